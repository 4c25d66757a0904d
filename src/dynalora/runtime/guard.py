"""Bounded drift: refuse updates that are non-finite, too large in one step, or too far from zero."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynalora.lora.state import Factors, LoraState


@dataclass
class GuardConfig:
    max_step: float = 8.0
    """Largest change in one update: ‖Δblend‖₂ + Σ_modules ‖B‖_F‖A‖_F of new factors (an upper bound of ‖ΔW‖)."""
    max_blend_mass: float = 4.0
    """Cumulative bound on ‖blend‖₁: the sum of |weights| a row may reach."""
    max_factor_norm: float = 64.0
    """Cumulative bound on Σ_modules ‖B‖_F‖A‖_F of a row's generated (and memory) factors."""


def factor_norm(factors: Factors | None) -> float:
    if not factors:
        return 0.0
    return float(sum(torch.linalg.norm(b.float()) * torch.linalg.norm(a.float()) for a, b in factors.values()))


def check_update(config: GuardConfig, state: LoraState, row: int, blend: torch.Tensor | None,
                 generated: Factors | None, memory: Factors | None) -> str | None:
    """Why the update must be refused, or ``None`` when it may be applied."""
    for name, factors in (("generated", generated), ("memory", memory)):
        for module, (lora_a, lora_b) in (factors or {}).items():
            if not (torch.isfinite(torch.as_tensor(lora_a)).all() and torch.isfinite(torch.as_tensor(lora_b)).all()):
                return f"non-finite {name} factors for {module}"
    step = 0.0
    if blend is not None:
        if not torch.isfinite(blend).all():
            return "non-finite blend weights"
        step += float(torch.linalg.norm(blend - state.blend_weights[row]))
        mass = float(blend.abs().sum())
        if mass > config.max_blend_mass:
            return f"blend mass {mass:.3g} > max_blend_mass={config.max_blend_mass}"
    for factors in (generated, memory):
        norm = factor_norm(factors)
        step += norm
        if norm > config.max_factor_norm:
            return f"factor norm {norm:.3g} > max_factor_norm={config.max_factor_norm}"
    if step > config.max_step:
        return f"update step {step:.3g} > max_step={config.max_step}"
    return None
