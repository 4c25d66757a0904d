"""Flags generated from config dataclasses: help from docstrings, --config files, errors that name the flag."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from dynalora.cli_config import ConfigFlags, field_docs


@dataclass
class Inner:
    steps: int = 8
    """Writer steps per chunk."""
    lr: float = 0.02


@dataclass
class Example:
    data: Path | list[Path]
    """Documents JSONL."""
    out_dir: Path = Path("out")
    """Where the 100% of it goes."""
    model: str | None = None
    rank: int = 4
    layers: list[int] = field(default_factory=lambda: [1, 2])
    shuffle: bool = True
    mode: Literal["fast", "exact"] = "fast"
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"Example.rank must be ≥ 1, got {self.rank}")


def parser_for(**kwargs):
    parser = argparse.ArgumentParser(prog="t", exit_on_error=False)
    return parser, ConfigFlags(parser, Example, **kwargs)


def test_defaults_flags_and_nested_fields_build_the_config():
    parser, flags = parser_for(aliases={"out_dir": "--out"})
    config = flags.build(parser.parse_args(["--data", "a.jsonl", "b.jsonl", "--out", "x", "--no-shuffle",
                                            "--layers", "3", "--inner.steps", "2", "--model", "none"]))
    assert config == Example(data=[Path("a.jsonl"), Path("b.jsonl")], out_dir=Path("x"), shuffle=False, layers=[3],
                             inner=Inner(steps=2))
    assert flags.build(parser.parse_args(["--data", "a"])) == Example(data=[Path("a")])


def test_help_shows_each_fields_docstring_and_default():
    parser, _ = parser_for()
    text = parser.format_help()
    assert "Documents JSONL. (required)" in text
    assert "Where the 100% of it goes. (default: out)" in text
    assert "Writer steps per chunk. (default: 8)" in text and "--inner.steps" in text
    assert "{fast,exact}" in text
    assert field_docs(Example)["data"] == "Documents JSONL."


def test_a_config_file_sets_fields_and_flags_given_win(tmp_path):
    file = tmp_path / "run.toml"
    file.write_text('data = ["d.jsonl"]\nrank = 7\nout_dir = "o"\n[inner]\nlr = 0.5\n')
    parser, flags = parser_for()
    config = flags.build(parser.parse_args(["--config", str(file), "--rank", "9"]))
    assert config == Example(data=["d.jsonl"], rank=9, out_dir=Path("o"), inner=Inner(lr=0.5))


def test_bad_values_are_usage_errors_that_name_the_flag_or_the_file(tmp_path, capsys):
    parser, flags = parser_for()
    with pytest.raises(SystemExit):
        flags.build(parser.parse_args(["--data", "a", "--rank", "0"]))
    assert "Example.rank must be ≥ 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        flags.build(parser.parse_args([]))
    assert "required: --data" in capsys.readouterr().err
    with pytest.raises(argparse.ArgumentError, match="--rank: 'x' is not an int"):
        parser.parse_args(["--data", "a", "--rank", "x"])
    with pytest.raises(argparse.ArgumentError, match="invalid choice"):
        parser.parse_args(["--data", "a", "--mode", "slow"])
    file = tmp_path / "bad.toml"
    file.write_text('data = "d"\nrnak = 3\n')
    with pytest.raises(SystemExit):
        flags.build(parser.parse_args(["--config", str(file)]))
    assert f"{file}: unknown setting(s) ['rnak']" in capsys.readouterr().err


def test_every_recipe_field_is_a_flag_with_its_help():
    """The train commands are generated from their configs: every field has a flag (nothing hand-kept)."""
    import dataclasses

    from dynalora.cli import build_parser
    from dynalora.train.shift import ShiftTrainConfig
    from dynalora.train.trigger_lora import TriggerLoraTrainConfig

    commands = build_parser()._subparsers._group_actions[0].choices
    recipes = commands["train"]._subparsers._group_actions[0].choices
    for name, cls in (("shift", ShiftTrainConfig), ("trigger-lora", TriggerLoraTrainConfig)):
        text = recipes[name].format_help()
        for config_field in dataclasses.fields(cls):
            assert "--" + config_field.name.replace("_", "-") in text, (name, config_field.name)
    assert "Rank of the trigger LoRA. (default: 4)" in " ".join(recipes["trigger-lora"].format_help().split())
