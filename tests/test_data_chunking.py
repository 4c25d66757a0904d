"""Chunking: exact tiling, size bounds, natural cut points, scene boundaries, stable chunk ids."""

from __future__ import annotations

import random
import re

import pytest

from dynalora.data.chunking import ChunkConfig, chunk_spans, chunk_text
from dynalora.data.documents import chunk_documents


def prose(paragraphs: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = "the a king queen sword crown night day river stone speaks runs falls rises".split()
    return "\n\n".join(
        " ".join(". ".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(3)) + "."
                 for _ in range(rng.randint(1, 3)))
        for _ in range(paragraphs))


@pytest.mark.parametrize("seed", range(5))
def test_spans_tile_the_text_within_max_chars(seed):
    text = prose(120, seed)
    config = ChunkConfig(max_chars=700, min_chars=300)
    spans = chunk_spans(text, config)
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(left[1] == right[0] for left, right in zip(spans, spans[1:]))  # no gap, no overlap
    assert all(0 < end - start <= config.max_chars for start, end in spans)
    # Short chunks were joined to a neighbour or the pair re-cut near its middle.
    assert all(end - start >= min(config.min_chars, config.max_chars // 4) for start, end in spans)
    # Cuts fall after a blank line whenever the paragraphs allow it (they are all < 700 chars here).
    assert sum(text[:end].endswith("\n\n") for _, end in spans[:-1]) >= 0.9 * (len(spans) - 1)


def test_chunk_text_is_the_text_without_blank_lines_at_the_cuts():
    text = prose(60, 1)
    chunks = chunk_text(text, ChunkConfig(max_chars=500, min_chars=200))
    assert re.sub(r"\s+", " ", " ".join(chunks)) == re.sub(r"\s+", " ", text)
    assert all(chunk == chunk.strip() for chunk in chunks)
    assert chunk_text("a\n\nb", ChunkConfig(max_chars=2, min_chars=0)) == ["a", "b"]
    assert chunk_text("") == [] and chunk_text("\n\n  \n") == []


def test_short_text_is_one_chunk_and_long_text_is_balanced():
    assert chunk_spans("hello world", ChunkConfig(max_chars=100, min_chars=10)) == [(0, 11)]
    # 4,100 characters of sentences: two chunks of about 2,050, not 4,000 + 100.
    text = " ".join(["Word word word word word word word word word."] * 90)[:4100]
    lengths = [end - start for start, end in chunk_spans(text, ChunkConfig(max_chars=4000, min_chars=1000))]
    assert len(lengths) == 2 and min(lengths) > 1500


def test_heading_is_not_left_alone():
    # A chapter whose heading plus body just exceeds max_chars: the cut goes mid-body, not after the heading.
    body = " ".join(f"Sentence number {i} is here." for i in range(160))
    text = "Acts 25\n\n" + body[:3996 - len("Acts 25\n\n") + 9]
    chunks = chunk_text(text, ChunkConfig(max_chars=4000, min_chars=2000))
    assert len(chunks) == 2 and all(len(chunk) > 1000 for chunk in chunks)
    assert chunks[0].startswith("Acts 25\n\nSentence number 0")


def test_unbreakable_text_is_cut_hard():
    text = "x" * 2500
    spans = chunk_spans(text, ChunkConfig(max_chars=1000, min_chars=0))
    assert [end - start for start, end in spans] == [1000, 1000, 500]


def test_boundary_starts_a_new_chunk_once_min_chars_is_reached():
    scenes = [f"Scene {numeral}. A room.\n\n" + prose(6, seed) for seed, numeral in enumerate(["I", "II", "III", "IV"])]
    text = "\n\n".join(scenes)
    scene = re.compile(r"Scene [IVX]+\.")
    longest_scene = max(map(len, scenes))
    config = ChunkConfig(max_chars=2 * longest_scene + 10, min_chars=10)  # two scenes fit in one chunk
    with_boundary = chunk_text(text, config, boundary=scene)
    assert with_boundary == scenes
    without = chunk_text(text, config)
    assert len(without) == 2  # without the boundary, scenes share chunks
    # Below min_chars a boundary does not cut: a lone heading never becomes its own chunk.
    assert chunk_text(text, ChunkConfig(max_chars=len(text) - 1, min_chars=len(text) // 3), boundary=scene)[0] \
        .startswith(scenes[0] + "\n\n" + scenes[1])


def test_chunk_documents_ids():
    texts = [("short", "tiny text"), ("long", prose(40, 3))]
    documents = chunk_documents(texts, "test", ChunkConfig(max_chars=400, min_chars=100))
    assert documents[0].id == "short" and documents[0].parent == "short"
    long_ids = [document.id for document in documents[1:]]
    assert long_ids == [f"long#{k}" for k in range(len(long_ids))] and len(long_ids) > 3
    assert {document.parent for document in documents[1:]} == {"long"}
    with pytest.raises(ValueError, match="must not contain '#'"):
        chunk_documents([("bad#id", "text")], "test")


def test_config_is_validated():
    with pytest.raises(ValueError, match="max_chars"):
        ChunkConfig(max_chars=0)
    with pytest.raises(ValueError, match="min_chars"):
        ChunkConfig(max_chars=100, min_chars=200)
