"""Probes for the ``distill`` memory writer, built from a chunk's own text (no other model, no data).

A probe is a chat exchange about the chunk that the model *with the chunk in context* (the teacher) and
the model with only its memory (the student) should answer alike: "What does the text say about X?" for
the names the chunk mentions (runs of capitalised words, and numbers), answered by the sentences that
mention X, and optionally "What was the text about?" answered by the chunk's sentences in another
order (an augmented view). Templates are generic: they know nothing of any evaluation's questions.

Example::

    chunk_probes("Mira Olsen bakes bread in Tollby. Tollby has 300 people.")
    # [("What does the text say about Tollby?", "Mira Olsen bakes bread in Tollby. Tollby has 300 people."),
    #  ("What does the text say about Mira Olsen?", "Mira Olsen bakes bread in Tollby."), ...]
"""

from __future__ import annotations

import random
import re
from collections import Counter

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_NAME = re.compile(r"\b[A-Z][\w'-]+(?:\s+(?:of\s+|de\s+|van\s+)?[A-Z][\w'-]+)*")
_NUMBER = re.compile(r"\b\d[\d,.]*\d\b|\b\d\b")
_COMMON_STARTS = frozenset("The A An In On At It Its He She His Her They Their This That These Those There Some "
                           "Many Most Records Local Visitors Little By For From After Before When While As Of "
                           "And But Or If We I You Our".split())
TOPIC_QUESTION = "What does the text say about {name}?"
CLOZE_QUESTION = "Complete this sentence from the text: {prefix} ..."
SUMMARY_QUESTION = "What was the text about?"


def sentences_of(text: str) -> list[str]:
    """The text's sentences (split after ``.``, ``!``, ``?``), stripped, empty ones dropped."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def names_in(sentence: str) -> list[str]:
    """Capitalised runs and numbers in a sentence; a lone first word or a common one that starts it is not a name."""
    found = []
    for match in _NAME.finditer(sentence):
        words = match.group().split()
        if match.start() == 0 and (words[0] in _COMMON_STARTS or len(words) == 1):
            words = words[1:]  # a sentence's first word is capitalised anyway
        if words and not (len(words) == 1 and words[0] in _COMMON_STARTS):
            found.append(" ".join(words))
    return found + _NUMBER.findall(sentence)


def cloze_probes(sentences: list[str]) -> list[tuple[str, str]]:
    """For each sentence that relates two names: the sentence up to its last name as the question, that name
    as the answer (a short answer, as a question about the fact would get)."""
    probes = []
    for sentence in sentences:
        names = [n for n in names_in(sentence) if sentence.rfind(n) > 0]
        if names:
            name = max(names, key=sentence.rfind)
            prefix = sentence[:sentence.rfind(name)].rstrip()
            if names_in(prefix):  # "Visitors often mention X" relates nothing
                probes.append((CLOZE_QUESTION.format(prefix=prefix), name))
    return list(dict.fromkeys(probes))


def mentioned_names(text: str) -> set[str]:
    """Every name in a text, possessives folded ("Banam Stanna's" names Banam Stanna): the relevance gate's keys."""
    return {re.sub(r"'s?$", "", name) for sentence in sentences_of(text) for name in names_in(sentence)}


def top_names(text: str, count: int) -> list[str]:
    """The ``count`` names mentioned in the most sentences of ``text`` (ties in order of appearance)."""
    mentions = Counter(name for sentence in sentences_of(text) for name in dict.fromkeys(names_in(sentence)))
    return [name for name, _ in mentions.most_common(count)]


def chunk_probes(text: str, max_probes: int = 8, seed: int = 0, restate: bool = False,
                 cloze: int = 0) -> list[tuple[str, str]]:
    """Up to ``max_probes`` ``(question, answer)`` pairs about ``text``: the most mentioned names first,
    then (``restate``) the whole chunk, its sentences shuffled; plus up to ``cloze`` sentence completions."""
    sentences = sentences_of(text)
    if not sentences:
        return []
    probes = cloze_probes(sentences)[:cloze]
    for name in top_names(text, max(0, max_probes - int(restate))):
        answer = " ".join(s for s in sentences if name in s)
        probes.append((TOPIC_QUESTION.format(name=name), answer))
    if restate:
        shuffled = sentences[:]
        random.Random(seed).shuffle(shuffled)
        probes.append((SUMMARY_QUESTION, " ".join(shuffled)))
    return probes[:max_probes + cloze]
