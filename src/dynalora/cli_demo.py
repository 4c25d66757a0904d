"""``dynalora demo`` (shift, then absorb) and ``dynalora plot``."""

from __future__ import annotations

from pathlib import Path

from dynalora.models import dynalora_home
from dynalora.shipped import shipped


def cmd_demo(args) -> int:
    from dynalora.demo import DemoConfig, run_demo

    run_demo(DemoConfig(checkpoints=args.checkpoints, model=args.model, plot=args.plot))
    if not args.no_absorb:
        from dynalora.demo_absorb import run_absorb_demo

        run_absorb_demo(args.checkpoints / "absorb", args.model, writer=args.absorber, steps=args.absorb_steps,
                        step_sizes=args.absorb_step_sizes)
    return 0


def cmd_plot(args) -> int:
    from dynalora.data.streams import read_streams, tokenize_stream
    from dynalora.plot import plot_blend_timeline
    from dynalora.system.shift import load_shift_system

    streams = read_streams(args.data)
    if not 0 <= args.index < len(streams):
        raise ValueError(f"--index {args.index}: {args.data} holds streams 0..{len(streams) - 1}")
    system = load_shift_system(*(args.checkpoints / n for n in ("library", "shift", "triggers")), args.model)
    tokens, starts, domains = tokenize_stream(system.base.tokenizer, streams[args.index])
    scored = system.run_stream(tokens)
    print(f"{len(scored.fired)} shifts over {len(tokens)} tokens; wrote "
          f"{plot_blend_timeline(scored.blends, system.bank.labels, starts, domains, scored.fired, args.out)}")
    return 0


def add_demo_commands(commands) -> None:
    p = commands.add_parser("demo", help="the shipped shift system on a stream that changes domain, then live")
    p.add_argument("--checkpoints", type=Path, default=shipped())
    p.add_argument("--model", default=None)
    p.add_argument("--plot", type=Path, default=dynalora_home() / "demo_timeline.png",
                   help="PNG blend timeline (default: %(default)s)")
    p.add_argument("--no-absorb", action="store_true", help="skip the absorb part (a document read into memory)")
    from dynalora.runtime.memory_writers import WRITERS, DistillConfig

    p.add_argument("--absorber", default="distill", choices=WRITERS,
                   help="how the absorb part writes the memory LoRA (default: %(default)s)")
    p.add_argument("--absorb-steps", type=int, default=DistillConfig.steps,
                   help="distillation steps per chunk (distill writers; default: %(default)s)")
    p.add_argument("--absorb-step-sizes", type=Path, default=None,
                   help="meta-learned step sizes for the distill writers (e.g. CHECKPOINTS/absorb_steps)")
    p.set_defaults(handler=cmd_demo)

    p = commands.add_parser("plot", help="PNG timeline of the blend weights over one stream's tokens")
    p.add_argument("--data", type=Path, required=True, help="streams JSONL (`dynalora data streams`)")
    p.add_argument("--index", type=int, default=0, help="which stream of the file")
    p.add_argument("--out", type=Path, default=Path("results/blend_timeline.png"))
    p.add_argument("--checkpoints", type=Path, default=shipped())
    p.add_argument("--model", default=None)
    p.set_defaults(handler=cmd_plot)
