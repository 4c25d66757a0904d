"""Command-line flags generated from a config dataclass: one flag per field, its docstring as help.

Example::

    p = commands.add_parser("shift")
    flags = ConfigFlags(p, ShiftTrainConfig, aliases={"library_dir": "--library"})
    config = flags.build(p.parse_args())  # defaults < --config FILE < flags given

A field ``library_dir: Path = Path("x")`` becomes ``--library-dir PATH``; ``bool`` fields get
``--name/--no-name``; ``list[T]`` takes several values; ``T | None`` also takes ``none``; a nested config
dataclass becomes ``--field.sub-field``. ``--config FILE`` (TOML or JSON, keys as the field names, nested
configs as tables) sets any field; flags given on the line win. The config's own ``__post_init__`` checks run
when it is built, before any model loads, and a bad value is reported as a usage error naming the flag.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import textwrap
import tomllib
import types
import typing
from pathlib import Path

_PREFIX = "config__"


def field_docs(cls) -> dict[str, str]:
    """``{field: docstring}`` from the string literal under each field of ``cls`` and its bases."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body
        for node, following in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _unwrap_optional(hint) -> tuple[object, bool]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        if len(args) == 1:
            return args[0], optional
        lists = [a for a in args if typing.get_origin(a) is list]
        if lists:  # e.g. Path | list[Path]: take a list
            return lists[0], optional
        return str, optional
    return hint, False


def _scalar(kind, optional: bool, flag: str):
    """The argparse ``type`` for one value of ``kind``; ``none`` gives None for an optional field."""
    convert = {int: int, float: float, str: str, Path: Path}.get(kind)
    if convert is None:
        return None

    def parse(text: str):
        if optional and text.lower() == "none":
            return None
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}: {text!r} is not a{'n' if kind is int else ''} "
                                             f"{kind.__name__}") from None
    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def _shown(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) or "[]"
    return str(value)


class ConfigFlags:
    """The flags of one config dataclass on ``parser`` (see the module docstring)."""

    def __init__(self, parser: argparse.ArgumentParser, cls, aliases: dict[str, str | list[str]] | None = None,
                 skip: tuple[str, ...] = (), config_file: bool = True, default_config: Path | None = None):
        self.cls, self.parser, self.dests = cls, parser, {}
        self.file_only: list[str] = []
        """Fields no flag can express (a dict, a list of tables): ``--config FILE`` sets them."""
        parser.__dict__.setdefault("config_flags", []).append(self)  # how a test finds every generated flag
        aliases = aliases or {}
        if config_file:
            shown = f" (default: {default_config})" if default_config else ""
            parser.add_argument("--config", type=Path, default=default_config, metavar="FILE",
                                help=f"TOML or JSON file of settings (field names as keys){shown}; flags given win")
        self._add(cls, "", aliases, set(skip))

    def _add(self, cls, prefix: str, aliases, skip) -> None:
        hints, docs = typing.get_type_hints(cls), field_docs(cls)
        for field in dataclasses.fields(cls):
            path = prefix + field.name
            if not field.init or path in skip:
                continue
            hint, optional = _unwrap_optional(hints[field.name])
            if dataclasses.is_dataclass(hint):
                self._add(hint, path + ".", aliases, skip)
                continue
            flag = "--" + path.replace("_", "-")
            names = [flag] + ([aliases[path]] if isinstance(aliases.get(path), str) else aliases.get(path, []))
            default = (field.default if field.default is not dataclasses.MISSING
                       else field.default_factory() if field.default_factory is not dataclasses.MISSING
                       else dataclasses.MISSING)
            required = default is dataclasses.MISSING
            help_text = docs.get(field.name, "").replace("``", "").replace("%", "%%")
            help_text += " (required)" if required else f" (default: {_shown(default)})".replace("%", "%%")
            dest = _PREFIX + path.replace(".", "__")
            kwargs = dict(dest=dest, default=argparse.SUPPRESS, help=help_text.strip())
            if hint is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            elif typing.get_origin(hint) is typing.Literal:
                kwargs["choices"] = list(typing.get_args(hint))
            elif typing.get_origin(hint) in (list, tuple):
                element = (typing.get_args(hint) or (str,))[0]
                convert = _scalar(element, False, flag)
                if convert is None:
                    self.file_only.append(path)  # not expressible as flags: the config file sets it
                    continue
                kwargs.update(nargs="*", type=convert, metavar=element.__name__.upper())
            else:
                convert = _scalar(hint, optional, flag)
                if convert is None:
                    self.file_only.append(path)
                    continue
                kwargs.update(type=convert, metavar=hint.__name__.upper())
            self.parser.add_argument(*names, **kwargs)
            self.dests[dest] = (path, flag, required)

    def build(self, args: argparse.Namespace, **overrides):
        """The config from defaults, ``--config FILE`` and the flags given (then ``overrides``)."""
        values: dict = {}
        config_file = getattr(args, "config", None)
        if config_file is not None:
            try:
                values = read_config_file(config_file)
            except (FileNotFoundError, ValueError) as error:
                self.parser.error(f"--config {error}")
        flat = {}
        for dest, (path, _, _) in self.dests.items():
            if hasattr(args, dest):
                flat[path] = getattr(args, dest)
        flat.update(overrides)
        for path, value in flat.items():
            *parents, name = path.split(".")
            target = values
            for parent in parents:
                target = target.setdefault(parent, {})
            target[name] = value
        missing = [flag for dest, (path, flag, required) in self.dests.items()
                   if required and _lookup(values, path) is _ABSENT]
        if missing:
            self.parser.error(f"the following arguments are required: {', '.join(missing)}")
        try:
            return construct(self.cls, values, str(config_file) if config_file else "the flags")
        except (TypeError, ValueError) as error:
            self.parser.error(str(error))


_ABSENT = object()


def _lookup(values: dict, path: str):
    for part in path.split("."):
        if not isinstance(values, dict) or part not in values:
            return _ABSENT
        values = values[part]
    return values


def construct(cls, values: dict, source: str):
    """``cls(**values)`` with nested config dataclasses built from nested dicts; unknown keys are an error
    naming ``source`` and the fields there are."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{source}: unknown setting(s) {unknown} for {cls.__name__}; known: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        hint, _ = _unwrap_optional(hints[name])
        element = (typing.get_args(hint) or (None,))[0] if typing.get_origin(hint) is list else None
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = construct(hint, value, f"{source} [{name}]")
        elif dataclasses.is_dataclass(element) and isinstance(value, list):  # e.g. TOML [[adapters]] tables
            value = [construct(element, item, f"{source} [[{name}]] #{index + 1}") if isinstance(item, dict)
                     else item for index, item in enumerate(value)]
        elif hint is Path and isinstance(value, str):
            value = Path(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as error:  # a required field missing
        raise ValueError(f"{source}: {cls.__name__}: {error}") from None


def read_config_file(path: Path) -> dict:
    """A TOML (or ``.json``) file's settings; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    text = path.read_text()
    try:
        return json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {error}") from None



REQUIRED = Path()
"""``out=REQUIRED``: the command writes a file that ``--out`` must name (no default)."""


def add_config_command(commands, name: str, config_cls, run, help_text: str, aliases: dict | None = None,
                       out: Path | None = None, default_config: Path | None = None) -> argparse.ArgumentParser:
    """A subcommand whose flags are ``config_cls``'s: it calls ``run(config)``, or with ``out`` (the default
    result file, or ``REQUIRED``) ``run(config, out=PATH)`` and adds ``--out``; ``default_config``: the ``--config``
    file read when none is given. Returns the subparser (for extra flags)."""
    parser = commands.add_parser(name, help=help_text, description=help_text)
    flags = ConfigFlags(parser, config_cls, aliases=aliases, default_config=default_config)
    if out is REQUIRED:
        parser.add_argument("--out", type=Path, required=True, help="the file written")
    elif out is not None:
        parser.add_argument("--out", type=Path, default=out,
                            help="where the JSON result goes (the table is printed; default: %(default)s)")

    def handler(args) -> int:
        config = flags.build(args)
        result = run(config) if out is None else run(config, out=args.out)
        return result if isinstance(result, int) else 0

    parser.set_defaults(handler=handler)
    return parser
