"""The mix gate: from the state vector, how much of the shift LoRA and of the memory LoRA a row applies.

Two independent weights ``w_shift, w_memory ∈ (0, 1)`` (both near 0: the base model). At a trigger the
row's blend is ``w_shift ×`` the shift network's answer, and its memory term is scaled by ``w_memory``
(:meth:`LoraState.set_memory_weight`: the absorbed memory itself is kept, so later absorbs still merge
into it). A fresh gate starts near both on (``initial_weight``): the two LoRAs summed, as without a gate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from dynalora.hyper.files import PretrainedNetwork
from dynalora.hyper.protocol import LoraUpdate, TriggerFeatures
from dynalora.lora.state import LoraState

CONFIG_FILE = "mix_gate.json"
WEIGHTS_FILE = "mix_gate.safetensors"
PARTS = ("shift", "memory")


@dataclass
class MixGateConfig:
    feature_size: int
    """H: size of the pooled hidden state (the shift network's state vector)."""
    width: int = 64
    initial_weight: float = 0.88
    """Both weights before training."""

    def __post_init__(self):
        if self.width < 1 or not 0 < self.initial_weight < 1:
            raise ValueError(f"MixGateConfig: width={self.width} ≥ 1 and initial_weight={self.initial_weight} "
                             "in (0, 1)")


class MixGate(nn.Module, PretrainedNetwork):
    """``features (N, H)`` → ``weights (N, 2)``: column 0 the shift LoRA's, column 1 the memory LoRA's."""

    config_class, config_file, weights_file = MixGateConfig, CONFIG_FILE, WEIGHTS_FILE
    folder_kind = "mix gate folder; make one with `dynalora train mix`"

    def __init__(self, config: MixGateConfig):
        super().__init__()
        self.config = config
        self.net = nn.Sequential(nn.LayerNorm(config.feature_size), nn.Linear(config.feature_size, config.width),
                                 nn.GELU(), nn.Linear(config.width, len(PARTS)))
        with torch.no_grad():
            self.net[-1].weight.mul_(0.1)
            self.net[-1].bias.fill_(math.log(config.initial_weight / (1 - config.initial_weight)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(features))  # (N, 2)


class MixHypernetwork:
    """Wraps the engine's shift hypernetwork: its answer scaled by ``w_shift``, and the row's memory weight."""

    def __init__(self, inner, gate: MixGate):
        self.inner, self.gate = inner, gate.eval()

    def check_bank(self, state: LoraState) -> None:
        self.inner.check_bank(state)

    @property
    def net(self):
        return self.inner.net

    @property
    def use_factors(self) -> bool:
        return self.inner.use_factors

    @torch.no_grad()
    def __call__(self, features: TriggerFeatures, state: LoraState) -> LoraUpdate:
        update = self.inner(features, state) or LoraUpdate()
        shift, memory = self.gate(features.pooled_hidden.float()[None])[0].tolist()
        generated = None if update.generated is None else {
            module: (lora_a * shift, lora_b) for module, (lora_a, lora_b) in update.generated.items()}
        blend = None if update.blend is None else update.blend * shift
        return LoraUpdate(blend=blend, generated=generated, memory=update.memory, memory_weight=memory,
                          level=update.level)
