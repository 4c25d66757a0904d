"""The ``dynalora`` command: a thin layer over the library. Each subcommand parses, calls, prints."""

from __future__ import annotations

import argparse
import logging
import sys

from dynalora.cli_adapters import add_adapter_commands, add_info_command
from dynalora.cli_generate import add_generate_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynalora", description="Let a causal LM rewrite its own LoRA while it runs.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_adapter_commands(commands)
    add_info_command(commands)
    add_generate_commands(commands)
    from dynalora.train.cli import add_train_commands

    add_train_commands(commands)
    from dynalora.eval.cli import add_eval_commands

    add_eval_commands(commands)
    from dynalora.cli_demo import add_demo_commands

    add_demo_commands(commands)
    from dynalora.bench.cli import add_bench_commands

    add_bench_commands(commands)
    from dynalora.cli_serve import add_handoff_command, add_serve_command

    add_serve_command(commands)
    add_handoff_command(commands)
    try:
        from dynalora.data.cli import add_data_commands
    except ImportError:  # the data package is optional while it is being built
        pass
    else:
        add_data_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the library logs; the command shows it
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars on every command are noise
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as error:
        # Library errors carry messages that name the file, field or shape at fault.
        print(f"dynalora {args.command}: error: {error}", file=sys.stderr)
        return 2
    finally:
        end_distributed()


def end_distributed() -> None:
    """Close the process group a recipe under ``accelerate launch`` opened, before the interpreter exits: left to
    the exit, gloo's threads were sometimes torn down joinable ("terminate called without an active exception",
    the process killed by SIGABRT after its work was done)."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
