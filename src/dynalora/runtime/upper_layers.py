"""Run a causal LM from one decoder layer up, on hidden states the lower layers computed once.

Test-time training that adapts only the upper layers (the ``distill`` memory writer) runs the frozen,
unadapted lower layers once per text and reuses their output at every step. :meth:`UpperLayers.capture`
runs the model until the first adapted layer and keeps what that layer was called with (hidden states,
mask, position embeddings — whatever the architecture passes), then stops; :meth:`UpperLayers.logits`
runs the rest. Works for any model whose decoder layers sit in one ``ModuleList`` followed by a final
norm and the LM head (Llama, Qwen2, Gemma, Mistral: ``model.layers`` + ``model.norm``; GPT-2:
``transformer.h`` + ``transformer.ln_f``).

Example::

    upper = UpperLayers(model, first_layer=15)
    inputs = upper.capture(ids)                    # layers 0..14 once, no gradient
    logits = upper.logits(inputs)                  # (B, T, V): layers 15.. + norm + head, differentiable
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import nn

from dynalora.lora.targets import decoder_layers


class _Stop(Exception):
    """Raised by the capture hook: nothing past the first upper layer needs to run."""


@dataclass
class LayerInputs:
    """What the first upper layer was called with (its hidden states ``(B, T, H)`` and keyword arguments)."""

    hidden: torch.Tensor
    kwargs: dict
    extra_args: tuple = ()


FINAL_NORMS = ("model.norm", "transformer.ln_f", "model.decoder.final_layer_norm", "gpt_neox.final_layer_norm")


def decoder_parts(model: nn.Module) -> tuple[nn.ModuleList, nn.Module, nn.Module]:
    """``(decoder layers, final norm, LM head)`` of a causal LM; a clear error for other layouts."""
    for path in FINAL_NORMS:
        try:
            norm = model.get_submodule(path)
        except AttributeError:
            continue
        return decoder_layers(model), norm, model.get_output_embeddings()
    raise ValueError(f"{type(model).__name__}: no final norm found at {', '.join(FINAL_NORMS)}")


class UpperLayers:
    def __init__(self, model: nn.Module, first_layer: int):
        self.model = model
        self.layers, self.norm, self.head = decoder_parts(model)
        if not 0 <= first_layer < len(self.layers):
            raise ValueError(f"first_layer={first_layer}: the model has decoder layers 0..{len(self.layers) - 1}")
        self.first_layer = first_layer

    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> LayerInputs:
        """Run the model on ``input_ids (B, T)`` up to the first upper layer; return that layer's inputs."""
        seen, thread = {}, threading.get_ident()

        def hook(_module, args, kwargs):
            if threading.get_ident() != thread:  # another thread's forward (the engine decoding beside it)
                return None
            seen["inputs"] = LayerInputs(args[0], dict(kwargs), tuple(args[1:]))
            raise _Stop

        handle = self.layers[self.first_layer].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        return seen["inputs"]

    def logits(self, inputs: LayerInputs, select: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T, V)`` logits from the captured inputs through the upper layers, the norm and the head;
        with a ``(B, T)`` bool ``select``, only those positions' ``(S, V)`` (the head is the costly part)."""
        hidden = inputs.hidden
        for layer in self.layers[self.first_layer:]:
            out = layer(hidden, *inputs.extra_args, **inputs.kwargs)
            hidden = out[0] if isinstance(out, tuple) else out  # (B, T, H); GPT-2 blocks return tuples
        hidden = self.norm(hidden)
        return self.head(hidden if select is None else hidden[select])
