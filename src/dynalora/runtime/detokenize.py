"""Streaming text out of token ids without re-decoding the whole row at every step.

Each new token is decoded together with a few tokens before it (from ``prefix_offset``); the text it adds is
the difference against decoding those few alone, so tokenizers whose pieces change with their neighbours
(SentencePiece's leading spaces, byte-level pieces of one character) come out right. A token that ends inside
a character (``\\ufffd``) adds nothing until the character is complete. Per token the work is a couple of
short decodes: O(L) over a row of L tokens, where decoding the whole row each step was O(L²).
"""

from __future__ import annotations

from typing import Callable


class IncrementalDecoder:
    """Example: ``d = IncrementalDecoder(tokenizer.decode); pieces = [d.add(t) for t in ids]``; then
    ``"".join(pieces) == d.text == tokenizer.decode(ids)``."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.tokens: list[int] = []
        self.text = ""
        self.prefix_offset = 0  # start of the tokens decoded again for context
        self.read_offset = 0  # tokens before it are in ``text``

    def add(self, token: int) -> str:
        """The text ``token`` adds (possibly empty while a character is incomplete)."""
        self.tokens.append(token)
        before = self.decode(self.tokens[self.prefix_offset:self.read_offset])
        after = self.decode(self.tokens[self.prefix_offset:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        piece = after[len(before):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        self.text += piece
        return piece
