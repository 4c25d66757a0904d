"""Split long texts into chunks of a few thousand characters at natural boundaries.

A chunk never exceeds ``max_chars``. Cuts fall at the coarsest boundary that works: blank lines, then
line ends, then sentence ends, then spaces, and only as a last resort inside a word. A text of ``n``
characters is cut into about ``ceil(n / max_chars)`` chunks of similar length (so a 4,100-character
text gives two chunks of ~2,050, not 4,000 + 100); a chunk shorter than ``min_chars`` is joined to a
neighbour, or the pair is re-cut near its middle. An optional ``boundary`` pattern (a scene heading,
a top-level ``def``) starts a new chunk once the current one holds at least ``min_chars``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# Coarsest first: paragraph breaks, line breaks, sentence ends, any whitespace.
_SEPARATORS = tuple(re.compile(pattern) for pattern in
                    (r"\n[ \t]*\n\s*", r"\n", r"(?<=[.!?;:])[ \t]+", r"[ \t]+"))


@dataclass(frozen=True)
class ChunkConfig:
    """How documents are cut into chunks (all lengths in characters)."""

    max_chars: int = 4000
    """Hard upper bound on a chunk's length."""
    min_chars: int = 2000
    """Shortest chunk a long text is cut into (short ones join a neighbour or share its text); a
    ``boundary`` match starts a new chunk only once the current chunk is at least this long."""

    def __post_init__(self) -> None:
        if self.max_chars < 1:
            raise ValueError(f"ChunkConfig.max_chars={self.max_chars}: must be >= 1")
        if not 0 <= self.min_chars <= self.max_chars:
            raise ValueError(f"ChunkConfig.min_chars={self.min_chars}: must lie in [0, max_chars={self.max_chars}]")


def _pieces(text: str, start: int, end: int, level: int, max_chars: int) -> list[tuple[int, int]]:
    """Spans tiling ``text[start:end]``, each at most ``max_chars``, cut at the coarsest separator possible."""
    if end - start <= max_chars:
        return [(start, end)]
    if level == len(_SEPARATORS):
        return [(cut, min(cut + max_chars, end)) for cut in range(start, end, max_chars)]
    cuts = [match.end() for match in _SEPARATORS[level].finditer(text, start, end) if start < match.end() < end]
    bounds = [start, *cuts, end]
    spans: list[tuple[int, int]] = []
    for left, right in zip(bounds, bounds[1:]):
        spans.extend(_pieces(text, left, right, level + 1, max_chars))
    return spans


def _best_cut(text: str, start: int, end: int, max_chars: int) -> int:
    """Where to cut ``text[start:end]`` in two: both sides <= ``max_chars`` and >= a quarter of the span,
    at the coarsest separator that allows it, nearest the middle."""
    middle, shortest = (start + end) / 2, (end - start) // 4
    for separator in _SEPARATORS:
        cuts = [match.end() for match in separator.finditer(text, start, end)
                if shortest <= match.end() - start <= max_chars and shortest <= end - match.end() <= max_chars]
        if cuts:
            return min(cuts, key=lambda cut: abs(cut - middle))
    return round(middle)


def _merge_short(text: str, spans: list[tuple[int, int]], config: ChunkConfig) -> list[tuple[int, int]]:
    """Join each chunk shorter than ``min_chars`` to a neighbour, or re-cut the pair into two halves."""
    spans = list(spans)
    index = 0
    while index < len(spans) and len(spans) > 1:
        start, end = spans[index]
        if end - start >= config.min_chars:
            index += 1
            continue
        # Pair with the shorter neighbour (the previous one on ties: tails join what came before).
        previous_length = spans[index - 1][1] - spans[index - 1][0] if index > 0 else None
        next_length = spans[index + 1][1] - spans[index + 1][0] if index + 1 < len(spans) else None
        use_previous = next_length is None or (previous_length is not None and previous_length <= next_length)
        left = index - 1 if use_previous else index
        pair_start, pair_end = spans[left][0], spans[left + 1][1]
        if pair_end - pair_start <= config.max_chars:
            spans[left:left + 2] = [(pair_start, pair_end)]
            index = left  # the joined chunk may still be short: look at it again
        else:
            cut = _best_cut(text, pair_start, pair_end, config.max_chars)
            spans[left:left + 2] = [(pair_start, cut), (cut, pair_end)]
            index = left + 2
    return spans


def chunk_spans(text: str, config: ChunkConfig = ChunkConfig(),
                boundary: re.Pattern[str] | None = None) -> list[tuple[int, int]]:
    """``(start, end)`` offsets that tile ``text`` exactly (no gaps, no overlap), each <= ``max_chars`` long."""
    if not text:
        return []
    pieces = _pieces(text, 0, len(text), 0, config.max_chars)
    # Aim for equal chunks: stop filling a chunk once it reaches the target, never pass max_chars.
    target_chars = math.ceil(len(text) / math.ceil(len(text) / config.max_chars))
    spans: list[tuple[int, int]] = []
    chunk_start = chunk_end = 0
    for piece_start, piece_end in pieces:
        current = chunk_end - chunk_start
        starts_section = boundary is not None and current >= config.min_chars and boundary.match(text, piece_start)
        if current and (current + piece_end - piece_start > config.max_chars or current >= target_chars
                        or starts_section):
            spans.append((chunk_start, chunk_end))
            chunk_start = piece_start
        chunk_end = piece_end
    spans.append((chunk_start, chunk_end))
    return _merge_short(text, spans, config)


def chunk_text(text: str, config: ChunkConfig = ChunkConfig(), boundary: re.Pattern[str] | None = None) -> list[str]:
    """Chunks of ``text`` with surrounding blank lines removed; whitespace-only chunks are dropped.

    Example: ``chunk_text("a\\n\\nb", ChunkConfig(max_chars=2, min_chars=0)) == ["a", "b"]``.
    """
    chunks = (text[start:end].strip("\n") for start, end in chunk_spans(text, config, boundary))
    return [chunk.rstrip() for chunk in chunks if chunk.strip()]
