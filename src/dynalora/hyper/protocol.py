"""What a hypernetwork sees when a trigger fires, and what it may answer.

A hypernetwork is any callable ``(TriggerFeatures, LoraState) -> LoraUpdate | None``; ``None`` or an
empty update means "no change" (the identity), which is always a valid answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from dynalora.lora.state import Factors, LoraState


@dataclass
class TriggerFeatures:
    """One row's state vector inputs, read from hidden states captured during the normal forward."""

    row: int
    position: int
    """Index in the row's sequence of the token about to be fed (the one sampled at this step)."""
    reason: str
    """Which trigger fired, e.g. ``token:<|shift|>``, ``surprise``, ``every_n``."""
    trigger_hidden: torch.Tensor
    """(H,) hidden state of the feature layer at the last fed position."""
    pooled_hidden: torch.Tensor
    """(H,) mean of the feature layer's hidden states over the recent window."""
    token_ids: list[int] = field(default_factory=list)
    """The row's tokens so far (prompt included)."""


@dataclass
class LoraUpdate:
    """A change to one row. All parts optional; at most one of ``blend`` / ``blend_delta``."""

    blend: torch.Tensor | None = None
    """(K,) new blend weights."""
    blend_delta: torch.Tensor | None = None
    """(K,) added to the current blend weights."""
    generated: Factors | None = None
    """New generated factors (``{}`` clears them)."""
    memory: Factors | None = None
    """New memory factors (``{}`` clears them)."""
    memory_weight: float | None = None
    """Scale of the row's memory term (the mix gate's; the memory itself is kept)."""
    level: int | None = None
    """The hypernetwork stack level that wrote it (1: the shift network alone; 2+: escalated)."""

    @property
    def is_identity(self) -> bool:
        return (self.blend is None and self.blend_delta is None and self.generated is None and self.memory is None
                and self.memory_weight is None)

    def resolved_blend(self, current: torch.Tensor) -> torch.Tensor | None:
        """The absolute blend this update asks for, given the current ``(K,)`` weights (on their device)."""
        if self.blend is not None and self.blend_delta is not None:
            raise ValueError("LoraUpdate: give blend or blend_delta, not both")
        if self.blend_delta is not None:
            return current + torch.as_tensor(self.blend_delta, dtype=current.dtype, device=current.device)
        return None if self.blend is None else torch.as_tensor(self.blend, dtype=current.dtype, device=current.device)


class Hypernetwork(Protocol):
    def __call__(self, features: TriggerFeatures, state: LoraState) -> LoraUpdate | None: ...
