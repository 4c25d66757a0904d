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
import tomllib
from dataclasses import dataclass, field, fields
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
from dynalora.lora.library_folder import METADATA_FILE
from dynalora.lr_schedule import cosine_lr
from dynalora.plot import plot_losses
from dynalora.shipped import trained

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
    out_dir: Path = field(default_factory=lambda: trained("library"))
    model: str | None = None
    """Base model (None: the embedded SmolLM2-135M-Instruct)."""
    rank: int = 8
    alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    steps: int = 60
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 2e-3
    warmup_steps: int = 5
    eval_batches: int = 6
    checkpoint_every: int = 20
    seed: int = 0
    threads: int = 2
    held_out_tasks: list[str] = field(default_factory=list)
    """BIG-Bench tasks kept out of the library (for held-out evaluations); a spec using one is refused."""

    @classmethod
    def from_toml(cls, path: str | Path) -> "LibraryConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such config file")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"{path}: not valid TOML ({error})") from error
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {unknown}; allowed: {sorted(known)}")
        try:
            adapters = [AdapterSpec(**entry) for entry in raw.pop("adapters", [])]
        except TypeError as error:
            raise ValueError(f"{path}: [[adapters]] entries need label, description, source ({error})") from error
        if "out_dir" in raw:
            raw["out_dir"] = Path(raw["out_dir"])
        config = cls(adapters=adapters, **raw)
        config.validate(str(path))
        return config

    def validate(self, where: str = "LibraryConfig") -> None:
        if not self.adapters:
            raise ValueError(f"{where}: no [[adapters]] given")
        labels = [a.label for a in self.adapters]
        if len(set(labels)) != len(labels):
            raise ValueError(f"{where}: duplicate adapter labels in {labels}")
        for spec in self.adapters:
            kind, name = source_kind(spec.source)
            if kind == "bigbench" and name in self.held_out_tasks:
                raise ValueError(f"{where}: adapter {spec.label!r} trains on held-out task {name!r}")
        for name in ("rank", "steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{where}: {name} must be ≥ 1")


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


def train_adapter(spec: AdapterSpec, base, config: LibraryConfig) -> dict:
    """Train (or resume) one adapter; returns its metadata. ``base`` is a loaded :class:`BaseModel`."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

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
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    start, losses, seconds = 0, [], 0.0
    if (partial / "trainer.pt").is_file():  # resume (our own file; weights_only refuses code objects)
        saved = torch.load(partial / "trainer.pt", weights_only=True)
        set_peft_model_state_dict(model, saved["lora"])
        optimizer.load_state_dict(saved["optimizer"])
        start, losses, seconds = saved["step"], saved["losses"], saved["seconds"]
    model.train()
    progress = tqdm(range(start, config.steps), desc=f"train {spec.label}", initial=start, total=config.steps)
    for step in progress:
        began = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, config.steps, config.warmup_steps, config.lr)
        loss, count = batch_nll(model, train[step])
        (loss / max(count, 1)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()) / max(count, 1))
        seconds += time.perf_counter() - began
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            partial.mkdir(parents=True, exist_ok=True)
            torch.save({"lora": get_peft_model_state_dict(model), "optimizer": optimizer.state_dict(),
                        "step": step + 1, "losses": losses, "seconds": seconds}, partial / "trainer.pt")
    model.eval()
    nll_adapter = mean_nll(model, validation)
    staging = config.out_dir / f"{spec.label}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging))
    save_half_precision(staging / "adapter_model.safetensors")
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
    }
    (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    plot_losses(losses, staging / "loss.png", f"{spec.label}: val NLL {nll_base:.3f} → {nll_adapter:.3f}")
    (staging / "losses.json").write_text(json.dumps(losses))
    base.model = model.unload()  # take the PEFT layers off: the next adapter starts from the plain base
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    shutil.rmtree(partial, ignore_errors=True)
    return metadata


def train_library(config: LibraryConfig, base=None) -> list[dict]:
    """Train every adapter not yet finished in ``config.out_dir``; returns all adapters' metadata."""
    from dynalora.models import load_base_model

    config.validate()
    torch.set_num_threads(config.threads)
    base = base or load_base_model(config.model)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for spec in config.adapters:
        done = config.out_dir / spec.label / METADATA_FILE
        if done.is_file():
            logger.info(f"{spec.label}: already trained, skipping ({done})")
            results.append(json.loads(done.read_text()))
            continue
        results.append(train_adapter(spec, base, config))
        r = results[-1]
        logger.info(f"{spec.label}: validation NLL {r['validation_nll_base']:.3f} → {r['validation_nll_adapter']:.3f} "
              f"in {r['train_seconds']:.0f}s")
    (config.out_dir / "library.json").write_text(json.dumps(
        {"config": config_record(config),
         "adapters": results}, indent=2))
    return results
