"""Text domains as lists of documents with stable ids: the corpora LoRAs are trained and evaluated on.

=====================  ===========================================  ==========================
domain                 document                                     id
=====================  ===========================================  ==========================
``code-python``        chunk of a standard-library module           ``json/decoder.py#0``
``drama-shakespeare``  scene-ish chunk of a play or poem            ``hamlet#12``
``scripture``          Bible chapter (long ones chunked)            ``genesis/1``, ``psalms/119#3``
``news``               one news article                             ``lee/017``
``dialogue``           one short conversation (``A:``/``B:`` turns)  ``greetings/004``
``docs-python``        chunk of a Python reference-manual topic     ``assignment#2``
=====================  ===========================================  ==========================

``LIBRARY_DOMAINS`` are meant for the LoRA library; ``UNSEEN_DOMAINS`` stay out of it for unseen-domain
evaluations (``docs-python`` is a near neighbour of ``code-python``, ``dialogue`` a far one).

A text that fits in one chunk keeps its parent id; a longer one becomes ``parent#0``, ``parent#1``, ...
Splits (:mod:`dynalora.data.splits`) go by parent, so the chunks of one play share a split. The built
documents are cached as JSON lines under ``$DYNALORA_HOME/data/domains/`` keyed by source and config.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from dynalora.data import readers
from dynalora.data.chunking import ChunkConfig, chunk_text
from dynalora.data.fetch import data_home
from dynalora.data.sources import SOURCES

_CACHE_FORMAT = 2  # bump when a reader or the chunking changes what documents look like


@dataclass(frozen=True)
class Document:
    """One training/evaluation text. ``id`` is unique within its domain and stable across runs."""

    id: str
    domain: str
    text: str

    @property
    def parent(self) -> str:
        return parent_id(self.id)


def parent_id(document_id: str) -> str:
    """``"hamlet#12"`` -> ``"hamlet"``; an id without ``#`` is its own parent."""
    return document_id.split("#", 1)[0]


@dataclass(frozen=True)
class CorpusConfig:
    """How domains are built. Changing a field changes the documents (and the cache key)."""

    chunk: ChunkConfig = field(default_factory=ChunkConfig)
    """Chunk sizes for long texts (plays, modules, chapters, manual topics)."""
    code_sample_fraction: float = 0.5
    """Share of standard-library modules in ``code-python`` (a stable hash-based sample; 0.5 ~ 4 M chars)."""

    def __post_init__(self) -> None:
        if not 0 < self.code_sample_fraction <= 1:
            raise ValueError(f"CorpusConfig.code_sample_fraction={self.code_sample_fraction}: must lie in (0, 1]")


@dataclass(frozen=True)
class _Domain:
    read: Callable[[Path | None, CorpusConfig], readers.Texts]
    boundary: re.Pattern[str] | None = None
    """Where a new chunk should start when possible (a scene heading, a top-level definition)."""


_DOMAINS: dict[str, _Domain] = {
    "code-python": _Domain(lambda _, config: readers.read_stdlib_code(config.code_sample_fraction),
                           re.compile(r"(?:def |class |async def |@)")),
    "drama-shakespeare": _Domain(lambda path, _: readers.read_shakespeare(path),
                                 re.compile(r"(?:ACT|Act|SCENE|Scene)\s+[IVXLC]+\b")),
    "scripture": _Domain(lambda path, _: readers.read_bbe_chapters(path)),
    "news": _Domain(lambda path, _: readers.read_lee_news(path)),
    "dialogue": _Domain(lambda path, _: readers.read_chatterbot_english(path)),
    "docs-python": _Domain(lambda _, config: readers.read_pydoc_topics()),
}
DOMAINS = tuple(_DOMAINS)
LIBRARY_DOMAINS = ("code-python", "drama-shakespeare", "scripture", "news")
UNSEEN_DOMAINS = ("dialogue", "docs-python")


def chunk_documents(texts: readers.Texts, domain: str, config: ChunkConfig = ChunkConfig(),
                    boundary: re.Pattern[str] | None = None) -> list[Document]:
    """Cut each ``(parent_id, text)`` into chunks; ids are ``parent`` (one chunk) or ``parent#k``."""
    documents = []
    for parent, text in texts:
        if "#" in parent:
            raise ValueError(f"{domain}: parent id {parent!r} must not contain '#' (it separates chunk numbers)")
        chunks = chunk_text(text, config, boundary)
        if len(chunks) == 1:
            documents.append(Document(parent, domain, chunks[0]))
        else:
            documents.extend(Document(f"{parent}#{index}", domain, chunk) for index, chunk in enumerate(chunks))
    return documents


def _cache_path(name: str, config: CorpusConfig) -> Path:
    source = SOURCES[name]
    key = json.dumps([_CACHE_FORMAT, name, source.package, source.version, asdict(config)], sort_keys=True)
    return data_home() / "domains" / f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.jsonl"


def build_domain(name: str, config: CorpusConfig = CorpusConfig(), progress: bool = True) -> list[Document]:
    """Read and chunk a domain from its source (downloading the archive once), bypassing the cache."""
    if name not in _DOMAINS:
        raise KeyError(f"unknown domain {name!r}; expected one of {', '.join(DOMAINS)}")
    domain = _DOMAINS[name]
    texts = domain.read(SOURCES[name].fetch(progress=progress), config)
    documents = chunk_documents(texts, name, config.chunk, domain.boundary)
    ids = [document.id for document in documents]
    if len(set(ids)) != len(ids):
        raise RuntimeError(f"{name}: duplicate document ids; the reader must give unique parent ids")
    return documents


def load_domain(name: str, config: CorpusConfig = CorpusConfig(), progress: bool = True) -> list[Document]:
    """All documents of domain ``name`` in a fixed order, from the cache or built on first use.

    Example: ``load_domain("drama-shakespeare")[0].id == "alls_well_that_ends_well#0"``.
    """
    if name not in _DOMAINS:
        raise KeyError(f"unknown domain {name!r}; expected one of {', '.join(DOMAINS)}")
    cache = _cache_path(name, config)
    if cache.is_file():
        with open(cache, encoding="utf-8") as lines:
            return [Document(**json.loads(line)) for line in lines]
    documents = build_domain(name, config, progress)
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_name(cache.name + ".partial")
    with open(partial, "w", encoding="utf-8") as out:
        for document in documents:
            out.write(json.dumps(asdict(document), ensure_ascii=False) + "\n")
    partial.replace(cache)
    return documents
