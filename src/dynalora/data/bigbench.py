"""BIG-Bench JSON tasks read straight out of the ``bigbench==1.0.0`` sdist (no install, no import).

On first use the 358 MB tarball is downloaded once and streamed once: every ``task.json`` (1,041 files,
1.7 GB) is copied to ``$DYNALORA_HOME/data/bigbench-1.0.0/tasks/`` (mirroring ``benchmark_tasks/``)
and summarised in ``index.json`` (example count, metric, mean input/target lengths). Later calls read
the index and one task file.

A task in a sub-folder is named ``parent:subtask`` (``arithmetic:1_digit_addition``); a parent whose
own ``task.json`` holds no examples is not loadable itself. Metrics:

* ``"exact_match"``: generate, compare with ``Example.targets`` (BIG-Bench ``exact_str_match`` and
  its case-insensitive / numeric variants);
* ``"multiple_choice"``: score each of ``Example.choices``, correct if the best is ``Example.correct``
  (BIG-Bench ``multiple_choice_grade``);
* ``"generative"``: free text scored by BLEU/ROUGE/... in BIG-Bench; no exact metric here.
"""

from __future__ import annotations

import json
import random
import tarfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm import tqdm

from dynalora.data.fetch import data_home
from dynalora.data.readers import hash_fraction
from dynalora.data.sources import SOURCES
from dynalora.data.splits import DEFAULT_FRACTIONS, SplitFractions, check_split, split_of

METRICS = ("exact_match", "multiple_choice", "generative")
_EXACT_SCORES = ("exact_str_match", "case_insensitive_str_match", "numeric_match_with_0_1_relative_error")
_TEXT_OVERLAP_SCORES = ("bleu", "bleurt", "rouge", "sequence_f1")
_TASKS_FOLDER = "/benchmark_tasks/"
_INDEX_FORMAT = 2  # bump when summaries or metric rules change: the index is rebuilt from the extracted files


@dataclass(frozen=True)
class Example:
    """One BIG-Bench example. Exact-match examples have ``target``; multiple-choice ones ``choices``/``correct``.

    ``targets`` lists every accepted answer (``target == targets[0]``); ``choice_scores[i]`` is the
    credit for picking ``choices[i]`` (1 for correct, 0 for wrong; some tasks give partial credit).
    """

    input: str
    target: str | None = None
    choices: list[str] | None = None
    correct: int | None = None
    targets: list[str] = field(default_factory=list)
    choice_scores: list[float] | None = None


@dataclass(frozen=True)
class Task:
    """A BIG-Bench JSON task with its prompt fields (defaults as in ``bigbench/api/json_task.py``)."""

    name: str
    description: str
    examples: list[Example]
    metric: str
    """One of ``METRICS``."""
    preferred_score: str
    """BIG-Bench's own ``preferred_score`` (e.g. ``exact_str_match``, ``multiple_choice_grade``, ``bleu``)."""
    keywords: list[str] = field(default_factory=list)
    task_prefix: str = ""
    example_input_prefix: str = "\nQ: "
    example_output_prefix: str = "\nA: "
    choice_prefix: str = "\n  choice: "
    append_choices_to_input: bool = True
    few_shot_example_separator: str = "\n"
    output_regex: str | None = None
    stop_string: str | None = None

    def format_prompt(self, example: Example, with_choices: bool | None = None) -> str:
        """Zero-shot BIG-Bench prompt: prefix, input, the choices (shuffled deterministically), output prefix.

        BIG-Bench lists the choices whenever an example has ``target_scores`` and the task does not set
        ``append_choices_to_input: false`` (so arithmetic prompts list its decoy answers, "banana"
        included); ``with_choices=False`` leaves them out, e.g. to train exact-match generation.
        """
        text = example.input
        if example.choices and (self.append_choices_to_input if with_choices is None else with_choices):
            shuffled = sorted(example.choices)
            random.Random(int(hash_fraction(example.input) * 2**32)).shuffle(shuffled)
            text += self.choice_prefix + self.choice_prefix.join(shuffled)
        return self.task_prefix + self.example_input_prefix + text + self.example_output_prefix


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def parse_example(raw: dict[str, Any]) -> Example:
    """One ``examples[i]`` entry of a task.json -> :class:`Example`."""
    if "input" not in raw or not ("target" in raw or "target_scores" in raw):
        raise ValueError(f"BIG-Bench example needs 'input' and 'target' or 'target_scores': {str(raw)[:200]}")
    raw_targets = raw.get("target")
    targets = [_as_text(t) for t in raw_targets] if isinstance(raw_targets, list) else (
        [] if raw_targets is None else [_as_text(raw_targets)])
    choices = scores = correct = None
    if "target_scores" in raw:
        choices = [_as_text(choice) for choice in raw["target_scores"]]
        scores = [float(score) for score in raw["target_scores"].values()]
        correct = scores.index(max(scores))  # first best, as BIG-Bench picks it
    return Example(input=_as_text(raw["input"]), target=targets[0] if targets else None, choices=choices,
                   correct=correct, targets=targets, choice_scores=scores)


def _metric_of(data: dict[str, Any], examples: list[Example]) -> str:
    """Follow BIG-Bench's ``preferred_score``; fall back on ``metrics`` only when that names no usable score."""
    preferred = data.get("preferred_score", "")
    metrics = data.get("metrics", [])
    all_choices = bool(examples) and all(example.choices for example in examples)
    all_targets = bool(examples) and all(example.targets for example in examples)
    if preferred == "multiple_choice_grade" and all_choices:
        return "multiple_choice"
    if preferred in _EXACT_SCORES and all_targets:
        return "exact_match"
    if preferred.startswith(_TEXT_OVERLAP_SCORES):  # BLEU/ROUGE-graded free text: exact match would mislead
        return "generative"
    if "multiple_choice_grade" in metrics and all_choices:
        return "multiple_choice"
    if any(metric in _EXACT_SCORES for metric in metrics) and all_targets:
        return "exact_match"
    return "generative"


def parse_task(data: dict[str, Any], name: str | None = None) -> Task:
    """A parsed task.json -> :class:`Task`; exact duplicate examples are dropped, as BIG-Bench does."""
    seen: set[str] = set()
    examples = []
    for raw in data.get("examples", []):
        key = json.dumps(raw, sort_keys=True)
        if key not in seen:
            seen.add(key)
            examples.append(parse_example(raw))
    return Task(
        name=name or data.get("name", ""), description=data.get("description", ""), examples=examples,
        metric=_metric_of(data, examples), preferred_score=data.get("preferred_score", ""),
        keywords=list(data.get("keywords", [])), task_prefix=str(data.get("task_prefix", "")),
        example_input_prefix=data.get("example_input_prefix", "\nQ: "),
        example_output_prefix=data.get("example_output_prefix", "\nA: "),
        choice_prefix=data.get("choice_prefix", "\n  choice: "),
        append_choices_to_input=bool(data.get("append_choices_to_input", True)),
        few_shot_example_separator=data.get("few_shot_example_separator", "\n"),
        output_regex=data.get("output_regex"), stop_string=data.get("stop_string"))


def summarize_task(task: Task) -> dict[str, Any]:
    """Index entry: counts, metric and mean lengths (characters) of inputs and of correct answers."""
    answers = [example.choices[example.correct] if task.metric == "multiple_choice" else (example.target or "")
               for example in task.examples]
    count = len(task.examples)
    return {
        "examples": count, "metric": task.metric, "preferred_score": task.preferred_score,
        "description": task.description,
        "mean_input_chars": round(sum(len(example.input) for example in task.examples) / count, 1) if count else 0,
        "max_input_chars": max((len(example.input) for example in task.examples), default=0),
        "mean_target_chars": round(sum(map(len, answers)) / count, 1) if count else 0,
        "mean_choices": round(sum(len(example.choices or []) for example in task.examples) / count, 2) if count else 0,
    }


def task_name_of(member_path: str) -> str | None:
    """``".../benchmark_tasks/arithmetic/1_digit_addition/task.json"`` -> ``"arithmetic:1_digit_addition"``."""
    if _TASKS_FOLDER not in member_path or not member_path.endswith("/task.json"):
        return None
    folders = PurePosixPath(member_path.split(_TASKS_FOLDER, 1)[1]).parts[:-1]
    return ":".join(folders) if folders else None


def bigbench_dir() -> Path:
    return data_home() / f"bigbench-{SOURCES['bigbench'].version}"


def _extract_task_files(progress: bool) -> list[str]:
    """Stream the sdist once and copy every task.json under ``tasks/``; returns their relative paths."""
    tasks_dir = bigbench_dir() / "tasks"
    listing = tasks_dir / "extracted.json"
    if listing.is_file():
        return json.loads(listing.read_text())
    sdist = SOURCES["bigbench"].fetch(progress=progress)
    relatives = []
    with tarfile.open(sdist, "r|gz") as archive, \
            tqdm(desc="extract BIG-Bench task.json", unit="file", disable=not progress) as bar:
        for member in archive:  # streamed: the tar.gz is read front to back exactly once
            if not member.isfile() or task_name_of(member.name) is None:
                continue
            relative = member.name.split(_TASKS_FOLDER, 1)[1]
            target = tasks_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.extractfile(member).read())
            relatives.append(relative)
            bar.update(1)
    listing.write_text(json.dumps(sorted(relatives), indent=0))  # written last: marks a complete extraction
    return sorted(relatives)


def prepare_bigbench(progress: bool = True) -> Path:
    """Download the sdist and copy out every task.json (once), then write ``index.json``; returns its path."""
    index_path = bigbench_dir() / "index.json"
    if index_path.is_file() and json.loads(index_path.read_text()).get("format") == _INDEX_FORMAT:
        return index_path
    index: dict[str, dict[str, Any]] = {}
    for relative in tqdm(_extract_task_files(progress), desc="index BIG-Bench tasks", unit="task",
                         disable=not progress):
        name = task_name_of(_TASKS_FOLDER + relative)
        try:
            data = json.loads((bigbench_dir() / "tasks" / relative).read_text(encoding="utf-8"))
            entry = summarize_task(parse_task(data, name))
        except (ValueError, TypeError, AttributeError, KeyError) as error:
            entry = {"examples": 0, "metric": "generative", "error": f"{type(error).__name__}: {error}"[:300]}
        index[name] = {"path": relative, **entry}
    for name in list(index):  # a parent lists its subtasks so `load_task(parent)` can name them
        if ":" in name:
            parent = name.rsplit(":", 1)[0]
            index.setdefault(parent, {"path": None, "examples": 0, "metric": "generative"})
            index[parent].setdefault("subtasks", []).append(name)
    partial = index_path.with_name("index.json.partial")
    partial.write_text(json.dumps({"format": _INDEX_FORMAT, "tasks": dict(sorted(index.items()))}, indent=1))
    partial.replace(index_path)
    _read_index.cache_clear()
    return index_path


@lru_cache(maxsize=1)
def _read_index(path: Path) -> dict[str, dict[str, Any]]:
    return json.loads(path.read_text())["tasks"]


def task_index(progress: bool = True) -> dict[str, dict[str, Any]]:
    """``{task name: summary}`` for every task.json in BIG-Bench, parents without examples included."""
    return _read_index(prepare_bigbench(progress))


def list_tasks(progress: bool = True) -> list[str]:
    """Names of the loadable tasks (those with examples), sorted: ``["abstract_narrative_understanding:...", ...]``."""
    return [name for name, entry in task_index(progress).items() if entry["examples"] > 0]


def load_task(name: str, progress: bool = True) -> Task:
    """The task ``name`` (``"word_sorting"`` or ``"parent:subtask"``) with all its examples."""
    index = task_index(progress)
    entry = index.get(name)
    if entry is None:
        close = [task for task in index if name.split(":")[0] in task][:8]
        raise KeyError(f"no BIG-Bench task {name!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    if entry["examples"] == 0:
        subtasks = entry.get("subtasks", [])
        reason = entry.get("error") or "it has no examples of its own"
        raise KeyError(f"BIG-Bench task {name!r} is not loadable ({reason})"
                       + (f"; load a subtask: {', '.join(subtasks)}" if subtasks else ""))
    data = json.loads((bigbench_dir() / "tasks" / entry["path"]).read_text(encoding="utf-8"))
    return parse_task(data, name)


def split_examples(task: Task, split: str, fractions: SplitFractions = DEFAULT_FRACTIONS) -> list[Example]:
    """Examples of ``split`` by hash of the input text (equal inputs share a split), in task order."""
    check_split(split)
    return [example for example in task.examples if split_of(example.input, fractions) == split]
