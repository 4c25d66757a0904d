"""Terminal styling that switches itself off when output is piped or ``NO_COLOR`` is set (no-color.org)."""

from __future__ import annotations

import os
import sys


def use_color(stream=None) -> bool:
    stream = stream or sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("NO_COLOR")


def styles(stream=None) -> tuple[str, str, str]:
    """``(DIM, BOLD, RESET)`` ANSI codes, or three empty strings when colour is off."""
    return ("\033[2m", "\033[1m", "\033[0m") if use_color(stream) else ("", "", "")
