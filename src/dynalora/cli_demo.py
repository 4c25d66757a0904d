"""``dynalora demo`` (shift, then absorb) and ``dynalora plot``."""

from __future__ import annotations

from pathlib import Path

from dynalora.cli_config import add_config_command
from dynalora.demo import DemoConfig
from dynalora.shipped import shipped


def cmd_demo(config) -> int:
    from dynalora.demo import run_demo

    run_demo(config)
    if config.absorb:
        from dynalora.demo_absorb import run_absorb_demo

        run_absorb_demo(config.checkpoints / "absorb", config.model, writer=config.absorber,
                        steps=config.absorb_steps, step_sizes=config.absorb_step_sizes, device=config.device,
                        dtype=config.dtype)
    return 0


def cmd_plot(args) -> int:
    from dynalora.data.streams import read_streams, tokenize_stream
    from dynalora.plot import plot_blend_timeline
    from dynalora.system.assemble import load_shift_system

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
    add_config_command(commands, "demo", DemoConfig, cmd_demo,
                       "the shipped shift system on a stream that changes domain, then live; then absorb")

    p = commands.add_parser("plot", help="PNG timeline of the blend weights over one stream's tokens")
    p.add_argument("--data", type=Path, required=True, help="streams JSONL (`dynalora data streams`)")
    p.add_argument("--index", type=int, default=0, help="which stream of the file")
    p.add_argument("--out", type=Path, default=Path("results/blend_timeline.png"))
    p.add_argument("--checkpoints", type=Path, default=shipped())
    p.add_argument("--model", default=None)
    p.set_defaults(handler=cmd_plot)
