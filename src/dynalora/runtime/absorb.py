"""Absorb: fold a chunk of tokens into a row's memory LoRA (fixed rank), so it can leave the window.

A memory writer (:mod:`dynalora.runtime.memory_writers`: the one-pass compressor, test-time
distillation, or both) turns the chunk into factors; :func:`merge_at_rank` folds them into the row's
memory slot at the state's ``memory_rank``. Memory and compute per absorb are constant in the
conversation's length.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dynalora.lora.inject import DynamicLoraModel
from dynalora.lora.lowrank import merge_at_rank
from dynalora.runtime.absorb_probes import mentioned_names
from dynalora.runtime.memory_writers import WRITERS, CompressorWriter, DistillConfig, DistillWriter


REPLAY_LIMIT = 8
"""Chunks an :class:`Absorber` remembers per row for writers that rehearse (token ids only)."""


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
    relevance_gate: bool = False
    """Switch a row's memory off for a prompt that names nothing the memory absorbed (names: runs of
    capitalised words and numbers, :func:`mentioned_names`); on when it does. Needs the absorber's tokenizer."""

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

        absorber = load_absorber(model, shipped("absorb"), writer="distill", tokenizer=tokenizer)
        absorber.absorb(0, tokenizer(document)["input_ids"][:128])   # row 0 now remembers it

    ``writer`` is a memory writer (:mod:`dynalora.runtime.memory_writers`: ``write(dyn, ids, memory)`` →
    the chunk's factors), or a compressor network, which is wrapped as the ``compressor`` writer.
    """

    def __init__(self, dyn: DynamicLoraModel, writer, config: AbsorbConfig | None = None, tokenizer=None):
        state = dyn.state
        if state.config.memory_rank < 1:
            raise ValueError("the LoRA state has memory_rank=0: attach with StateConfig(memory_rank=r) to absorb")
        if not hasattr(writer, "write"):
            writer = CompressorWriter(writer)
        missing = [m for m in writer.modules_list if m not in state.slots]
        if missing:
            raise ValueError(f"the memory writer writes {missing[:3]}..., which are not target modules of the state; "
                             f"attach with InjectConfig(target_modules=...) covering them")
        self.dyn, self.writer, self.config = dyn, writer, config or AbsorbConfig()
        self.history: dict[int, list[list[int]]] = {}
        """Row → the last ``REPLAY_LIMIT`` chunks its memory holds (token ids; a writer may rehearse them)."""
        self.tokenizer = tokenizer
        self.names: dict[int, set[str]] = {}
        """Row → the names in everything its memory absorbed (for the relevance gate)."""
        if self.config.relevance_gate and tokenizer is None:
            raise ValueError("AbsorbConfig.relevance_gate needs the tokenizer: Absorber(..., tokenizer=...)")

    def keep_rows(self, keep: list[int]) -> None:
        """Rows left a running batch: row ``keep[i]`` is now row ``i`` (its history and names go with it)."""
        moved = {old: new for new, old in enumerate(keep)}
        self.history = {moved[row]: chunks for row, chunks in self.history.items() if row in moved}
        self.names = {moved[row]: names for row, names in self.names.items() if row in moved}

    def replay(self, row: int) -> list[list[int]]:
        """The chunks the row's memory holds, oldest first (none once the memory was reset)."""
        if not self.dyn.state.row_factors(row, "memory"):
            self.history.pop(row, None)
            self.names.pop(row, None)
        return list(self.history.get(row, []))

    def relevance(self, row: int, text: str) -> float:
        """The relevance gate's memory weight for a prompt: 1 if it names something the row's memory absorbed
        (or the gate is off), else 0."""
        if not self.config.relevance_gate:
            return 1.0
        self.replay(row)  # forgets the names of a memory that was reset
        return 1.0 if mentioned_names(text) & self.names.get(row, set()) else 0.0

    def encode(self, token_ids: list[int], row: int = 0, following: list[int] = (), memory: dict | None = None,
               replay: list[list[int]] | None = None) -> dict:
        """Factors ``{module: (A (r, in), B (out, r))}`` the writer makes of one chunk for ``row``; ``following``:
        the window tokens after it. ``memory`` and ``replay`` default to the row's own now (a background write
        passes the snapshot it took when it started)."""
        memory = self.dyn.state.row_factors(row, "memory") if memory is None else memory
        replay = self.replay(row) if replay is None else replay
        return self.writer.write(self.dyn, token_ids, memory, replay, following)

    def absorb(self, row: int, token_ids: list[int], following: list[int] = ()) -> AbsorbReport:
        started = time.perf_counter()
        rank, error = self.merge(row, self.encode(token_ids, row, following), token_ids)
        return AbsorbReport(row, len(token_ids), rank, error, time.perf_counter() - started)

    @torch.no_grad()
    def merge(self, row: int, factors: dict, token_ids: list[int]) -> tuple[int, float]:
        """Fold a chunk's factors into the row's memory at the fixed rank, in one validated in-place update
        (a bad write raises and leaves the old memory). Returns the rank in use and the cut's error."""
        state = self.dyn.state
        history = self.replay(row)
        merged, error = merge_at_rank(state.row_factors(row, "memory"), factors, state.config.memory_rank,
                                      self.config.decay)
        state.update(row, memory=merged)
        self.history[row] = (history + [list(token_ids)])[-REPLAY_LIMIT:]
        if self.tokenizer is not None:
            self.names.setdefault(row, set()).update(mentioned_names(self.tokenizer.decode(token_ids)))
        return max((a.shape[0] for a, _ in merged.values()), default=0), error

    def absorb_text(self, row: int, token_ids: list[int]) -> list[AbsorbReport]:
        """Absorb a whole token sequence in chunks of ``chunk_tokens`` (e.g. a document before a question)."""
        size = self.config.chunk_tokens
        return [self.absorb(row, token_ids[i:i + size], token_ids[i + size:]) for i in range(0, len(token_ids), size)]

    def evict(self, row: int, token_ids: list[int]) -> tuple[list[int], list[AbsorbReport]]:
        """While the row is over the window: absorb the oldest chunk after the sink and drop it.

        Returns the kept tokens (sink + the rest, in order) and a report per absorbed chunk."""
        sink, size = self.config.sink_tokens, self.config.chunk_tokens
        reports = []
        while len(token_ids) > self.config.window:
            reports.append(self.absorb(row, token_ids[sink:sink + size], token_ids[sink + size:]))
            token_ids = token_ids[:sink] + token_ids[sink + size:]
        return token_ids, reports


def trained_chunk_tokens(compressor_dir: str | Path) -> int:
    """The chunk length a compressor was trained on (from its ``train_absorb.json``)."""
    record = Path(compressor_dir) / "train_absorb.json"
    if not record.is_file():
        raise FileNotFoundError(f"{record}: missing (a compressor folder from `dynalora train absorb` has it)")
    return json.loads(record.read_text())["config"]["chunk_tokens"]


@dataclass
class WriterPlan:
    """A memory writer chosen by name, and what it needs of the LoRA state before the model is wrapped."""

    writer: str
    compressor: torch.nn.Module | None
    distill: DistillConfig
    target_kinds: list[str]
    """Module names (last part) the state must cover."""
    memory_rank: int
    chunk_tokens: int

    def build(self, dyn: DynamicLoraModel, tokenizer):
        """The writer for a model wrapped with a state that covers :attr:`target_kinds`."""
        start = CompressorWriter(self.compressor.to(dyn.state.device)) if self.compressor is not None else None
        return start if self.writer == "compressor" else DistillWriter(dyn, tokenizer, self.distill, start=start)

    def absorber(self, dyn: DynamicLoraModel, tokenizer, window: int, sink_tokens: int = 4,
                 relevance_gate: bool = False) -> "Absorber":
        """The :class:`Absorber` writing this plan's memory on ``dyn`` (wrapped to cover :attr:`target_kinds`,
        with a memory of :attr:`memory_rank`)."""
        return Absorber(dyn, self.build(dyn, tokenizer), AbsorbConfig(window=window, sink_tokens=sink_tokens,
                                                                      chunk_tokens=self.chunk_tokens,
                                                                      relevance_gate=relevance_gate), tokenizer)


def plan_writer(writer: str = "compressor", compressor_dir: str | Path | None = None, tokenizer=None,
                distill: DistillConfig | None = None, chunk_tokens: int | None = None, window: int = 512) -> WriterPlan:
    """``writer``: one of :data:`WRITERS`; ``compressor_dir`` is needed by the two that use the compressor,
    ``tokenizer`` by the two that distill. The memory's rank is the compressor's, or ``distill.memory_rank``.
    The chunk length is the compressor's training chunk, or for ``distill`` three quarters of the window
    (it learns a text best whole: on validation documents one chunk answered far more than 128-token ones)."""
    from dynalora.hyper.compressor import load_compressor

    if writer not in WRITERS:
        raise ValueError(f"writer={writer!r}: choose one of {', '.join(WRITERS)}")
    uses_compressor, distills = writer != "distill", writer != "compressor"
    if uses_compressor and compressor_dir is None:
        raise ValueError(f"writer={writer!r} needs compressor_dir (a folder from `dynalora train absorb`)")
    if distills and tokenizer is None:
        raise ValueError(f"writer={writer!r} needs the tokenizer (its probes are chat prompts)")
    distill = distill or DistillConfig()
    compressor = load_compressor(compressor_dir) if uses_compressor else None
    kinds = set(distill.module_kinds) if distills else set()
    if compressor is not None:
        kinds |= {m.rsplit(".", 1)[-1] for m in compressor.modules_list}
    if chunk_tokens is None:
        chunk_tokens = trained_chunk_tokens(compressor_dir) if compressor is not None else window * 3 // 4
    return WriterPlan(writer, compressor, distill, sorted(kinds),
                      distill.memory_rank if distills else compressor.config.rank, chunk_tokens)


def load_absorber(model, compressor_dir: str | Path | None = None, max_batch: int = 1, window: int = 512,
                  sink_tokens: int = 4, writer: str = "compressor", tokenizer=None,
                  distill: DistillConfig | None = None, chunk_tokens: int | None = None,
                  relevance_gate: bool = False) -> Absorber:
    """A given model with a memory-only LoRA state on the writer's modules, and its :class:`Absorber`
    (``absorber.dyn`` is the wrapped model). The writer's arguments are :func:`plan_writer`'s. (A whole system
    with a window, from checkpoint names: ``System.from_checkpoints(EngineSpec(window=...))``.)"""
    from dynalora.lora import InjectConfig, LoraBank, StateConfig, module_shapes_of

    plan = plan_writer(writer, compressor_dir, tokenizer, distill, chunk_tokens, window)
    dyn = DynamicLoraModel.attach(model, LoraBank(module_shapes_of(model)), InjectConfig(
        target_modules=plan.target_kinds,
        state=StateConfig(max_batch=max_batch, generated_rank=0, memory_rank=plan.memory_rank)))
    return plan.absorber(dyn, tokenizer, window, sink_tokens, relevance_gate)
