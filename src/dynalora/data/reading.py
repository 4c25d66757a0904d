"""Reading comprehension documents from BIG-Bench ``natural_instructions`` (DROP, Quoref, ROPES).

Each subtask input holds a passage and one question in one string:

* DROP   ``"Passage: ... \\nQuestion: ... \\nAnswer type: Number "`` (answers: numbers, dates, spans);
* Quoref ``"Passage: ... \\nQuestion: ..."``;
* ROPES  ``"Background Paragraph: ... \\nStory: ... \\nQuestion: ..."`` (context = background + story).

Inputs are split at the *last* ``"\\nQuestion:"`` (a passage may quote the word); an input without the
expected labels is skipped and counted. Examples sharing a passage become one document with several
questions. Only single answers of at most ``max_answer_words`` words are kept: multi-span answers
(Quoref's ``["Columbus.", "Nathaniel."]``, DROP's span lists) are skipped and counted. The split of a
document is :func:`dynalora.data.splits.split_of` of its context, so a passage never crosses splits.
"""

from __future__ import annotations

import ast
import re
from functools import lru_cache

from dynalora.data.bigbench import load_task
from dynalora.data.splits import SPLITS, check_split, split_of

READING_SUBTASKS = ("subtask028_drop_answer_generation", "subtask002_quoref_answer_generation",
                    "subtask061_ropes_answer_generation")
"""``natural_instructions:<name>`` subtasks with a passage, a question and a short answer."""
_SPACES = re.compile(r"[ \t]+")


def _tidy(text: str) -> str:
    return "\n".join(_SPACES.sub(" ", line).strip() for line in text.strip().splitlines())


def split_reading_input(text: str) -> tuple[str, str] | None:
    """``(context, question)`` out of a subtask input, or ``None`` when its labels are not where expected."""
    head, found, question = text.rpartition("\nQuestion:")
    if not found:
        return None
    question = _tidy(question.split("\nAnswer type:", 1)[0])
    head = head.strip()
    if head.startswith("Background Paragraph:"):
        background, found, story = head[len("Background Paragraph:"):].rpartition("\nStory:")
        if not found:
            return None
        context = f"{_tidy(background)}\n\n{_tidy(story)}"
    elif head.startswith("Passage:"):
        context = _tidy(head[len("Passage:"):])
    else:
        return None
    if not context.strip() or not question:
        return None
    return context, question


def clean_reading_answer(target: str) -> str | None:
    """``"3."`` -> ``"3"``; DROP dates ``"{'day': '12', 'month': 'December', 'year': '1914'}."`` ->
    ``"December 12, 1914"``; one-span lists ``"['6-7']."`` -> ``"6-7"``; several spans -> ``None``."""
    text = target.strip()
    text = text[:-1].strip() if text.endswith(".") else text
    if text.startswith(("{", "[")):
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
        if isinstance(parsed, dict):
            day, month, year = (str(parsed.get(key, "")).strip() for key in ("day", "month", "year"))
            if day and month and year:
                return f"{month} {day}, {year}"
            return " ".join(part for part in (month, day, year) if part) or None
        if isinstance(parsed, list):
            spans = [str(span).strip() for span in parsed if str(span).strip()]
            return spans[0] if len(spans) == 1 else None
    return text or None


@lru_cache(maxsize=8)
def reading_pool(subtask: str, max_answer_words: int = 8, progress: bool = False) -> tuple[dict, dict]:
    """All documents of one subtask by split, and what was skipped: ``({split: [doc]}, stats)``.

    ``stats``: ``examples``, ``unsplit`` (no passage/question found), ``multi_span``, ``long_answer``
    (over ``max_answer_words``), ``duplicate`` (same question twice on a passage), and per split
    ``"<split>_documents"`` and ``"<split>_questions"``. Documents are ``{"context", "questions":
    [{"question", "answer"}], "kind": "reading", "source": subtask}`` in task order. The result is
    cached: copy before changing it.
    """
    if subtask not in READING_SUBTASKS:
        raise ValueError(f"subtask={subtask!r}: expected one of {', '.join(READING_SUBTASKS)}")
    task = load_task(f"natural_instructions:{subtask}", progress=progress)
    stats = {"examples": len(task.examples), "unsplit": 0, "multi_span": 0, "long_answer": 0, "duplicate": 0}
    by_context: dict[str, dict] = {}
    for example in task.examples:
        parts = split_reading_input(example.input)
        if parts is None:
            stats["unsplit"] += 1
            continue
        answer = clean_reading_answer(example.target or "") if len(example.targets) == 1 else None
        if answer is None:
            stats["multi_span"] += 1
            continue
        if len(answer.split()) > max_answer_words:
            stats["long_answer"] += 1
            continue
        context, question = parts
        document = by_context.setdefault(context, {"context": context, "questions": [], "kind": "reading",
                                                   "source": subtask})
        if any(asked["question"] == question for asked in document["questions"]):
            stats["duplicate"] += 1
            continue
        document["questions"].append({"question": question, "answer": answer})
    pool = {split: [] for split in SPLITS}
    for context, document in by_context.items():
        pool[split_of(context)].append(document)
    for split in SPLITS:
        stats[f"{split}_documents"] = len(pool[split])
        stats[f"{split}_questions"] = sum(len(document["questions"]) for document in pool[split])
    return pool, stats


def reading_documents(split: str, subtasks: tuple[str, ...] = READING_SUBTASKS, max_answer_words: int = 8,
                      progress: bool = False) -> list[dict]:
    """Documents of ``split`` from ``subtasks``, taken in turn (one of each, then the next of each, ...)."""
    check_split(split)
    pools = [reading_pool(subtask, max_answer_words, progress)[0][split] for subtask in subtasks]
    mixed = []
    for position in range(max((len(pool) for pool in pools), default=0)):
        mixed.extend(pool[position] for pool in pools if position < len(pool))
    return mixed
