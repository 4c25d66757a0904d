"""A user's own text as a data source: JSONL (any field), a folder of .txt/.md; errors that name the file and line."""

from __future__ import annotations

import json

import pytest

from dynalora.data.splits import split_documents
from dynalora.data.text_sources import parse_source, source_documents


def test_jsonl_with_a_field_and_a_folder_give_documents_in_every_split(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": f"note {i} " * 20}) + "\n" for i in range(60)))
    folder = tmp_path / "notes"
    (folder / "deep").mkdir(parents=True)
    for i in range(30):
        (folder / ("deep" if i % 3 else "") / f"n{i}{'.md' if i % 2 else '.txt'}").write_text(f"text {i} " * 30)
    (folder / "skip.py").write_text("not text")
    jsonl = source_documents(f"jsonl:{tmp_path / 'a.jsonl'}#body")
    notes = source_documents(f"dir:{folder}")
    assert len(jsonl) == 60 and len(notes) == 30 and all("not text" not in d.text for d in notes)
    for split in ("train", "validation", "test"):
        assert split_documents(jsonl, split), split
    assert [d.text for d in source_documents(f"dir:{folder}")] == [d.text for d in notes]  # a fixed order
    long_file = tmp_path / "long"
    long_file.mkdir()
    (long_file / "book.txt").write_text("A sentence of a long book. " * 400)
    assert len(source_documents(f"dir:{long_file}")) > 5  # one long file is cut into chunks, each split on its own


def test_bad_sources_name_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="use one of domain:NAME"):
        parse_source("wiki:x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        source_documents(f"jsonl:{tmp_path / 'none.jsonl'}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no string field 'text' .*\['title'\]"):
        source_documents(f"jsonl:{bad}")
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not JSON"):
        source_documents(f"jsonl:{bad}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text found"):
        source_documents(f"dir:{tmp_path / 'empty'}")
    with pytest.raises(ValueError, match="is a task, not text"):
        source_documents("bigbench:word_sorting")
