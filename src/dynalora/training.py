"""What every training loop shares, on ``accelerate``: device placement, mixed precision, data-parallel shards of
each batch, gradient accumulation, and a resumable state (``save_state``/``load_state``).

A recipe runs unchanged alone or under ``accelerate launch --multi_gpu --num_processes N`` (on CPUs too: gloo).
Every process draws the same global batch from the same seeded generator and takes its own slice of it, so N
processes take the same optimizer steps as one (their gradients are averaged over equal slices; tested).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from dynalora.models import load_base_model, resolve_dtype

MIXED_PRECISION = ("no", "bf16", "fp16")
CURVES_FILE = "curves.jsonl"


@dataclass
class RunConfig:
    """How a recipe runs (not what it learns); a field of each recipe's config."""

    device: str = "auto"
    """auto (CUDA when there is one; under accelerate launch its process's device), cpu or cuda."""
    mixed_precision: str = "no"
    """no, bf16 or fp16 autocast for the forward and backward (weights and optimizer stay fp32)."""
    dtype: str = "float32"
    """The frozen base model's weights: float32, bfloat16 or float16 (half the memory; what is trained stays
    float32)."""
    gradient_accumulation_steps: int = 1
    """Optimizer steps every this many batches."""
    checkpoint_every: int = 0
    """Save a resumable state every this many steps (0: never); a rerun with the same out_dir resumes from it."""
    tracker: str | None = None
    """Also send the curves to this accelerate tracker (tensorboard, mlflow, aim, ... when installed; its files
    under out_dir). Every run writes them to out_dir/curves.jsonl as it goes."""

    def __post_init__(self):
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"RunConfig.mixed_precision={self.mixed_precision!r}: choose one of {MIXED_PRECISION}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"RunConfig.device={self.device!r}: choose auto, cpu or cuda")
        resolve_dtype(self.dtype)
        if self.gradient_accumulation_steps < 1 or self.checkpoint_every < 0:
            raise ValueError("RunConfig.gradient_accumulation_steps must be ≥ 1 and checkpoint_every ≥ 0")
        if self.tracker is not None:
            from accelerate.tracking import get_available_trackers

            available = sorted(str(getattr(t, "value", t)) for t in get_available_trackers())
            if self.tracker not in available:
                raise ValueError(f"RunConfig.tracker={self.tracker!r}: not installed; available here: {available} "
                                 "(e.g. pip install tensorboard)")


@dataclass
class TrainingRun:
    """One recipe's run: its accelerator and where its resumable state lives (``out_dir/resume``)."""

    config: RunConfig
    out_dir: Path
    accelerator: Accelerator = field(init=False)

    def __post_init__(self):
        # on a machine without CUDA, accelerate joins launched processes only when told cpu=True
        cpu = self.config.device == "cpu" or (self.config.device == "auto" and not torch.cuda.is_available())
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=self.config.mixed_precision,
                                       gradient_accumulation_steps=self.config.gradient_accumulation_steps,
                                       log_with=self.config.tracker, project_dir=str(self.out_dir))
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != self.accelerator.num_processes:  # each process would train alone, on the same data
            raise RuntimeError(f"{launched} processes were launched but accelerate joined "
                               f"{self.accelerator.num_processes}; check --device ({self.config.device})")
        self.state_dir = Path(self.out_dir) / "resume"
        self.curves = Path(self.out_dir) / CURVES_FILE
        if self.config.tracker is not None:
            self.accelerator.init_trackers(Path(self.out_dir).name)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def load_base(self, model: str | None):
        """The recipe's frozen base model (:func:`load_base_model`) in ``dtype``, on this process's device."""
        return load_base_model(model, self.config.dtype, self.device)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def shard(self, rows: torch.Tensor) -> torch.Tensor:
        """This process's slice of a global batch ``rows (B,)``: every N-th, from its rank."""
        count = self.accelerator.num_processes
        if len(rows) % count:
            raise ValueError(f"batch_size={len(rows)} does not split over {count} processes; use a multiple of it")
        return rows[self.accelerator.process_index::count]

    def update(self, loss: torch.Tensor | None, optimizer, parameters, max_norm: float | None = None,
               average: bool = False) -> None:
        """One optimizer update, the same in every recipe: ``loss`` back-propagated through accelerate (fp16 loss
        scaling, gradient accumulation; None: the recipe has already), the gradients averaged over the processes
        with ``average`` (for parameters the recipe calls other than through a prepared module — a level inside a
        hypernetwork stack, a compressor's ``.read``, hooks — which no DDP wrapper averages), clipped to
        ``max_norm``, then the step (skipped by accelerate between accumulation boundaries)."""
        if loss is not None:
            self.accelerator.backward(loss)
        parameters = list(parameters)
        if average and self.accelerator.num_processes > 1 and self.accelerator.sync_gradients:
            for parameter in parameters:
                if parameter.grad is not None:
                    parameter.grad = self.accelerator.reduce(parameter.grad, "mean")
        if max_norm is not None and self.accelerator.sync_gradients:
            self.accelerator.clip_grad_norm_(parameters, max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def mean(self, value: torch.Tensor) -> float:
        """A per-process scalar averaged over the processes (for logs)."""
        return float(self.accelerator.reduce(value.detach().float().reshape(1), "mean"))

    def resume(self, rng=None) -> tuple[int, list, dict]:
        """Load the saved state if there is one (models, optimizers, what was registered for checkpointing, torch's
        RNGs, and ``rng``: the recipe's ``torch.Generator`` or ``random.Random``, if it draws from one):
        ``(step, history, extra)``; ``(0, [], {})`` when none."""
        if not (self.state_dir / "progress.json").is_file():
            if self.is_main:
                self.curves.unlink(missing_ok=True)  # a fresh run's curves start empty
            return 0, [], {}
        self.accelerator.load_state(str(self.state_dir))
        saved = torch.load(self.state_dir / "recipe.pt", weights_only=False)  # written by this recipe
        if rng is not None:
            (rng.set_state if isinstance(rng, torch.Generator) else rng.setstate)(saved["rng"])
        progress = json.loads((self.state_dir / "progress.json").read_text())
        if self.is_main and self.curves.is_file():  # the steps logged after the saved state are done again
            lines = self.curves.read_text().splitlines()
            self.curves.write_text("".join(line + "\n" for line in lines
                                           if json.loads(line)["step"] <= progress["step"]))
        return progress["step"], progress["history"], saved["extra"]

    def end_step(self, step: int, history: list, rng=None, extra: dict | None = None) -> None:
        """After ``step`` steps: the step's values (``history[-1]``) appended to the curves (and the tracker), and
        every ``checkpoint_every`` steps the resumable state, with the recipe's ``rng`` and any ``extra`` it needs to
        go on (e.g. the best weights so far)."""
        if history and self.is_main:
            values = history[-1] if isinstance(history[-1], dict) else {"loss": history[-1]}
            self.curves.parent.mkdir(parents=True, exist_ok=True)
            with self.curves.open("a") as curves:
                curves.write(json.dumps({"step": step, **values}) + "\n")
            if self.config.tracker is not None:
                self.accelerator.log(values, step=step)
        every = self.config.checkpoint_every
        if not every or step % every:
            return
        self.accelerator.save_state(str(self.state_dir))
        if self.is_main:
            rng_state = None if rng is None else rng.get_state() if isinstance(rng, torch.Generator) else rng.getstate()
            torch.save({"rng": rng_state, "extra": extra or {}}, self.state_dir / "recipe.pt")
            (self.state_dir / "progress.json").write_text(json.dumps({"step": step, "history": history}))
        self.accelerator.wait_for_everyone()

    def finish(self) -> None:
        """The run is done: its resumable state goes (the curves stay)."""
        if self.config.tracker is not None:
            self.accelerator.end_training()
        self.accelerator.wait_for_everyone()
        if self.is_main:
            shutil.rmtree(self.state_dir, ignore_errors=True)
