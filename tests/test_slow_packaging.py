"""The package as a user gets it: a wheel that carries the shipped checkpoints, run outside the checkout (slow)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_carries_the_checkpoints_and_python_m_dynalora_demo_runs_outside_the_checkout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "wheel")], check=True, capture_output=True)
    wheel = next((tmp_path / "wheel").glob("dynalora-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("dynalora/__main__.py", "dynalora/configs/library.toml",
                   "dynalora/checkpoints/shift/shift_net.safetensors", "dynalora/checkpoints/library/library.json",
                   "dynalora/checkpoints/triggers/trigger_tokens.safetensors", "dynalora/serve/page.html",
                   "dynalora/checkpoints/router/router.safetensors"):
        assert needed in names, needed
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"  # no checkpoints/ or configs/ here: defaults must not need the checkout
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    where = subprocess.run([sys.executable, "-c", "import dynalora.shipped as s; print(s.SHIPPED_DIR)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout
    assert where.strip() == str(tmp_path / "site" / "dynalora" / "checkpoints")  # the installed copy, not ours
    demo = subprocess.run([sys.executable, "-m", "dynalora", "demo", "--no-absorb", "--plot", str(tmp_path / "t.png")],
                          cwd=elsewhere, env={**env, "NO_COLOR": "1"}, capture_output=True, text=True, timeout=900)
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert "<|shift|> fired" in demo.stdout and "\033[" not in demo.stdout  # piped: no ANSI codes
    assert (tmp_path / "t.png").is_file() and not list(elsewhere.iterdir())  # wrote nothing into the cwd
