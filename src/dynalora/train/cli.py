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
    if args.rescan:
        from dynalora.train.triggers import rescan_thresholds

        for folder in args.rescan:
            v = rescan_thresholds(folder, args.library)["validation"]
            print(f"{folder}: threshold {v['threshold']}: validation recall {v['boundary_recall']:.2f}, precision "
                  f"{v['precision']:.2f}, false/1k tokens {v['false_per_1k_tokens']:.2f}")
        return 0
    if args.lora:
        from dynalora.train.trigger_lora import TriggerLoraTrainConfig, train_trigger_lora

        result = train_trigger_lora(TriggerLoraTrainConfig(
            library_dir=args.library, row_dir=args.out_dir, out_dir=args.lora_out_dir, train_streams=args.streams,
            steps=args.lora_steps, layers=args.lora_layers, rank=args.lora_rank))
        v = result["validation"]
        print(f"trigger LoRA + <|shift|> row trained in {result['seconds']:.0f}s; threshold {result['threshold']}: "
              f"validation recall {v['boundary_recall']:.2f}, precision {v['precision']:.2f}, "
              f"false/1k tokens {v['false_per_1k_tokens']:.2f}")
        return 0
    from dynalora.train.triggers import TriggerTrainConfig, train_triggers

    result = train_triggers(TriggerTrainConfig(library_dir=args.library, out_dir=args.out_dir,
                                               train_streams=args.streams))
    v = result["validation"]
    print(f"<|shift|> row trained in {result['seconds']:.0f}s; threshold {result['threshold']}: validation recall "
          f"{v['boundary_recall']:.2f}, precision {v['precision']:.2f}, false/1k tokens {v['false_per_1k_tokens']:.2f}")
    return 0


def cmd_xlora(args) -> int:
    from dynalora.train.xlora import XLoraTrainConfig, train_xlora

    result = train_xlora(XLoraTrainConfig(library_dir=args.library, out_dir=args.out_dir, model=args.model,
                                          streams=args.streams, steps=args.steps, threads=args.threads))
    print(f"X-LoRA classifier: {result['parameters']} parameters, {result['train_seconds']:.0f}s; "
          f"last 20 steps: LM loss {result['final_loss']:.3f}")
    return 0


def cmd_absorb(args) -> int:
    from dynalora.train.absorb import AbsorbTrainConfig, train_absorb

    result = train_absorb(AbsorbTrainConfig(
        data=args.data, validation=args.validation, out_dir=args.out_dir, model=args.model, steps=args.steps,
        batch_size=args.batch_size, rank=args.rank, target_modules=args.targets, chunk_tokens=args.chunk_tokens,
        time_limit_minutes=args.time_limit, teacher_batch_size=args.teacher_batch_size, device=args.device,
        threads=args.threads, lr=args.lr, b_scale=args.b_scale, distill_weight=args.distill_weight,
        gold_weight=args.gold_weight, max_chunks=args.max_chunks, compressor=args.compressor,
        bottleneck=args.bottleneck, init_step=args.init_step, locality_fraction=args.locality_fraction,
        locality_weight=args.locality_weight, locality_span=args.locality_span))
    final, validation = result["final"], result["validation"]
    print(f"compressor: {result['parameters']} parameters, {result['steps_done']} steps "
          f"in {result['train_seconds']:.0f}s on {result['device_name']}"
          + (f"; last 20 steps: gold NLL {final['gold_nll']:.3f}, answer acc {final['answer_acc']:.2f}"
             if final else ""))
    for name, scores in validation.items():
        print(f"validation {name}: gold NLL {scores['gold_nll']:.3f}, answer acc {scores['answer_acc']:.2f}")
    return 0


def cmd_absorb_steps(args) -> int:
    from dynalora.runtime.memory_writers import DistillConfig
    from dynalora.train.absorb_steps import AbsorbStepsTrainConfig, train_absorb_steps

    result = train_absorb_steps(AbsorbStepsTrainConfig(
        data=args.data, out_dir=args.out_dir, model=args.model, documents=args.documents,
        distill=DistillConfig(steps=args.steps, lr=args.lr), score_steps=args.score_steps, meta_lr=args.meta_lr,
        start_lr=args.start_lr, locality_weight=args.locality_weight, threads=args.threads))
    docs = result["documents"]
    for k in args.score_steps:
        first, last = docs[:len(docs) // 2], docs[len(docs) // 2:]
        mean = [sum(d["nll_after"][k] for d in half) / max(1, len(half)) for half in (first, last)]
        print(f"gold NLL after {k} steps: first half of the documents {mean[0]:.3f}, second half {mean[1]:.3f}")
        if args.locality_weight > 0:
            mean = [sum(d["locality_nll_after"][k] for d in half) / max(1, len(half)) for half in (first, last)]
            print(f"  unrelated questions' NLL with the memory: first half {mean[0]:.3f}, second half {mean[1]:.3f}")
    print(f"{len(docs)} documents in {result['seconds']:.0f}s; step sizes in {args.out_dir}")
    return 0


def cmd_escalate(args) -> int:
    from dynalora.train.escalate import EscalateTrainConfig, train_escalate

    result = train_escalate(EscalateTrainConfig(
        library_dir=args.library, shift_dir=args.shift, triggers_dir=args.triggers, out_dir=args.out_dir,
        model=args.model, steps=args.steps, examples_per_domain=args.examples_per_domain, rank=args.rank,
        width=args.width, targets=args.targets, level2_factors=not args.blend_only, lr=args.lr,
        validate_every=args.validate_every, think_share=args.think_share, threads=args.threads))
    print(f"level 2: {result['parameters']} parameters, {result['train_seconds']:.0f}s; <|think|> threshold "
          f"{result['threshold']:.3f} (validation rate {result['validation_choice']['rate']:.2f})")
    for split, nll in result["nll"].items():
        print(f"{split}: NLL " + ", ".join(f"{name} {value:.4f}" for name, value in nll.items()))
    return 0


def cmd_mix(args) -> int:
    from dynalora.train.mix import MixTrainConfig, train_mix

    result = train_mix(MixTrainConfig(facts=args.facts, library_dir=args.library, shift_dir=args.shift,
                                      compressor_dir=args.compressor, out_dir=args.out_dir, model=args.model,
                                      steps=args.steps, lr=args.lr, initial_weight=args.initial_weight,
                                      max_docs=args.max_docs, examples_per_domain=args.examples_per_domain,
                                      threads=args.threads))
    final = result["final"]
    print(f"mix gate: {result['parameters']} parameters, {result['train_seconds']:.0f}s; last 20 steps: domain NLL "
          f"{final['domain_nll']:.3f}, facts NLL {final['facts_nll']:.3f}, w_shift {final['w_shift']:.2f}, "
          f"w_memory {final['w_memory_domain']:.2f} (domain rows) / {final['w_memory_facts']:.2f} (fact rows)")
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

    p = sub.add_parser("triggers", help="train the <|shift|> token on mixed-domain streams "
                                        "(its row; --lora: and a top-layer LoRA)")
    p.add_argument("--library", type=Path, default=Path("checkpoints/library"))
    p.add_argument("--out-dir", type=Path, default=Path("checkpoints/triggers"),
                   help="the row-only trigger (written; with --lora: read, as the starting row)")
    p.add_argument("--streams", type=int, default=48, help="training streams")
    p.add_argument("--lora", action="store_true",
                   help="the second form: a LoRA on the top layers' k_proj/o_proj trained with the row")
    p.add_argument("--lora-out-dir", type=Path, default=Path("checkpoints/triggers_lora"))
    p.add_argument("--lora-steps", type=int, default=150)
    p.add_argument("--lora-layers", type=int, default=4, help="the LoRA goes on the last this many layers")
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--rescan", type=Path, nargs="+", default=None, metavar="DIR",
                   help="train nothing: choose these trained triggers' thresholds again on their validation streams")
    p.set_defaults(handler=cmd_triggers)

    p = sub.add_parser("escalate", help="train level 2 of the hypernetwork stack (a LoRA for the shift network) "
                                        "and the <|think|> row that calls it")
    p.add_argument("--library", type=Path, default=Path("checkpoints/library"))
    p.add_argument("--shift", type=Path, default=Path("checkpoints/shift"), help="level 1 (train shift)")
    p.add_argument("--triggers", type=Path, default=Path("checkpoints/triggers"))
    p.add_argument("--out-dir", type=Path, default=Path("checkpoints/escalate"))
    p.add_argument("--model", default=None)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--examples-per-domain", type=int, default=160)
    p.add_argument("--rank", type=int, default=4, help="rank of the LoRA level 2 writes for each level-1 layer")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--targets", nargs="+", default=None,
                   help="level-1 Linear layers level 2 writes for, e.g. encoder.3 blend_head (default: all)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--validate-every", type=int, default=0,
                   help="validation NLL every N steps; keep the best step's level 2 (0: keep the last)")
    p.add_argument("--blend-only", action="store_true",
                   help="escalated, use level 1's blend only (default: its generated factors too)")
    p.add_argument("--think-share", type=float, default=0.4,
                   help="<|think|> targets: this share of training examples, where level 2 beats level 1 most")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(handler=cmd_escalate)

    p = sub.add_parser("mix", help="train the gate that weighs the shift LoRA and the memory LoRA per row")
    p.add_argument("--facts", type=Path, required=True,
                   help="fact documents JSONL the compressor never trained on "
                        "(`dynalora data absorb --kind facts --split validation --seed-offset 100`)")
    p.add_argument("--library", type=Path, default=Path("checkpoints/library"))
    p.add_argument("--shift", type=Path, default=Path("checkpoints/shift"))
    p.add_argument("--compressor", type=Path, default=Path("checkpoints/absorb"))
    p.add_argument("--out-dir", type=Path, default=Path("checkpoints/mix"))
    p.add_argument("--model", default=None)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--initial-weight", type=float, default=0.5, help="both gate weights before training")
    p.add_argument("--max-docs", type=int, default=40)
    p.add_argument("--examples-per-domain", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(handler=cmd_mix)

    p = sub.add_parser("xlora", help="train PEFT X-LoRA's classifier over the library (a baseline of eval shift)")
    p.add_argument("--library", type=Path, default=Path("checkpoints/library"))
    p.add_argument("--out-dir", type=Path, default=Path("checkpoints/xlora"))
    p.add_argument("--model", default=None)
    p.add_argument("--streams", type=int, default=64, help="training streams (library domains, train split)")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(handler=cmd_xlora)

    p = sub.add_parser("absorb", help="train the absorb compressor by context distillation")
    p.add_argument("--data", type=Path, nargs="+", required=True,
                   help="training documents JSONL (`dynalora data absorb --split train`)")
    p.add_argument("--validation", type=Path, default=None, help="validation documents JSONL")
    p.add_argument("--out-dir", type=Path, default=Path("checkpoints/absorb"))
    p.add_argument("--model", default=None)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--compressor", choices=["gradient", "perceiver"], default="gradient",
                   help="gradient: a learned transform of the chunk's next-token gradient; perceiver: learned "
                        "queries over its hidden states")
    p.add_argument("--rank", type=int, default=16, help="memory rank (the perceiver's chunks have it too)")
    p.add_argument("--bottleneck", type=int, default=64, help="the gradient compressor's MLP width")
    p.add_argument("--init-step", type=float, default=0.015,
                   help="the gradient compressor's step size × √(chunk tokens) at the start")
    p.add_argument("--locality-fraction", type=float, default=0.15,
                   help="share of examples with an unrelated document in memory (the memory must change nothing)")
    p.add_argument("--locality-weight", type=float, default=0.0,
                   help="score those examples by KL(no memory ‖ memory) with this weight (0: by the answer alone)")
    p.add_argument("--locality-span", type=int, default=32,
                   help="window tokens before the answer that the locality KL also covers")
    p.add_argument("--targets", nargs="+", default=["o_proj", "down_proj"], help="modules the memory LoRA writes")
    p.add_argument("--chunk-tokens", type=int, default=128)
    p.add_argument("--max-chunks", type=int, default=4, help="skip documents longer than this many chunks")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--b-scale", type=float, default=1.0, help="fixed scale on the generated B factors")
    p.add_argument("--distill-weight", type=float, default=1.0, help="0: gold answers only, no teacher pass")
    p.add_argument("--gold-weight", type=float, default=0.5)
    p.add_argument("--time-limit", type=float, default=None, help="minutes; stop and save when reached")
    p.add_argument("--teacher-batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(handler=cmd_absorb)

    p = sub.add_parser("absorb-steps", help="meta-learn the distill memory writer's step sizes and start on "
                                            "train-seed documents (scored by their real questions)")
    p.add_argument("--data", type=Path, required=True,
                   help="training documents JSONL (`dynalora data absorb --kind facts --split train`)")
    p.add_argument("--out-dir", type=Path, default=Path("checkpoints/absorb_steps"))
    p.add_argument("--model", default=None)
    p.add_argument("--documents", type=int, default=None, help="documents used (default: all)")
    p.add_argument("--steps", type=int, default=8, help="the schedule's length (writer steps per chunk)")
    p.add_argument("--lr", type=float, default=0.02, help="the step size every step starts from")
    p.add_argument("--score-steps", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="steps after which the gold answers are scored (default: %(default)s)")
    p.add_argument("--meta-lr", type=float, default=0.1, help="Adam step size on the log step sizes")
    p.add_argument("--start-lr", type=float, default=1e-3, help="Adam step size on the A starts (0: none)")
    p.add_argument("--locality-weight", type=float, default=1.0,
                   help="weight of the gold NLL of unrelated self-contained questions with the memory on (0: off)")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(handler=cmd_absorb_steps)
