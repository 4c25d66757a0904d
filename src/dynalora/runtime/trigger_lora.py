"""The trigger LoRA at run time: a static ``ΔW`` on a few top-layer modules, merged into the base weights.

Trained by ``dynalora train triggers --lora`` (see :mod:`dynalora.train.trigger_lora`) and saved beside
the trigger token rows as ``trigger_lora.safetensors`` (rank-``r`` factors ``name.A (r, in)``,
``name.B (out, r)``). Being the same at every token, merging it is exact and costs nothing per token.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

LORA_FILE = "trigger_lora.safetensors"


def lora_factors(deltas: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """fp16 rank-``rank`` factors (``name.A (r, in)``, ``name.B (out, r)``) from the SVD of each ``ΔW``: small files."""
    factors = {}
    for name, delta in deltas.items():
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        factors[f"{name}.B"] = (u[:, :rank] * s[:rank]).half().contiguous()
        factors[f"{name}.A"] = vh[:rank].half().contiguous()
    return factors


def factor_deltas(factors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{module name: ΔW (out, in)}`` from :func:`lora_factors`' factors."""
    names = sorted({key.rsplit(".", 1)[0] for key in factors})
    return {name: factors[f"{name}.B"].float() @ factors[f"{name}.A"].float() for name in names}


def merge_trigger_lora(model, deltas: dict[str, torch.Tensor], sign: float = 1.0) -> None:
    """Add (``sign=1``) or take out (``-1``) the trigger LoRA in the base weights, in place (inside a
    dynalora wrapper too: its ``base_layer``)."""
    modules = dict(model.named_modules())
    missing = sorted(set(deltas) - set(modules))
    if missing:
        raise ValueError(f"trigger LoRA names modules this model lacks: {missing[:3]}")
    with torch.no_grad():
        for name, delta in deltas.items():
            weight = getattr(modules[name], "base_layer", modules[name]).weight
            if weight.shape != delta.shape:
                raise ValueError(f"trigger LoRA {name}: ΔW {tuple(delta.shape)} ≠ weight {tuple(weight.shape)}")
            weight += sign * delta.to(weight.device, weight.dtype)


@contextmanager
def trigger_lora_merged(model, deltas: dict[str, torch.Tensor] | None):
    """The trigger LoRA merged for the duration (e.g. only while dynalora runs in an evaluation)."""
    if deltas:
        merge_trigger_lora(model, deltas, 1.0)
    try:
        yield
    finally:
        if deltas:
            merge_trigger_lora(model, deltas, -1.0)
