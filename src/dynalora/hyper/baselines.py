"""Two simple hypernetworks: tests use them, and evaluations use them as baselines."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dynalora.hyper.protocol import LoraUpdate, TriggerFeatures
from dynalora.lora.state import LoraState


class NearestPrototype:
    """Blend toward the bank adapters whose prototype vector is closest to the pooled hidden state.

    ``prototypes (K, H)``: e.g. the mean feature-layer hidden state of each adapter's training text
    (see :meth:`from_texts`). ``sharpness`` scales cosine similarities before the softmax; with
    ``one_hot=True`` the nearest adapter gets weight 1 and the rest 0.
    """

    def __init__(self, prototypes: torch.Tensor, sharpness: float = 20.0, one_hot: bool = False):
        self.prototypes = F.normalize(prototypes.float(), dim=-1)  # (K, H)
        self.sharpness = sharpness
        self.one_hot = one_hot

    def __call__(self, features: TriggerFeatures, state: LoraState) -> LoraUpdate:
        pooled = features.pooled_hidden.float()
        similarity = self.prototypes.to(pooled.device) @ F.normalize(pooled, dim=-1)  # (K,)
        if self.one_hot:
            blend = F.one_hot(similarity.argmax(), similarity.shape[0]).float()
        else:
            blend = torch.softmax(self.sharpness * similarity, dim=-1)
        return LoraUpdate(blend=blend)

    @classmethod
    def from_texts(cls, engine, texts_per_adapter: list[list[str]], **kwargs) -> "NearestPrototype":
        """Prototypes = mean pooled feature of each adapter's example texts, through ``engine``'s model."""
        prototypes = torch.stack([torch.stack([engine.encode_text(text) for text in texts]).mean(0)
                                  for texts in texts_per_adapter])  # (K, H)
        return cls(prototypes, **kwargs)


class FixedSchedule:
    """Answer the i-th call with the i-th blend (cycling): a trigger-agnostic baseline."""

    def __init__(self, blends: list[list[float]] | torch.Tensor, cycle: bool = True):
        self.blends = torch.as_tensor(blends, dtype=torch.float32)  # (N, K)
        self.cycle = cycle
        self.calls = 0

    def __call__(self, features: TriggerFeatures, state: LoraState) -> LoraUpdate | None:
        index = self.calls % len(self.blends) if self.cycle else self.calls
        self.calls += 1
        if index >= len(self.blends):
            return None
        return LoraUpdate(blend=self.blends[index])
