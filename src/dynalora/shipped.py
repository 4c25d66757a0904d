"""Where the shipped checkpoints and configs live (inside the installed package), and where recipes write.

Defaults never depend on the working directory: a checkpoint a command reads defaults to the one shipped
with the package (``shipped("shift")``), and one a recipe writes defaults to the user's cache
(``trained("shift")`` = ``$DYNALORA_HOME/checkpoints/shift``); pass a folder to use another.
"""

from __future__ import annotations

from pathlib import Path

from dynalora.models import dynalora_home

PACKAGE_DIR = Path(__file__).resolve().parent
SHIPPED_DIR = PACKAGE_DIR / "checkpoints"
CONFIGS_DIR = PACKAGE_DIR / "configs"


def shipped(name: str = "") -> Path:
    """A shipped checkpoint folder, e.g. ``shipped("library")``; ``shipped()`` is the folder of them all."""
    return SHIPPED_DIR / name if name else SHIPPED_DIR


def trained(name: str) -> Path:
    """Where a recipe writes by default: ``$DYNALORA_HOME/checkpoints/<name>`` (not the shipped copy)."""
    return dynalora_home() / "checkpoints" / name


def shipped_config(name: str) -> Path:
    """A config file shipped with the package, e.g. ``shipped_config("library.toml")``."""
    return CONFIGS_DIR / name
