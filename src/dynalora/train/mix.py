"""``dynalora train mix``: the gate that weighs the shift LoRA and the memory LoRA per row.

A stream that changes domain and runs past the window puts a row in two situations, and the examples
are drawn from both: **domain** — text of a library domain just after a trigger, while the memory holds
an absorbed document unrelated to it (scored: the continuation's NLL); **facts** — a question about an
absorbed document (scored: the gold answer's NLL). Each example carries what the engine would hold at
that trigger: the shift network's blend (its answer to the pooled state vector, blend only, as
shipped) and the memory LoRA the absorber writes (the shipped compressor, merged at the state's rank).
Only the gate trains, through the frozen model (``LoraState.functional``): ``w_shift`` scales the blend,
``w_memory`` the memory's ``B``. Domains come from their train split; documents from validation seeds the
compressor never trained on (nor validated on: ``--seed-offset 100``); the eval reports test seeds and split.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from dynalora.data.batches import config_record
from dynalora.shipped import shipped, trained
from dynalora.system.mix import MixSetup, mix_examples, mixed_nll
from dynalora.training import RunConfig, TrainingRun

@dataclass
class MixTrainConfig:
    facts: Path
    """Fictional-fact documents the compressor never trained on (``dynalora data absorb --kind facts --split
    validation --seed-offset 100``): on its own training documents the memory is far more useful than on
    unseen ones, and the gate would learn to trust it too much."""
    library_dir: Path = shipped("library")
    """The trained library (``dynalora train library``)."""
    shift_dir: Path = shipped("shift")
    """The shift network (``dynalora train shift``)."""
    compressor_dir: Path = shipped("absorb")
    """The absorb compressor (``dynalora train absorb``)."""
    out_dir: Path = field(default_factory=lambda: trained("mix"))
    """Where the gate is written."""
    model: str | None = None
    """Base model: HF id or folder (None: the embedded SmolLM2-135M-Instruct)."""
    max_docs: int = 40
    """Fact documents used."""
    examples_per_domain: int = 40
    """Domain contexts per library domain."""
    context_tokens: int = 48
    """Tokens of context the gate reads."""
    continuation_tokens: int = 64
    """Tokens after the context whose NLL is the loss."""
    width: int = 64
    """Hidden width of the gate."""
    steps: int = 200
    """Optimizer steps."""
    batch_size: int = 8
    """Examples per step."""
    lr: float = 1e-3
    """Adam learning rate."""
    initial_weight: float = 0.5
    """Both gate weights before training (a sigmoid far from 0.5 learns slowly)."""
    seed: int = 0
    """Random seed."""
    threads: int = 2
    """CPU threads torch uses."""
    run: RunConfig = field(default_factory=RunConfig)
    """Device, mixed precision, gradient accumulation, resumable checkpoints (accelerate)."""
    split: str = field(default="train", repr=False)
    """The domains' split the examples come from (the eval passes ``test``)."""


def train_mix(config: MixTrainConfig) -> dict:
    from dynalora.hyper.mix_gate import MixGate, MixGateConfig
    from dynalora.data.absorb import read_docs
    from dynalora.plot import plot_losses

    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    run = TrainingRun(config.run, config.out_dir)
    setup = MixSetup(config, run.device, config.run.dtype)
    docs = read_docs(Path(config.facts))[:config.max_docs]
    examples, memories = mix_examples(setup, config, docs, config.split, config.seed)
    prepare_seconds = time.perf_counter() - started
    gate = MixGate(MixGateConfig(feature_size=setup.net.config.feature_size, width=config.width,
                                 initial_weight=config.initial_weight))
    gate = gate.to(run.device)
    optimizer = torch.optim.AdamW(gate.parameters(), lr=config.lr, weight_decay=0.01)
    gate, optimizer = run.accelerator.prepare(gate, optimizer)
    by_kind = {kind: [i for i, e in enumerate(examples) if e.kind == kind] for kind in ("domain", "facts")}
    rng = random.Random(config.seed)
    start, history, _ = run.resume(rng)
    began = time.perf_counter()
    for step in (progress := tqdm(range(start, config.steps), desc="train mix", initial=start, total=config.steps,
                                  disable=not run.is_main)):
        rows = [i for kind in by_kind.values() for i in rng.sample(kind, min(len(kind), config.batch_size // 2))]
        batch = [examples[i] for i in run.shard(torch.tensor(rows)).tolist()]  # this process's slice
        with run.accelerator.accumulate(gate), run.accelerator.autocast():
            weights = gate(torch.stack([e.features for e in batch]))  # (N, 2)
            nll = mixed_nll(setup, batch, memories, weights)
            loss = nll.mean()
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(f"train mix: non-finite loss at step {step}")
            run.update(loss, optimizer, gate.parameters())
        kinds = torch.tensor([e.kind == "domain" for e in batch], device=nll.device)
        history.append({"nll": run.mean(loss), "domain_nll": run.mean(nll[kinds].mean()),
                        "facts_nll": run.mean(nll[~kinds].mean()), "w_shift": run.mean(weights[:, 0].mean()),
                        "w_memory": run.mean(weights[:, 1].mean()),
                        "w_memory_domain": run.mean(weights[kinds, 1].mean()),
                        "w_memory_facts": run.mean(weights[~kinds, 1].mean())})
        run.end_step(step + 1, history, rng)
        progress.set_postfix(nll=f"{history[-1]['nll']:.3f}", ws=f"{history[-1]['w_shift']:.2f}",
                             wm_domain=f"{history[-1]['w_memory_domain']:.2f}",
                             wm_facts=f"{history[-1]['w_memory_facts']:.2f}")
    train_seconds = time.perf_counter() - began
    gate = run.accelerator.unwrap_model(gate).eval()
    setup.close()
    run.finish()
    config.out_dir.mkdir(parents=True, exist_ok=True)
    if run.is_main:
        gate.save_pretrained(config.out_dir)
        plot_losses([h["nll"] for h in history], config.out_dir / "loss.png", "mix gate: NLL (domain + facts rows)")
    metadata = {"config": config_record(config), "train_seconds": round(train_seconds, 1),
                "prepare_seconds": round(prepare_seconds, 1), "parameters": sum(p.numel() for p in gate.parameters()),
                "examples": {kind: len(v) for kind, v in by_kind.items()}, "documents": len(docs),
                "final": {k: sum(h[k] for h in history[-20:]) / len(history[-20:]) for k in history[-1]}
                if history else {},
                "history": history, "split": {"domains": config.split, "facts": str(config.facts)},
                "processes": run.accelerator.num_processes, "resumed_from_step": start}
    if run.is_main:
        (config.out_dir / "train_mix.json").write_text(json.dumps(metadata, indent=2))
    return metadata
