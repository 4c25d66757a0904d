"""What the engine streams besides text: tokens, LoRA changes, finished rows."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenEvent:
    row: int
    position: int
    token_id: int
    text: str
    """The text this token adds to the row's visible output (may be empty mid-character)."""
    kind: str = "token"


@dataclass
class LoraEvent:
    kind: str
    """``shift`` (applied), ``identity`` (hypernetwork said no change), ``rejected`` (guard refused it;
    the previous state is kept), ``suppressed`` (a trigger held back by a rate limit), ``route`` (the token router
    moved the row's per-token blend far from the one last reported), ``absorb`` (the
    oldest chunk folded into the memory LoRA and evicted; ``position`` is then the row's kept length)."""
    row: int
    position: int
    reason: str
    seconds: float
    old_blend: list[float] | None
    new_blend: list[float] | None
    detail: str = ""
    level: int | None = None
    """The hypernetwork stack level that answered (``None``: not a stacked hypernetwork, or no call)."""


@dataclass
class FinishEvent:
    row: int
    reason: str
    """``eos``, ``stop`` (a stop string), ``length`` or ``interrupted``."""
    kind: str = "finish"


Event = TokenEvent | LoraEvent | FinishEvent


@dataclass
class GenerationResult:
    texts: list[str]
    token_ids: list[list[int]]
    """Visible generated tokens per row (trigger tokens removed)."""
    events: list[Event] = field(default_factory=list)
    finish_reasons: list[str | None] = field(default_factory=list)

    @classmethod
    def empty(cls, rows: int) -> "GenerationResult":
        return cls(texts=[""] * rows, token_ids=[[] for _ in range(rows)], finish_reasons=[None] * rows)

    def add(self, event: Event) -> None:
        self.events.append(event)
        if isinstance(event, TokenEvent):
            self.texts[event.row] += event.text
            self.token_ids[event.row].append(event.token_id)
        elif isinstance(event, FinishEvent):
            self.finish_reasons[event.row] = event.reason

    def lora_events(self, kind: str | None = None) -> list[LoraEvent]:
        return [e for e in self.events if isinstance(e, LoraEvent) and (kind is None or e.kind == kind)]
