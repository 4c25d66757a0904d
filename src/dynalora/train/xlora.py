"""``dynalora train xlora``: PEFT's X-LoRA over the library, its classifier trained briefly — a baseline.

X-LoRA (Buehler & Buehler, 2024) runs the base model once without adapters, feeds each token's last
hidden state to a small classifier that outputs softmax scalings over the library's adapters, then
runs the model again with every adapter's output weighted by its token's scalings. Only the
classifier is trained (the experts stay frozen), here on the language-modelling loss of
mixed-domain streams from the library domains' **train** split — the same library and the same kind
of text as ``dynalora eval shift``, with no domain labels (as dynalora's triggers learn).

PEFT 0.21 names: the adapters are passed as ``"0" … "n-1"`` (PEFT's X-LoRA loads them under those names
and looks its ``adapters`` keys up among them), the library order is kept in ``xlora.json``.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from dynalora.data.batches import config_record, random_windows
from dynalora.shipped import shipped, trained
from dynalora.system.xlora import CONFIG_FILE, WEIGHTS_FILE, build_xlora, xlora_classifier
from dynalora.training import RunConfig, TrainingRun

@dataclass
class XLoraTrainConfig:
    library_dir: Path = shipped("library")
    """The trained library X-LoRA mixes (``dynalora train library``)."""
    out_dir: Path = field(default_factory=lambda: trained("xlora"))
    """Where the classifier is written."""
    model: str | None = None
    """Base model: HF id or folder (None: the embedded SmolLM2-135M-Instruct)."""
    streams: int = 64
    """Training streams (the library's text adapters' sources, train split)."""
    segments: int = 3
    """Segments (domain changes + 1) per stream."""
    segment_chars: int = 700
    """Characters per segment."""
    window: int = 256
    """Tokens per training sequence (a random window of a stream)."""
    steps: int = 120
    """Optimizer steps."""
    batch_size: int = 1
    """Windows per step (split over the processes under ``accelerate launch``)."""
    lr: float = 2e-3
    """Adam learning rate."""
    depth: int = 1
    """Classifier layers (PEFT ``xlora_depth``; 1 = one linear map from the hidden state)."""
    seed: int = 0
    """Random seed."""
    threads: int = 2
    """CPU threads torch uses."""
    run: RunConfig = field(default_factory=RunConfig)
    """Device, mixed precision, gradient accumulation, resumable checkpoints (accelerate)."""

    def __post_init__(self):
        if self.steps < 1 or self.window < 8 or self.streams < 1 or self.batch_size < 1:
            raise ValueError("XLoraTrainConfig: steps ≥ 1, window ≥ 8, streams ≥ 1, batch_size ≥ 1")


def train_xlora(config: XLoraTrainConfig) -> dict:
    from safetensors.torch import save_file

    from dynalora.data.streams import library_streams, tokenize_stream
    from dynalora.plot import plot_losses

    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    run = TrainingRun(config.run, config.out_dir)
    model, tokenizer, adapters = build_xlora(config.library_dir, config.model, config.depth, run.device,
                                             config.run.dtype)
    labels = [adapter["label"] for adapter in adapters]
    streams = library_streams(adapters, "train", config.streams, config.seed, config.segments, config.segment_chars)
    sequences = [tokenize_stream(tokenizer, s)[0] for s in streams]
    lengths = [len(tokens) for tokens in sequences]
    rng = random.Random(config.seed)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    model, optimizer = run.accelerator.prepare(model, optimizer)
    start, history, extra = run.resume(rng)
    model.train()
    started = time.perf_counter() - extra.get("seconds", 0.0)
    progress = tqdm(range(start, config.steps), desc="train xlora", initial=start, total=config.steps,
                    disable=not run.is_main)
    for step in progress:
        windows = [sequences[i][at:at + config.window]  # the global batch, drawn alike on every process
                   for i, at in random_windows(rng, lengths, config.batch_size, config.window)]
        mine = [windows[i] for i in run.shard(torch.arange(config.batch_size)).tolist()]
        with run.accelerator.accumulate(model), run.accelerator.autocast():
            losses = [model(input_ids=torch.tensor([ids], device=run.device),  # (1, T)
                            labels=torch.tensor([ids], device=run.device)).loss for ids in mine]
            loss = torch.stack(losses).mean()
            run.update(loss, optimizer, parameters)
        history.append(run.mean(loss))
        progress.set_postfix(loss=f"{history[-1]:.3f}")
        run.end_step(step + 1, history, rng, {"seconds": time.perf_counter() - started})
    seconds = time.perf_counter() - started
    model = run.accelerator.unwrap_model(model)
    run.finish()
    record = {"config": config_record(config), "labels": labels, "train_seconds": round(seconds, 1),
              "parameters": sum(p.numel() for p in parameters), "history": history,
              "final_loss": sum(history[-20:]) / len(history[-20:]), "processes": run.accelerator.num_processes,
              "resumed_from_step": start}
    if run.is_main:
        config.out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().half().contiguous() for k, v in xlora_classifier(model).state_dict().items()},
                  str(config.out_dir / WEIGHTS_FILE))
        plot_losses(history, config.out_dir / "loss.png", "X-LoRA classifier: LM loss on train-split streams")
        (config.out_dir / CONFIG_FILE).write_text(json.dumps(record, indent=2))
    return record
