"""Absorb: fold a chunk of tokens into a row's memory LoRA (fixed rank), so it can leave the window.

The chunk is read by one forward of the base model alone (no LoRA, positions from 0, nothing else
in context — the same view the compressor was trained on); the compressor turns it into factors of
rank ``r``; :func:`merge_at_rank` folds them into the row's memory slot at the state's
``memory_rank``. Memory and compute per absorb are constant in the conversation's length.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dynalora.lora.inject import DynamicLoraModel
from dynalora.lora.lowrank import merge_at_rank


@dataclass
class AbsorbConfig:
    window: int = 512
    """Most tokens a row keeps in context (sink + recent); beyond it the oldest chunk is absorbed."""
    sink_tokens: int = 4
    """First tokens that always stay (attention sinks; the chat template's start)."""
    chunk_tokens: int = 128
    """Tokens absorbed and evicted at a time (the compressor's training chunk length)."""
    decay: float = 1.0
    """Older memory is multiplied by this at every merge (1: plain sum, then the rank cut)."""

    def __post_init__(self):
        if self.sink_tokens < 0 or self.chunk_tokens < 1:
            raise ValueError("AbsorbConfig: sink_tokens ≥ 0 and chunk_tokens ≥ 1")
        if self.window < self.sink_tokens + self.chunk_tokens + 1:
            raise ValueError(f"AbsorbConfig.window={self.window} must exceed sink_tokens + chunk_tokens "
                             f"({self.sink_tokens} + {self.chunk_tokens}): an eviction must leave room")


@dataclass
class AbsorbReport:
    row: int
    tokens: int
    """Tokens absorbed (and evicted)."""
    memory_rank: int
    rel_error: float
    """Worst relative error of the rank cut over modules (0 while the memory has room)."""
    seconds: float


class Absorber:
    """Example::

        absorber = Absorber(dyn, load_compressor("checkpoints/absorb"))
        absorber.absorb(0, tokenizer(document)["input_ids"][:128])   # row 0 now remembers it
    """

    def __init__(self, dyn: DynamicLoraModel, compressor: torch.nn.Module, config: AbsorbConfig | None = None):
        state = dyn.state
        if state.config.memory_rank < 1:
            raise ValueError("the LoRA state has memory_rank=0: attach with StateConfig(memory_rank=r) to absorb")
        missing = [m for m in compressor.modules_list if m not in state.slots]
        if missing:
            raise ValueError(f"the compressor writes {missing[:3]}..., which are not target modules of the state; "
                             f"attach with InjectConfig(target_modules=...) covering them")
        self.dyn, self.compressor, self.config = dyn, compressor.eval(), config or AbsorbConfig()

    @torch.no_grad()
    def encode(self, token_ids: list[int]) -> dict:
        """Factors ``{module: (A (r, in), B (out, r))}`` of one chunk (the base model alone reads it)."""
        device = next(self.compressor.parameters()).device
        factors = self.compressor.read(self.dyn, torch.tensor([token_ids], device=device))
        dtype = self.dyn.state.dtype
        return {m: (a[0].to(dtype), b[0].to(dtype)) for m, (a, b) in factors.items()}

    @torch.no_grad()
    def absorb(self, row: int, token_ids: list[int]) -> AbsorbReport:
        started = time.perf_counter()
        state = self.dyn.state
        merged, error = merge_at_rank(state.row_factors(row, "memory"), self.encode(token_ids),
                                      state.config.memory_rank, self.config.decay)
        state.update(row, memory=merged)
        rank = max((a.shape[0] for a, _ in merged.values()), default=0)
        return AbsorbReport(row, len(token_ids), rank, error, time.perf_counter() - started)

    def absorb_text(self, row: int, token_ids: list[int]) -> list[AbsorbReport]:
        """Absorb a whole token sequence in chunks of ``chunk_tokens`` (e.g. a document before a question)."""
        size = self.config.chunk_tokens
        return [self.absorb(row, token_ids[i:i + size]) for i in range(0, len(token_ids), size)]

    def evict(self, row: int, token_ids: list[int]) -> tuple[list[int], list[AbsorbReport]]:
        """While the row is over the window: absorb the oldest chunk after the sink and drop it.

        Returns the kept tokens (sink + the rest, in order) and a report per absorbed chunk."""
        sink, size = self.config.sink_tokens, self.config.chunk_tokens
        reports = []
        while len(token_ids) > self.config.window:
            reports.append(self.absorb(row, token_ids[sink:sink + size]))
            token_ids = token_ids[:sink] + token_ids[sink + size:]
        return token_ids, reports


def trained_chunk_tokens(compressor_dir: str | Path) -> int:
    """The chunk length a compressor was trained on (from its ``train_absorb.json``)."""
    record = Path(compressor_dir) / "train_absorb.json"
    if not record.is_file():
        raise FileNotFoundError(f"{record}: missing (a compressor folder from `dynalora train absorb` has it)")
    return json.loads(record.read_text())["config"]["chunk_tokens"]


def load_absorber(model, compressor_dir: str | Path, max_batch: int = 1, window: int = 512,
                  sink_tokens: int = 4) -> Absorber:
    """A base model with a memory-only LoRA state on the compressor's modules, and its :class:`Absorber`
    (``absorber.dyn`` is the wrapped model) — what the absorb evaluation, benchmark and demo run."""
    from dynalora.hyper.compressor import load_compressor
    from dynalora.lora import InjectConfig, LoraBank, StateConfig, module_shapes_of

    compressor = load_compressor(compressor_dir)
    dyn = DynamicLoraModel.attach(model, LoraBank(module_shapes_of(model)), InjectConfig(
        target_modules=sorted({m.rsplit(".", 1)[-1] for m in compressor.modules_list}),
        state=StateConfig(max_batch=max_batch, generated_rank=0, memory_rank=compressor.config.rank)))
    return Absorber(dyn, compressor, AbsorbConfig(window=window, sink_tokens=sink_tokens,
                                                  chunk_tokens=trained_chunk_tokens(compressor_dir)))
