"""The token router: per-token re-weighting of a row's blend inside the normal forward (no second pass, KV cache kept).

As the feature layer (the middle decoder layer, whose states the shift network reads) starts, the router reads each
position's hidden state entering it and re-weights the row's blend for that layer and the ones above, at that
position:

    routed = total · softmax(log(p + ε) + Δ(h))[:K],   p = [blend, base share] / total

``Δ`` is a small MLP whose last layer starts at zero, so a fresh router applies the row's blend (the shift network's
answer: its prior) up to the ε smoothing, and training can only move it where the next-token loss says. Layers below
the feature layer keep the row's blend (they run before ``h`` exists). Because the routing of a position depends only
on that position's own forward, decoding one token at a time and a teacher-forced pass over a whole stream compute
exactly the same thing: the engine, ``score_stream`` and training share this code path (:meth:`TokenRouter.attach`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dynalora.hyper.files import PretrainedNetwork

CONFIG_FILE = "router.json"
WEIGHTS_FILE = "router.safetensors"


@dataclass
class TokenRouterConfig:
    feature_size: int
    """H: size of the feature layer's hidden state."""
    bank_labels: list[str]
    """Adapters it re-weights, in bank order."""
    feature_layer: int
    """The decoder layer whose input it reads; the adapters of that layer and the ones above it are routed."""
    width: int = 64
    smoothing: float = 0.01
    """ε: lets the router raise an adapter the prior has at zero."""

    def __post_init__(self):
        if self.width < 1 or not 0 < self.smoothing < 1:
            raise ValueError(f"TokenRouterConfig: width={self.width} ≥ 1 and smoothing={self.smoothing} in (0, 1)")


class TokenRouter(nn.Module, PretrainedNetwork):
    config_class, config_file, weights_file = TokenRouterConfig, CONFIG_FILE, WEIGHTS_FILE
    folder_kind = "token router folder; make one with `dynalora train route`"

    def __init__(self, config: TokenRouterConfig):
        super().__init__()
        self.config = config
        self.net = nn.Sequential(nn.LayerNorm(config.feature_size), nn.Linear(config.feature_size, config.width),
                                 nn.GELU(), nn.Linear(config.width, len(config.bank_labels) + 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.prior: torch.Tensor | None = None
        """``(B, T, K)`` blends per position for the next forwards (training on a stream's shift schedule); None:
        the rows' blends in the state."""

    def forward(self, hidden: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """``hidden (B, T, H)``, ``prior (B, T or 1, K)`` → the routed blend ``(B, T, K)``."""
        prior = prior.float()
        base = (1 - prior.sum(-1, keepdim=True)).clamp(min=0)  # (B, T|1, 1)
        full = torch.cat([prior.clamp(min=0), base], dim=-1)  # (B, T|1, K+1)
        total = full.sum(-1, keepdim=True).clamp(min=1e-6)
        logits = torch.log(full / total + self.config.smoothing) + self.net(hidden.float())  # (B, T, K+1)
        return torch.softmax(logits, dim=-1)[..., :-1] * total  # (B, T, K)

    def attach(self, dyn) -> "TokenRouter":
        """Route ``dyn``'s forwards from now on (until :meth:`detach`): a hook as the feature layer starts writes the
        routed rank weights of it and the layers above into ``dyn.state.routed``; a hook at the model's start clears
        them."""
        from dynalora.lora.targets import decoder_layers

        state = dyn.state
        if state.labels != self.config.bank_labels:
            raise ValueError(f"the token router was trained for bank {self.config.bank_labels}, but the state's bank "
                             f"is {state.labels}")
        layers = decoder_layers(dyn.model)
        routed_modules = frozenset(name for name in state.slots if _layer_of(name) >= self.config.feature_layer)

        def clear(module, args, kwargs):
            state.routed = None

        def route(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]  # (B, T, H): what enters the feature layer
            prior = self.prior
            if prior is None:
                start = state.row_offset
                prior = state.blend_weights[start:start + hidden.shape[0], None, :]  # (B, 1, K)
            blend = self(hidden, prior)  # (B, T, K)
            state.routed = (state.expand_blend(blend).to(state.dtype), routed_modules)

        self.to(next(dyn.model.parameters()).device)
        self._handles = [dyn.model.register_forward_pre_hook(clear, with_kwargs=True),
                         layers[self.config.feature_layer].register_forward_pre_hook(route, with_kwargs=True)]
        state.router = self
        return self

    def detach(self, dyn) -> None:
        for handle in getattr(self, "_handles", []):
            handle.remove()
        self._handles = []
        dyn.state.routed = None
        dyn.state.router = None


def _layer_of(module_name: str) -> int:
    """The decoder layer a module belongs to (``model.layers.17.self_attn.q_proj`` → 17; -1 outside the layers)."""
    return next((int(part) for part in module_name.split(".") if part.isdigit()), -1)
