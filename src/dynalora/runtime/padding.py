"""Batches of token rows of different lengths: padding, and grouping rows of similar length."""

from __future__ import annotations

import torch


def pad_rows(rows: list[list[int]], pad_id: int, device, left: bool = False,
             room: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded ``(N, T)`` ids and mask: right-padded (causal scoring then needs no mask: a pad only follows the
    positions that are scored), or left-padded so that every row ends at column ``T - room - 1``; ``room`` empty
    columns follow (mask 0) for tokens a generation will write in place. Built on the CPU, moved in one copy."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width + room), pad_id, dtype=torch.long, device="cpu")
    mask = torch.zeros((len(rows), width + room), dtype=torch.long, device="cpu")
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long, device="cpu")
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


def left_pad(tensor: torch.Tensor, columns: int, dim: int) -> torch.Tensor:
    """``columns`` zeros (False for a mask) before ``tensor`` along ``dim``."""
    if columns <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = columns
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def length_buckets(lengths: list[int], spread: float = 1.5) -> list[list[int]]:
    """Indices grouped so that no batch pads a row past ``spread`` × its shortest row (sorted by length)."""
    buckets: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if buckets and lengths[i] <= spread * lengths[buckets[-1][0]]:
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets
