"""``dynalora eval ...``"""

from __future__ import annotations

from pathlib import Path

from dynalora.cli_config import add_config_command


def add_eval_commands(commands) -> None:
    from dynalora.eval.absorb import AbsorbEvalConfig, eval_absorb
    from dynalora.eval.escalate import EscalateEvalConfig, eval_escalate
    from dynalora.eval.mix import MixEvalConfig, eval_mix
    from dynalora.eval.shift import ShiftEvalConfig, eval_shift
    from dynalora.eval.tasks import TaskEvalConfig, eval_tasks

    evaluate = commands.add_parser("eval", help="quality evaluations against baselines (JSON + table)")
    sub = evaluate.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    checkpoints = {"library_dir": "--library", "shift_dir": "--shift", "triggers_dir": "--triggers"}
    evaluations = [
        ("shift", ShiftEvalConfig, eval_shift, {**checkpoints, "xlora_dir": "--xlora", "use_factors": "--with-factors"},
         "per-segment NLL through mixed-domain streams: dynalora vs merges, router, oracle, X-LoRA"),
        ("tasks", TaskEvalConfig, eval_tasks, {**checkpoints, "use_factors": "--with-factors"},
         "accuracy on held-out BIG-Bench tasks: dynalora from a description / 5 examples vs base, best adapter, "
         "uniform merge, LoraHub-style search"),
        ("escalate", EscalateEvalConfig, eval_escalate, {**checkpoints, "escalate_dir": "--escalate"},
         "continuation NLL vs compute: base, level 1, level 2 always, dynalora deciding with <|think|>, random "
         "escalation at the same rate"),
        ("mix", MixEvalConfig, eval_mix, {**checkpoints, "compressor_dir": "--compressor", "gate_dir": "--mix"},
         "the learned mix gate vs shift only, absorb only, a fixed 50/50 mix (domain NLL and absorbed-fact answers)"),
    ]
    for name, config_cls, evaluate_fn, aliases, help_text in evaluations:
        add_config_command(sub, name, config_cls, evaluate_fn, help_text, aliases,
                           out=Path(f"results/eval_{name}.json"))

    distill_flags = {f"distill.{name}": flag for name, flag in (
        ("lr", "--distill-lr"), ("rank", "--distill-rank"), ("memory_rank", "--memory-rank"),
        ("first_layer", "--distill-first-layer"), ("replay_chunks", "--replay-chunks"),
        ("chunk_weight", "--chunk-weight"),
        ("probe_weight", "--probe-weight"), ("locality_weight", "--locality-weight"), ("max_probes", "--max-probes"),
        ("cloze", "--cloze"), ("generated", "--generated"), ("following_tokens", "--following-tokens"),
        ("step_sizes", "--step-sizes"))}  # the names these settings had before the flags were generated
    add_config_command(sub, "absorb", AbsorbEvalConfig, eval_absorb,
                       "questions about a document evicted from the window: memory LoRA vs full context, no context, "
                       "gradient LoRA, summaries; --needle, --locality, --sequence",
                       {"compressor_dir": "--compressor", **distill_flags}, out=Path("results/eval_absorb.json"))
