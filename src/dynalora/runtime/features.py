"""Hidden states of one layer, captured by a forward hook during the normal forward (no extra pass)."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
from torch import nn

from dynalora.lora.targets import decoder_layers
from dynalora.runtime.padding import left_pad


class HiddenCapture:
    """Keeps, per row, the last ``window`` hidden states of layer ``layer_index`` (B, W, H).

    Positions masked out (left padding) are not pooled. ``enabled = False`` pauses capture (used while
    recomputing the KV cache, whose hidden states would duplicate positions)."""

    def __init__(self, model: nn.Module, layer_index: int | None = None, window: int = 32):
        layers = decoder_layers(model)
        self.layer_index = len(layers) // 2 if layer_index is None else layer_index
        if not -len(layers) <= self.layer_index < len(layers):
            raise ValueError(f"feature_layer={layer_index} is out of range for {len(layers)} decoder layers")
        self.window = window
        self.enabled = True
        self.recent: torch.Tensor | None = None  # (B, W, H)
        self.valid: torch.Tensor | None = None  # (B, W) bool
        self._pending_mask: torch.Tensor | None = None
        self._thread = threading.get_ident()  # forwards of other threads (a background absorb) are not captured
        self._handle = layers[self.layer_index].register_forward_hook(self._hook)

    def expect(self, mask: torch.Tensor) -> None:
        """The attention mask ``(B, T_new)`` of the positions the next forward feeds."""
        self._pending_mask = mask.bool()

    def _hook(self, module, inputs, output):
        if not self.enabled or threading.get_ident() != self._thread:
            return
        hidden = (output[0] if isinstance(output, tuple) else output).detach()  # (B, T_new, H)
        mask = self._pending_mask
        if mask is None or mask.shape != hidden.shape[:2]:
            mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        if self.recent is None or self.recent.shape[0] != hidden.shape[0]:
            self.recent, self.valid = hidden[:, -self.window:], mask[:, -self.window:]
        else:
            self.recent = torch.cat([self.recent, hidden], dim=1)[:, -self.window:]  # (B, W, H)
            self.valid = torch.cat([self.valid, mask], dim=1)[:, -self.window:]  # (B, W)
        self._pending_mask = None

    def reset(self) -> None:
        self.recent = self.valid = None

    def take(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What is captured so far (``None``: nothing), leaving the capture empty: rows about to join a batch are
        prefilled on their own and their capture is then put below this one (:meth:`put_above`)."""
        taken = None if self.recent is None else (self.recent, self.valid)
        self.reset()
        return taken

    def put_above(self, taken: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Rows ``taken`` first, then the rows captured since (the shorter window padded on its left, not valid)."""
        if taken is None:
            return
        if self.recent is None:
            self.recent, self.valid = taken
            return
        width = max(taken[0].shape[1], self.recent.shape[1])
        parts = [(left_pad(recent, width - recent.shape[1], 1), left_pad(valid, width - valid.shape[1], 1))
                 for recent, valid in (taken, (self.recent, self.valid))]
        self.recent = torch.cat([parts[0][0], parts[1][0]])  # (B, W, H)
        self.valid = torch.cat([parts[0][1], parts[1][1]])  # (B, W)

    def select(self, keep: list[int]) -> None:
        """Keep only the rows ``keep`` (rows that left the batch are dropped)."""
        if self.recent is not None:
            self.recent, self.valid = self.recent[keep], self.valid[keep]

    def follow_current_thread(self) -> None:
        """Capture the forwards of the calling thread from now on (the one generating: a server runs the engine on a
        worker thread; a background absorb's forwards, on yet another, stay out)."""
        self._thread = threading.get_ident()

    def last(self, row: int) -> torch.Tensor:
        """(H,) hidden state at the row's last captured position."""
        return self.recent[row, -1]

    def pooled(self, row: int) -> torch.Tensor:
        """(H,) mean over the row's valid positions in the window."""
        valid = self.valid[row]
        return self.recent[row][valid].mean(dim=0) if valid.any() else self.recent[row, -1]

    def remove(self) -> None:
        self._handle.remove()


@torch.no_grad()
def pooled_features(dyn, capture, contexts: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """``contexts (N, T)`` → pooled feature-layer hidden states ``(N, H)`` under the zero state, in float32 (what the
    hypernetworks read, whatever the model's dtype)."""
    dyn.state.reset()
    out = []
    for start in range(0, len(contexts), batch_size):
        chunk = contexts[start:start + batch_size]
        capture.reset()
        dyn(input_ids=chunk, use_cache=False)
        out.append(torch.stack([capture.pooled(b) for b in range(len(chunk))]))
    capture.reset()
    return torch.cat(out).float()


@contextmanager
def lm_head_inputs(model: nn.Module, detach: bool = True):
    """The hidden states the LM head reads: one ``(B, T, H)`` per forward while the block is open (``T`` = the
    positions whose logits are kept). ``p(token) = σ(h·e − log Z)`` of a new token row ``e`` needs only these
    and ``log Z``, so trigger and think rows are fitted on them without a backward through the model."""
    captured: list[torch.Tensor] = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda module, inputs, output: captured.append(inputs[0].detach() if detach else inputs[0]))
    try:
        yield captured
    finally:
        handle.remove()
