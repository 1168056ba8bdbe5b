"""Gradio UI parts of PEFT Studio: one `create_*()` per tab, each calling studio/ functions only."""
from .calculator import create_calculator
from .chat import create_chat
from .export import create_export
from .runs import create_runs
from .style import CSS, HEADER, theme
from .train import create_train

__all__ = ["create_train", "create_runs", "create_chat", "create_calculator", "create_export", "CSS", "HEADER",
           "theme"]
