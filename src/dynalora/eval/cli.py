"""``dynalora eval ...``"""

from __future__ import annotations

from pathlib import Path


def cmd_shift(args) -> int:
    from dynalora.eval.shift import ShiftEvalConfig, eval_shift

    eval_shift(ShiftEvalConfig(data=args.data, library_dir=args.library, shift_dir=args.shift,
                               triggers_dir=args.triggers, model=args.model, max_streams=args.max_streams,
                               update_delay=args.update_delay, use_factors=args.with_factors,
                               methods=args.methods),
               out=args.out)
    return 0


def add_eval_commands(commands) -> None:
    from dynalora.eval.shift import METHODS

    evaluate = commands.add_parser("eval", help="quality evaluations against baselines (JSON + table)")
    sub = evaluate.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    p = sub.add_parser("shift", help="per-segment NLL through mixed-domain streams: dynalora vs merges, router, oracle")
    p.add_argument("--data", type=Path, nargs="+", required=True,
                   help="streams JSONL file(s) (make them with `dynalora data streams`)")
    p.add_argument("--out", type=Path, default=Path("results/eval_shift.json"))
    p.add_argument("--library", type=Path, default=Path("checkpoints/library"))
    p.add_argument("--shift", type=Path, default=Path("checkpoints/shift"))
    p.add_argument("--triggers", type=Path, default=Path("checkpoints/triggers"))
    p.add_argument("--model", default=None)
    p.add_argument("--max-streams", type=int, default=None)
    p.add_argument("--update-delay", type=int, default=12, help="tokens between a trigger and its update")
    p.add_argument("--methods", nargs="+", default=list(METHODS), help=f"methods to run (default: all {list(METHODS)})")
    p.add_argument("--with-factors", action="store_true", help="also apply the shift network's generated factors")
    p.set_defaults(handler=cmd_shift)
