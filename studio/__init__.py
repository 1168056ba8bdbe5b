"""PEFT Studio engine: models, data, PEFT methods, training, checkpoints, chat. Never imports gradio."""

__version__ = "0.1.0"
