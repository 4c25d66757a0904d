"""Short-answer scoring as in SQuAD: normalised containment ("exact match") and token F1.

Both compare *normalised* text: lowercase, punctuation removed, the articles a/an/the dropped,
whitespace collapsed (SQuAD's ``normalize_answer``). Exact match here is containment, as the absorb
evaluation asks for: a generation "The pass key is 48213." scores 1 against the answer "48213".
Example: ``token_f1("Maris Velkin, a baker", "Maris Velkin") == 0.8``.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """``"The  Olvane River!"`` -> ``"olvane river"``: lowercase, no punctuation or articles, single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answer: str) -> float:
    """1.0 if the normalised answer occurs in the normalised prediction on word boundaries, else 0.0.

    Word boundaries keep ``"12"`` from matching inside ``"1200"``; an answer that normalises to
    nothing (``"the"``) matches only an equally empty prediction.
    """
    expected, predicted = normalize_answer(answer), normalize_answer(prediction)
    if not expected:
        return float(not predicted)
    return float(f" {expected} " in f" {predicted} ")


def token_f1(prediction: str, answer: str) -> float:
    """SQuAD token F1 between the normalised prediction and answer (bags of words, harmonic mean of P and R)."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def score_answers(predictions: Sequence[str], answers: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Means over items: ``{"exact_match": ..., "f1": ...}``, each in [0, 1].

    ``answers[i]`` is one answer or a list of accepted answers (the best one counts, as in SQuAD).
    """
    if len(predictions) != len(answers):
        raise ValueError(f"score_answers: {len(predictions)} predictions but {len(answers)} answers")
    if not answers:
        raise ValueError("score_answers: no answers to score")
    matches, f1s = [], []
    for prediction, accepted in zip(predictions, answers):
        accepted = [accepted] if isinstance(accepted, str) else list(accepted)
        if not accepted:
            raise ValueError(f"score_answers: item {len(matches)} has an empty list of accepted answers")
        matches.append(max(exact_match(prediction, answer) for answer in accepted))
        f1s.append(max(token_f1(prediction, answer) for answer in accepted))
    return {"exact_match": sum(matches) / len(matches), "f1": sum(f1s) / len(f1s)}
