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


def merge_at_rank(old: dict, new: dict, rank: int, decay: float = 1.0) -> tuple[dict, float]:
    """Fold ``new`` factors into ``old`` at a fixed rank: ``ΔW' ≈ decay·ΔW_old + ΔW_new`` per module.

    ``old``/``new``: ``{module: (A (r, in), B (out, r))}`` (either may lack a module). The stacked factors
    (rank ``r_old + r_new``) are cut back to ``rank`` by :func:`truncate` (QR + SVD of a small core, never
    an ``out × in`` matrix), so the memory's size does not grow with the number of merges; what is lost
    is the smallest singular directions (older content fades first only as far as ``decay`` < 1 makes it
    smaller). Returns ``(merged, worst relative error over modules)``.
    """
    merged, worst = {}, 0.0
    for module in list(old) + [m for m in new if m not in old]:
        parts_a, parts_b = [], []
        if module in old:
            parts_a.append(old[module][0])
            parts_b.append(old[module][1] * decay)
        if module in new:
            parts_a.append(new[module][0])
            parts_b.append(new[module][1])
        lora_a, lora_b = torch.cat(parts_a), torch.cat(parts_b, dim=1)  # (R, in), (out, R)
        if lora_a.shape[0] > rank:
            lora_a, lora_b, error = truncate(lora_a, lora_b, rank)
            worst = max(worst, error)
        merged[module] = (lora_a, lora_b)
    return merged, worst
