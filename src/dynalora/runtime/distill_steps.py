"""The ``distill`` writer's update rule: Adam with its own step size per step, per module and per factor.

With one step size everywhere :class:`Adam` is ``torch.optim.Adam`` (bias-corrected, no weight decay).
A :class:`StepSizes` schedule gives every (step, module, ``A``/``B``) its own step size and may carry a
start for the fresh ``A`` factors; ``dynalora train absorb-steps`` meta-learns both on train-seed documents
(:mod:`dynalora.train.absorb_steps`) so that few steps write what many hand-tuned ones would.

Example::

    sizes = StepSizes.constant(["model.layers.20.mlp.down_proj"], steps=8, lr=0.02)
    sizes.at(3)                     # (M, 2) step sizes of A and B at step 3 (the last one past the schedule)
    sizes.save(trained("absorb_steps"), record={...})
    StepSizes.load(shipped("absorb_steps"))
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

BETAS = (0.9, 0.999)
EPS = 1e-8
FILE = "step_sizes.safetensors"
RECORD = "train_absorb_steps.json"


@dataclass
class StepSizes:
    modules: list[str]
    log_lr: torch.Tensor
    """(steps, M, 2): log step size of ``A`` (0) and ``B`` (1) for each step and module (order of ``modules``)."""
    start: dict[str, torch.Tensor] = field(default_factory=dict)
    """``{module: A (r, in)}``: where fresh ``A`` factors start (else Gaussian); ``B`` always starts at zero."""

    def __post_init__(self):
        if self.log_lr.dim() != 3 or self.log_lr.shape[1:] != (len(self.modules), 2):
            raise ValueError(f"StepSizes.log_lr: shape {tuple(self.log_lr.shape)}, expected (steps, "
                             f"{len(self.modules)}, 2) for {len(self.modules)} modules")
        unknown = sorted(set(self.start) - set(self.modules))
        if unknown:
            raise ValueError(f"StepSizes.start: modules {unknown[:3]} are not in the schedule's modules")

    @classmethod
    def constant(cls, modules: list[str], steps: int, lr: float) -> StepSizes:
        return cls(list(modules), torch.full((max(steps, 1), len(modules), 2), math.log(lr)))

    @property
    def steps(self) -> int:
        return self.log_lr.shape[0]

    def at(self, step: int) -> torch.Tensor:
        """(M, 2) step sizes at ``step`` (0-based); steps past the schedule take its last ones."""
        return self.log_lr[min(step, self.steps - 1)].detach().exp()

    def save(self, folder: str | Path, record: dict | None = None) -> Path:
        """``step_sizes.safetensors`` (log step sizes fp32, a few hundred numbers; the starts fp16) and a JSON
        record, each written to a temporary name and moved into place."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"log_lr": self.log_lr.detach().float().contiguous()}
        tensors.update({f"start.{m}": a.detach().half().contiguous() for m, a in self.start.items()})
        temporary = folder / (FILE + ".tmp")
        save_file(tensors, str(temporary), metadata={"modules": json.dumps(self.modules)})
        temporary.replace(folder / FILE)
        if record is not None:
            (folder / (RECORD + ".tmp")).write_text(json.dumps(record, indent=2))
            (folder / (RECORD + ".tmp")).replace(folder / RECORD)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> StepSizes:
        path = Path(folder) / FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (a folder from `dynalora train absorb-steps` has it)")
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            modules = json.loads(handle.metadata()["modules"])
        tensors = load_file(str(path))
        return cls(modules, tensors["log_lr"], {k[len("start."):]: v for k, v in tensors.items()
                                                 if k.startswith("start.")})

    def for_modules(self, modules: list[str]) -> torch.Tensor:
        """Row indices into the schedule for ``modules``; a clear error when one is missing."""
        index = {m: i for i, m in enumerate(self.modules)}
        missing = [m for m in modules if m not in index]
        if missing:
            raise ValueError(f"StepSizes: no step sizes for {missing[:3]} (the schedule was learned for "
                             f"{len(self.modules)} other modules; retrain with `dynalora train absorb-steps`)")
        return torch.tensor([index[m] for m in modules])


class Adam:
    """Adam over a list of tensors, a step size per tensor per step. :meth:`step` applies ``p -= lr · d`` and
    returns the directions ``d = m̂ / (√v̂ + ε)`` (what a step-size hypergradient needs: ∂p/∂lr = −d)."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.first = [torch.zeros_like(t) for t in tensors]
        self.second = [torch.zeros_like(t) for t in tensors]
        self.count = 0

    @torch.no_grad()
    def step(self, tensors: list[torch.Tensor], step_sizes: list[float]) -> list[torch.Tensor]:
        self.count += 1
        beta1, beta2 = BETAS
        correction1, correction2 = 1 - beta1 ** self.count, math.sqrt(1 - beta2 ** self.count)
        directions = []
        for tensor, first, second, lr in zip(tensors, self.first, self.second, step_sizes):
            grad = tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)
            first.mul_(beta1).add_(grad, alpha=1 - beta1)
            second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            direction = first / ((second.sqrt() / correction2).add_(EPS) * correction1)
            tensor.sub_(direction, alpha=lr)
            directions.append(direction)
        return directions
