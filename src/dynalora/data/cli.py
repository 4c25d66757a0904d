"""``dynalora data fetch|list|streams|absorb``: warm the data cache, show what is there, write data files."""

from __future__ import annotations

import argparse
import sys
import time

from dynalora.data.bigbench import METRICS, list_tasks, task_index
from dynalora.data.documents import DOMAINS, LIBRARY_DOMAINS, load_domain
from dynalora.data.sources import SOURCES
from dynalora.data.splits import SPLITS, split_sizes


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

    streams = commands.add_parser("streams", help="write mixed-domain streams (JSONL) for `dynalora eval shift`")
    streams.add_argument("--out", required=True, help="output JSONL file")
    streams.add_argument("--split", default="test", help="document split to cut segments from (default: test)")
    streams.add_argument("--streams", type=int, default=16)
    streams.add_argument("--segments", type=int, default=3)
    streams.add_argument("--segment-chars", type=int, default=700)
    streams.add_argument("--unseen", action="store_true", help="mix in domains no library adapter was trained on")
    streams.add_argument("--seed", type=int, default=0)
    streams.set_defaults(handler=cmd_streams)

    absorb = commands.add_parser("absorb", help="write documents with questions (JSONL) for the memory LoRA")
    absorb.add_argument("--kind", choices=("facts", "needle", "reading", "all", "locality"), default="facts",
                        help="invented facts, a pass key in filler, BIG-Bench reading passages, all three, or "
                             "locality (one entity, two facts: unrelated questions / the simplest documents)")
    absorb.add_argument("--split", choices=SPLITS, default="train",
                        help="seed range (facts, needle) or passage split (reading); splits never share seeds")
    absorb.add_argument("--count", type=int, default=100, help="documents per kind (default: 100)")
    absorb.add_argument("--words", type=int, default=300,
                        help="approximate words per facts or needle document (default: 300)")
    absorb.add_argument("--seed-offset", type=int, default=0,
                        help="first seed inside the split's range (reading: first passage of the split)")
    absorb.add_argument("--out", required=True, help="output JSONL file")
    absorb.set_defaults(handler=cmd_absorb)


def cmd_streams(args) -> int:
    from dynalora.data.streams import (
        StreamConfig,
        build_streams,
        unseen_stream_config,
        write_streams,
    )

    config = unseen_stream_config(args.split, args.streams, args.seed) if args.unseen else \
        StreamConfig(split=args.split, streams=args.streams, seed=args.seed)
    config.segments, config.segment_chars = args.segments, args.segment_chars
    path = write_streams(build_streams(config), args.out)
    print(f"wrote {args.streams} streams of {args.segments} segments ({args.split} split) to {path}")
    return 0


def cmd_absorb(args) -> int:
    from dynalora.data import absorb

    config = absorb.AbsorbDataConfig(kind=args.kind, split=args.split, count=args.count,
                                     seed_offset=args.seed_offset, words=args.words)
    documents = absorb.build_absorb_docs(config)
    path = absorb.write_absorb_docs(documents, args.out)
    summary = absorb.summarize_absorb_docs(documents)
    print(format_table(["kind", "documents", "questions", "mean words"],
                       [[kind, entry["documents"], entry["questions"], round(entry["mean_words"], 1)]
                        for kind, entry in summary.items()]))
    print(f"wrote {len(documents)} {args.split} documents to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m dynalora.data.cli fetch``) for when the main CLI is unavailable."""
    parser = argparse.ArgumentParser(prog="dynalora")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", *(sys.argv[1:] if argv is None else argv)])
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
