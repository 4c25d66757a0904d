"""Where an adapter's text comes from, written as one string, and its documents with train/validation/test splits.

A source is one of:

* ``domain:NAME`` — a built-in corpus (``dynalora data list``);
* ``jsonl:PATH`` or ``jsonl:PATH#FIELD`` — one document per line, its ``FIELD`` (default ``text``);
* ``dir:PATH`` — every ``.txt`` and ``.md`` file under the folder;
* ``datasets:PATH`` or ``datasets:PATH#FIELD`` — a local file the ``datasets`` library loads (``.json``,
  ``.jsonl``, ``.csv``, ``.parquet``), its ``FIELD`` column (default ``text``); needs ``pip install datasets``.

User documents are cut into chunks of at most ``CHUNK`` characters and each chunk is its own split key
(``split_documents``), so that even three files give train, validation and test text; built-in corpora keep
their own ids (a play's chunks stay in one split). ``bigbench:TASK`` sources are tasks, not text.

Example: ``source_documents("dir:notes/")`` → every note as :class:`Document` chunks.
"""

from __future__ import annotations

import json
from pathlib import Path

from dynalora.data.chunking import ChunkConfig, chunk_text
from dynalora.data.documents import Document, load_domain

TEXT_KINDS = ("domain", "jsonl", "dir", "datasets")
"""Source kinds that give text (the hypernetwork and trigger recipes read these)."""
SOURCE_KINDS = TEXT_KINDS + ("bigbench",)
SOURCE_FORMS = "domain:NAME | jsonl:PATH[#FIELD] | dir:PATH | datasets:PATH[#FIELD] | bigbench:TASK"
CHUNK = ChunkConfig(max_chars=1500, min_chars=600)
TEXT_SUFFIXES = (".txt", ".md")


def parse_source(source: str) -> tuple[str, str, str]:
    """``"jsonl:data/news.jsonl#body"`` → ``("jsonl", "data/news.jsonl", "body")``; the field defaults to ``text``."""
    kind, sep, rest = str(source).partition(":")
    if not sep or kind not in SOURCE_KINDS or not rest:
        raise ValueError(f"data source {source!r}: use one of {SOURCE_FORMS}")
    target, _, field = rest.partition("#") if kind in ("jsonl", "datasets") else (rest, "", "")
    return kind, target, field or "text"


def source_documents(source: str) -> list[Document]:
    """The documents of a text source, in a fixed order (see the module docstring)."""
    kind, target, field = parse_source(source)
    if kind == "bigbench":
        raise ValueError(f"data source {source!r} is a task, not text; the recipe needs text "
                         f"({' | '.join(f for f in SOURCE_FORMS.split(' | ') if not f.startswith('bigbench'))})")
    if kind == "domain":
        return load_domain(target, progress=False)
    path = Path(target).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data source {source!r}: {path} does not exist")
    if kind == "jsonl":
        texts = list(_jsonl_texts(path, field))
    elif kind == "dir":
        if not path.is_dir():
            raise ValueError(f"data source {source!r}: {path} is not a folder")
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file())
        texts = [(str(p.relative_to(path)), p.read_text(encoding="utf-8", errors="replace")) for p in files]
    else:
        texts = list(_datasets_texts(path, field, source))
    documents = [Document(id=f"{name.replace('#', '_')}@{k}", domain=source, text=chunk)
                 for name, text in texts for k, chunk in enumerate(chunk_text(text, CHUNK)) if chunk.strip()]
    if not documents:
        raise ValueError(f"data source {source!r}: no text found")
    return documents


def _jsonl_texts(path: Path, field: str):
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                fields = sorted(record) if isinstance(record, dict) else "no fields"
                raise ValueError(f"{path}:{number}: no string field {field!r} (write jsonl:{path}#FIELD to use "
                                 f"another; this line has {fields})")
            yield f"{path.name}:{number}", text


def _datasets_texts(path: Path, field: str, source: str):
    try:
        from datasets import load_dataset
    except ImportError:
        raise ImportError(f"data source {source!r} needs the datasets library: pip install datasets") from None
    builder = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"data source {source!r}: {path.suffix} files are not read; use .json, .jsonl, .csv, "
                         ".parquet")
    table = load_dataset(builder, data_files=str(path), split="train")
    if field not in table.column_names:
        raise ValueError(f"data source {source!r}: no column {field!r} (columns: {table.column_names})")
    for index, text in enumerate(table[field]):
        if isinstance(text, str):
            yield f"{path.name}:{index}", text


def adapter_text_sources(adapters: list[dict]) -> dict[str, str]:
    """``{label: source}`` of the adapters whose source is text (``bigbench`` tasks are left out): what the
    hypernetwork and trigger recipes read. An adapter with no source at all is an error that names it."""
    missing = [a["label"] for a in adapters if not a.get("source")]
    if missing:
        raise ValueError(f"adapters {missing} have no data source: the recipe needs their text (import each with "
                         "`dynalora adapters import FOLDER --label LABEL --data SOURCE`)")
    return {a["label"]: a["source"] for a in adapters if parse_source(a["source"])[0] in TEXT_KINDS}
