"""Low-rank algebra on factor pairs that never forms the full ``out × in`` matrix."""

from __future__ import annotations

import torch


def truncate(lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` approximation of ``B @ A`` (Frobenius), via QR + SVD of an R×R core.

    Args: ``lora_a (R, in)``, ``lora_b (out, R)``. Returns ``(A' (k, in), B' (out, k), rel_error)`` with
    ``k = min(rank, R)`` and ``rel_error = ||BA - B'A'||_F / ||BA||_F`` (0 for a zero matrix).
    Cost O((in + out)·R²), so it fits the hot path of memory merges.
    """
    dtype = lora_a.dtype
    a64, b64 = lora_a.double(), lora_b.double()
    q_b, r_b = torch.linalg.qr(b64)  # (out, R), (R, R)
    q_a, r_a = torch.linalg.qr(a64.T)  # (in, R), (R, R)
    core = r_b @ r_a.T  # (R, R): B A = q_b core q_a^T
    u, s, vh = torch.linalg.svd(core)
    k = min(rank, s.shape[0])
    total = float(s.pow(2).sum())
    rel_error = (float(s[k:].pow(2).sum()) / total) ** 0.5 if total > 0 else 0.0
    root = s[:k].sqrt()
    new_b = (q_b @ u[:, :k]) * root  # (out, k)
    new_a = root[:, None] * (vh[:k] @ q_a.T)  # (k, in)
    return new_a.to(dtype), new_b.to(dtype), rel_error
