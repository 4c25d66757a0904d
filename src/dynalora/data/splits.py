"""Deterministic train/validation/test splits by hashing a stable key (a document's parent id, an input).

The split of a key depends only on the key and the fractions: not on the order or the number of the
other items, not on a random seed, not on the machine. Adding documents never moves old ones.
Example: ``split_of("hamlet") == split_of("hamlet")`` on every run; ``split_documents(docs, "test")``
holds every chunk of a play or of none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from dynalora.data.documents import Document
from dynalora.data.readers import hash_fraction

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class SplitFractions:
    """Share of keys in each split; the three must sum to 1."""

    train: float = 0.8
    validation: float = 0.1
    test: float = 0.1

    def __post_init__(self) -> None:
        for split in SPLITS:
            if getattr(self, split) < 0:
                raise ValueError(f"SplitFractions.{split}={getattr(self, split)}: must be >= 0")
        if abs(self.train + self.validation + self.test - 1) > 1e-9:
            raise ValueError(f"SplitFractions: train + validation + test = "
                             f"{self.train + self.validation + self.test}, must be 1")


DEFAULT_FRACTIONS = SplitFractions()


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {', '.join(SPLITS)}")


def split_of(key: str, fractions: SplitFractions = DEFAULT_FRACTIONS) -> str:
    """``"train"``, ``"validation"`` or ``"test"`` for ``key``, from the sha1 of the key."""
    position = hash_fraction(key)
    if position < fractions.train:
        return "train"
    if position < fractions.train + fractions.validation:
        return "validation"
    return "test"


def split_documents(documents: Iterable[Document], split: str,
                    fractions: SplitFractions = DEFAULT_FRACTIONS) -> list[Document]:
    """Documents of ``split``, in their original order; chunks follow their parent (the id before ``#``)."""
    check_split(split)
    return [document for document in documents if split_of(document.parent, fractions) == split]


def split_sizes(documents: Iterable[Document],
                fractions: SplitFractions = DEFAULT_FRACTIONS) -> dict[str, tuple[int, int]]:
    """``{split: (documents, characters)}`` over all three splits."""
    sizes = {split: [0, 0] for split in SPLITS}
    for document in documents:
        size = sizes[split_of(document.parent, fractions)]
        size[0] += 1
        size[1] += len(document.text)
    return {split: (count, chars) for split, (count, chars) in sizes.items()}
