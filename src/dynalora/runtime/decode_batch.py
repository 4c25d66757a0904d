"""The rows a generation runs: token ids, mask and positions, left-padded, with their KV cache — rows join (prefilled
on their own, then padded to a common length) and leave (selected out, all-padding columns trimmed) between steps."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from dynalora.runtime.padding import left_pad, pad_rows


class DecodeBatch:
    """Token ids, mask and positions of every row so far, left-padded: all (B, L), on the model's device.

    The buffers hold ``room`` more columns than the prompt from the start, so a step writes one column in place
    instead of copying the whole batch (``append`` grows them only if a stream outruns its room)."""

    def __init__(self, rows: list[list[int]], pad_id: int, device: torch.device, room: int = 0):
        self._ids, self._mask = pad_rows(rows, pad_id, device, left=True, room=room)
        self._positions = (self._mask.cumsum(-1) - 1).clamp(min=0)
        self.length = max(len(r) for r in rows)
        self.pad_id = pad_id

    @property
    def size(self) -> int:
        return self._ids.shape[0]

    @property
    def ids(self) -> torch.Tensor:  # (B, L)
        return self._ids[:, :self.length]

    @property
    def mask(self) -> torch.Tensor:  # (B, L)
        return self._mask[:, :self.length]

    @property
    def positions(self) -> torch.Tensor:  # (B, L)
        return self._positions[:, :self.length]

    @property
    def room(self) -> int:
        return self._ids.shape[1] - self.length

    def append(self, tokens: torch.Tensor) -> None:  # tokens (B,)
        if self.length == self._ids.shape[1]:  # out of room: double it
            grow = max(self.length, 16)
            self._ids = torch.cat([self._ids, torch.zeros_like(self._ids[:, :grow])], dim=1)
            self._mask = torch.cat([self._mask, torch.zeros_like(self._mask[:, :grow])], dim=1)
            self._positions = torch.cat([self._positions, torch.zeros_like(self._positions[:, :grow])], dim=1)
        self._ids[:, self.length] = tokens
        self._mask[:, self.length] = 1
        self._positions[:, self.length] = self._positions[:, self.length - 1] + 1
        self.length += 1

    def row_tokens(self, b: int) -> list[int]:
        return self.ids[b][self.mask[b].bool()].tolist()

    def join(self, other: "DecodeBatch") -> tuple[int, int]:
        """Append ``other``'s rows below these, both right-aligned at the longer length (the shorter side gains
        padding columns on its left). Returns the columns of padding added to ``(self, other)``."""
        length = max(self.length, other.length)
        room = max(self.room, other.room)
        parts = []
        for source in (self._ids, self._mask, self._positions):
            fill = self.pad_id if source is self._ids else 0
            merged = torch.full((self.size + other.size, length + room), fill, dtype=source.dtype,
                                device=source.device)
            parts.append(merged)
        for offset, batch in ((0, self), (self.size, other)):
            rows, start = slice(offset, offset + batch.size), length - batch.length
            for merged, source in zip(parts, (batch.ids, batch.mask, batch.positions)):
                merged[rows, start:length] = source
        pads = (length - self.length, length - other.length)
        self._ids, self._mask, self._positions = parts
        self.length = length
        return pads

    def select(self, keep: list[int]) -> int:
        """Keep only the rows ``keep`` (in that order), then drop the columns that are padding in all of them.
        Returns the number of columns dropped (to drop from the KV cache too)."""
        index = torch.tensor(keep, dtype=torch.long, device=self._ids.device)
        self._ids, self._mask, self._positions = (t[index] for t in (self._ids, self._mask, self._positions))
        used = self.mask.any(dim=0)  # (L,)
        drop = int(used.long().argmax()) if used.any() else 0
        if drop:
            self._ids, self._mask, self._positions = (t[:, drop:] for t in (self._ids, self._mask, self._positions))
            self.length -= drop
        return drop


def join_caches(first: DynamicCache, second: DynamicCache, pads: tuple[int, int]) -> DynamicCache:
    """One cache of ``first``'s rows then ``second``'s, each left-padded by ``pads`` (zeros there: masked out)."""
    for mine, theirs in zip(first.layers, second.layers):
        mine.keys = torch.cat([left_pad(mine.keys, pads[0], 2), left_pad(theirs.keys, pads[1], 2)], dim=0)
        mine.values = torch.cat([left_pad(mine.values, pads[0], 2), left_pad(theirs.values, pads[1], 2)], dim=0)
    return first


def select_cache(cache: DynamicCache, keep: list[int], drop_columns: int) -> None:
    """Keep the rows ``keep`` and drop the first ``drop_columns`` positions (padding in all of them), in place."""
    index = torch.tensor(keep, dtype=torch.long, device=cache.layers[0].keys.device)
    for layer in cache.layers:
        layer.keys = layer.keys[index, :, drop_columns:]  # (B, heads, L, head_dim)
        layer.values = layer.values[index, :, drop_columns:]

