"""Per-row LoRA state: what every row of a batch applies on top of the base model.

For row ``b`` and target module ``m`` the injected layer adds

    Σ_k w[b,k] · B_k A_k x      (bank blend; scaling folded into B_k)
  + B_g[b] A_g[b] x             (generated factors, rank ≤ generated_rank)
  + B_m[b] A_m[b] x             (memory factors,    rank ≤ memory_rank)

All buffers are allocated once for ``max_batch`` rows; every update validates its whole input first
and then writes in place (``copy_``/``zero_``), so a bad update changes nothing and no buffer is ever
reallocated (their ``data_ptr()`` stay fixed — safe under ``torch.compile`` and CUDA graphs).
Generated and memory factors of a module share one buffer pair (rank slots ``[0, r_g)`` and
``[r_g, r_g + r_m)``), so the layer applies both with a single pair of batched matmuls.
"""

from __future__ import annotations

import json
import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dynalora.lora.bank import LoraBank

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A (r, in), B (out, r))
FACTOR_KINDS = ("generated", "memory")


class StateError(ValueError):
    """An update or state file that does not fit this state; nothing was changed."""


@dataclass
class StateConfig:
    """Sizes of the per-row state, fixed at creation."""

    max_batch: int = 8
    """Rows the state holds; a forward pass may use any batch size up to this."""
    generated_rank: int = 8
    """Rank of the per-row generated factors (written by a hypernetwork)."""
    memory_rank: int = 8
    """Rank of the per-row memory factors (written by absorb)."""

    def __post_init__(self):
        for name in ("max_batch", "generated_rank", "memory_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (1 if name == "max_batch" else 0):
                raise StateError(f"StateConfig.{name} must be an integer ≥ {1 if name == 'max_batch' else 0}, "
                                 f"got {value!r}")


class ModuleSlot:
    """The tensors one injected layer reads. ``bank_*`` are ``None`` when no adapter touches the module."""

    __slots__ = ("name", "bank_a_t", "bank_b_t", "row_a_t", "row_b_t", "active_rows")

    def __init__(self, name, bank_a_t, bank_b_t, row_a_t, row_b_t):
        self.name = name
        self.bank_a_t = bank_a_t  # (in, K*r)
        self.bank_b_t = bank_b_t  # (K*r, out)
        self.row_a_t = row_a_t  # (max_batch, in, r_g + r_m)
        self.row_b_t = row_b_t  # (max_batch, r_g + r_m, out)
        self.active_rows: set[int] = set()  # rows with nonzero factors: an all-zero state skips the bmm

    @property
    def rows_active(self) -> bool:
        return bool(self.active_rows)


class LoraState:
    """Blend weights and row factors for ``config.max_batch`` rows over one bank and target set.

    Example::

        state = LoraState(bank, targets, StateConfig(max_batch=4))
        state.update(0, blend=[0.5, 0.5, 0, 0])           # row 0: half of adapters 0 and 1
        state.update(1, generated={"model.layers.0.self_attn.q_proj": (A, B)})
        snap = state.snapshot(); state.reset(); state.restore(snap)
    """

    def __init__(self, bank: LoraBank, target_modules: list[str], config: StateConfig | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.config = config or StateConfig()
        self.bank = bank
        self.labels = list(bank.labels)
        self.bank_rank = bank.rank
        self.dtype, self.device = dtype, torch.device(device)
        missing = [m for m in bank.modules if m not in target_modules]
        if missing:
            raise StateError(f"bank adapters touch modules that are not targeted: {missing[:4]}... add their "
                             "suffixes to target_modules")
        unknown = [m for m in target_modules if m not in bank.module_shapes]
        if unknown:
            raise StateError(f"target modules {unknown[:4]} are not linear layers of the base model")
        rows, row_rank = self.config.max_batch, self.config.generated_rank + self.config.memory_rank
        count = len(bank)
        self.blend_weights = torch.zeros(rows, count, dtype=dtype, device=device)  # (max_batch, K)
        self.rank_weights = torch.zeros(rows, count * self.bank_rank, dtype=dtype, device=device)  # (max_batch, K*r)
        self.bank_active = False
        # per-row weight on the memory term (the mix gate's): applied as a scale on the rank dimension
        self.memory_weights = torch.ones(rows, dtype=dtype, device=device)  # (max_batch,)
        self.row_scales = torch.ones(rows, row_rank, dtype=dtype, device=device)  # (max_batch, r_g + r_m)
        self.rows_scaled = False
        self.row_offset = 0  # a forward's batch row i reads state row row_offset + i (see use_rows)
        self.merged_row: int | None = None
        """The row whose whole LoRA is folded into the base weights (``DynamicLoraModel.merge_row``), or None."""
        self.on_change = None
        """Called before any write (set while a row is merged: it takes the row out)."""
        self.router = None
        """The token router attached to this state's model (:class:`dynalora.hyper.router.TokenRouter`), or None."""
        self._local = threading.local()  # per-thread functional overrides: a background absorb trains beside decode
        stacked = bank.stacked(dtype=dtype, device=device)
        self.slots: dict[str, ModuleSlot] = {}
        for module in target_modules:
            in_features, out_features = bank.module_shapes[module]
            bank_a_t, bank_b_t = stacked.get(module, (None, None))
            self.slots[module] = ModuleSlot(
                module, bank_a_t, bank_b_t,
                torch.zeros(rows, in_features, row_rank, dtype=dtype, device=device),
                torch.zeros(rows, row_rank, out_features, dtype=dtype, device=device),
            )

    # -- reading --------------------------------------------------------------------------------
    @property
    def max_batch(self) -> int:
        return self.config.max_batch

    @property
    def modules(self) -> list[str]:
        return list(self.slots)

    def _rank_range(self, kind: str) -> tuple[int, int]:
        if kind == "generated":
            return 0, self.config.generated_rank
        if kind == "memory":
            return self.config.generated_rank, self.config.generated_rank + self.config.memory_rank
        raise StateError(f"factor kind {kind!r}: choose one of {FACTOR_KINDS}")

    def row_factors(self, row: int, kind: str) -> Factors:
        """The nonzero ``{module: (A (r, in), B (out, r))}`` of one row's generated or memory slot."""
        self._check_row(row)
        start, stop = self._rank_range(kind)
        out = {}
        for module, slot in self.slots.items():
            lora_a = slot.row_a_t[row, :, start:stop].T  # (r, in)
            lora_b = slot.row_b_t[row, start:stop].T  # (out, r)
            if lora_a.any() and lora_b.any():
                out[module] = (lora_a.clone(), lora_b.clone())
        return out

    def effective_factors(self, row: int) -> Factors:
        """One row's whole LoRA as plain factors: ``ΔW_m = B @ A`` exactly (rank ≤ K·r + r_g + r_m).

        Adapters with zero weight and all-zero rank slots are dropped."""
        self._check_row(row)
        weights = self.blend_weights[row]  # (K,)
        used = [k for k in range(len(self.labels)) if weights[k] != 0]
        out = {}
        for module, slot in self.slots.items():
            parts_a, parts_b = [], []
            if slot.bank_a_t is not None:
                for k in used:
                    cols = slice(k * self.bank_rank, (k + 1) * self.bank_rank)
                    lora_a, lora_b = slot.bank_a_t[:, cols].T, slot.bank_b_t[cols].T  # (r, in), (out, r)
                    keep = lora_a.any(dim=1) & lora_b.any(dim=0)
                    parts_a.append(lora_a[keep])
                    parts_b.append(lora_b[:, keep] * weights[k])
            lora_a, lora_b = slot.row_a_t[row].T, slot.row_b_t[row].T  # (R, in), (out, R)
            keep = lora_a.any(dim=1) & lora_b.any(dim=0)
            parts_a.append(lora_a[keep])
            parts_b.append(lora_b[:, keep])
            lora_a, lora_b = torch.cat(parts_a), torch.cat(parts_b, dim=1)
            if lora_a.shape[0]:
                out[module] = (lora_a.clone(), lora_b.clone())
        return out

    @contextmanager
    def use_rows(self, start: int):
        """Within the block, a forward's batch row ``i`` uses state row ``start + i``: e.g. to run one
        row of a batch alone (recomputing its KV cache) under its own LoRA."""
        self._check_row(start)
        previous, self.row_offset = self.row_offset, start
        try:
            yield self
        finally:
            self.row_offset = previous

    @contextmanager
    def functional(self, rank_weights: torch.Tensor | None = None,
                   row_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
        """Within the block, layers read these tensors instead of the buffers (gradients flow into them).

        ``rank_weights (B, K*r)`` (see :func:`expand_blend`), or ``(B, T, K*r)``: a blend per position;
        ``row_factors[module] = (A_t (B, in, R), B_t (B, R, out))`` for any rank R. Used to train hypernetworks end to
        end through the frozen model."""
        self._changed()
        previous, self._local.overrides = self.overrides, {"rank_weights": rank_weights, "rows": row_factors or {}}
        try:
            yield self
        finally:
            self._local.overrides = previous

    @property
    def overrides(self) -> dict | None:
        """This thread's differentiable tensors (see :meth:`functional`); ``None`` outside the block."""
        return getattr(self._local, "overrides", None)

    @property
    def routed(self) -> tuple[torch.Tensor, frozenset[str]] | None:
        """Per-position rank weights ``(B, T, K*r)`` and the modules that read them in place of the row's blend, for
        the rest of this thread's current forward (set by a token router at its layer: :mod:`dynalora.hyper.router`);
        ``None``: every module reads the row's blend."""
        return getattr(self._local, "routed", None)

    @routed.setter
    def routed(self, value: tuple[torch.Tensor, frozenset[str]] | None) -> None:
        self._local.routed = value

    def expand_blend(self, blend: torch.Tensor) -> torch.Tensor:
        """Blend weights ``(B, K)`` → rank weights ``(B, K*r)`` (differentiable)."""
        return blend.repeat_interleave(self.bank_rank, dim=-1)

    # -- writing --------------------------------------------------------------------------------
    def _check_row(self, row: int) -> None:
        if not isinstance(row, int) or not 0 <= row < self.max_batch:
            raise StateError(f"row {row!r} is out of range: this state holds rows 0..{self.max_batch - 1} "
                             "(StateConfig.max_batch)")

    def _checked_blend(self, blend) -> torch.Tensor:
        weights = torch.as_tensor(blend, dtype=self.dtype, device=self.device)
        if weights.shape != (len(self.labels),):
            raise StateError(f"blend weights have shape {tuple(weights.shape)}, but the bank holds "
                             f"{len(self.labels)} adapters {self.labels}: pass one weight per adapter")
        if not torch.isfinite(weights).all():
            raise StateError(f"blend weights hold NaN or Inf: {weights.tolist()}")
        return weights

    def _checked_factors(self, factors: Factors, kind: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        start, stop = self._rank_range(kind)
        capacity = stop - start
        checked = {}
        for module, pair in factors.items():
            if module not in self.slots:
                raise StateError(f"{kind} factors for {module!r}: not a target module of this state "
                                 f"(targets are e.g. {self.modules[:3]})")
            lora_a, lora_b = (torch.as_tensor(t, device=self.device) for t in pair)
            in_features, out_features = self.bank.module_shapes[module]
            if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[1] != in_features or \
                    lora_b.shape[0] != out_features or lora_a.shape[0] != lora_b.shape[1]:
                raise StateError(f"{kind} factors for {module!r}: A {tuple(lora_a.shape)} and B "
                                 f"{tuple(lora_b.shape)} do not fit; need A (r, {in_features}), B ({out_features}, r)")
            if lora_a.shape[0] > capacity:
                raise StateError(f"{kind} factors for {module!r} have rank {lora_a.shape[0]}, above the state's "
                                 f"{kind}_rank={capacity} (StateConfig)")
            if not (torch.isfinite(lora_a).all() and torch.isfinite(lora_b).all()):
                raise StateError(f"{kind} factors for {module!r} hold NaN or Inf")
            checked[module] = (lora_a, lora_b)
        return checked

    @torch.no_grad()
    def update(self, row: int, blend=None, generated: Factors | None = None, memory: Factors | None = None) -> None:
        """Replace, for one row, any of: blend weights ``(K,)``; generated factors; memory factors.

        ``None`` leaves a part as it is; ``{}`` clears a factor slot. Modules absent from a factor dict
        are zeroed. Everything is validated before anything is written."""
        self._check_row(row)
        weights = None if blend is None else self._checked_blend(blend)
        parts = {kind: self._checked_factors(f, kind) for kind, f in
                 (("generated", generated), ("memory", memory)) if f is not None}
        self._changed()
        if weights is not None:
            self.blend_weights[row].copy_(weights)
            self.rank_weights[row].copy_(weights.repeat_interleave(self.bank_rank))
            self.bank_active = bool(self.blend_weights.any())
        for kind, checked in parts.items():
            start, stop = self._rank_range(kind)
            for module, slot in self.slots.items():
                slot.row_a_t[row, :, start:stop].zero_()
                slot.row_b_t[row, start:stop].zero_()
                if module in checked:
                    lora_a, lora_b = checked[module]
                    rank = lora_a.shape[0]
                    slot.row_a_t[row, :, start:start + rank].copy_(lora_a.T)
                    slot.row_b_t[row, start:start + rank].copy_(lora_b.T)
        if parts:
            self._refresh_active(row)

    @torch.no_grad()
    def set_memory_weight(self, row: int, weight: float) -> None:
        """Scale one row's memory term by ``weight`` (1: as absorbed, 0: off); the memory itself is kept, so
        :meth:`row_factors` and later absorbs see it unscaled."""
        self._check_row(row)
        if not (math.isfinite(float(weight)) and float(weight) >= 0):
            raise StateError(f"memory weight {weight!r}: must be a finite number ≥ 0")
        self._changed()
        self.memory_weights[row] = float(weight)
        self._refresh_scales()

    def _refresh_scales(self) -> None:
        start, stop = self._rank_range("memory")
        self.row_scales[:, start:stop] = self.memory_weights[:, None]
        self.rows_scaled = bool((self.memory_weights != 1).any())

    def set_blend(self, row: int, weights) -> None:
        self.update(row, blend=weights)

    def set_blend_by_label(self, row: int, weights_by_label: dict[str, float]) -> None:
        """Example: ``state.set_blend_by_label(0, {"news": 0.7, "scripture": 0.3})``; others get 0."""
        unknown = sorted(set(weights_by_label) - set(self.labels))
        if unknown:
            raise StateError(f"unknown adapter labels {unknown}; the bank holds {self.labels}")
        self.update(row, blend=[float(weights_by_label.get(label, 0.0)) for label in self.labels])

    @torch.no_grad()
    def reset(self, row: int | None = None) -> None:
        """Zero one row (or all rows): the model is then the base model for it."""
        rows = slice(None) if row is None else row
        if row is not None:
            self._check_row(row)
        self._changed()
        self.blend_weights[rows].zero_()
        self.rank_weights[rows].zero_()
        self.memory_weights[rows] = 1.0
        for slot in self.slots.values():
            slot.row_a_t[rows].zero_()
            slot.row_b_t[rows].zero_()
        self.bank_active = bool(self.blend_weights.any())
        self._refresh_scales()
        self._refresh_active(row)

    def _changed(self) -> None:
        """Called before every write: a row folded into the base weights (``DynamicLoraModel.merge_row``) is taken
        out first, exactly."""
        if self.on_change is not None:
            self.on_change()

    def _refresh_active(self, row: int | None = None) -> None:
        """Recheck which rows hold factors: one row after an update (cheap), or all of them."""
        rows = range(self.max_batch) if row is None else [row]
        for slot in self.slots.values():
            for r in rows:
                if slot.row_a_t[r].any() and slot.row_b_t[r].any():
                    slot.active_rows.add(r)
                else:
                    slot.active_rows.discard(r)

    # -- snapshots and files ------------------------------------------------------------------------
    def tensors(self, row: int | None = None) -> dict[str, torch.Tensor]:
        """Copies of the state's tensors (one row, keeping a leading dim of 1, or all rows)."""
        rows = slice(None) if row is None else slice(row, row + 1)
        out = {"blend_weights": self.blend_weights[rows].clone(), "memory_weights": self.memory_weights[rows].clone()}
        for module, slot in self.slots.items():
            out[f"rows.{module}.A_t"] = slot.row_a_t[rows].clone()
            out[f"rows.{module}.B_t"] = slot.row_b_t[rows].clone()
        return out

    def snapshot(self, row: int | None = None) -> dict:
        """A copy of one row (or all rows) that :meth:`restore` writes back."""
        if row is not None:
            self._check_row(row)
        return {"row": row, "tensors": self.tensors(row)}

    @torch.no_grad()
    def restore(self, snapshot: dict, row: int | None = None) -> None:
        """Write a snapshot back in place, to its own row or to ``row`` (a one-row snapshot only)."""
        tensors = snapshot["tensors"]
        target = snapshot["row"] if row is None else row
        if target is not None:
            self._check_row(target)
        rows = slice(None) if target is None else slice(target, target + 1)
        self._check_tensors(tensors, expected_rows=self.max_batch if target is None else 1, where="snapshot")
        self._changed()
        self.blend_weights[rows].copy_(tensors["blend_weights"])
        self.rank_weights[rows].copy_(tensors["blend_weights"].repeat_interleave(self.bank_rank, dim=1))
        self.memory_weights[rows] = tensors["memory_weights"].to(self.dtype)
        self._refresh_scales()
        for module, slot in self.slots.items():
            slot.row_a_t[rows].copy_(tensors[f"rows.{module}.A_t"])
            slot.row_b_t[rows].copy_(tensors[f"rows.{module}.B_t"])
        self.bank_active = bool(self.blend_weights.any())
        self._refresh_active()

    def _check_tensors(self, tensors: dict[str, torch.Tensor], expected_rows: int, where: str) -> None:
        expected = self.tensors(0)
        for key, reference in expected.items():
            if key not in tensors:
                raise StateError(f"{where}: tensor {key!r} is missing (saved for another model or target set?)")
            shape = (expected_rows, *reference.shape[1:])
            if tuple(tensors[key].shape) != shape:
                raise StateError(f"{where}: tensor {key!r} has shape {tuple(tensors[key].shape)}, this state "
                                 f"needs {shape}")
            if not torch.isfinite(tensors[key]).all():
                raise StateError(f"{where}: tensor {key!r} holds NaN or Inf")

    def save(self, path: str | Path, row: int | None = None) -> Path:
        """Save all rows (or one row, as a one-row file) as safetensors, with the bank labels and sizes in the
        header."""
        if row is not None:
            self._check_row(row)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"format": "dynalora-state/1", "labels": json.dumps(self.labels),
                    "bank_rank": str(self.bank_rank), "config": json.dumps(vars(self.config))}
        tmp = path.with_name(path.name + ".partial")
        save_file({k: v.contiguous().cpu() for k, v in self.tensors(row).items()}, str(tmp), metadata=metadata)
        tmp.replace(path)
        return path

    def load(self, path: str | Path, row: int | None = None) -> None:
        """Load a file written by :meth:`save` into this state, in place; refuses one for another bank. With ``row``:
        the file's first row (a one-row file, or a whole state's row 0) into that row only; a one-row file without
        ``row`` goes into row 0, the other rows zeroed."""
        if row is not None:
            self._check_row(row)
        path = Path(path)
        if not path.is_file():
            raise StateError(f"{path}: no such state file")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as error:
            raise StateError(f"{path}: cannot be read as safetensors ({error})") from error
        if "blend_weights" in tensors:  # files from before the mix gate have no memory weights
            tensors.setdefault("memory_weights", torch.ones(tensors["blend_weights"].shape[0]))
        labels = json.loads(metadata.get("labels", "null"))
        if labels != self.labels:
            raise StateError(f"{path}: saved for bank {labels}, but this state's bank is {self.labels}")
        one_row = tensors.get("blend_weights", torch.zeros(0)).shape[0] == 1
        if row is None and one_row and self.max_batch > 1:  # a one-row file (a session's): row 0, the others zero
            self.reset()
            row = 0
        if row is not None:
            tensors = {key: value[:1] for key, value in tensors.items()}
        self._check_tensors(tensors, expected_rows=self.max_batch if row is None else 1, where=str(path))
        self.restore({"row": row, "tensors": {k: v.to(self.dtype) for k, v in tensors.items()}})

    def to(self, device: str | torch.device) -> "LoraState":
        """Move every buffer (a move reallocates: do it once, before generation)."""
        self._changed()
        self.device = torch.device(device)
        self.blend_weights = self.blend_weights.to(device)
        self.rank_weights = self.rank_weights.to(device)
        self.memory_weights, self.row_scales = self.memory_weights.to(device), self.row_scales.to(device)
        for slot in self.slots.values():
            for name in ("bank_a_t", "bank_b_t", "row_a_t", "row_b_t"):
                value = getattr(slot, name)
                if value is not None:
                    setattr(slot, name, value.to(device))
        return self
