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


def cmd_shift(args) -> int:
    from dynalora.train.shift import ShiftTrainConfig, train_shift

    result = train_shift(ShiftTrainConfig(library_dir=args.library, out_dir=args.out_dir, steps=args.steps,
                                          examples_per_domain=args.examples_per_domain))
    final = result["final"]
    print(f"shift network: {result['parameters']} parameters, {result['train_seconds']:.0f}s; last 20 steps: "
          f"continuation NLL {final['lm']:.3f}, blend accuracy {final['acc']:.2f}, mean gate {final['gate']:.2f}")
    return 0


def cmd_triggers(args) -> int:
    from dynalora.train.triggers import TriggerTrainConfig, train_triggers

    result = train_triggers(TriggerTrainConfig(library_dir=args.library, out_dir=args.out_dir,
                                               train_streams=args.streams))
    v = result["validation"]
    print(f"<|shift|> row trained in {result['seconds']:.0f}s; threshold {result['threshold']}: validation recall "
          f"{v['boundary_recall']:.2f}, precision {v['precision']:.2f}, false/1k tokens {v['false_per_1k_tokens']:.2f}")
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

    p = sub.add_parser("shift", help="train the shift hypernetwork on the trained library")
    p.add_argument("--library", type=Path, default=Path("checkpoints/library"))
    p.add_argument("--out-dir", type=Path, default=Path("checkpoints/shift"))
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--examples-per-domain", type=int, default=160)
    p.set_defaults(handler=cmd_shift)

    p = sub.add_parser("triggers", help="train the <|shift|> token (its embedding row only) on mixed-domain streams")
    p.add_argument("--library", type=Path, default=Path("checkpoints/library"))
    p.add_argument("--out-dir", type=Path, default=Path("checkpoints/triggers"))
    p.add_argument("--streams", type=int, default=48, help="training streams")
    p.set_defaults(handler=cmd_triggers)
