"""``dynalora train route``: train the token router (:mod:`dynalora.hyper.router`) end to end through the frozen model.

Data: mixed-domain streams from the library domains' **train** split (as ``train xlora``), each first run through the
shift system exactly as ``eval shift`` runs it (learned trigger, shift network, its update delay): the blend in force
at every token is the router's prior there — including the tokens after a domain change that the trigger has not
caught yet, where re-weighting per token pays most. Loss: the next-token NLL of random windows of the streams with the
prior blend on every layer up to the feature layer and the routed blend above it (``LoraState.functional`` with one
blend per position); only the router (a few tens of thousands of parameters) is trained.
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

from dynalora.data.batches import config_record, random_windows
from dynalora.shipped import shipped, trained
from dynalora.training import RunConfig, TrainingRun


@dataclass
class RouteTrainConfig:
    library_dir: Path = shipped("library")
    """The trained library the router re-weights (``dynalora train library``)."""
    shift_dir: Path = shipped("shift")
    """The shift network whose blends are the prior (``dynalora train shift``)."""
    triggers_dir: Path = shipped("triggers")
    """The trained trigger that fires it (``dynalora train triggers``)."""
    out_dir: Path = field(default_factory=lambda: trained("router"))
    """Where the router is written (``router.safetensors`` + ``router.json``)."""
    model: str | None = None
    """Base model: HF id or folder (None: the embedded SmolLM2-135M-Instruct)."""
    streams: int = 48
    """Training streams (the library's text adapters' sources, train split)."""
    segments: int = 3
    """Segments (domain changes + 1) per stream."""
    segment_chars: int = 700
    """Characters per segment."""
    update_delay: int = 12
    """The shift system's update delay (as ``eval shift`` runs it)."""
    trigger: list[str] = field(default_factory=lambda: ["prob"])
    """The shift system's trigger policies (``--trigger`` forms, as ``eval shift`` takes them; ``prompt`` picks the
    first blend from each stream's first ``prompt_tokens``)."""
    prompt_tokens: int = 0
    """A stream's first tokens read as a prompt (for the ``prompt`` policy)."""
    window: int = 128
    """Tokens per training sequence (a random window of a stream)."""
    steps: int = 200
    """Optimizer steps."""
    batch_size: int = 2
    """Windows per step (split over the processes under ``accelerate launch``)."""
    lr: float = 3e-3
    """AdamW learning rate."""
    width: int = 64
    """Hidden width of the router's MLP."""
    smoothing: float = 0.01
    """ε of the routed blend (how far the router may raise an adapter its prior has at zero)."""
    seed: int = 0
    """Random seed."""
    threads: int = 2
    """CPU threads torch uses."""
    run: RunConfig = field(default_factory=RunConfig)
    """Device, mixed precision, gradient accumulation, resumable checkpoints (accelerate)."""

    def __post_init__(self):
        if self.steps < 0 or self.window < 8 or self.streams < 1 or self.batch_size < 1:
            raise ValueError("RouteTrainConfig: steps ≥ 0, window ≥ 8, streams ≥ 1, batch_size ≥ 1")


def train_route(config: RouteTrainConfig) -> dict:
    from dynalora.data.streams import library_streams, tokenize_stream
    from dynalora.hyper.router import TokenRouter, TokenRouterConfig
    from dynalora.plot import plot_losses
    from dynalora.lora.targets import decoder_layers
    from dynalora.system.assemble import load_shift_system

    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    run = TrainingRun(config.run, config.out_dir)
    system = load_shift_system(config.library_dir, config.shift_dir, config.triggers_dir, config.model,
                               device=str(run.device), dtype=config.run.dtype, update_delay=config.update_delay,
                               triggers=config.trigger)
    system.merge_trigger_lora()  # as the live engine runs (a no-op for a row-only trigger)
    dyn, tokenizer, vocab = system.dyn, system.base.tokenizer, system.vocab_size
    started = time.perf_counter()
    streams = library_streams(system.adapters, "train", config.streams, config.seed, config.segments,
                              config.segment_chars)
    sequences, priors = [], []
    for stream in tqdm(streams, desc="shift system on the streams", leave=False, disable=not run.is_main):
        tokens = tokenize_stream(tokenizer, stream)[0]
        sequences.append(tokens)
        scored = system.run_stream(tokens, prompt_tokens=config.prompt_tokens)
        priors.append(torch.tensor(scored.blends[:-1]))  # (L-1, K): in force predicting t+1
    prior_seconds = time.perf_counter() - started
    layers = len(decoder_layers(dyn.model))
    router = TokenRouter(TokenRouterConfig(feature_size=dyn.model.config.hidden_size, bank_labels=system.bank.labels,
                                           feature_layer=system.engine_config.feature_layer % layers
                                           if system.engine_config.feature_layer is not None else layers // 2,
                                           width=config.width, smoothing=config.smoothing))
    router.attach(dyn)
    optimizer = torch.optim.AdamW(router.parameters(), lr=config.lr, weight_decay=0.0)
    prepared, optimizer = run.accelerator.prepare(router, optimizer)
    lengths = [len(tokens) for tokens in sequences]
    rng = random.Random(config.seed)
    start, history, extra = run.resume(rng)
    router.train()
    started = time.perf_counter() - extra.get("seconds", 0.0)
    progress = tqdm(range(start, config.steps), desc="train route", initial=start, total=config.steps,
                    disable=not run.is_main)
    for step in progress:
        windows = random_windows(rng, lengths, config.batch_size, config.window)  # alike on every process
        mine = [windows[i] for i in run.shard(torch.arange(config.batch_size)).tolist()]
        length = min(min(len(priors[i]) - at for i, at in mine), config.window)  # priors: one fewer than tokens
        ids = torch.tensor([sequences[i][at:at + length] for i, at in mine], device=run.device)  # (B, T)
        prior = torch.stack([priors[i][at:at + length] for i, at in mine]).to(run.device)  # (B, T, K)
        with run.accelerator.accumulate(prepared), run.accelerator.autocast():
            router.prior = prior
            with dyn.state.functional(dyn.state.expand_blend(prior)):  # (B, T, K*r): the prior below the router
                logits = dyn(input_ids=ids, use_cache=False).logits[:, :-1, :vocab]  # (B, T-1, V)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab).float(), ids[:, 1:].reshape(-1))
            run.update(loss, optimizer, router.parameters(), max_norm=1.0, average=True)  # the hook calls it unwrapped
        history.append(run.mean(loss))
        if not math.isfinite(history[-1]):
            raise FloatingPointError(f"train route: non-finite loss at step {step}")
        progress.set_postfix(loss=f"{history[-1]:.3f}")
        run.end_step(step + 1, history, rng, {"seconds": time.perf_counter() - started})
    router.prior = None
    router.detach(dyn)
    seconds = time.perf_counter() - started
    run.finish()
    router = run.accelerator.unwrap_model(prepared).eval()
    record = {"config": config_record(config), "labels": system.bank.labels, "train_seconds": round(seconds, 1),
              "prior_seconds": round(prior_seconds, 1), "parameters": sum(p.numel() for p in router.parameters()),
              "history": history, "final_loss": sum(history[-20:]) / max(len(history[-20:]), 1),
              "split": "train", "processes": run.accelerator.num_processes, "resumed_from_step": start}
    if run.is_main:
        router.save_pretrained(config.out_dir)
        if history:
            plot_losses(history, config.out_dir / "loss.png", "token router: LM loss on train-split streams")
        (config.out_dir / "train_route.json").write_text(json.dumps(record, indent=2))
    return record
