"""Documents with questions for the *absorb* capability: a memory LoRA stores context evicted from the window.

Every line of an absorb JSONL file is one document::

    {"context": "...", "questions": [{"question": "...", "answer": "..."}, ...],
     "kind": "facts" | "needle" | "reading" | "locality", "seed": n, "split": "train" | "validation" | "test"}

plus ``"depth"`` and ``"words"`` for needle documents and ``"source"`` (the BIG-Bench subtask) for
reading ones. Kinds: ``facts`` (:mod:`dynalora.data.facts`, invented entities), ``needle``
(:mod:`dynalora.data.needle`, a pass key in filler), ``reading`` (:mod:`dynalora.data.reading`,
DROP/Quoref/ROPES passages from BIG-Bench) and ``locality`` (one-entity items that fit in the window,
to check that a memory LoRA leaves unrelated questions alone).

Seeds never cross splits. Each split owns a range of ``SPLIT_SEED_SPAN`` seeds starting at
``SPLIT_SEED_BASE[split]`` (train 0, validation 1e9, test 2e9); inside it, documents (facts, needle,
reading positions) use the first ``DOCUMENT_SEEDS`` seeds and locality items the rest::

    train       [0, 5e8) documents        [5e8, 1e9) locality
    validation  [1e9, 1.5e9) documents    [1.5e9, 2e9) locality
    test        [2e9, 2.5e9) documents    [2.5e9, 3e9) locality

A reading document's seed is the split's base plus its position in that split's pool; the split
itself comes from a hash of the passage (:func:`dynalora.data.splits.split_of`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynalora.data.facts import facts_document, locality_item
from dynalora.data.jsonl import read_jsonl, write_jsonl
from dynalora.data.needle import needle_document
from dynalora.data.reading import READING_SUBTASKS, reading_documents
from dynalora.data.splits import SPLITS

ABSORB_KINDS = ("facts", "needle", "reading")
SPLIT_SEED_SPAN = 1_000_000_000
SPLIT_SEED_BASE = {split: index * SPLIT_SEED_SPAN for index, split in enumerate(SPLITS)}
DOCUMENT_SEEDS = SPLIT_SEED_SPAN // 2
"""Seeds per split for documents; the other half of the split's range is for locality items."""
NEEDLE_DEPTH_STEPS = 11
"""A built needle document sits at depth ``(seed % 11) / 10``: 0.0, 0.1, ..., 1.0 in turn."""


def _check_split(split: str, owner: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"{owner}.split={split!r}: expected one of {', '.join(SPLITS)}")


def split_seeds(split: str, locality: bool = False) -> range:
    """The seeds of ``split`` for documents (or, with ``locality``, for locality items)."""
    _check_split(split, "split_seeds")
    start = SPLIT_SEED_BASE[split] + (DOCUMENT_SEEDS if locality else 0)
    return range(start, start + (SPLIT_SEED_SPAN - DOCUMENT_SEEDS if locality else DOCUMENT_SEEDS))


def _check_seeds(owner: str, offset: int, count: int, available: int) -> None:
    if count < 1:
        raise ValueError(f"{owner}.count={count}: expected at least 1")
    if offset < 0 or offset + count > available:
        raise ValueError(f"{owner}.seed_offset={offset}: seed_offset + count must lie in [0, {available:,}]")


@dataclass
class AbsorbDataConfig:
    """What :func:`build_absorb_docs` writes; ``dynalora data absorb`` sets the same fields from flags."""

    kind: str = "facts"
    """One of facts, needle, reading, or all (``count`` documents of each kind, in that order); or
    locality (one invented entity, two facts, one question: the unrelated-question items, also the
    simplest training documents)."""
    split: str = "train"
    """train, validation or test: picks the seed range (facts, needle) or the passage split (reading)."""
    count: int = 100
    """Documents per kind."""
    seed_offset: int = 0
    """First seed inside the split's range (reading: first position in the split's pool); later
    documents take the next ones, so two configs with disjoint [offset, offset + count) never overlap."""
    words: int = 300
    """Approximate length in words: facts are padded with distractor sentences up to it, needle filler
    has this many words; reading passages keep their own length."""
    entities: tuple[int, int] = (3, 6)
    """Facts: (min, max) invented entities per document."""
    facts_per_entity: tuple[int, int] = (2, 4)
    """Facts: (min, max) stated and asked facts per entity."""
    max_answer_words: int = 8
    """Reading: keep only questions whose answer has at most this many words."""

    def __post_init__(self) -> None:
        if self.kind not in (*ABSORB_KINDS, "all", "locality"):
            raise ValueError(f"AbsorbDataConfig.kind={self.kind!r}: expected one of {', '.join(ABSORB_KINDS)}, "
                             "all, locality")
        _check_split(self.split, "AbsorbDataConfig")
        _check_seeds("AbsorbDataConfig", self.seed_offset, self.count, DOCUMENT_SEEDS)
        if self.words < 0:
            raise ValueError(f"AbsorbDataConfig.words={self.words}: expected a number of words >= 0")
        for name in ("entities", "facts_per_entity"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise ValueError(f"AbsorbDataConfig.{name}={getattr(self, name)}: expected (min, max) "
                                 "with 1 <= min <= max")
        if self.max_answer_words < 1:
            raise ValueError(f"AbsorbDataConfig.max_answer_words={self.max_answer_words}: expected at least 1")

    @property
    def kinds(self) -> tuple[str, ...]:
        return ABSORB_KINDS if self.kind == "all" else (self.kind,)


def _build_kind(kind: str, config: AbsorbDataConfig) -> list[dict]:
    base = SPLIT_SEED_BASE[config.split]
    positions = range(config.seed_offset, config.seed_offset + config.count)
    if kind == "facts":
        documents = [facts_document(base + position, config.words, config.entities, config.facts_per_entity)
                     for position in positions]
    elif kind == "locality":
        return unrelated_questions(config.count, config.seed_offset, config.split)
    elif kind == "needle":
        documents = [needle_document(base + position, config.words,
                                     (position % NEEDLE_DEPTH_STEPS) / (NEEDLE_DEPTH_STEPS - 1))
                     for position in positions]
    else:
        pool = reading_documents(config.split, READING_SUBTASKS, config.max_answer_words)
        if positions.stop > len(pool):
            raise ValueError(f"AbsorbDataConfig.count={config.count}: the {config.split} split has "
                             f"{len(pool)} reading documents, {len(pool) - config.seed_offset} from "
                             f"seed_offset={config.seed_offset}")
        documents = [dict(pool[position], seed=base + position) for position in positions]
    return [dict(document, split=config.split) for document in documents]


def build_absorb_docs(config: AbsorbDataConfig | None = None, /, **fields: Any) -> list[dict]:
    """Absorb documents as JSONL-ready dicts, deterministic for a config.

    ``build_absorb_docs(kind="needle", split="test", count=22, words=2000)`` is the same as
    ``build_absorb_docs(AbsorbDataConfig(kind="needle", split="test", count=22, words=2000))``.
    """
    if config is None:
        config = AbsorbDataConfig(**fields)
    elif fields:
        raise TypeError(f"build_absorb_docs: give a config or fields, not both (got {', '.join(fields)})")
    return [document for kind in config.kinds for document in _build_kind(kind, config)]


def needle_suite(window_tokens: int, multiples: tuple[int, ...] = (1, 2, 4, 8), depths: int = 10,
                 tokenizer: Any = None, words_per_token: float = 0.75, seed: int = 0,
                 split: str = "test") -> list[dict]:
    """The needle evaluation set: for each length multiple, one document at each of ``depths`` depths.

    Depths run evenly from 0.0 to 1.0; a document is about ``multiple * window_tokens`` tokens long,
    measured with ``tokenizer.encode`` when a tokenizer is given (the filler length is rescaled until
    within about 1%), else estimated as ``words = tokens * words_per_token``. Lines also carry
    ``"multiple"``, ``"target_tokens"`` and, with a tokenizer, ``"tokens"``. Seeds are the split's
    document seeds from ``seed`` on. Example: ``needle_suite(2048)`` -> 40 documents, 1,536 to 12,288 words.
    """
    if window_tokens < 1:
        raise ValueError(f"needle_suite: window_tokens={window_tokens}: expected at least 1")
    if depths < 2:
        raise ValueError(f"needle_suite: depths={depths}: expected at least 2 (0.0 and 1.0)")
    if not multiples or min(multiples) <= 0:
        raise ValueError(f"needle_suite: multiples={multiples}: expected positive length multiples")
    if words_per_token <= 0:
        raise ValueError(f"needle_suite: words_per_token={words_per_token}: expected > 0")
    _check_split(split, "needle_suite")
    _check_seeds("needle_suite", seed, len(multiples) * depths, DOCUMENT_SEEDS)
    base = SPLIT_SEED_BASE[split]

    def count_tokens(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    lines = []
    for multiple in multiples:
        target_tokens = round(multiple * window_tokens)
        for step in range(depths):
            document_seed, depth = base + seed + len(lines), step / (depths - 1)
            words = max(1, round(target_tokens * words_per_token))
            document = needle_document(document_seed, words, depth)
            # Each seed picks its own filler set, so each document is measured; repetitive filler settles fast.
            for _ in range(4 if tokenizer is not None else 0):
                tokens = count_tokens(document["context"])
                if abs(tokens - target_tokens) <= 0.01 * target_tokens:
                    break
                words = max(1, round(words * target_tokens / tokens))
                document = needle_document(document_seed, words, depth)
            document.update(split=split, multiple=multiple, target_tokens=target_tokens)
            if tokenizer is not None:
                document["tokens"] = count_tokens(document["context"])
            lines.append(document)
    return lines


def unrelated_questions(count: int, seed: int = 0, split: str = "test") -> list[dict]:
    """``count`` locality items (one invented entity, two facts, one question), from the split's locality seeds."""
    _check_split(split, "unrelated_questions")
    _check_seeds("unrelated_questions", seed, count, SPLIT_SEED_SPAN - DOCUMENT_SEEDS)
    start = split_seeds(split, locality=True).start + seed
    return [dict(locality_item(start + index), split=split) for index in range(count)]


def write_absorb_docs(documents: list[dict], path: str | Path) -> Path:
    return write_jsonl(documents, path)


def _check_document(document: dict) -> None:
    if not isinstance(document["context"], str) or not document["questions"]:
        raise ValueError("no context or no questions")
    for item in document["questions"]:
        if not isinstance(item["question"], str) or not isinstance(item["answer"], str):
            raise TypeError("question and answer must be strings")


def read_absorb_docs(path: str | Path) -> list[dict]:
    """Read an absorb JSONL file; each line needs a ``context`` and a non-empty ``questions`` list."""
    return read_jsonl(path, _check_document, "absorb documents",
                      '{"context": "...", "questions": [{"question": "...", "answer": "..."}], ...}',
                      "; make one with `dynalora data absorb --out FILE`")


def summarize_absorb_docs(documents: list[dict]) -> dict[str, dict[str, float]]:
    """``{kind: {"documents", "questions", "mean_words"}}`` (words of the context, split on whitespace)."""
    summary: dict[str, dict[str, float]] = {}
    for document in documents:
        entry = summary.setdefault(document["kind"], {"documents": 0, "questions": 0, "words": 0})
        entry["documents"] += 1
        entry["questions"] += len(document["questions"])
        entry["words"] += len(document["context"].split())
    return {kind: {"documents": entry["documents"], "questions": entry["questions"],
                   "mean_words": entry["words"] / entry["documents"]} for kind, entry in summary.items()}


def read_docs(paths: list[Path] | Path) -> list[dict]:
    """The documents of one or several absorb JSONL files, in order."""
    return [doc for path in (paths if isinstance(paths, list) else [paths]) for doc in read_absorb_docs(path)]
