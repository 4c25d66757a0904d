"""Plots are an extra: without matplotlib, what draws them goes on and says what was not drawn."""

from __future__ import annotations

import logging
import sys

from dynalora.plot import plot_blend_timeline, plot_losses


def test_without_matplotlib_plots_are_skipped_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with caplog.at_level(logging.WARNING, logger="dynalora.plot"):
        assert plot_blend_timeline([[1.0, 0.0]] * 4, ["a", "b"], [0], ["a"], [1], tmp_path / "t.png") is None
        plot_losses([1.0, 0.5], tmp_path / "loss.png", "loss")
    assert not list(tmp_path.iterdir())
    assert "t.png not drawn" in caplog.text and "loss.png not drawn" in caplog.text
