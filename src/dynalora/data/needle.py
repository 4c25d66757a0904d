"""Passkey ("needle in a haystack") documents: a random 5-digit pass key hidden in repetitive filler.

The filler repeats neutral, digit-free sentences (the classic "The grass is green. The sky is blue.
..." and a few variants, the set and its starting sentence picked by the seed); the pass key
sentence goes in at a relative depth (0 = first sentence, 1 = last) between two filler sentences.

Example::

    needle_document(3, words=500, depth=0.5)
    -> {"context": "... The pass key is 48213. Remember it. ...", "kind": "needle", "seed": 3,
        "depth": 0.5, "words": 500, "questions": [{"question": "What is the pass key?", "answer": "48213"}]}
"""

from __future__ import annotations

import random

FILLER_SETS = (
    ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."),
    ("The river is calm.", "The hills are quiet.", "The road is long.", "The wind is soft.",
     "Birds fly over the fields."),
    ("The table is made of wood.", "The cup is on the shelf.", "The door is closed.", "The lamp is off.",
     "The room is quiet."),
    ("Clouds drift across the sky.", "The trees sway gently.", "Rain falls on the roof.", "The lake is still.",
     "Night follows day."),
)
PASSKEY_SENTENCE = "The pass key is {passkey}. Remember it."
PASSKEY_QUESTION = "What is the pass key?"


def filler_sentences(words: int, rng: random.Random) -> list[str]:
    """Filler sentences totalling about ``words`` words (one sentence more at most), cycling one set."""
    sentences = FILLER_SETS[rng.randrange(len(FILLER_SETS))]
    start = rng.randrange(len(sentences))
    chosen, total = [], 0
    while total < words:
        sentence = sentences[(start + len(chosen)) % len(sentences)]
        chosen.append(sentence)
        total += len(sentence.split())
    return chosen


def needle_document(seed: int, words: int = 1000, depth: float = 0.5) -> dict:
    """A pass key at relative ``depth`` (0..1) of about ``words`` words of filler (the key sentence adds 6).

    Returns ``{"context", "questions": [{"question": "What is the pass key?", "answer": "48213"}],
    "kind": "needle", "seed", "depth", "words"}``.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth}: expected a relative position between 0.0 and 1.0")
    if words < 0:
        raise ValueError(f"words={words}: expected a number of filler words >= 0")
    rng = random.Random(seed)
    passkey = str(rng.randint(10_000, 99_999))
    sentences = filler_sentences(words, rng)
    # Place by word count, not sentence count, so depth tracks the position in the text.
    target, position, seen = depth * sum(len(s.split()) for s in sentences), 0, 0
    while position < len(sentences) and seen + len(sentences[position].split()) / 2 < target:
        seen += len(sentences[position].split())
        position += 1
    sentences.insert(position, PASSKEY_SENTENCE.format(passkey=passkey))
    return {"context": " ".join(sentences), "questions": [{"question": PASSKEY_QUESTION, "answer": passkey}],
            "kind": "needle", "seed": seed, "depth": depth, "words": words}
