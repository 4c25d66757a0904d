"""``dynalora train escalate``: level 2 of the hypernetwork stack, and the ``<|think|>`` row that calls it.

Level 1 is the shipped shift network, frozen. Level 2 (:class:`~dynalora.hyper.stack.LevelNet`) reads the
same pooled state vector and writes a LoRA for level 1's own Linear layers; it is trained end to end
through level 1, the bank and the frozen base model on the continuation NLL (examples as in ``train
shift``: a context from one library domain and the text that follows). Level 1 alone answers as the
shipped system does (its gated blend; its generated factors raised the NLL on validation streams);
escalated, level 1's generated factors are used too (``level2_factors``), now under level 2's LoRA.

Then ``<|think|>``: on every training example, the gain of level 2 over level 1 (nats per token); the
token's tied embedding row is fitted (:func:`~dynalora.runtime.special_tokens.fit_token_row`, as ``train
triggers``) to fire, at the context's last token, on the ``think_share`` of training examples where that gain
is largest (a share, not a fixed margin: level 2 beats level 1 on nearly every training example, and a row
fitted to fire almost everywhere ranks nothing). Its firing threshold is chosen on validation examples: the
most level-2 gain at an escalation rate ≤ ``max_rate``. With ``validate_every``, level 2 is also stopped early
on the same validation examples (the weights of the step with the lowest validation NLL are kept).

NLLs are over the original vocabulary, as in every eval: the trigger tokens are control tokens the engine
consumes, and their tied rows would otherwise take probability mass from the text.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from dynalora.data.batches import config_record
from dynalora.shipped import shipped, trained
from dynalora.training import RunConfig, TrainingRun
from dynalora.system.escalate import continuation_nll, escalate_examples, last_hidden_and_log_z, nll_table


@dataclass
class EscalateTrainConfig:
    library_dir: Path = shipped("library")
    """The trained library (``dynalora train library``)."""
    shift_dir: Path = shipped("shift")
    """Level 1: the shift network (``dynalora train shift``)."""
    triggers_dir: Path = shipped("triggers")
    """The trained trigger tokens; the ``<|think|>`` row is fitted on top of them."""
    out_dir: Path = field(default_factory=lambda: trained("escalate"))
    """Where level 2 and the ``<|think|>`` row are written."""
    model: str | None = None
    """Base model: HF id or folder (None: the embedded SmolLM2-135M-Instruct)."""
    examples_per_domain: int = 160
    """Training contexts per library domain (train split)."""
    validation_per_domain: int = 24
    """Validation contexts per library domain (the think threshold and best step)."""
    context_tokens: int = 48
    """Tokens of context the networks read."""
    continuation_tokens: int = 64
    """Tokens after the context whose NLL is the loss."""
    rank: int = 4
    """Rank of the LoRA level 2 writes for each of level 1's Linear layers."""
    width: int = 128
    """Hidden width of level 2."""
    targets: list[str] | None = None
    """Level 1's Linear layers level 2 writes for (None: all of them)."""
    level2_factors: bool = True
    """Escalated, use level 1's generated factors (under level 2's LoRA) besides its blend."""
    steps: int = 150
    """Optimizer steps."""
    batch_size: int = 8
    """Contexts per step."""
    lr: float = 1e-3
    """Adam learning rate."""
    validate_every: int = 0
    """Every this many steps, level 2's validation NLL; the best step's weights are kept (0: keep the last)."""
    think_share: float = 0.4
    """The share of training examples, those where level 2 beats level 1 the most, ``<|think|>`` fires on."""
    think_steps: int = 300
    """Optimizer steps on the ``<|think|>`` row."""
    think_lr: float = 0.02
    """Adam learning rate on the ``<|think|>`` row."""
    max_rate: float = 0.5
    """The think threshold keeps the validation escalation rate at most this."""
    seed: int = 0
    """Random seed."""
    threads: int = 2
    """CPU threads torch uses."""
    run: RunConfig = field(default_factory=RunConfig)
    """Device, mixed precision, gradient accumulation, resumable checkpoints (accelerate)."""

    def __post_init__(self):
        if (self.rank < 1 or self.steps < 0 or self.validate_every < 0 or not 0 < self.max_rate <= 1
                or not 0 < self.think_share < 1):
            raise ValueError(f"EscalateTrainConfig: rank={self.rank} ≥ 1, steps={self.steps} ≥ 0, validate_every="
                             f"{self.validate_every} ≥ 0, max_rate={self.max_rate} in (0, 1], think_share="
                             f"{self.think_share} in (0, 1)")


def choose_think_threshold(p_think: torch.Tensor, gain: torch.Tensor, max_rate: float) -> dict:
    """The threshold (one of the distinct probabilities) that captures the most of ``gain (N,)`` — level 2's NLL
    gain over level 1 per example — escalating at most a ``max_rate`` share of the examples."""
    order = torch.argsort(p_think, descending=True)
    captured = torch.cumsum(gain[order], 0)  # escalating the top-k by p(think)
    allowed = int(max_rate * len(gain))
    if allowed < 1:
        return {"threshold": 1.0, "rate": 0.0, "gain_captured": 0.0}
    best = int(torch.argmax(captured[:allowed]))
    total = float(gain.sum())
    return {"threshold": float(p_think[order[best]]), "rate": (best + 1) / len(gain),
            "gain_captured": float(captured[best]) / total if total > 0 else 0.0}


def train_escalate(config: EscalateTrainConfig) -> dict:
    from dynalora.hyper.stack import HyperStack, LevelNet, LevelNetConfig, linear_shapes
    from dynalora.runtime.special_tokens import THINK_TOKEN, trigger_row_tensor
    from dynalora.runtime.trained_trigger import TrainedTrigger
    from dynalora.system.assemble import load_shift_system
    from dynalora.plot import plot_losses
    from dynalora.runtime.special_tokens import fit_token_row

    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    run = TrainingRun(config.run, config.out_dir)
    system = load_shift_system(config.library_dir, config.shift_dir, config.triggers_dir, config.model,
                               max_batch=max(config.batch_size, 16), use_factors=False, device=run.device,
                               dtype=config.run.dtype)
    model, dyn, level1 = system.base.model, system.dyn, system.net
    for p in level1.parameters():  # level 1 stays as trained (the base model is frozen when loaded)
        p.requires_grad_(False)
    level2 = LevelNet(LevelNetConfig(feature_size=level1.config.feature_size,
                                     target_shapes=linear_shapes(level1, config.targets), rank=config.rank,
                                     width=config.width)).to(run.device)
    stack = HyperStack([level1, level2])
    data = {split: escalate_examples(system, config, split, per_domain, seed)
            for split, per_domain, seed in (("train", config.examples_per_domain, config.seed),
                                            ("validation", config.validation_per_domain, config.seed + 1))}
    feature_seconds = time.perf_counter() - started

    features, continuations, _ = data["train"]

    def validation_nll() -> float:
        level2.eval()
        value = float(nll_table(dyn, stack, *data["validation"][:2], config.level2_factors, system.vocab_size,
                                names=("level2",))["level2"].mean())
        level2.train()
        return value

    validation_history, best = [], None  # best: (nll, step, state)

    def validate(step: int) -> None:
        nonlocal best
        validation_history.append({"step": step, "nll": validation_nll()})
        if best is None or validation_history[-1]["nll"] < best[0]:
            weights = {k: v.detach().clone() for k, v in level2.state_dict().items()}
            best = (validation_history[-1]["nll"], step, weights)

    optimizer = torch.optim.AdamW(level2.parameters(), lr=config.lr, weight_decay=0.01)
    optimizer = run.accelerator.prepare(optimizer)  # level 2 runs inside the stack: its gradients averaged below
    run.accelerator.register_for_checkpointing(level2)  # and its weights saved with the resumable state
    generator = torch.Generator().manual_seed(config.seed)
    start, history, extra = run.resume(generator)
    validation_history, best = extra.get("validation_history", []), extra.get("best")
    if config.validate_every and not start:
        validate(0)  # a fresh level 2 writes B = 0: level 1 exactly, the floor early stopping can fall back to
    level2.train()
    began = time.perf_counter()
    for step in (progress := tqdm(range(start, config.steps), desc="train escalate", initial=start,
                                  total=config.steps, disable=not run.is_main)):
        rows = run.shard(torch.randint(0, len(features), (config.batch_size,), generator=generator))
        with run.accelerator.accumulate(level2), run.accelerator.autocast():
            loss = continuation_nll(dyn, stack, features[rows], continuations[rows], 2, config.level2_factors,
                                    system.vocab_size).mean()
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(f"train escalate: non-finite loss at step {step}")
            run.update(loss, optimizer, level2.parameters(), max_norm=1.0, average=True)  # called inside the stack
        history.append(run.mean(loss))
        progress.set_postfix(nll=f"{history[-1]:.3f}")
        if config.validate_every and ((step + 1) % config.validate_every == 0 or step + 1 == config.steps):
            validate(step + 1)
            progress.set_postfix(nll=f"{history[-1]:.3f}", validation=f"{validation_history[-1]['nll']:.3f}")
        run.end_step(step + 1, history, generator, {"validation_history": validation_history, "best": best})
    run.finish()
    train_seconds = time.perf_counter() - began
    if best is not None:
        level2.load_state_dict(best[2])
    level2.eval()

    vocab_size, embedding = system.vocab_size, trigger_row_tensor(model)  # the LM head's row decides p(<|think|>)
    think_id = system.base.tokenizer.convert_tokens_to_ids(THINK_TOKEN)
    tables, think_inputs = {}, {}
    for split, (split_features, split_continuations, contexts) in data.items():
        tables[split] = nll_table(dyn, stack, split_features, split_continuations, config.level2_factors,
                                  vocab_size)
        think_inputs[split] = last_hidden_and_log_z(model, contexts, vocab_size)
    gain = {split: t["level1"] - t["level2"] for split, t in tables.items()}
    cut = torch.quantile(gain["train"], 1 - config.think_share)
    target = (gain["train"] > cut).float()
    positives, negatives = float(target.sum()), float((1 - target).sum())
    balance = negatives / positives if positives and negatives else 1.0  # both classes weigh the same
    row, think_losses = fit_token_row(embedding[think_id], *think_inputs["train"], target, balance,
                                      config.think_steps, config.think_lr, desc="train <|think|> row")
    with torch.no_grad():
        embedding[think_id] = row
    p_think = {split: torch.sigmoid(h @ row.float() - z) for split, (h, z) in think_inputs.items()}
    chosen = choose_think_threshold(p_think["validation"], gain["validation"], config.max_rate)

    config.out_dir.mkdir(parents=True, exist_ok=True)
    if run.is_main:
        level2.save_pretrained(config.out_dir / "level2")
        TrainedTrigger.from_model(model, {THINK_TOKEN: think_id}).save_pretrained(config.out_dir,
                                                                                  "think_token.safetensors")
        plot_losses(history, config.out_dir / "loss.png", "level 2: continuation NLL at depth 2")
    mean = lambda t: float(t.mean())  # noqa: E731
    metadata = {
        "config": config_record(config), "threshold": chosen["threshold"], "validation_choice": chosen,
        "nll": {split: {name: mean(v) for name, v in t.items()} for split, t in tables.items()},
        "think_targets_train": float(target.mean()),
        "think_gain_cut": float(cut),
        "think_accuracy": {split: float(((p_think[split] >= chosen["threshold"]) == (gain[split] > cut))
                                        .float().mean()) for split in data},
        "parameters": sum(p.numel() for p in level2.parameters()),
        "train_seconds": round(train_seconds, 1), "feature_seconds": round(feature_seconds, 1),
        "seconds": round(time.perf_counter() - started, 1), "think_loss": [think_losses[0], think_losses[-1]],
        "history": history, "validation_history": validation_history, "kept_step": best[1] if best else config.steps,
        "split": {"train": "train", "threshold and kept step": "validation"},
        "processes": run.accelerator.num_processes, "resumed_from_step": start}
    if run.is_main:
        (config.out_dir / "escalate.json").write_text(json.dumps(metadata, indent=2))
    dyn.detach()
    return metadata
