"""Stacked hypernetworks (Escalate): level n writes a LoRA for level n−1's own Linear layers.

Level 0 is the base model; level 1 is the shift network, which writes the base model's LoRA; a level
n ≥ 2 is a :class:`LevelNet` that reads the same state vector and writes per-row factors for chosen
``nn.Linear`` layers of the level below. Running the stack at depth d evaluates levels d, d−1, ..., 1,
each under the LoRA written by the one above (:func:`lora_on`), so level 1 answers as a network
fine-tuned for this very context. Levels are generic: a LevelNet can sit on a LevelNet.

A fresh LevelNet writes ``B = 0``: depth d + 1 gives exactly what depth d gives (the identity), and
training moves it away from there only where that lowers the loss.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dynalora.hyper.files import PretrainedNetwork
from dynalora.hyper.protocol import TriggerFeatures
from dynalora.hyper.shift_net import ShiftHypernetwork

CONFIG_FILE = "level_net.json"
WEIGHTS_FILE = "level_net.safetensors"


def linear_shapes(network: nn.Module, names: list[str] | None = None) -> dict[str, list[int]]:
    """``{name: [in, out]}`` of the network's ``nn.Linear`` layers (all of them, or those named)."""
    found = {name: [m.in_features, m.out_features] for name, m in network.named_modules() if isinstance(m, nn.Linear)}
    if names is None:
        return found
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"linear layers {missing} are not in the level below; it has {sorted(found)}")
    return {n: found[n] for n in names}


@contextmanager
def lora_on(network: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None):
    """Within the block, each named ``nn.Linear`` of ``network`` adds its row's ``B A x`` to its output.

    ``factors[name] = (A (N, r, in), B (N, out, r))``; the layer's input is ``(N, ..., in)`` (row ``i`` of the
    batch uses row ``i`` of the factors). Gradients flow into the factors; the network's weights are untouched."""
    modules = dict(network.named_modules())
    handles = []

    def add_delta(lora_a, lora_b):
        def hook(_module, inputs, output):
            x = inputs[0]
            flat = x.reshape(x.shape[0], -1, x.shape[-1])  # (N, T, in)
            delta = (flat @ lora_a.transpose(1, 2).to(x.dtype)) @ lora_b.transpose(1, 2).to(x.dtype)  # (N, T, out)
            return output + delta.reshape(*x.shape[:-1], -1)
        return hook

    try:
        for name, (lora_a, lora_b) in (factors or {}).items():
            if name not in modules or not isinstance(modules[name], nn.Linear):
                raise ValueError(f"lora_on: {name!r} is not an nn.Linear of {type(network).__name__}")
            handles.append(modules[name].register_forward_hook(add_delta(lora_a, lora_b)))
        yield network
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class LevelNetConfig:
    feature_size: int
    """H: size of the state vector (the pooled hidden state the level below reads too)."""
    target_shapes: dict[str, list[int]] = field(default_factory=dict)
    """The level below's Linear layers this level writes for: name → [in, out]."""
    rank: int = 4
    width: int = 128
    level: int = 2
    """Where this network sits in the stack (2 writes for the shift network)."""

    def __post_init__(self):
        if self.rank < 1 or self.width < 1 or self.level < 2:
            raise ValueError(f"LevelNetConfig: rank={self.rank} and width={self.width} must be ≥ 1, "
                             f"level={self.level} ≥ 2 (level 1 is the shift network)")
        if not self.target_shapes:
            raise ValueError("LevelNetConfig.target_shapes is empty: name the level below's Linear layers")


class LevelNet(nn.Module, PretrainedNetwork):
    """State vector ``(N, H)`` → ``{layer: (A (N, r, in), B (N, out, r))}`` for the level below."""

    config_class, config_file, weights_file = LevelNetConfig, CONFIG_FILE, WEIGHTS_FILE
    folder_kind = "level network folder; make one with `dynalora train escalate`"

    def __init__(self, config: LevelNetConfig):
        super().__init__()
        self.config = config
        self.encoder = nn.Sequential(nn.LayerNorm(config.feature_size), nn.Linear(config.feature_size, config.width),
                                     nn.GELU())
        self.names = list(config.target_shapes)
        self.heads = nn.ModuleList(nn.Linear(config.width, config.rank * (i + o))
                                   for i, o in config.target_shapes.values())
        for head, (in_features, _) in zip(self.heads, config.target_shapes.values()):
            # as LoRA: A random (through the bias), B zero, so ΔW = BA = 0 but B still gets a gradient
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
            nn.init.normal_(head.bias[:config.rank * in_features], std=in_features ** -0.5)

    def forward(self, features: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        z = self.encoder(features)  # (N, W)
        count, rank, out = z.shape[0], self.config.rank, {}
        for name, head in zip(self.names, self.heads):
            in_features, out_features = self.config.target_shapes[name]
            flat = head(z)  # (N, r*(in+out))
            out[name] = (flat[:, :rank * in_features].reshape(count, rank, in_features),  # (N, r, in)
                         flat[:, rank * in_features:].reshape(count, out_features, rank))  # (N, out, r)
        return out


class HyperStack(nn.Module):
    """``levels[0]`` is level 1 (writes the base model's LoRA), ``levels[k]`` is level k + 1 (a LevelNet
    writing for ``levels[k - 1]``)."""

    def __init__(self, levels: list[nn.Module]):
        super().__init__()
        if not levels:
            raise ValueError("HyperStack needs at least level 1")
        for k, level in enumerate(levels[1:], start=1):
            if not isinstance(level, LevelNet):
                raise TypeError(f"HyperStack level {k + 1} must be a LevelNet, got {type(level).__name__}")
            linear_shapes(levels[k - 1], level.names)  # it writes for layers the level below has
        self.levels = nn.ModuleList(levels)

    @property
    def depth(self) -> int:
        return len(self.levels)

    def forward(self, features: torch.Tensor, depth: int = 1, **level1_kwargs):
        """Level 1's output for ``features (N, H)`` with levels 2..``depth`` above it (``depth=1``: level 1 alone)."""
        if not 1 <= depth <= self.depth:
            raise ValueError(f"depth={depth}: this stack has levels 1..{self.depth}")
        factors = None
        for level in reversed(self.levels[1:depth]):  # the top level first; each writes for the next
            with lora_on(level, factors):
                factors = level(features)
        with lora_on(self.levels[0], factors):
            return self.levels[0](features, **level1_kwargs)


THINK_REASONS = ("<|think|>", "p(think)")
"""Trigger reasons that escalate: the sampled ``<|think|>`` token (``token:<|think|>``) or its probability past
the threshold (``TokenProbability(think_id, threshold, name="think")``)."""


class EscalatingHypernetwork(ShiftHypernetwork):
    """The engine's hypernetwork for a stack: level 1 alone at an ordinary trigger, the whole stack when the
    trigger's reason is ``<|think|>`` — the model pays for the levels above only when it asks."""

    def __init__(self, stack: HyperStack, use_factors: bool = True, think_reasons: tuple[str, ...] = THINK_REASONS):
        super().__init__(stack.levels[0], use_factors)
        self.stack, self.think_reasons = stack.eval(), think_reasons

    def propose(self, features: TriggerFeatures) -> tuple[dict, int]:
        depth = self.stack.depth if any(word in features.reason for word in self.think_reasons) else 1
        out = self.stack(features.pooled_hidden.float()[None], depth, with_factors=self.use_factors)
        if depth == 1 and self.use_factors:  # level 1 answers with its blend alone (as shipped and evaluated);
            out["factors"] = {m: (a * 0, b * 0) for m, (a, b) in out["factors"].items()}  # zeros clear level 2's
        return out, depth


def load_stack(level1: nn.Module, folder: str | Path) -> HyperStack:
    """Level 1 with the levels saved in ``folder`` (``level2/``, ``level3/``, ... from ``dynalora train escalate``)."""
    folder, levels = Path(folder), [level1]
    while (folder / f"level{len(levels) + 1}").is_dir():
        levels.append(LevelNet.from_pretrained(folder / f"level{len(levels) + 1}"))
    if len(levels) == 1:
        raise FileNotFoundError(f"{folder / 'level2'}: missing (not an escalate folder; make one with "
                                "`dynalora train escalate`)")
    return HyperStack(levels)
