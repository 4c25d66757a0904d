"""The absorb compressor: a chunk's activations in the base model → memory LoRA factors at a fixed rank.

The encoder is the base model itself: one forward pass over the chunk (no LoRA) gives the hidden
states entering every decoder layer. For each target module ``m`` in layer ``l`` the compressor keeps
``rank`` learned queries (a rank embedding + the layer's and the module kind's embeddings); they
cross-attend over the chunk's hidden states *entering layer l* — so a module reads the view of the
text its own layer sees — then a small MLP and a per-kind linear head turn query ``i`` into row ``i``
of ``A (r, in)`` and column ``i`` of ``B (out, r)`` (the Doc-to-LoRA family: a Perceiver-style
aggregator with layer and module embeddings). ``B``'s head starts at zero, so a fresh compressor
writes the identity (ΔW = 0) while ``A`` and ``B`` still get gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dynalora.hyper.files import PretrainedNetwork
from dynalora.hyper.shift_net import _layer_and_kind

CONFIG_FILE = "compressor.json"
WEIGHTS_FILE = "compressor.safetensors"


@dataclass
class CompressorConfig:
    hidden_size: int
    """H: the base model's hidden size."""
    module_shapes: dict[str, list[int]] = field(default_factory=dict)
    """Target modules → [in, out], in model order (e.g. every layer's ``o_proj`` and ``down_proj``)."""
    rank: int = 8
    """Rank of one chunk's factors (the memory keeps this rank after merges too)."""
    width: int = 256
    """Width of the queries and of the attention."""
    heads: int = 4
    mlp_ratio: int = 2
    scale: float = 1.0
    """Multiplies ``B`` (a fixed output scale; the head learns the rest)."""

    def __post_init__(self):
        if not self.module_shapes:
            raise ValueError("CompressorConfig.module_shapes: name at least one target module")
        if self.rank < 1 or self.width % self.heads:
            raise ValueError(f"CompressorConfig: rank ≥ 1 and width divisible by heads "
                             f"(rank={self.rank}, width={self.width}, heads={self.heads})")


class Compressor(nn.Module, PretrainedNetwork):
    config_class, config_file, weights_file = CompressorConfig, CONFIG_FILE, WEIGHTS_FILE
    folder_kind = "compressor folder; make one with `dynalora train absorb`"

    def __init__(self, config: CompressorConfig):
        super().__init__()
        self.config = config
        width, rank = config.width, config.rank
        self.modules_list = list(config.module_shapes)
        located = [_layer_and_kind(name) for name in self.modules_list]
        self.kinds = sorted({kind for _, kind in located})
        self.register_buffer("module_layer", torch.tensor([layer for layer, _ in located]), persistent=False)
        self.register_buffer("module_kind", torch.tensor([self.kinds.index(k) for _, k in located]),
                             persistent=False)
        layers = max(layer for layer, _ in located) + 1
        self.layer_embedding = nn.Embedding(layers, width)
        self.kind_embedding = nn.Embedding(len(self.kinds), width)
        self.rank_embedding = nn.Parameter(torch.randn(rank, width) * 0.02)
        self.key_norm = nn.LayerNorm(config.hidden_size)
        self.key_value = nn.Linear(config.hidden_size, 2 * width)
        self.attention = nn.MultiheadAttention(width, config.heads, batch_first=True)
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, config.mlp_ratio * width), nn.GELU(),
                                 nn.Linear(config.mlp_ratio * width, width))
        self.out_norm = nn.LayerNorm(width)
        shapes = {kind: config.module_shapes[self.modules_list[[k for _, k in located].index(kind)]]
                  for kind in self.kinds}
        for name, (in_features, out_features) in config.module_shapes.items():
            kind = _layer_and_kind(name)[1]
            if [in_features, out_features] != list(shapes[kind]):
                raise ValueError(f"CompressorConfig.module_shapes[{name!r}] = {[in_features, out_features]}, but other "
                                 f"{kind} modules are {shapes[kind]}: one head per module kind needs one shape")
        self.head_a = nn.ModuleDict({kind: nn.Linear(width, i) for kind, (i, _) in shapes.items()})
        self.head_b = nn.ModuleDict({kind: nn.Linear(width, o) for kind, (_, o) in shapes.items()})
        for head in self.head_b.values():
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        for kind, head in self.head_a.items():
            nn.init.normal_(head.weight, std=(width * shapes[kind][0]) ** -0.5)  # A rows ~ LoRA's 1/√in
            nn.init.zeros_(head.bias)

    @property
    def source_layers(self) -> list[int]:
        """Decoder layers whose input hidden states the compressor reads (``hidden_states[l]`` in HF)."""
        return sorted({int(layer) for layer in self.module_layer})

    def forward(self, hidden_states: dict[int, torch.Tensor], mask: torch.Tensor | None = None) -> dict:
        """``hidden_states[l] (N, T, H)``: the chunk's hidden states entering layer ``l``; ``mask (N, T)``
        true on real tokens. Returns ``{module: (A (N, r, in), B (N, out, r))}``."""
        count, length = next(iter(hidden_states.values())).shape[:2]
        width, rank, modules = self.config.width, self.config.rank, len(self.modules_list)
        layers = self.source_layers
        stacked = torch.stack([hidden_states[layer] for layer in layers], dim=1)  # (N, L, T, H)
        keys, values = self.key_value(self.key_norm(stacked.float())).chunk(2, dim=-1)  # (N, L, T, W) each
        layer_index = torch.tensor([layers.index(int(layer)) for layer in self.module_layer],
                                   device=keys.device)  # (M,)
        keys = keys[:, layer_index] + self.layer_embedding(self.module_layer)[None, :, None]  # (N, M, T, W)
        values = values[:, layer_index]  # (N, M, T, W)
        queries = (self.rank_embedding[None] + self.layer_embedding(self.module_layer)[:, None]
                   + self.kind_embedding(self.module_kind)[:, None])  # (M, r, W)
        queries = queries[None].expand(count, -1, -1, -1).reshape(count * modules, rank, width)  # (N*M, r, W)
        padding = None
        if mask is not None:
            padding = ~mask.bool()[:, None, :].expand(-1, modules, -1).reshape(count * modules, length)  # (N*M, T)
        attended, _ = self.attention(queries, keys.reshape(count * modules, length, width),
                                     values.reshape(count * modules, length, width), key_padding_mask=padding,
                                     need_weights=False)  # (N*M, r, W)
        hidden = queries + attended
        hidden = self.out_norm(hidden + self.mlp(hidden)).reshape(count, modules, rank, width)  # (N, M, r, W)
        factors = {}
        for index, name in enumerate(self.modules_list):
            kind = self.kinds[int(self.module_kind[index])]
            lora_a = self.head_a[kind](hidden[:, index])  # (N, r, in)
            lora_b = self.head_b[kind](hidden[:, index]).transpose(1, 2) * self.config.scale  # (N, out, r)
            factors[name] = (lora_a, lora_b)
        return factors

    def read(self, dyn, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
        """Chunks ``(N, T)`` → factors: one forward of the base model alone (no gradient), then :meth:`forward`."""
        with torch.no_grad(), dyn.state.functional(None, {}):
            hidden = layer_inputs(dyn.model, input_ids, self.source_layers, attention_mask)
        return self(hidden, None if attention_mask is None else attention_mask.bool())


def load_compressor(folder: str | Path) -> nn.Module:
    """Either compressor from its folder: a :class:`GradientCompressor` where its config file is, else a
    :class:`Compressor`. Both have ``modules_list``, ``config.rank`` (the memory's rank) and ``read``."""
    from dynalora.hyper.gradient_compressor import CONFIG_FILE as GRADIENT_CONFIG
    from dynalora.hyper.gradient_compressor import GradientCompressor

    if (Path(folder) / GRADIENT_CONFIG).is_file():
        return GradientCompressor.from_pretrained(folder)
    return Compressor.from_pretrained(folder)


def layer_inputs(model: nn.Module, input_ids: torch.Tensor, layers: list[int],
                 attention_mask: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """One forward of the base model (caller disables the LoRA) → ``{l: (N, T, H)}`` hidden states entering
    decoder layer ``l`` (HF ``hidden_states[l]``). Runs only up to the deepest requested layer."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False,
                logits_to_keep=1)
    return {layer: out.hidden_states[layer] for layer in layers}
