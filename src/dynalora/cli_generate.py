"""``dynalora generate`` and ``dynalora chat``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dynalora.cli_config import ConfigFlags
from dynalora.console import styles

DIM, BOLD, RESET = styles()  # empty when piped or NO_COLOR is set


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The engine's flags (generated from :class:`EngineSpec` and :class:`SamplingConfig`) and the run's."""
    from dynalora.runtime import SamplingConfig
    from dynalora.system.spec import FLAG_ALIASES, EngineSpec

    spec = ConfigFlags(p, EngineSpec, aliases=FLAG_ALIASES)
    sampling = ConfigFlags(p, SamplingConfig, config_file=False)
    p.add_argument("--state", type=Path, default=None, help="start from this saved LoRA state")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens at most (default: %(default)s)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.set_defaults(engine_flags=spec, sampling_flags=sampling)


def engine_from_args(args):
    from dynalora.system.assemble import build_engine

    engine = build_engine(args.engine_flags.build(args))
    if args.state:
        engine.dyn.state.load(args.state)
    return engine


def generation_kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_tokens, stop_strings=tuple(args.stop),
                sampling=args.sampling_flags.build(args))


def describe_event(event, labels: list[str]) -> str:
    blend = ""
    if event.new_blend is not None and event.new_blend != event.old_blend:
        top = sorted(zip(labels, event.new_blend), key=lambda x: -abs(x[1]))[:3]
        blend = " → " + ", ".join(f"{label}={w:.2f}" for label, w in top)
    level = "" if event.level is None else f" L{event.level}"
    return f"[{event.kind}{level} @{event.position} {event.reason}{blend} {event.seconds * 1e3:.1f}ms {event.detail}]"


def print_stream(events, labels, show_events: bool, out=sys.stdout) -> int:
    """Print tokens as they come, LoRA events dim and inline; returns the number of tokens."""
    from dynalora.runtime import LoraEvent, TokenEvent

    tokens = 0
    for event in events:
        if isinstance(event, TokenEvent):
            out.write(event.text)
            tokens += 1
        elif isinstance(event, LoraEvent) and show_events:
            out.write(f"{DIM}{describe_event(event, labels)}{RESET}")
        out.flush()
    return tokens


def cmd_generate(args) -> int:
    if args.file:
        prompt = Path(args.file).read_text()
    elif args.prompt:
        prompt = args.prompt
    else:
        raise ValueError("give a prompt or --file")
    engine = engine_from_args(args)
    started = time.perf_counter()
    events = engine.stream([prompt], chat=args.chat, **generation_kwargs(args))
    try:
        tokens = print_stream(events, engine.dyn.state.labels, args.show_events)
    except KeyboardInterrupt:
        tokens = 0
        print("\n[interrupted]", file=sys.stderr)
    seconds = time.perf_counter() - started
    print(f"\n{DIM}[{tokens} tokens in {seconds:.1f}s, {tokens / max(seconds, 1e-9):.1f} tok/s]{RESET}",
          file=sys.stderr)
    return 0


def blend_bars(labels: list[str], weights: list[float], width: int = 30) -> str:
    """The blend as a terminal bar chart."""
    if not labels:
        return "(the bank is empty)"
    top = max(max(abs(w) for w in weights), 1e-9)
    lines = []
    for label, weight in zip(labels, weights):
        bar = "█" * round(width * abs(weight) / top)
        lines.append(f"{label:>20} {weight:+.3f} {bar}")
    return "\n".join(lines)


CHAT_HELP = "/reset  /state  /save DIR  /load DIR  /quit   (Ctrl-C stops a generation)"


def cmd_chat(args) -> int:
    from dynalora.runtime.session import ChatSession

    engine = engine_from_args(args)
    session = ChatSession(engine, system=args.system)
    labels = engine.dyn.state.labels
    hyper = type(engine.hypernetwork).__name__
    print(f"{DIM}dynalora chat — {len(labels)} adapters, hypernetwork {hyper}. {CHAT_HELP}{RESET}")
    while True:
        try:
            line = input(f"{BOLD}you>{RESET} ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        command, _, rest = line.partition(" ")
        try:
            if command == "/quit":
                return 0
            if command == "/reset":
                session.reset()
                print(f"{DIM}[state and transcript reset]{RESET}")
            elif command == "/state":
                print(blend_bars(labels, engine.dyn.state.blend_weights[0].tolist()))
            elif command == "/save":
                print(f"{DIM}[saved to {session.save(rest or 'session')}]{RESET}")
            elif command == "/load":
                session.load(rest or "session")
                print(f"{DIM}[loaded {len(session.messages)} messages]{RESET}")
            elif command.startswith("/"):
                print(CHAT_HELP)
            else:
                print(f"{BOLD}bot>{RESET} ", end="")
                started = time.perf_counter()
                try:
                    tokens = print_stream(session.ask(line, **generation_kwargs(args)), labels, True)
                except KeyboardInterrupt:
                    tokens = 0
                    print(f"\n{DIM}[generation stopped]{RESET}", end="")
                seconds = time.perf_counter() - started
                print(f"\n{DIM}[{tokens} tokens, {seconds:.1f}s]{RESET}")
        except (ValueError, FileNotFoundError) as error:
            print(f"error: {error}")


def add_generate_commands(commands) -> None:
    p = commands.add_parser("generate", help="generate text; the model may change its LoRA as it goes")
    p.add_argument("prompt", nargs="?", default=None)
    p.add_argument("--file", default=None, help="read the prompt from a file")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--show-events", action="store_true", help="print LoRA events inline (dim)")
    add_engine_arguments(p)
    p.set_defaults(handler=cmd_generate)

    p = commands.add_parser("chat", help="interactive chat with streaming and LoRA events")
    p.add_argument("--system", default=None, help="system prompt")
    add_engine_arguments(p)
    p.set_defaults(handler=cmd_chat)
