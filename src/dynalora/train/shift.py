"""``dynalora train shift``: train the shift hypernetwork end to end through the frozen base and bank.

An example is a context window and the text that follows it, from one library domain's train split.
The network reads the pooled feature-layer hidden state of the context (cached once, from the
normal forward of the base model), proposes a blend + gate + generated factors, and is trained on
the language-modelling loss of the continuation under the resulting LoRA (the differentiable
``LoraState.functional`` path). The row's *current* blend is drawn at random — zero, the right
adapter, or a wrong one — so the gate learns when to keep it (identity) and when to move.
Auxiliary losses: cross-entropy of the blend head toward the source domain's adapter, a small
penalty on the gate (move only when it pays) and on the generated factors' norm.
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
from dynalora.lora.library_folder import load_library_bank
from dynalora.shipped import shipped, trained
from dynalora.data.batches import build_examples
from dynalora.runtime.features import pooled_features
from dynalora.hyper.shift_net import gated_answer, row_factors
from dynalora.training import RunConfig, TrainingRun


@dataclass
class ShiftTrainConfig:
    library_dir: Path = shipped("library")
    """The trained library the network blends (``dynalora train library``)."""
    out_dir: Path = field(default_factory=lambda: trained("shift"))
    """Where the network is written (``shift_net.safetensors`` + ``shift_net.json``)."""
    model: str | None = None
    """Base model: HF id or folder (None: the embedded SmolLM2-135M-Instruct)."""
    examples_per_domain: int = 160
    """Training contexts per library domain (train split)."""
    context_tokens: int = 48
    """Tokens of a domain's text the network reads (pooled) before it answers."""
    continuation_tokens: int = 64
    """Tokens after the context whose NLL under the answered LoRA is the loss."""
    pool_window: int = 16
    """Recent positions averaged into the feature (the engine pools the same window)."""
    feature_layer: int | None = None
    """Decoder layer whose hidden states are the feature (None: the middle one)."""
    width: int = 256
    """Hidden width of the network's MLP."""
    generated_rank: int = 2
    """Rank of the LoRA factors the network generates besides its blend (0: blend only)."""
    factor_modules: list[str] | None = None
    """Module kinds the generated factors go on (None: the kinds the bank's adapters adapt, e.g. q_proj and v_proj
    for the shipped library, c_attn for GPT-2)."""
    steps: int = 150
    """Optimizer steps."""
    batch_size: int = 8
    """Contexts per step."""
    lr: float = 1e-3
    """Adam learning rate."""
    aux_blend_weight: float = 0.1
    """Weight of the auxiliary loss pulling the blend toward the context's own domain adapter."""
    gate_penalty: float = 0.01
    """Penalty on the gate (how far the answer moves the blend): keeps small changes small."""
    factor_penalty: float = 1e-3
    """Penalty on the generated factors' size."""
    seed: int = 0
    """Random seed (data order, initialisation)."""
    threads: int = 2
    """CPU threads torch uses."""
    run: RunConfig = field(default_factory=RunConfig)
    """Device, mixed precision, gradient accumulation, resumable checkpoints (accelerate)."""


def train_shift(config: ShiftTrainConfig) -> dict:
    from dynalora.hyper.shift_net import ShiftNet, ShiftNetConfig
    from dynalora.lora import DynamicLoraModel, InjectConfig, StateConfig
    from dynalora.lora.targets import find_target_modules
    from dynalora.runtime.features import HiddenCapture
    from dynalora.plot import plot_losses

    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    run = TrainingRun(config.run, config.out_dir)
    base = run.load_base(config.model)
    bank, adapters = load_library_bank(config.library_dir, base.model)
    dyn = DynamicLoraModel.attach(base.model, bank, InjectConfig(
        state=StateConfig(max_batch=max(config.batch_size, 16), generated_rank=config.generated_rank, memory_rank=0)))
    capture = HiddenCapture(base.model, config.feature_layer, config.pool_window)
    adapted = set(bank.modules)
    factor_modules = (find_target_modules(base.model, config.factor_modules) if config.factor_modules
                      else [m for m in bank.module_shapes if m in adapted])
    net = ShiftNet(ShiftNetConfig(
        feature_size=base.model.config.hidden_size, bank_labels=bank.labels,
        module_shapes={m: list(bank.module_shapes[m]) for m in factor_modules}, width=config.width,
        generated_rank=config.generated_rank, feature_layer=capture.layer_index, pool_window=config.pool_window)).to(
        run.device)

    started = time.perf_counter()
    contexts, continuations, labels = build_examples(base.tokenizer, adapters, config, "train",
                                                     config.examples_per_domain, config.seed)
    features = pooled_features(dyn, capture, contexts.to(run.device))  # (N, H)
    feature_seconds = time.perf_counter() - started
    count, bank_size = len(labels), len(bank)
    continuations = continuations.to(run.device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=0.01)
    net, optimizer = run.accelerator.prepare(net, optimizer)
    rng = torch.Generator().manual_seed(config.seed)
    start, history, _ = run.resume(rng)
    net.train()
    progress = tqdm(range(start, config.steps), desc="train shift", initial=start, total=config.steps,
                    disable=not run.is_main)
    for step in progress:
        rows = torch.randint(0, count, (config.batch_size,), generator=rng)  # the global batch, as on every process
        # the row's current blend: zero, the right adapter, or a wrong one
        draw = torch.randint(0, 3, (config.batch_size,), generator=rng)
        wrong = (labels[rows] + torch.randint(1, bank_size, (config.batch_size,), generator=rng)) % bank_size
        mine = run.shard(torch.arange(config.batch_size))  # this process's slice of it
        rows, draw, wrong = rows[mine], draw[mine], wrong[mine]
        target = labels[rows]
        current = torch.zeros(len(rows), bank_size)
        current[draw == 1, target[draw == 1]] = 1.0
        current[draw == 2, wrong[draw == 2]] = 1.0
        target, current = target.to(run.device), current.to(run.device)
        with run.accelerator.accumulate(net), run.accelerator.autocast():
            out = net(features[rows])
            blend, factors = gated_answer(out, current)  # (B, K), gated factors
            ids = continuations[rows]
            with dyn.state.functional(dyn.state.expand_blend(blend), row_factors(factors)):
                logits = dyn(input_ids=ids, use_cache=False).logits[:, :-1]  # (B, T-1, V)
            lm = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                   ids[:, 1:].reshape(-1))
            aux = torch.nn.functional.nll_loss(torch.log(out["blend"].float() + 1e-6), target)
            # ‖B‖‖A‖ per module (an upper bound of ‖BA‖); +eps: the factors start at exactly zero
            factor_norm = sum((a.pow(2).sum((1, 2)) * b.pow(2).sum((1, 2)) + 1e-12).sqrt().mean()
                              for a, b in out["factors"].values())
            loss = lm + config.aux_blend_weight * aux + config.gate_penalty * out["gate"].mean() \
                + config.factor_penalty * factor_norm
            run.update(loss, optimizer, net.parameters(), max_norm=1.0)
        accuracy = (out["blend"].argmax(-1) == target).float().mean()
        history.append({"lm": run.mean(lm), "aux": run.mean(aux), "gate": run.mean(out["gate"].mean()),
                        "acc": run.mean(accuracy)})
        if not all(map(math.isfinite, history[-1].values())):
            raise FloatingPointError(f"train shift: non-finite loss at step {step}: {history[-1]}")
        progress.set_postfix(lm=f"{history[-1]['lm']:.3f}", acc=f"{history[-1]['acc']:.2f}")
        run.end_step(step + 1, history, rng)
    seconds = time.perf_counter() - started
    capture.remove()
    dyn.detach()
    net = run.accelerator.unwrap_model(net).eval()
    run.finish()
    config.out_dir.mkdir(parents=True, exist_ok=True)
    if run.is_main:
        net.save_pretrained(config.out_dir)
        plot_losses([h["lm"] for h in history], config.out_dir / "loss.png", "shift hypernetwork: continuation NLL")
    metadata = {"config": config_record(config),
                "train_seconds": round(seconds, 1), "feature_seconds": round(feature_seconds, 1),
                "examples": count, "parameters": sum(p.numel() for p in net.parameters()),
                "final": {k: sum(h[k] for h in history[-20:]) / min(20, len(history)) for k in history[-1]},
                "history": history, "split": "train", "processes": run.accelerator.num_processes,
                "resumed_from_step": start}
    if run.is_main:
        (config.out_dir / "train_shift.json").write_text(json.dumps(metadata, indent=2))
    return metadata
