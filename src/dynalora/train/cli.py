"""``dynalora train ...``"""

from __future__ import annotations

from pathlib import Path


def cmd_library(args) -> int:
    from dynalora.train.library import LibraryConfig, train_library

    config = LibraryConfig.from_toml(args.config)
    if args.out_dir:
        config.out_dir = args.out_dir
    if args.steps:
        config.steps = args.steps
    if args.only:
        unknown = sorted(set(args.only) - {a.label for a in config.adapters})
        if unknown:
            raise ValueError(f"--only: no adapters labelled {unknown} in {args.config}")
        config.adapters = [a for a in config.adapters if a.label in args.only]
    train_library(config)
    return 0


def add_train_commands(commands) -> None:
    train = commands.add_parser("train", help="training recipes (resumable, with progress bars and loss plots)")
    sub = train.add_subparsers(dest="train_command", required=True, metavar="RECIPE")
    p = sub.add_parser("library", help="train the labelled LoRA library (one PEFT adapter per entry)")
    p.add_argument("--config", type=Path, default=Path("configs/library.toml"), help="TOML config")
    p.add_argument("--out-dir", type=Path, default=None, help="override the config's out_dir")
    p.add_argument("--steps", type=int, default=None, help="override the config's steps")
    p.add_argument("--only", nargs="+", default=None, help="train only these labels")
    p.set_defaults(handler=cmd_library)
