"""``dynalora train library``: train the labelled LoRA library, one PEFT adapter per entry.

Each adapter is trained with PEFT on its own source (a text domain's train split, or a BIG-Bench task's
train split with loss on the answer only), evaluated on the validation split before and after, and
saved as a PEFT folder plus ``dynalora_adapter.json`` (label, description, source, splits, cost, NLLs)
and ``loss.png``. Finished adapters are skipped when the command is run again; an interrupted one
resumes from its last checkpoint (``<label>.partial/``).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from dynalora.data.batches import (
    TokenBatch,
    batch_nll,
    config_record,
    pair_batches,
    source_kind,
    task_pairs,
    text_token_stream,
    window_batches,
)
from dynalora.cli_config import construct, read_config_file
from dynalora.lora.library_folder import METADATA_FILE
from dynalora.lr_schedule import cosine_lr
from dynalora.plot import plot_losses
from dynalora.shipped import trained
from dynalora.training import RunConfig, TrainingRun

logger = logging.getLogger(__name__)


@dataclass
class AdapterSpec:
    label: str
    description: str
    source: str
    """``domain:NAME`` (see ``dynalora data list``) or ``bigbench:TASK``."""


@dataclass
class LibraryConfig:
    adapters: list[AdapterSpec]
    """The library: one ``[[adapters]]`` table per adapter (label, description, source); set by ``--config``."""
    out_dir: Path = field(default_factory=lambda: trained("library"))
    """Where each adapter's PEFT folder and ``library.json`` are written."""
    model: str | None = None
    """Base model (None: the embedded SmolLM2-135M-Instruct)."""
    rank: int = 8
    """LoRA rank of each adapter."""
    alpha: float = 16.0
    """LoRA alpha (the update is scaled by alpha / rank)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module kinds each adapter adapts."""
    steps: int = 60
    """Optimizer steps per adapter."""
    batch_size: int = 4
    """Windows (or task examples) per step, split over the processes under ``accelerate launch``."""
    seq_len: int = 128
    """Tokens per training window."""
    lr: float = 2e-3
    """Peak AdamW learning rate (cosine schedule)."""
    warmup_steps: int = 5
    """Linear warm-up steps."""
    eval_batches: int = 6
    """Validation batches scored before and after training."""
    seed: int = 0
    """Random seed (data order, initialisation)."""
    threads: int = 2
    """CPU threads torch uses."""
    held_out_tasks: list[str] = field(default_factory=list)
    """BIG-Bench tasks kept out of the library (for held-out evaluations); a spec using one is refused."""
    only: list[str] | None = None
    """Train only the adapters with these labels (None: every one not yet finished)."""
    run: RunConfig = field(default_factory=lambda: RunConfig(checkpoint_every=20))
    """Device, mixed precision, gradient accumulation, resumable checkpoints of the adapter in training."""

    def __post_init__(self):
        where = "LibraryConfig"
        if not self.adapters:
            raise ValueError(f"{where}: no [[adapters]] given")
        labels = [a.label for a in self.adapters]
        if len(set(labels)) != len(labels):
            raise ValueError(f"{where}: duplicate adapter labels in {labels}")
        unknown = sorted(set(self.only or []) - set(labels))
        if unknown:
            raise ValueError(f"{where}: only={unknown}: no adapters with these labels (have {labels})")
        for spec in self.adapters:
            kind, name = source_kind(spec.source)
            if kind == "bigbench" and name in self.held_out_tasks:
                raise ValueError(f"{where}: adapter {spec.label!r} trains on held-out task {name!r}")
        for name in ("rank", "steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{where}: {name} must be ≥ 1")

    @classmethod
    def from_file(cls, path: str | Path) -> "LibraryConfig":
        """The config in a TOML or JSON file (the shipped one: ``shipped_config("library.toml")``); errors name the
        file and the field."""
        return construct(cls, read_config_file(path), str(path))


def _batches(spec: AdapterSpec, tokenizer, config: LibraryConfig, split: str, count: int,
             seed: int) -> list[TokenBatch]:
    kind, name = source_kind(spec.source)
    if kind != "bigbench":
        stream = text_token_stream(tokenizer, spec.source, split, seed=seed)
        return window_batches(stream, config.seq_len, config.batch_size, count, seed)
    pairs = task_pairs(tokenizer, name, split)
    return pair_batches(pairs, config.seq_len, config.batch_size, count, seed, tokenizer.pad_token_id or 0)


@torch.no_grad()
def mean_nll(model, batches: list[TokenBatch]) -> float:
    total, count = 0.0, 0
    for batch in batches:
        loss, n = batch_nll(model, batch)
        total, count = total + float(loss), count + n
    return total / max(count, 1)


def save_half_precision(path: Path) -> None:
    """Rewrite a safetensors file in fp16 (shipped checkpoints stay small; loaders upcast)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    save_file({k: v.half().contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


class LoraWeights:
    """A PEFT model's adapter weights as one object to checkpoint (``accelerate``'s ``register_for_checkpointing``)."""

    def __init__(self, model):
        self.model = model

    def state_dict(self) -> dict:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model)

    def load_state_dict(self, state: dict) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, state)


def train_adapter(spec: AdapterSpec, base, config: LibraryConfig) -> dict:
    """Train (or resume) one adapter; returns its metadata. ``base`` is a loaded :class:`BaseModel`."""
    from peft import LoraConfig, get_peft_model

    out = config.out_dir / spec.label
    partial = config.out_dir / f"{spec.label}.partial"
    tokenizer = base.tokenizer
    torch.manual_seed(config.seed)
    train = _batches(spec, tokenizer, config, "train", config.steps, seed=config.seed)
    validation = _batches(spec, tokenizer, config, "validation", config.eval_batches, seed=config.seed + 1)
    base.model.eval()
    nll_base = mean_nll(base.model, validation)

    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=list(config.target_modules),
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base.model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    run = TrainingRun(config.run, partial)
    optimizer = run.accelerator.prepare(torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0))
    run.accelerator.register_for_checkpointing(LoraWeights(model))  # the adapter's weights only, not the base's
    start, losses, extra = run.resume()
    seconds = extra.get("seconds", 0.0)
    model.train()
    progress = tqdm(range(start, config.steps), desc=f"train {spec.label}", initial=start, total=config.steps,
                    disable=not run.is_main)
    for step in progress:
        began = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, config.steps, config.warmup_steps, config.lr)
        batch = train[step].rows(run.shard(torch.arange(len(train[step].input_ids))))  # this process's rows
        with run.accelerator.accumulate(), run.accelerator.autocast():
            loss, count = batch_nll(model, batch)
            run.update(loss / max(count, 1), optimizer, params, max_norm=1.0, average=True)  # not a prepared module
        losses.append(run.mean(loss.detach() / max(count, 1)))
        seconds += time.perf_counter() - began
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
        run.end_step(step + 1, losses, extra={"seconds": seconds})
    run.finish()
    model.eval()
    nll_adapter = mean_nll(model, validation)
    kind, name = source_kind(spec.source)
    metadata = {
        "label": spec.label, "description": spec.description, "source": spec.source,
        "splits": {"train": "train", "validation": "validation", "test": "test",
                   "by": "parent document id" if kind == "domain" else "example input"},
        "base_model": base.name, "rank": config.rank, "alpha": config.alpha,
        "target_modules": list(config.target_modules), "steps": config.steps, "batch_size": config.batch_size,
        "seq_len": config.seq_len, "lr": config.lr, "train_seconds": round(seconds, 1),
        "train_tokens_seen": int(sum(int(b.attention_mask.sum()) for b in train)),
        "validation_nll_base": nll_base, "validation_nll_adapter": nll_adapter, "seed": config.seed,
        "device": str(next(model.parameters()).device), "torch_threads": torch.get_num_threads(),
        "processes": run.accelerator.num_processes, "resumed_from_step": start,
    }
    if run.is_main:  # written whole under a staging name, then moved into place
        staging = config.out_dir / f"{spec.label}.staging"
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(str(staging))
        save_half_precision(staging / "adapter_model.safetensors")
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
        plot_losses(losses, staging / "loss.png", f"{spec.label}: val NLL {nll_base:.3f} → {nll_adapter:.3f}")
        (staging / "losses.json").write_text(json.dumps(losses))
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
        shutil.rmtree(partial, ignore_errors=True)
    run.accelerator.wait_for_everyone()
    base.model = model.unload()  # take the PEFT layers off: the next adapter starts from the plain base
    return metadata


def train_library(config: LibraryConfig, base=None) -> list[dict]:
    """Train every adapter (of ``config.only``, if given) not yet finished in ``config.out_dir``; returns their
    metadata (``library.json`` lists them)."""

    torch.set_num_threads(config.threads)
    run = TrainingRun(config.run, config.out_dir)  # the device and the main process; each adapter has its own run
    base = base or run.load_base(config.model)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for spec in [a for a in config.adapters if config.only is None or a.label in config.only]:
        done = config.out_dir / spec.label / METADATA_FILE
        if done.is_file():
            logger.info(f"{spec.label}: already trained, skipping ({done})")
            results.append(json.loads(done.read_text()))
            continue
        results.append(train_adapter(spec, base, config))
        r = results[-1]
        logger.info(f"{spec.label}: validation NLL {r['validation_nll_base']:.3f} → {r['validation_nll_adapter']:.3f} "
              f"in {r['train_seconds']:.0f}s")
    if run.is_main:
        (config.out_dir / "library.json").write_text(json.dumps({"config": config_record(config), "adapters": results},
                                                                indent=2))
    return results
