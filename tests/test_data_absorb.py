"""Absorb documents: deterministic from seeds, splits that never share seeds, answers in the context."""

from __future__ import annotations

import itertools
import re

import pytest

from dynalora.data.absorb import (
    DOCUMENT_SEEDS,
    SPLIT_SEED_BASE,
    AbsorbDataConfig,
    build_absorb_docs,
    needle_suite,
    read_absorb_docs,
    split_seeds,
    summarize_absorb_docs,
    unrelated_questions,
    write_absorb_docs,
)
from dynalora.data.bigbench import bigbench_dir
from dynalora.data.cli import main as data_main
from dynalora.data.facts import facts_document, locality_item
from dynalora.data.needle import PASSKEY_SENTENCE, needle_document
from dynalora.data.reading import (
    clean_reading_answer,
    reading_documents,
    reading_pool,
    split_reading_input,
)
from dynalora.data.splits import SPLITS, split_of


def assert_answers_in_context(documents: list[dict]) -> None:
    for document in documents:
        assert document["questions"]
        for item in document["questions"]:
            assert item["answer"] and item["answer"] in document["context"], (item, document["seed"])
            assert item["question"] not in document["context"]
            assert item["question"].endswith("?")


def test_documents_are_deterministic_from_their_seed():
    assert facts_document(5, words=300) == facts_document(5, words=300)
    assert facts_document(5, words=300) != facts_document(6, words=300)
    assert needle_document(9, words=200, depth=0.3) == needle_document(9, words=200, depth=0.3)
    assert locality_item(4) == locality_item(4)
    config = AbsorbDataConfig(kind="all", split="validation", count=3, seed_offset=7, words=120)
    reading_free = AbsorbDataConfig(kind="facts", split="test", count=4, words=120)
    assert build_absorb_docs(reading_free) == build_absorb_docs(kind="facts", split="test", count=4, words=120)
    if (bigbench_dir() / "index.json").is_file():
        assert build_absorb_docs(config) == build_absorb_docs(config)
    with pytest.raises(TypeError, match="not both"):
        build_absorb_docs(reading_free, count=2)


def test_split_seed_ranges_are_disjoint():
    ranges = [split_seeds(split, locality) for split in SPLITS for locality in (False, True)]
    for first, second in itertools.combinations(ranges, 2):
        assert first.stop <= second.start or second.stop <= first.start, (first, second)
    assert sum(len(seeds) for seeds in ranges) == 3 * (SPLIT_SEED_BASE["validation"] - SPLIT_SEED_BASE["train"])
    seen: dict[int, str] = {}
    for split in SPLITS:
        documents = build_absorb_docs(kind="facts", split=split, count=5, words=50) + \
            build_absorb_docs(kind="needle", split=split, count=5, words=50) + unrelated_questions(5, split=split)
        for document in documents:
            assert document["split"] == split
            assert document["seed"] in split_seeds(split, document["kind"] == "locality")
            assert seen.setdefault(document["seed"], split) == split
    last = build_absorb_docs(kind="needle", split="train", count=1, seed_offset=DOCUMENT_SEEDS - 1, words=10)
    assert last[0]["seed"] == DOCUMENT_SEEDS - 1 < split_seeds("validation").start
    with pytest.raises(ValueError, match="AbsorbDataConfig.seed_offset"):
        AbsorbDataConfig(count=2, seed_offset=DOCUMENT_SEEDS - 1)


def test_facts_answers_occur_in_the_context_and_questions_do_not():
    documents = [facts_document(seed, words=words) for seed in range(150) for words in (0, 400)]
    assert_answers_in_context(documents)
    for document in documents:  # one question per fact, each (question, answer) pair distinct
        pairs = [(item["question"], item["answer"]) for item in document["questions"]]
        assert len(set(pairs)) == len(pairs) >= 6
    padded = [len(facts_document(seed, words=400)["context"].split()) for seed in range(20)]
    assert all(400 <= count < 420 for count in padded)


def test_locality_items_are_short_and_self_contained():
    items = unrelated_questions(40, seed=3)
    assert_answers_in_context(items)
    assert all(item["kind"] == "locality" and len(item["questions"]) == 1 for item in items)
    assert max(len(item["context"].split()) for item in items) < 40
    assert unrelated_questions(40, seed=3) == items


def test_needle_answer_is_the_only_number_and_sits_at_the_requested_depth():
    for step in range(11):
        depth = step / 10
        document = needle_document(step, words=1000, depth=depth)
        passkey = document["questions"][0]["answer"]
        sentence = PASSKEY_SENTENCE.format(passkey=passkey)
        assert re.findall(r"\d+", document["context"]) == [passkey] and len(passkey) == 5
        relative = document["context"].index(sentence) / (len(document["context"]) - len(sentence))
        assert abs(relative - depth) < 0.02, (depth, relative)
        assert 1000 <= len(document["context"].split()) - len(sentence.split()) < 1010
    assert_answers_in_context([needle_document(seed, words=300, depth=0.7) for seed in range(50)])
    built = build_absorb_docs(kind="needle", split="train", count=11, words=80)
    assert [document["depth"] for document in built] == [step / 10 for step in range(11)]
    assert all(document["words"] == 80 for document in built)


class WordPieceTokenizer:
    """Stands in for a Hugging Face tokenizer: words and punctuation marks are tokens."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[str]:
        return re.findall(r"\w+|[^\w\s]", text)


def test_needle_suite_covers_lengths_and_depths():
    suite = needle_suite(256, multiples=(1, 2, 4), depths=10)
    assert len(suite) == 30 and len({document["seed"] for document in suite}) == 30
    assert [document["depth"] for document in suite[:10]] == [step / 9 for step in range(10)]
    assert [document["words"] for document in suite[::10]] == [192, 384, 768]
    assert all(document["split"] == "test" and document["seed"] in split_seeds("test") for document in suite)
    measured = needle_suite(300, multiples=(1, 8), depths=2, tokenizer=WordPieceTokenizer())
    for document in measured:
        assert abs(document["tokens"] - document["target_tokens"]) <= 0.015 * document["target_tokens"]
    with pytest.raises(ValueError, match="depths=1"):
        needle_suite(256, depths=1)


def test_jsonl_round_trip(tmp_path):
    documents = build_absorb_docs(kind="facts", split="train", count=3, words=60) + \
        build_absorb_docs(kind="needle", split="train", count=2, words=60) + unrelated_questions(2)
    path = write_absorb_docs(documents, tmp_path / "absorb" / "docs.jsonl")
    assert read_absorb_docs(path) == documents
    summary = summarize_absorb_docs(documents)
    assert summary["needle"]["documents"] == 2 and summary["needle"]["questions"] == 2
    assert summary["facts"]["questions"] == sum(len(d["questions"]) for d in documents if d["kind"] == "facts")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(path.read_text() + '{"context": "x", "questions": []}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:8: not a valid absorb documents line"):
        read_absorb_docs(bad)


def test_bad_config_fields_are_named():
    with pytest.raises(ValueError, match=r"AbsorbDataConfig.kind='story': expected one of facts, needle, reading, all"):
        AbsorbDataConfig(kind="story")
    with pytest.raises(ValueError, match=r"AbsorbDataConfig.split='dev': expected one of train, validation, test"):
        AbsorbDataConfig(split="dev")
    with pytest.raises(ValueError, match=r"AbsorbDataConfig.count=0"):
        AbsorbDataConfig(count=0)
    with pytest.raises(ValueError, match=r"AbsorbDataConfig.entities=\(4, 2\)"):
        AbsorbDataConfig(entities=(4, 2))
    with pytest.raises(ValueError, match=r"unrelated_questions.split='dev'"):
        unrelated_questions(3, split="dev")
    with pytest.raises(ValueError, match=r"depth=1.5"):
        needle_document(0, depth=1.5)


def test_cli_writes_documents_and_prints_a_summary(tmp_path, capsys):
    out = tmp_path / "needle.jsonl"
    assert data_main(["absorb", "--kind", "needle", "--split", "validation", "--count", "4", "--words", "50",
                      "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "needle" in printed and "wrote 4 validation documents" in printed
    assert [document["seed"] for document in read_absorb_docs(out)] == list(split_seeds("validation")[:4])


def test_reading_inputs_are_split_into_passage_and_question():
    drop = "Passage: The Bears won  by 3.\nThey  scored twice. \nQuestion: How many points? \nAnswer type: Number "
    assert split_reading_input(drop) == ("The Bears won by 3.\nThey scored twice.", "How many points?")
    ropes = "Background Paragraph: Salt dissolves. \nStory: Cup A has salt. \nQuestion: Which cup is salty?"
    assert split_reading_input(ropes) == ("Salt dissolves.\n\nCup A has salt.", "Which cup is salty?")
    quoted = "Passage: He asked a\nQuestion: nobody heard. \nQuestion: Who asked?"
    assert split_reading_input(quoted) == ("He asked a\nQuestion: nobody heard.", "Who asked?")
    assert split_reading_input("Passage: no question here") is None
    assert split_reading_input("Text: x \nQuestion: y?") is None
    assert split_reading_input("Background Paragraph: no story \nQuestion: y?") is None
    assert clean_reading_answer("3.") == "3" and clean_reading_answer("cup B.") == "cup B"
    assert clean_reading_answer("{'day': '12', 'month': 'December', 'year': '1914'}.") == "December 12, 1914"
    assert clean_reading_answer("{'day': '', 'month': '', 'year': '2008'}.") == "2008"
    assert clean_reading_answer("['6-7'].") == "6-7"
    assert clean_reading_answer("['touchdown', 'field goal'].") is None


def test_bigbench_reading_documents():
    if not (bigbench_dir() / "index.json").is_file():
        pytest.skip("BIG-Bench is not in the data cache: `dynalora data fetch --bigbench` (358 MB; PyPI no longer "
                    "serves it: place a copy of the sdist as the README's set-up says)")
    validation = reading_documents("validation")
    assert len(validation) > 500 and {document["source"] for document in validation} == {
        document["source"] for document in reading_documents("test")}
    for document in validation:
        assert split_of(document["context"]) == "validation"
        assert all(len(item["answer"].split()) <= 8 for item in document["questions"])
    train_contexts = {document["context"] for document in reading_documents("train")}
    assert not train_contexts & {document["context"] for document in validation}
    _, stats = reading_pool("subtask002_quoref_answer_generation")
    assert stats["unsplit"] == 0 and stats["multi_span"] > 0
    built = build_absorb_docs(kind="reading", split="validation", count=6, seed_offset=2)
    assert [document["seed"] for document in built] == list(split_seeds("validation")[2:8])
    assert [document["context"] for document in built] == [document["context"] for document in validation[2:8]]
    with pytest.raises(ValueError, match="AbsorbDataConfig.count=100000"):
        build_absorb_docs(kind="reading", split="test", count=100_000)


def test_locality_kind_writes_the_unrelated_question_items():
    from dynalora.data.absorb import build_absorb_docs, unrelated_questions

    docs = build_absorb_docs(kind="locality", split="validation", count=3, seed_offset=2)
    assert docs == unrelated_questions(3, seed=2, split="validation")
    assert all(len(d["questions"]) == 1 and d["questions"][0]["answer"] in d["context"] for d in docs)
