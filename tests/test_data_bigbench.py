"""BIG-Bench task.json parsing on inline fixtures, and the extract/index/load path on a tiny fake sdist."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from dynalora.data.bigbench import (Example, list_tasks, load_task, parse_example, parse_task, split_examples,
                                    task_index, task_name_of)
from dynalora.data.splits import SPLITS

EXACT_TASK = {
    "name": "word_sorting", "description": "Sort a list of words", "keywords": ["algorithms"],
    "metrics": ["exact_str_match"], "preferred_score": "exact_str_match",
    "task_prefix": "Sort the following words alphabetically:", "example_input_prefix": "\nList: ",
    "example_output_prefix": "\nSorted: ",
    "examples": [
        {"input": "stick gelatine", "target": "gelatine stick"},
        {"input": "b a", "target": ["a b", "a  b"]},
        {"input": "stick gelatine", "target": "gelatine stick"},  # exact duplicate: dropped
    ],
}
CHOICE_TASK = {
    "name": "date_understanding", "description": "Infer the date from context",
    "metrics": ["multiple_choice_grade"], "preferred_score": "multiple_choice_grade", "append_choices_to_input": True,
    "examples": [
        {"input": "Yesterday was April 30, 2021. What is the date today?",
         "target_scores": {"05/01/2021": 1, "02/23/2021": 0, "04/29/2021": 0}},
        {"input": "Which is best?", "target_scores": {"worst": 0, "good": 0.5, "best": 1, "also best": 1}},
    ],
}


def test_exact_match_task():
    task = parse_task(EXACT_TASK)
    assert task.name == "word_sorting" and task.metric == "exact_match" and task.preferred_score == "exact_str_match"
    assert [example.input for example in task.examples] == ["stick gelatine", "b a"]
    first, second = task.examples
    assert first == Example(input="stick gelatine", target="gelatine stick", targets=["gelatine stick"])
    assert second.target == "a b" and second.targets == ["a b", "a  b"] and second.choices is None
    assert task.format_prompt(first) == "Sort the following words alphabetically:\nList: stick gelatine\nSorted: "


def test_multiple_choice_task():
    task = parse_task(CHOICE_TASK)
    assert task.metric == "multiple_choice"
    date, best = task.examples
    assert date.choices == ["05/01/2021", "02/23/2021", "04/29/2021"] and date.correct == 0 and date.target is None
    assert best.correct == 2 and best.choice_scores == [0.0, 0.5, 1.0, 1.0]  # first of the tied best, as BIG-Bench
    prompt = task.format_prompt(date)
    assert prompt.startswith("\nQ: Yesterday was April 30, 2021. What is the date today?\n  choice: ")
    assert prompt.endswith("\nA: ") and all(f"\n  choice: {choice}" in prompt for choice in date.choices)
    assert prompt == task.format_prompt(date)  # the choice order is shuffled deterministically


def test_metric_follows_preferred_score():
    rouge = dict(EXACT_TASK, metrics=["rouge", "exact_str_match"], preferred_score="rougeLsum")
    assert parse_task(rouge).metric == "generative"
    both = dict(EXACT_TASK, metrics=["exact_str_match", "multiple_choice_grade"], preferred_score="exact_str_match",
                examples=[{"input": "1+1", "target": "2", "target_scores": {"2": 1, "3": 0}}])
    assert parse_task(both).metric == "exact_match"
    task = parse_task(both)
    assert task.examples[0].target == "2" and task.examples[0].choices == ["2", "3"]
    assert "choice: 3" in task.format_prompt(task.examples[0])  # BIG-Bench lists decoys by default
    assert task.format_prompt(task.examples[0], with_choices=False) == "Sort the following words alphabetically:" \
        "\nList: 1+1\nSorted: "
    unknown = dict(CHOICE_TASK, preferred_score="macro_f1")
    assert parse_task(unknown).metric == "multiple_choice"


def test_bad_examples_are_rejected_with_the_example_shown():
    with pytest.raises(ValueError, match="needs 'input'"):
        parse_example({"input": "no answer"})
    assert parse_example({"input": 3, "target": 4}).input == "3"


def test_task_names_from_archive_paths():
    root = "bigbench-1.0.0/bigbench/benchmark_tasks/"
    assert task_name_of(root + "word_sorting/task.json") == "word_sorting"
    assert task_name_of(root + "arithmetic/1_digit_addition/task.json") == "arithmetic:1_digit_addition"
    assert task_name_of(root + "arithmetic/README.md") is None
    assert task_name_of("bigbench-1.0.0/bigbench/api/task.json") is None


def test_split_examples_by_input_text():
    task = parse_task(dict(EXACT_TASK, examples=[{"input": f"w{i} v{i}", "target": f"v{i} w{i}"} for i in range(300)]))
    parts = {split: split_examples(task, split) for split in SPLITS}
    assert sum(map(len, parts.values())) == 300
    assert sorted(example.input for part in parts.values() for example in part) == \
        sorted(example.input for example in task.examples)
    assert 200 < len(parts["train"]) < 270 and parts["validation"] and parts["test"]
    assert parts == {split: split_examples(task, split) for split in SPLITS}


def _add_json(archive: tarfile.TarFile, path: str, data: dict) -> None:
    raw = json.dumps(data).encode()
    info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{path}")
    info.size = len(raw)
    archive.addfile(info, io.BytesIO(raw))


@pytest.fixture
def fake_bigbench(tmp_path, monkeypatch):
    """A tiny bigbench sdist placed where the download cache looks, so nothing is fetched."""
    monkeypatch.setenv("DYNALORA_HOME", str(tmp_path))
    folder = tmp_path / "data" / "downloads" / "bigbench-1.0.0-sdist"
    folder.mkdir(parents=True)
    with tarfile.open(folder / "bigbench-1.0.0.tar.gz", "w:gz") as archive:
        _add_json(archive, "word_sorting/task.json", EXACT_TASK)
        _add_json(archive, "arithmetic/task.json", {"name": "arithmetic", "description": "Arithmetic"})
        _add_json(archive, "arithmetic/1_digit_addition/task.json", dict(EXACT_TASK, name="1_digit_addition"))
        _add_json(archive, "date_understanding/task.json", CHOICE_TASK)
        _add_json(archive, "broken/task.json", {"examples": [{"input": "no target"}]})
    return tmp_path


def test_extract_index_and_load_from_a_fake_sdist(fake_bigbench):
    assert list_tasks(progress=False) == ["arithmetic:1_digit_addition", "date_understanding", "word_sorting"]
    index = task_index(progress=False)
    assert index["word_sorting"]["examples"] == 2 and index["word_sorting"]["metric"] == "exact_match"
    assert index["date_understanding"]["mean_choices"] == 3.5
    assert index["arithmetic"]["subtasks"] == ["arithmetic:1_digit_addition"]
    assert "error" in index["broken"]
    task = load_task("arithmetic:1_digit_addition", progress=False)
    assert task.name == "arithmetic:1_digit_addition" and len(task.examples) == 2
    assert (fake_bigbench / "data" / "bigbench-1.0.0" / "tasks" / "word_sorting" / "task.json").is_file()
    with pytest.raises(KeyError, match="load a subtask: arithmetic:1_digit_addition"):
        load_task("arithmetic", progress=False)
    with pytest.raises(KeyError, match="no BIG-Bench task 'word_sort'"):
        load_task("word_sort", progress=False)
