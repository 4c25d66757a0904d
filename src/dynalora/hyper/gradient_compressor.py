"""The gradient compressor: a chunk → memory LoRA factors, written from the chunk's own learning signal.

The base model reads the chunk once, forward and backward, on its next-token loss (no weight is
changed): every target module ``m`` gives, per token ``t``, its input ``x_t`` and the gradient ``δ_t``
of the loss at its output. One SGD step on ``W_m`` would add ``-η Σ_t δ_t x_tᵀ`` — already a rank-``T``
LoRA with ``A = x`` and ``B = -η δᵀ``. The step is ``η = init_step / √T`` for a chunk of ``T`` tokens:
measured with the raw gradient, the best step for ~330-token documents is about a third of that for
~25-token ones (the summed gradient grows with length, its useful part more slowly). The compressor
learns to turn that step into a memory that answers questions (the MEND family of editors, here writing
from a document instead of an edit request): per module kind, a residual bottleneck MLP maps each
token's ``[x_t, δ_t]`` to ``[x̃_t, δ̃_t]``, with a learned scale and shift per module before it and a
learned step size per module after it. The MLP's output layer starts at zero, so an untrained compressor
writes exactly one SGD step of size ``init_step / √T`` (measured: it already tells documents apart, see
the README).

Factors have rank ``T`` (the chunk's tokens; padding tokens give zero rows); the memory keeps
``rank`` by :func:`dynalora.lora.lowrank.merge_at_rank`.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dynalora.hyper.files import PretrainedNetwork
from dynalora.hyper.shift_net import _layer_and_kind

CONFIG_FILE = "gradient_compressor.json"
WEIGHTS_FILE = "gradient_compressor.safetensors"


@dataclass
class GradientCompressorConfig:
    module_shapes: dict[str, list[int]] = field(default_factory=dict)
    """Target modules → [in, out], in model order (e.g. every layer's ``o_proj`` and ``down_proj``)."""
    rank: int = 16
    """Rank the memory keeps (the runtime's cut; one chunk's factors have one rank per token)."""
    bottleneck: int = 64
    """Hidden width of the per-kind MLP that transforms each token's ``[x, δ]``."""
    init_step: float = 0.015
    """Step size × √T of the untrained compressor (one SGD step on a ``T``-token chunk's summed next-token loss)."""

    def __post_init__(self):
        if not self.module_shapes:
            raise ValueError("GradientCompressorConfig.module_shapes: name at least one target module")
        if self.rank < 1 or self.bottleneck < 1 or self.init_step <= 0:
            raise ValueError(f"GradientCompressorConfig: rank ≥ 1, bottleneck ≥ 1 and init_step > 0 "
                             f"(rank={self.rank}, bottleneck={self.bottleneck}, init_step={self.init_step})")


class GradientCompressor(nn.Module, PretrainedNetwork):
    config_class, config_file, weights_file = GradientCompressorConfig, CONFIG_FILE, WEIGHTS_FILE
    folder_kind = "gradient compressor folder; make one with `dynalora train absorb`"

    def __init__(self, config: GradientCompressorConfig):
        super().__init__()
        self.config = config
        self.modules_list = list(config.module_shapes)
        self.kind_of = {name: _layer_and_kind(name)[1] for name in self.modules_list}
        sizes = {}
        for name, (in_features, out_features) in config.module_shapes.items():
            size = sizes.setdefault(self.kind_of[name], in_features + out_features)
            if size != in_features + out_features:
                raise ValueError(f"GradientCompressorConfig.module_shapes[{name!r}] = {[in_features, out_features]}: "
                                 f"other {self.kind_of[name]} modules differ, and one MLP per kind needs one shape")
        self.kinds = sorted(sizes)
        self.mlp_in = nn.ModuleDict({k: nn.Linear(sizes[k], config.bottleneck) for k in self.kinds})
        self.mlp_out = nn.ModuleDict({k: nn.Linear(config.bottleneck, sizes[k]) for k in self.kinds})
        for layer in self.mlp_out.values():  # identity at the start: the plain SGD step
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        keys = [name.replace(".", "/") for name in self.modules_list]  # ParameterDict keys may not hold dots
        self._keys = dict(zip(self.modules_list, keys))
        self.scale = nn.ParameterDict({key: nn.Parameter(torch.ones(sum(config.module_shapes[n])))
                                       for n, key in self._keys.items()})
        self.shift = nn.ParameterDict({key: nn.Parameter(torch.zeros(sum(config.module_shapes[n])))
                                       for n, key in self._keys.items()})
        self.log_step = nn.ParameterDict({key: nn.Parameter(torch.tensor(math.log(config.init_step)))
                                          for key in keys})

    def forward(self, signals: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict:
        """``signals[m] = (x (N, T, in), δ (N, T, out))`` (zero on padding) → ``{m: (A (N, T, in), B (N, out, T))}``."""
        factors = {}
        for name in self.modules_list:
            x, grad = signals[name]
            key, kind, width = self._keys[name], self.kind_of[name], x.shape[-1]
            x_rms, grad_rms = _rms(x), _rms(grad)  # (N, 1, 1) each
            joined = torch.cat([x / x_rms, grad / grad_rms], dim=-1).float()  # (N, T, in + out)
            joined = joined * self.scale[key] + self.shift[key]
            joined = joined + self.mlp_out[kind](F.gelu(self.mlp_in[kind](joined)))  # (N, T, in + out)
            real = (x.abs().sum(-1, keepdim=True) > 0).to(joined.dtype)  # (N, T, 1): padding stays zero
            step = self.log_step[key].exp() / real.sum(1, keepdim=True).clamp(min=1).sqrt()  # (N, 1, 1)
            lora_a = joined[..., :width] * x_rms * real  # (N, T, in)
            lora_b = -step * (joined[..., width:] * grad_rms * real).transpose(1, 2)  # (N, out, T)
            factors[name] = (lora_a, lora_b)
        return factors

    def read(self, dyn, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
        """Chunks ``(N, T)`` → factors: the base model's signals (:func:`chunk_signals`) through :meth:`forward`."""
        return self(chunk_signals(dyn, self.modules_list, input_ids, attention_mask))


def _rms(values: torch.Tensor) -> torch.Tensor:
    """(N, T, D) → (N, 1, 1): root mean square over a row's nonzero tokens (1 for an all-zero row)."""
    real = (values.abs().sum(-1) > 0).sum(-1).clamp(min=1)  # (N,)
    mean_square = values.float().pow(2).sum((1, 2)) / (real * values.shape[-1])  # (N,)
    return torch.where(mean_square > 0, mean_square.sqrt(), torch.ones_like(mean_square))[:, None, None]


def chunk_signals(dyn, modules: list[str], input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One forward and backward of the base model alone (no LoRA) over chunks ``(N, T)`` on their summed
    next-token loss → ``{module: (x (N, T, in), δ (N, T, out))}``: each target module's input and the
    loss gradient at its output, detached, zero on padding. No weight's gradient is computed or kept."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    captured, hooks, thread = {}, [], threading.get_ident()

    def capture(name):
        def hook(_module, inputs, output):
            if threading.get_ident() != thread:  # another thread's forward (the engine decoding beside it)
                return None
            probe = torch.zeros_like(output, requires_grad=True)  # its gradient is ∂loss/∂output
            captured[name] = (inputs[0].detach(), probe)
            return output + probe
        return hook

    for name in modules:
        hooks.append(dyn.layers[name].register_forward_hook(capture(name)))
    try:
        with torch.enable_grad(), dyn.state.functional(None, {}):
            logits = dyn.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits  # (N, T, V)
            labels = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # (N, T-1)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), reduction="sum",
                                   ignore_index=-100)
            grads = torch.autograd.grad(loss, [captured[name][1] for name in modules])
    finally:
        for hook in hooks:
            hook.remove()
    real = mask[..., None].to(grads[0].dtype)  # (N, T, 1)
    return {name: (captured[name][0] * real, grad.detach() * real) for name, grad in zip(modules, grads)}
