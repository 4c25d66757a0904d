"""Bounded drift: refuse updates that are non-finite or larger than a row should move in one step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynalora.lora.state import Factors, LoraState


@dataclass
class GuardConfig:
    max_blend_step: float = 2.0
    """Largest change of the blend weights in one update (L2 norm of the difference)."""
    max_blend_mass: float = 4.0
    """Largest ‖blend‖₁ a row may reach: bounds the drift of a thousand small steps."""
    max_module_delta: float = 8.0
    """Largest ‖B A‖_F of any one module's generated or memory factors."""


def lowrank_norm(lora_a: torch.Tensor, lora_b: torch.Tensor) -> float:
    """Exact ‖B A‖_F from ``A (r, in)``, ``B (out, r)`` via an r×r product: ‖BA‖² = tr((A Aᵀ)(Bᵀ B))."""
    a, b = lora_a.double(), lora_b.double()
    return float(torch.trace((a @ a.T) @ (b.T @ b)).clamp(min=0).sqrt())


def check_update(config: GuardConfig, state: LoraState, row: int, blend: torch.Tensor | None,
                 generated: Factors | None, memory: Factors | None) -> str | None:
    """Why the update must be refused, or ``None`` when it may be applied."""
    for name, factors in (("generated", generated), ("memory", memory)):
        for module, (lora_a, lora_b) in (factors or {}).items():
            lora_a, lora_b = torch.as_tensor(lora_a, device=state.device), torch.as_tensor(lora_b, device=state.device)
            if not (torch.isfinite(lora_a).all() and torch.isfinite(lora_b).all()):
                return f"non-finite {name} factors for {module}"
            norm = lowrank_norm(lora_a, lora_b)
            if norm > config.max_module_delta:
                return f"{name} factors for {module}: ‖BA‖={norm:.3g} > max_module_delta={config.max_module_delta}"
    if blend is not None:
        if not torch.isfinite(blend).all():
            return "non-finite blend weights"
        step = float(torch.linalg.norm(blend.float() - state.blend_weights[row].float()))
        if step > config.max_blend_step:
            return f"blend step {step:.3g} > max_blend_step={config.max_blend_step}"
        mass = float(blend.abs().sum())
        if mass > config.max_blend_mass:
            return f"blend mass {mass:.3g} > max_blend_mass={config.max_blend_mass}"
    return None
