"""``dynalora eval ...``"""

from __future__ import annotations

from pathlib import Path

from dynalora.cli_config import add_config_command
from dynalora.shipped import shipped


def cmd_absorb(args) -> int:
    from dynalora.eval.absorb import AbsorbEvalConfig, eval_absorb

    from dynalora.runtime.memory_writers import DistillConfig

    distill = DistillConfig(lr=args.distill_lr, rank=args.distill_rank, memory_rank=args.memory_rank,
                            first_layer=args.distill_first_layer, replay_chunks=args.replay_chunks,
                            chunk_weight=args.chunk_weight, probe_weight=args.probe_weight,
                            locality_weight=args.locality_weight, max_probes=args.max_probes,
                            cloze=args.cloze, generated=args.generated, following_tokens=args.following_tokens,
                            step_sizes=args.step_sizes)
    eval_absorb(AbsorbEvalConfig(data=args.data, compressor_dir=args.compressor, model=args.model, window=args.window,
                                 methods=args.methods, max_docs=args.max_docs, gradient_steps=args.gradient_steps,
                                 needle=args.needle, needle_multiples=args.needle_multiples,
                                 locality=args.locality, memory_weight=args.memory_weight,
                                 absorber=args.absorber, distill=distill, steps=args.steps,
                                 chunk_tokens=args.chunk_tokens, sequence=args.sequence,
                                 relevance_gate=args.relevance_gate, threads=args.threads),
                out=args.out)
    return 0


def add_eval_commands(commands) -> None:
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

    from dynalora.eval.absorb import METHODS as ABSORB_METHODS

    p = sub.add_parser("absorb", help="questions about a document evicted from the window: memory LoRA vs full "
                                      "context, no context, gradient LoRA, summaries; --needle, --locality")
    p.add_argument("--data", type=Path, default=None, help="documents JSONL (`dynalora data absorb --split test`)")
    p.add_argument("--out", type=Path, default=Path("results/eval_absorb.json"))
    p.add_argument("--compressor", type=Path, default=shipped("absorb"))
    p.add_argument("--model", default=None)
    p.add_argument("--window", type=int, default=512, help="window budget in tokens")
    p.add_argument("--methods", nargs="+", default=list(ABSORB_METHODS),
                   help=f"methods to run (default: all {list(ABSORB_METHODS)})")
    p.add_argument("--max-docs", type=int, default=None)
    p.add_argument("--gradient-steps", type=int, nargs="+", default=[4, 16, 48],
                   help="cumulative fine-tuning steps at which gradient_lora is scored")
    p.add_argument("--needle", action="store_true", help="pass-key retrieval at 10 depths, 1/2/4/8x the window")
    p.add_argument("--needle-multiples", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="document lengths in windows for --needle (default: %(default)s)")
    p.add_argument("--locality", type=int, default=0, help="unrelated questions for the locality check")
    p.add_argument("--memory-weight", type=float, default=1.0,
                   help="scale on the absorbed memory when answering (1: as written, 0: off)")
    from dynalora.runtime.memory_writers import WRITERS, DistillConfig

    p.add_argument("--absorber", default="compressor", choices=WRITERS, help="the memory writer (default: %(default)s)")
    p.add_argument("--steps", type=int, nargs="+", default=[DistillConfig.steps],
                   help="distillation steps per chunk; each value is scored as dynalora@K (default: %(default)s)")
    p.add_argument("--chunk-tokens", type=int, default=None,
                   help="tokens absorbed at a time (default: the compressor's training chunk, or 3/4 of the window)")
    p.add_argument("--distill-lr", type=float, default=DistillConfig.lr, help="distillation step size (Adam)")
    p.add_argument("--step-sizes", default=None,
                   help="a folder from `dynalora train absorb-steps`: meta-learned step sizes per step and module "
                        "(and the factors' start) in place of --distill-lr")
    p.add_argument("--distill-rank", type=int, default=DistillConfig.rank, help="rank written per chunk")
    p.add_argument("--memory-rank", type=int, default=DistillConfig.memory_rank,
                   help="rank the memory keeps (distill writers; default: %(default)s)")
    p.add_argument("--replay-chunks", type=int, default=DistillConfig.replay_chunks,
                   help="earlier chunks rehearsed at each absorb (default: %(default)s)")
    p.add_argument("--distill-first-layer", type=float, default=DistillConfig.first_layer,
                   help="adapt layers from this fraction of the depth up (default: %(default)s)")
    p.add_argument("--chunk-weight", type=float, default=DistillConfig.chunk_weight,
                   help="weight of the next-token loss on the chunk itself")
    p.add_argument("--probe-weight", type=float, default=DistillConfig.probe_weight,
                   help="weight of the KL to the teacher (chunk in context) on probes about the chunk")
    p.add_argument("--locality-weight", type=float, default=DistillConfig.locality_weight,
                   help="weight of the KL to the base model on its own answers to unrelated questions")
    p.add_argument("--max-probes", type=int, default=DistillConfig.max_probes, help="topic probes per chunk")
    p.add_argument("--cloze", type=int, default=DistillConfig.cloze, help="sentence-completion probes per chunk")
    p.add_argument("--following-tokens", type=int, default=DistillConfig.following_tokens,
                   help="window tokens after an absorbed chunk used as a probe (0: off; default: %(default)s)")
    p.add_argument("--generated", type=int, default=DistillConfig.generated,
                   help="probes the base model writes itself (a question per top name, its own answer)")
    p.add_argument("--relevance-gate", action="store_true",
                   help="memory on only for questions that name something it absorbed")
    p.add_argument("--sequence", type=int, default=0,
                   help="absorb this many documents one after another into one memory, then ask about each")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(handler=cmd_absorb)
