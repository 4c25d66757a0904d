"""The shift hypernetwork: a state vector → a blend over the bank, a gate, and generated LoRA factors.

* **encoder**: the pooled feature-layer hidden state ``(H,)`` → a state vector ``z (width,)``;
* **blend head**: ``K + 1`` logits → softmax; the extra slot is "base" (no adapter), so the network can
  always fall back to the base model for text no adapter fits;
* **gate** ``g ∈ (0, 1)``: the applied blend is ``(1 - g)·current + g·proposed`` — ``g → 0`` is the
  identity ("the current LoRA already fits");
* **factor heads** (as Text-to-LoRA's heads): for every target module, ``[z, layer embedding, module-kind
  embedding]`` → ``A (r, in)``, ``B (out, r)``, one output layer per module kind (q, v, ...); the last
  layer starts at zero so a fresh network generates nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dynalora.hyper.files import PretrainedNetwork
from dynalora.hyper.protocol import LoraUpdate, TriggerFeatures
from dynalora.lora.state import LoraState

CONFIG_FILE = "shift_net.json"
WEIGHTS_FILE = "shift_net.safetensors"


@dataclass
class ShiftNetConfig:
    feature_size: int
    """H: size of the pooled hidden state."""
    bank_labels: list[str]
    """Adapters the blend head weighs, in bank order."""
    module_shapes: dict[str, list[int]] = field(default_factory=dict)
    """Modules that get generated factors: name → [in, out] (empty: blend only)."""
    width: int = 256
    generated_rank: int = 2
    embedding_size: int = 32
    feature_layer: int | None = None
    """Decoder layer the features come from (recorded so inference reads the same one)."""
    pool_window: int = 16


def _layer_and_kind(name: str) -> tuple[int, str]:
    parts = name.split(".")
    layer = next((int(p) for p in parts if p.isdigit()), 0)
    return layer, parts[-1]


class ShiftNet(nn.Module, PretrainedNetwork):
    config_class, config_file, weights_file = ShiftNetConfig, CONFIG_FILE, WEIGHTS_FILE
    folder_kind = "shift network folder"

    def __init__(self, config: ShiftNetConfig):
        super().__init__()
        self.config = config
        width, emb = config.width, config.embedding_size
        self.encoder = nn.Sequential(nn.LayerNorm(config.feature_size), nn.Linear(config.feature_size, width),
                                     nn.GELU(), nn.Linear(width, width), nn.GELU())
        self.blend_head = nn.Linear(width, len(config.bank_labels) + 1)
        self.gate_head = nn.Linear(width, 1)
        self.modules_list = list(config.module_shapes)
        located = [_layer_and_kind(name) for name in self.modules_list]
        self.kinds = sorted({kind for _, kind in located})
        self.register_buffer("module_layer", torch.tensor([layer for layer, _ in located], dtype=torch.long),
                             persistent=False)
        self.register_buffer("module_kind", torch.tensor([self.kinds.index(k) for _, k in located], dtype=torch.long),
                             persistent=False)
        layers = max((layer for layer, _ in located), default=0) + 1
        self.layer_embedding = nn.Embedding(layers, emb)
        self.kind_embedding = nn.Embedding(max(len(self.kinds), 1), emb)
        self.factor_trunk = nn.Sequential(nn.Linear(width + 2 * emb, width), nn.GELU())
        shapes = {kind: config.module_shapes[self.modules_list[[k for _, k in located].index(kind)]]
                  for kind in self.kinds}
        for name, (_, kind) in zip(self.modules_list, located):
            if list(config.module_shapes[name]) != list(shapes[kind]):
                raise ValueError(f"ShiftNetConfig.module_shapes: {name} {list(config.module_shapes[name])} and "
                                 f"another {kind!r} module {list(shapes[kind])} differ in shape; one output head "
                                 "serves a kind, so give factor_modules of one shape per kind")
        rank = config.generated_rank
        self.factor_out = nn.ModuleDict({kind: nn.Linear(width, rank * (i + o)) for kind, (i, o) in shapes.items()})
        for kind, layer in self.factor_out.items():
            # As LoRA: A starts random (here through the bias), B at zero, so ΔW = BA starts at zero but
            # B still gets a gradient (with both at zero the product's gradient vanishes for good).
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
            in_features = shapes[kind][0]
            nn.init.normal_(layer.bias[:rank * in_features], std=in_features ** -0.5)
        with torch.no_grad():
            self.gate_head.bias.fill_(2.0)  # start by following the proposal

    def forward(self, features: torch.Tensor, with_factors: bool = True) -> dict:
        """``features (N, H)`` → ``blend (N, K)``, ``base_weight (N,)``, ``gate (N,)`` and
        ``factors[module] = (A (N, r, in), B (N, out, r))``."""
        z = self.encoder(features)  # (N, W)
        probs = torch.softmax(self.blend_head(z), dim=-1)  # (N, K+1)
        out = {"blend": probs[:, :-1], "base_weight": probs[:, -1], "gate": torch.sigmoid(self.gate_head(z))[:, 0],
               "factors": {}}
        if with_factors and self.modules_list:
            count, modules = z.shape[0], len(self.modules_list)
            context = torch.cat([
                z[:, None, :].expand(count, modules, -1),  # (N, M, W)
                self.layer_embedding(self.module_layer)[None].expand(count, -1, -1),  # (N, M, E)
                self.kind_embedding(self.module_kind)[None].expand(count, -1, -1),  # (N, M, E)
            ], dim=-1)
            hidden = self.factor_trunk(context)  # (N, M, W)
            rank = self.config.generated_rank
            for index, name in enumerate(self.modules_list):
                kind = self.kinds[int(self.module_kind[index])]
                in_features, out_features = self.config.module_shapes[name]
                flat = self.factor_out[kind](hidden[:, index])  # (N, r*(in+out))
                lora_a = flat[:, :rank * in_features].reshape(count, rank, in_features)  # (N, r, in)
                lora_b = flat[:, rank * in_features:].reshape(count, out_features, rank)  # (N, out, r)
                out["factors"][name] = (lora_a, lora_b)
        return out


def gated_answer(out: dict, current: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """What the network's output ``out`` (for N rows) writes: the blend ``(1 − g)·current + g·proposed``
    ``(N, K)`` (``current`` None: zero) and the generated factors scaled by the gate,
    ``{module: (A (N, r, in), B (N, out, r))}``. The one gate formula of the engine, the recipes and the evals."""
    gate = out["gate"][:, None]  # (N, 1)
    blend = gate * out["blend"] if current is None else (1 - gate) * current + gate * out["blend"]  # (N, K)
    factors = {name: (lora_a * gate[:, :, None], lora_b) for name, (lora_a, lora_b) in out["factors"].items()}
    return blend, factors


def row_factors(factors: dict) -> dict:
    """Per-row factors ``{module: (A (N, r, in), B (N, out, r))}`` in the state's layout for ``functional``:
    ``{module: (A_t (N, in, r), B_t (N, r, out))}``."""
    return {name: (lora_a.transpose(1, 2), lora_b.transpose(1, 2)) for name, (lora_a, lora_b) in factors.items()}


class ShiftHypernetwork:
    """Adapts a :class:`ShiftNet` to the engine's hypernetwork protocol (one row at a time)."""

    def __init__(self, net: ShiftNet, use_factors: bool = True):
        self.net = net.eval()
        self.use_factors = use_factors and bool(net.modules_list)

    def check_bank(self, state: LoraState) -> None:
        if state.labels != self.net.config.bank_labels:
            raise ValueError(f"the shift network was trained for bank {self.net.config.bank_labels}, "
                             f"but the engine's bank is {state.labels}")

    def propose(self, features: TriggerFeatures) -> tuple[dict, int]:
        """The network's output for one row ``(1, ...)`` and the stack level that wrote it."""
        return self.net(features.pooled_hidden.float()[None], with_factors=self.use_factors), 1

    @torch.no_grad()
    def __call__(self, features: TriggerFeatures, state: LoraState) -> LoraUpdate:
        out, level = self.propose(features)
        blend, factors = gated_answer(out, state.blend_weights[features.row].float()[None])
        generated = {name: (a[0], b[0]) for name, (a, b) in factors.items()} if self.use_factors else None
        return LoraUpdate(blend=blend[0], generated=generated, level=level)
