"""Flags generated from config dataclasses: help from docstrings, --config files, errors that name the flag."""

from __future__ import annotations

import argparse
import dataclasses
import typing
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


def generated_commands(parser, prefix="dynalora"):
    """``{command: [ConfigFlags, ...]}`` of every subcommand with flags generated from config dataclasses."""
    found = {prefix: parser.config_flags} if hasattr(parser, "config_flags") else {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found.update(generated_commands(child, f"{prefix} {name}"))
    return found


def config_paths(cls, prefix=""):
    """Every field of a config dataclass, nested ones as ``outer.inner``."""
    hints = typing.get_type_hints(cls)
    for config_field in dataclasses.fields(cls):
        hint = hints[config_field.name]
        if dataclasses.is_dataclass(hint):
            yield from config_paths(hint, prefix + config_field.name + ".")
        elif config_field.init:
            yield prefix + config_field.name


def test_every_config_field_is_a_flag_with_its_docstring_as_help():
    """Every command generated from a config (recipes, evals, benches, data, generate/chat, demo): each field is a
    flag whose help is the field's docstring with its default, or (a dict, a list of tables) a --config setting."""
    from dynalora.cli import build_parser

    commands = generated_commands(build_parser())
    assert {"dynalora train library", "dynalora train shift", "dynalora eval shift", "dynalora data streams",
            "dynalora data absorb", "dynalora demo", "dynalora chat", "dynalora bench engine"} <= set(commands)
    assert {flags.cls.__name__ for flags in commands["dynalora chat"]} == {"EngineSpec", "SamplingConfig"}
    for command, flags in ((command, flags) for command, all_flags in commands.items() for flags in all_flags):
        flagged = {path for path, _, _ in flags.dests.values()}
        for path in config_paths(flags.cls):
            assert path in flagged or path in flags.file_only, (command, path)
        for dest, (path, flag, _) in flags.dests.items():
            action = next(a for a in flags.parser._actions if a.dest == dest)
            assert action.help and not action.help.startswith("(default"), (command, flag, "has no docstring")
    help_text = " ".join(commands["dynalora train trigger-lora"][0].parser.format_help().split())
    assert "Rank of the trigger LoRA. (default: 4)" in help_text


@pytest.mark.parametrize("command", [["eval", "shift", "--data", "streams.jsonl"], ["eval", "tasks"],
                                     ["eval", "escalate"], ["eval", "mix", "--facts", "f.jsonl"],
                                     ["eval", "absorb", "--data", "d.jsonl"], ["bench", "engine"], ["bench", "switch"],
                                     ["bench", "layer"], ["bench", "absorb"], ["bench", "xlora"]])
def test_evals_and_benches_refuse_a_bad_device_or_dtype_before_anything_loads(command, capsys):
    from dynalora.cli import main

    for flag, value, message in (("--device", "tpu", "use cpu, cuda, cuda:N or auto"),
                                 ("--dtype", "int8", "choose one of ['float32', 'bfloat16', 'float16']")):
        with pytest.raises(SystemExit):
            main([*command, flag, value])
        assert message in capsys.readouterr().err, (command, flag)
