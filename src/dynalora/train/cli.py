"""``dynalora train ...``"""

from __future__ import annotations

from pathlib import Path

from dynalora.cli_config import add_config_command
from dynalora.shipped import shipped_config


def cmd_library(config) -> int:
    from dynalora.train.library import train_library

    train_library(config)
    return 0


def cmd_shift(config) -> int:
    from dynalora.train.shift import train_shift

    result = train_shift(config)
    final = result["final"]
    print(f"shift network: {result['parameters']} parameters, {result['train_seconds']:.0f}s; last 20 steps: "
          f"continuation NLL {final['lm']:.3f}, blend accuracy {final['acc']:.2f}, mean gate {final['gate']:.2f}")
    return 0


def _print_trigger_result(what: str, result: dict) -> None:
    v = result["validation"]
    print(f"{what} trained in {result['seconds']:.0f}s; threshold {result['threshold']}: validation recall "
          f"{v['boundary_recall']:.2f}, precision {v['precision']:.2f}, false/1k tokens {v['false_per_1k_tokens']:.2f}")


def cmd_triggers(config) -> int:
    from dynalora.train.triggers import train_triggers

    _print_trigger_result("<|shift|> row", train_triggers(config))
    return 0


def cmd_trigger_lora(config) -> int:
    from dynalora.train.trigger_lora import train_trigger_lora

    _print_trigger_result("trigger LoRA + <|shift|> row", train_trigger_lora(config))
    return 0


def cmd_trigger_head(config) -> int:
    from dynalora.train.trigger_head import train_trigger_head

    _print_trigger_result("trigger head", train_trigger_head(config))
    return 0


def cmd_rescan_triggers(args) -> int:
    from dynalora.runtime.trigger_head import HEAD_FILE
    from dynalora.train.trigger_head import rescan_head
    from dynalora.train.triggers import rescan_thresholds

    for folder in args.folders:
        if (folder / HEAD_FILE).is_file():
            v = rescan_head(folder, args.library, args.model, args.votes, args.max_false_per_1k)["validation"]
        elif args.votes or args.max_false_per_1k is not None:
            raise SystemExit(f"{folder}: --votes and --max-false-per-1k apply to a trigger head ({HEAD_FILE})")
        else:
            v = rescan_thresholds(folder, args.library, args.model)["validation"]
        rule = v.get("votes", [1, 1])
        print(f"{folder}: threshold {v['threshold']} at {rule[0]} of the last {rule[1]}: validation recall "
              f"{v['boundary_recall']:.2f}, precision {v['precision']:.2f}, false/1k tokens "
              f"{v['false_per_1k_tokens']:.2f}")
    return 0


def cmd_xlora(config) -> int:
    from dynalora.train.xlora import train_xlora

    result = train_xlora(config)
    print(f"X-LoRA classifier: {result['parameters']} parameters, {result['train_seconds']:.0f}s; "
          f"last 20 steps: LM loss {result['final_loss']:.3f}")
    return 0


def cmd_route(config) -> int:
    from dynalora.train.route import train_route

    result = train_route(config)
    print(f"token router: {result['parameters']} parameters, {result['train_seconds']:.0f}s "
          f"(+{result['prior_seconds']:.0f}s running the shift system on the streams); last 20 steps: LM loss "
          f"{result['final_loss']:.3f}")
    return 0


def cmd_absorb(config) -> int:
    from dynalora.train.absorb import train_absorb

    result = train_absorb(config)
    final, validation = result["final"], result["validation"]
    print(f"compressor: {result['parameters']} parameters, {result['steps_done']} steps "
          f"in {result['train_seconds']:.0f}s on {result['device_name']}"
          + (f"; last 20 steps: gold NLL {final['gold_nll']:.3f}, answer acc {final['answer_acc']:.2f}"
             if final else ""))
    for name, scores in validation.items():
        print(f"validation {name}: gold NLL {scores['gold_nll']:.3f}, answer acc {scores['answer_acc']:.2f}")
    return 0


def cmd_absorb_steps(config) -> int:
    from dynalora.train.absorb_steps import train_absorb_steps

    result = train_absorb_steps(config)
    docs = result["documents"]
    for k in config.score_steps:
        first, last = docs[:len(docs) // 2], docs[len(docs) // 2:]
        mean = [sum(d["nll_after"][k] for d in half) / max(1, len(half)) for half in (first, last)]
        print(f"gold NLL after {k} steps: first half of the documents {mean[0]:.3f}, second half {mean[1]:.3f}")
        if config.locality_weight > 0:
            mean = [sum(d["locality_nll_after"][k] for d in half) / max(1, len(half)) for half in (first, last)]
            print(f"  unrelated questions' NLL with the memory: first half {mean[0]:.3f}, second half {mean[1]:.3f}")
    print(f"{len(docs)} documents in {result['seconds']:.0f}s; step sizes in {config.out_dir}")
    return 0


def cmd_escalate(config) -> int:
    from dynalora.train.escalate import train_escalate

    result = train_escalate(config)
    print(f"level 2: {result['parameters']} parameters, {result['train_seconds']:.0f}s; <|think|> threshold "
          f"{result['threshold']:.3f} (validation rate {result['validation_choice']['rate']:.2f})")
    for split, nll in result["nll"].items():
        print(f"{split}: NLL " + ", ".join(f"{name} {value:.4f}" for name, value in nll.items()))
    return 0


def cmd_mix(config) -> int:
    from dynalora.train.mix import train_mix

    result = train_mix(config)
    final = result["final"]
    print(f"mix gate: {result['parameters']} parameters, {result['train_seconds']:.0f}s; last 20 steps: domain NLL "
          f"{final['domain_nll']:.3f}, facts NLL {final['facts_nll']:.3f}, w_shift {final['w_shift']:.2f}, "
          f"w_memory {final['w_memory_domain']:.2f} (domain rows) / {final['w_memory_facts']:.2f} (fact rows)")
    return 0


def add_train_commands(commands) -> None:
    train = commands.add_parser("train", help="training recipes (resumable, with progress bars and loss plots)")
    sub = train.add_subparsers(dest="train_command", required=True, metavar="RECIPE")
    from dynalora.train.absorb import AbsorbTrainConfig
    from dynalora.train.absorb_steps import AbsorbStepsTrainConfig
    from dynalora.train.escalate import EscalateTrainConfig
    from dynalora.train.library import LibraryConfig
    from dynalora.train.mix import MixTrainConfig
    from dynalora.train.route import RouteTrainConfig
    from dynalora.train.shift import ShiftTrainConfig
    from dynalora.train.trigger_head import TriggerHeadTrainConfig
    from dynalora.train.trigger_lora import TriggerLoraTrainConfig
    from dynalora.train.triggers import TriggerTrainConfig
    from dynalora.train.xlora import XLoraTrainConfig

    library = {"library_dir": "--library"}
    recipes = [
        ("library", LibraryConfig, cmd_library, {},
         "train the labelled LoRA library (one PEFT adapter per [[adapters]] entry of --config)"),
        ("shift", ShiftTrainConfig, cmd_shift, library, "train the shift hypernetwork on the trained library"),
        ("triggers", TriggerTrainConfig, cmd_triggers, {**library, "train_streams": "--streams"},
         "train the <|shift|> token's row on mixed-domain streams"),
        ("trigger-lora", TriggerLoraTrainConfig, cmd_trigger_lora, {**library, "train_streams": "--streams"},
         "the trigger's second form: its row and a LoRA on the top layers, from a trained row"),
        ("trigger-head", TriggerHeadTrainConfig, cmd_trigger_head, {**library, "train_streams": "--streams"},
         "the trigger's third form: <|shift|>'s logit from an MLP over several layers (fires at real changes)"),
        ("escalate", EscalateTrainConfig, cmd_escalate, {**library, "shift_dir": "--shift", "triggers_dir":
                                                          "--triggers"},
         "train level 2 of the hypernetwork stack (a LoRA for the shift network) and the <|think|> row that calls it"),
        ("mix", MixTrainConfig, cmd_mix, {**library, "shift_dir": "--shift", "compressor_dir": "--compressor"},
         "train the gate that weighs the shift LoRA and the memory LoRA per row"),
        ("route", RouteTrainConfig, cmd_route, {**library, "shift_dir": "--shift", "triggers_dir": "--triggers"},
         "train the token router: per-token re-weighting of the shift network's blend, inside the forward"),
        ("xlora", XLoraTrainConfig, cmd_xlora, library,
         "train PEFT X-LoRA's classifier over the library (a baseline of eval shift)"),
        ("absorb", AbsorbTrainConfig, cmd_absorb, {"target_modules": "--targets", "time_limit_minutes": "--time-limit"},
         "train the absorb compressor by context distillation"),
        ("absorb-steps", AbsorbStepsTrainConfig, cmd_absorb_steps, {"distill.steps": "--steps", "distill.lr": "--lr"},
         "meta-learn the distill memory writer's step sizes and start on train-seed documents"),
    ]
    for name, config_cls, handler, aliases, help_text in recipes:
        add_config_command(sub, name, config_cls, handler, help_text, aliases,
                           default_config=shipped_config("library.toml") if name == "library" else None)

    p = sub.add_parser("rescan-triggers", help="train nothing: choose trained triggers' thresholds again on their "
                                               "validation streams")
    p.add_argument("folders", type=Path, nargs="+", metavar="DIR", help="trained trigger folders (row, LoRA or head)")
    p.add_argument("--votes", nargs="+", metavar="K/N", default=None,
                   help="a head's firing rules to scan with the threshold (default: its record's, or 1/1 2/2 2/3 3/4 "
                        "3/5)")
    p.add_argument("--max-false-per-1k", type=float, default=None,
                   help="a head's false-trigger budget per 1,000 validation tokens (default: its record's)")
    p.add_argument("--library", type=Path, default=TriggerTrainConfig.library_dir)
    p.add_argument("--model", default=None)
    p.set_defaults(handler=cmd_rescan_triggers)
