"""Reference implementations the benchmark compares our engine with. Outside studio/ on purpose:
the engine never imports them, and they need packages (peft) that the studio does not depend on."""
