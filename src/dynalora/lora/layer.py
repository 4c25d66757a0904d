"""The injected layer: a base linear layer plus the per-row dynamic LoRA of a :class:`LoraState`."""

from __future__ import annotations

import torch
from torch import nn

from dynalora.lora.state import LoraState, ModuleSlot


class DynamicLoraLinear(nn.Module):
    """``y = W x + (x A_t ⊙ rank_weights[b]) B_t + bmm(bmm(x, A_row[b]) ⊙ row_scales[b], B_row[b])``.

    No loop over adapters or rows: the bank blend is one rank-(K·r) LoRA whose rank dimension is
    scaled per row, the per-row factors are one pair of batched matmuls. Each term is skipped when the
    state has nothing in it, so an all-zero state costs two attribute reads.
    """

    def __init__(self, base_layer: nn.Module, state: LoraState, module_name: str):
        super().__init__()
        self.base_layer = base_layer
        self.module_name = module_name
        # Plain attributes, not submodules or buffers: the state owns the tensors and the model's
        # state_dict stays exactly the base model's.
        self.__dict__["dynalora_state"] = state
        self.__dict__["dynalora_slot"] = state.slots[module_name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, in)
        y = self.base_layer(x)  # (B, T, out)
        state: LoraState = self.dynalora_state
        slot: ModuleSlot = self.dynalora_slot
        routed = state.routed if state.router is not None else None  # a thread-local read only when routing
        if routed is not None and self.module_name not in routed[1]:
            routed = None
        if state.merged_row is not None:  # the weights hold one row's whole LoRA (DynamicLoraModel.merge_row)
            alone = x.dim() == 2 or x.shape[0] == 1
            if alone and state.row_offset == state.merged_row and state.overrides is None and routed is None:
                return y
            state.on_change()  # a batch, another row or training: the weights put back exactly, then as usual
            y = self.base_layer(x)
        if state.overrides is not None:
            return self._functional_forward(x, y, state.overrides, slot, routed)
        bank_on = (state.bank_active or routed is not None) and slot.bank_a_t is not None
        if not (bank_on or slot.rows_active):
            return y
        squeeze = x.dim() == 2
        if squeeze:  # (T, in): one row
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        start = state.row_offset
        stop = start + x.shape[0]
        if stop > state.max_batch:
            raise RuntimeError(f"batch of {x.shape[0]} rows (from state row {start}), but the LoRA state holds "
                               f"{state.max_batch}; attach with a larger StateConfig.max_batch")
        x = x.to(slot.row_a_t.dtype)
        if bank_on:
            weights = state.rank_weights[start:stop, None, :] if routed is None else routed[0]  # (B, 1 or T, K*r)
            mixed = (x @ slot.bank_a_t) * weights  # (B, T, K*r)
            y = y + (mixed @ slot.bank_b_t).to(y.dtype)  # (B, T, out)
        if slot.rows_active:
            low = torch.bmm(x, slot.row_a_t[start:stop])  # (B, T, r_g + r_m)
            if state.rows_scaled:  # the mix gate's memory weights
                low = low * state.row_scales[start:stop, None, :]
            y = y + torch.bmm(low, slot.row_b_t[start:stop]).to(y.dtype)  # (B, T, out)
        return y.squeeze(0) if squeeze else y

    def _functional_forward(self, x, y, overrides: dict, slot: ModuleSlot, routed=None) -> torch.Tensor:
        """Same sum, from differentiable tensors given by ``LoraState.functional`` (training), computed in the
        state's dtype (the model's; gradients flow back to the given tensors' own dtype)."""
        dtype = slot.row_a_t.dtype
        x = x.to(dtype)
        rank_weights = overrides["rank_weights"] if routed is None else routed[0]
        if rank_weights is not None and slot.bank_a_t is not None:
            if rank_weights.dim() == 2:  # (B, K*r): one blend a row
                rank_weights = rank_weights[:, None, :]
            mixed = (x @ slot.bank_a_t) * rank_weights.to(dtype)  # (B, T, K*r)
            y = y + (mixed @ slot.bank_b_t).to(y.dtype)  # (B, T, out)
        factors = overrides["rows"].get(self.module_name)
        if factors is not None:
            a_t, b_t = factors  # (B, in, R), (B, R, out)
            y = y + torch.bmm(torch.bmm(x, a_t.to(dtype)), b_t.to(dtype)).to(y.dtype)  # (B, T, out)
        return y

    def extra_repr(self) -> str:
        return f"module_name={self.module_name!r}"
