"""``dynalora data fetch|list|streams|absorb``: warm the data cache, show what is there, write data files."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dynalora.data.bigbench import METRICS, list_tasks, task_index
from dynalora.data.documents import DOMAINS, LIBRARY_DOMAINS, load_domain
from dynalora.data.sources import SOURCES
from dynalora.data.splits import SPLITS, split_sizes
from dynalora.cli_config import REQUIRED, add_config_command


def format_table(header: list[str], rows: list[list]) -> str:
    """Plain text table, numbers right-aligned."""
    cells = [header] + [[f"{value:,}" if isinstance(value, int) else str(value) for value in row] for row in rows]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    numeric = [all(isinstance(row[column], (int, float)) for row in rows) for column in range(len(header))]
    lines = ["  ".join(cell.rjust(width) if is_number else cell.ljust(width)
                       for cell, width, is_number in zip(row, widths, numeric)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def cmd_fetch(args) -> int:
    domains = DOMAINS if args.domains is None else args.domains
    rows = []
    for name in domains:
        started = time.perf_counter()
        documents = load_domain(name, progress=not args.quiet)
        seconds = time.perf_counter() - started
        sizes = split_sizes(documents)
        rows.append([name, "library" if name in LIBRARY_DOMAINS else "unseen", len(documents),
                     *(f"{sizes[split][0]:,} / {sizes[split][1]:,}" for split in SPLITS), f"{seconds:.1f}"])
    if rows:
        print(format_table(["domain", "role", "documents", *(f"{split} docs / chars" for split in SPLITS), "seconds"],
                           rows))
    if args.bigbench:
        started = time.perf_counter()
        index = task_index(progress=not args.quiet)
        loadable = [entry for entry in index.values() if entry["examples"] > 0]
        by_metric = {metric: sum(entry["metric"] == metric for entry in loadable) for metric in METRICS}
        print(f"\nBIG-Bench: {len(loadable)} loadable tasks ({', '.join(f'{n} {m}' for m, n in by_metric.items())}), "
              f"{sum(entry['examples'] for entry in loadable):,} examples, {time.perf_counter() - started:.1f} s")
    return 0


def cmd_list(args) -> int:
    if not args.tasks:
        rows = [[name, "library" if name in LIBRARY_DOMAINS else ("unseen" if name in DOMAINS else "tasks"),
                 f"{source.package}=={source.version}", source.licence, source.url] for name, source in SOURCES.items()]
        print(format_table(["name", "role", "source", "licence", "url"], rows))
        return 0
    index = task_index(progress=True)
    rows = []
    for name in list_tasks():
        entry = index[name]
        if args.metric and entry["metric"] != args.metric or entry["examples"] < args.min_examples:
            continue
        if args.max_input_chars and entry["mean_input_chars"] > args.max_input_chars:
            continue
        rows.append([name, entry["examples"], entry["metric"], entry["mean_input_chars"], entry["mean_target_chars"]])
    print(format_table(["task", "examples", "metric", "mean input chars", "mean target chars"], rows))
    print(f"{len(rows)} tasks")
    return 0


def add_data_commands(subparsers) -> None:
    """Register ``data fetch``, ``list``, ``streams`` and ``absorb`` on the main CLI's subparsers."""
    data = subparsers.add_parser("data", help="fetch and list domains and BIG-Bench tasks; write streams, absorb data")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    fetch = commands.add_parser("fetch", help="download sources once, build and cache the domains, print split sizes")
    fetch.add_argument("--domains", nargs="*", choices=DOMAINS, default=None, metavar="DOMAIN",
                       help=f"domains to build (default: all of {', '.join(DOMAINS)}; give none for none)")
    fetch.add_argument("--bigbench", action="store_true",
                       help="also fetch the bigbench sdist (358 MB) and index its task.json files")
    fetch.add_argument("--quiet", action="store_true", help="no progress bars")
    fetch.set_defaults(handler=cmd_fetch)

    listing = commands.add_parser("list", help="domains with their sources and licences, or BIG-Bench tasks")
    listing.add_argument("--tasks", action="store_true", help="list BIG-Bench tasks (fetches them on first use)")
    listing.add_argument("--metric", choices=METRICS, default=None, help="with --tasks: only tasks with this metric")
    listing.add_argument("--min-examples", type=int, default=0, help="with --tasks: only tasks with this many examples")
    listing.add_argument("--max-input-chars", type=float, default=None,
                         help="with --tasks: only tasks whose mean input is at most this long (characters)")
    listing.set_defaults(handler=cmd_list)

    from dynalora.data.absorb import AbsorbDataConfig
    from dynalora.data.streams import StreamConfig

    add_config_command(commands, "streams", StreamConfig, cmd_streams,
                       "write mixed-domain streams (JSONL) for `dynalora eval shift`", out=REQUIRED)
    add_config_command(commands, "absorb", AbsorbDataConfig, cmd_absorb,
                       "write documents with questions (JSONL) for the memory LoRA", out=REQUIRED)


def cmd_streams(config, out: Path) -> int:
    from dynalora.data.streams import build_streams, write_streams

    path = write_streams(build_streams(config), out)
    print(f"wrote {config.streams} streams of {config.segments} segments ({config.split} split) to {path}")
    return 0


def cmd_absorb(config, out: Path) -> int:
    from dynalora.data import absorb

    documents = absorb.build_absorb_docs(config)
    path = absorb.write_absorb_docs(documents, out)
    summary = absorb.summarize_absorb_docs(documents)
    print(format_table(["kind", "documents", "questions", "mean words"],
                       [[kind, entry["documents"], entry["questions"], round(entry["mean_words"], 1)]
                        for kind, entry in summary.items()]))
    print(f"wrote {len(documents)} {config.split} documents to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m dynalora.data.cli fetch``) for when the main CLI is unavailable."""
    parser = argparse.ArgumentParser(prog="dynalora")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", *(sys.argv[1:] if argv is None else argv)])
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
