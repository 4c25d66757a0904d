"""The trigger head: ``<|shift|>``'s logit from a small MLP over several layers' hidden states.

The row-only trigger is a linear probe of the last hidden state (``p = σ(h·e − log Z)``) and finds three in four
domain changes at ~2 false triggers per 1,000 tokens. The head reads the hidden states of a few decoder layers and
the LM head's input at the same position (concatenated, ``(F,) = (len(layers)+1)·H``), normalises them with the
training features' mean and spread, and gives a logit ``a`` through a one-hidden-layer MLP. Attached to a model, it
sets the trigger token's logit to ``a + logsumexp(the other logits)``, so the model's own softmax gives
``p(<|shift|>) = σ(a)`` exactly: every trigger policy (``prob``, a sampled ``token``), the engine, the teacher-forced
scoring and the server read it as the model's probability of emitting the token, with no second pass and no state
across forwards (forward hooks, one small matmul per position).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from dynalora.lora.targets import decoder_layers

HEAD_FILE = "trigger_head.safetensors"


def default_head_layers(layer_count: int) -> list[int]:
    """Decoder layers a quarter, half and three quarters of the way up."""
    return sorted({max(0, layer_count * k // 4) for k in (1, 2, 3)})


@dataclass
class TriggerHeadConfig:
    layers: list[int] = field(default_factory=list)
    """Decoder layers whose outputs the head reads (besides the LM head's input)."""
    hidden_size: int = 0
    """The model's hidden size ``H``."""
    width: int = 128
    """The MLP's hidden width."""
    dropout: float = 0.1
    """Dropout on the normalised features while training."""

    @property
    def features(self) -> int:
        return (len(self.layers) + 1) * self.hidden_size


class TriggerHead(nn.Module):
    def __init__(self, config: TriggerHeadConfig):
        super().__init__()
        self.config = config
        self.register_buffer("mean", torch.zeros(config.features))  # (F,)
        self.register_buffer("scale", torch.ones(config.features))  # (F,)
        self.net = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(config.features, config.width), nn.GELU(),
                                 nn.Linear(config.width, 1))
        self._hooks: list = []

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``features (..., F)`` → the trigger's logit ``a (...)``, ``p = σ(a)``."""
        return self.net((features.float() - self.mean) / self.scale)[..., 0]

    def set_normalisation(self, features: torch.Tensor) -> None:
        """Mean and spread of the training features ``(N, F)``."""
        self.mean.copy_(features.mean(0))
        self.scale.copy_(features.std(0) + 1e-4)

    def round_to_saved(self) -> "TriggerHead":
        """Round weights and normalisation to float16, as ``trigger_head.safetensors`` stores them: a threshold chosen
        after this holds for the head that is shipped, not only for the one in memory."""
        with torch.no_grad():
            for tensor in self.state_dict().values():
                tensor.copy_(tensor.half().float())
        return self

    def record(self) -> dict:
        return asdict(self.config)

    # -- at run time ----------------------------------------------------------------------------------
    def attach(self, model: nn.Module, token_id: int) -> None:
        """Set ``token_id``'s logit from the head in every forward of ``model`` (until :meth:`detach`)."""
        if self._hooks:
            raise ValueError("TriggerHead.attach: already attached (detach first)")
        self.eval()

        def rewrite(features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            if logits.requires_grad:
                logits = logits.clone()  # (B, T, V); otherwise the LM head's fresh output is rewritten in place
            logits[..., token_id] = float("-inf")
            with torch.no_grad():
                logit = self(features) + torch.logsumexp(logits.float(), dim=-1)  # (B, T): p(token) = σ(a) exactly
            logits[..., token_id] = logit.to(logits.dtype)
            return logits

        self._hooks = _tap(model, self.config.layers, rewrite)

    def detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


def _tap(model: nn.Module, layers: list[int], on_head) -> list:
    """Forward hooks: the outputs of ``layers`` and the LM head's input of each forward, concatenated
    ``(B, T, F)`` (the last ``T`` positions whose logits are kept), passed with the logits to
    ``on_head(features, logits)``, whose answer (if not None) replaces the logits. Per thread: a forward on
    another thread (a background absorb) keeps its own states."""
    blocks = decoder_layers(model)
    for index in layers:
        if not 0 <= index < len(blocks):
            raise ValueError(f"trigger head layer {index} is out of range for {len(blocks)} decoder layers")
    local = threading.local()

    def keep(index):
        def hook(module, inputs, output):
            states = getattr(local, "states", {})
            states[index] = output[0] if isinstance(output, tuple) else output  # (B, T, H)
            local.states = states
        return hook

    def head(module, inputs, output):
        states = getattr(local, "states", {})
        local.states = {}
        if any(index not in states for index in layers):
            return None  # a forward that did not run the decoder layers (not ours to rewrite)
        last = inputs[0]  # (B, T', H): T' = T, or fewer with logits_to_keep
        parts = [states[index][:, -last.shape[1]:] for index in layers] + [last]
        return on_head(torch.cat(parts, dim=-1), output)  # (B, T', F)

    handles = [blocks[index].register_forward_hook(keep(index)) for index in layers]
    handles.append(model.get_output_embeddings().register_forward_hook(head))
    return handles


@contextmanager
def head_features(model: nn.Module, layers: list[int]):
    """The trigger head's input features of every forward while the block is open: one ``(B, T, F)`` each, detached
    (what ``dynalora train trigger-head`` fits the head on; the same hooks as :meth:`TriggerHead.attach`)."""
    captured: list[torch.Tensor] = []
    handles = _tap(model, layers, lambda features, logits: captured.append(features.detach()))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
