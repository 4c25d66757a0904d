"""Mixed-domain streams: texts that move between domains, for trigger training and shift evaluation.

A stream is ``{"segments": [{"domain": ..., "text": ...}, ...]}`` (the format ``dynalora eval shift``
reads); consecutive segments come from different domains, each a contiguous piece of one document of
the requested split, cut at line starts. By default a segment ends where its characters run out (often mid-word) and
the next is glued on (``...put up their tentsTalks between...``): a mark at every boundary that a trigger can learn
instead of the change of subject. ``joins="word"`` cuts each segment at a word end and starts the next with a space
(a change mid-sentence); ``joins="sentence"`` cuts it after its last sentence or line, as text changes subject.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from dynalora.data.documents import LIBRARY_DOMAINS, UNSEEN_DOMAINS
from dynalora.data.jsonl import read_jsonl, write_jsonl
from dynalora.data.splits import split_documents
from dynalora.data.text_sources import adapter_text_sources, source_documents


@dataclass
class StreamConfig:
    split: str = "test"
    """Document split the segments are cut from: train, validation or test."""
    streams: int = 16
    """How many streams."""
    segments: int = 3
    """Segments per stream (each from another domain than the one before)."""
    segment_chars: int = 700
    """Characters per segment (short documents are joined until they reach it)."""
    domains: list[str] = field(default_factory=lambda: list(LIBRARY_DOMAINS))
    """Built-in domains the segments come from (when ``sources`` is empty)."""
    unseen: bool = False
    """Also cut segments from the built-in domains no library adapter was trained on."""
    sources: dict[str, str] = field(default_factory=dict)
    """Label → data source (:mod:`dynalora.data.text_sources`) to cut the segments from, in place of ``domains``:
    a user's own adapters' text. Every such segment counts as a library one."""
    seed: int = 0
    """Random seed (which documents, which domain next)."""
    joins: str = "glued"
    """How a segment meets the next: glued (cut where its characters run out, the next glued on), word (cut at its
    last word end, the next after a space) or sentence (cut after its last sentence end or line, the next after a
    space). The same documents and domains whichever."""

    def __post_init__(self):
        if self.joins not in JOINS:
            raise ValueError(f"StreamConfig.joins (--joins)={self.joins!r}: choose one of {', '.join(JOINS)}")


JOINS = ("glued", "word", "sentence")


def _sentence_end(text: str) -> int:
    """Index just past the last sentence end (``.``, ``!`` or ``?`` before whitespace or the end) or line end; 0 if
    none."""
    ends = [i + 1 for i, c in enumerate(text) if c == "\n" or (c in ".!?" and (i + 1 == len(text)
                                                                             or text[i + 1].isspace()))]
    return ends[-1] if ends else 0


def clean_join(texts: list[str], at: str = "word") -> list[str]:
    """Segments that join without a mark: each but the last cut after its last whole word (``at="word"``; a piece cut
    mid-word is dropped) or its last sentence or line (``"sentence"``; the last word end when it has none), the next
    starting with one space. ``clean_join(["a bc d", "Ef g"]) == ["a bc", " Ef g"]``."""
    out = []
    for i, text in enumerate(texts):
        text = text.strip()
        if i < len(texts) - 1:
            cut = _sentence_end(text) if at == "sentence" else 0
            cut = cut or max(text.rfind(" "), text.rfind("\n"))
            text = text[:cut].rstrip() if cut > 0 else text
        out.append(text if i == 0 else " " + text)
    return out


def _segment(documents, rng: random.Random, chars: int) -> str:
    document = documents[rng.randrange(len(documents))]
    text = document.text
    if len(text) <= chars:  # short documents (dialogue): join neighbours until long enough
        pieces, index = [text], documents.index(document)
        while sum(len(p) for p in pieces) < chars:
            index = (index + 1) % len(documents)
            pieces.append(documents[index].text)
        return "\n".join(pieces)[:chars]
    start = rng.randrange(0, len(text) - chars)
    line_start = text.rfind("\n", 0, start) + 1
    return text[line_start:line_start + chars]


def build_streams(config: StreamConfig) -> list[dict]:
    rng = random.Random(config.seed)
    pools = {}
    domains = list(config.domains) + (list(UNSEEN_DOMAINS) if config.unseen else [])
    for label, source in (config.sources or {d: f"domain:{d}" for d in domains}).items():
        documents = split_documents(source_documents(source), config.split)
        if not documents:
            raise ValueError(f"{label} ({source}) has no {config.split} documents")
        pools[label] = documents
    if len(pools) < 2 and config.segments > 1:
        raise ValueError("streams that change domain need at least two domains")
    streams = []
    for _ in range(config.streams):
        segments, previous = [], None
        for _ in range(config.segments):
            domain = rng.choice([d for d in pools if d != previous])
            segments.append({"domain": domain, "text": _segment(pools[domain], rng, config.segment_chars),
                             "library": bool(config.sources) or domain in LIBRARY_DOMAINS})
            previous = domain
        if config.joins != "glued":
            for segment, text in zip(segments, clean_join([s["text"] for s in segments], config.joins)):
                segment["text"] = text
        streams.append({"segments": segments, "split": config.split})
    return streams


def write_streams(streams: list[dict], path: str | Path) -> Path:
    return write_jsonl(streams, path)


def _check_stream(stream: dict) -> None:
    segments = stream["segments"]
    if not segments or not all(isinstance(s["text"], str) and s["text"] for s in segments):
        raise ValueError("empty segments or texts")


def read_streams(path: str | Path) -> list[dict]:
    """Read a streams JSONL file; each line must have a non-empty ``segments`` list of ``{"text": ...}``."""
    return read_jsonl(path, _check_stream, "streams", '{"segments": [{"domain": "...", "text": "..."}, ...]}')


def tokenize_stream(tokenizer, stream: dict) -> tuple[list[int], list[int], list[str]]:
    """Token ids of the whole stream, the start index of every segment, and each segment's domain."""
    ids, starts, domains = [], [], []
    for segment in stream["segments"]:
        starts.append(len(ids))
        ids.extend(tokenizer(segment["text"], add_special_tokens=False)["input_ids"])
        domains.append(segment.get("domain", ""))
    return ids, starts, domains


def library_streams(adapters: list[dict], split: str, count: int, seed: int, segments: int,
                    segment_chars: int, joins: str = "glued") -> list[dict]:
    """Mixed-domain streams over a library's text adapters (``[{"label", "source"}, ...]``) from one split: each
    segment is one adapter's text, labelled with the adapter (what the trigger and shift recipes train on)."""
    sources = adapter_text_sources(adapters)
    if len(sources) < 2:
        raise ValueError(f"streams that change domain need at least two adapters with text sources; have {sources} "
                         "(give each adapter one: `dynalora adapters import FOLDER --data SOURCE`)")
    return build_streams(StreamConfig(split=split, streams=count, segments=segments, segment_chars=segment_chars,
                                      sources=sources, seed=seed, joins=joins))
