"""When a row's LoRA should change: trigger policies, composable and rate-limited, one copy per row.

A policy looks at one :class:`StepObservation` at a time (a sampled token, or with ``wants_prompt``
each prompt position during prefill) and answers the reason it fires, or ``None``.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from dataclasses import dataclass, field


@dataclass
class StepObservation:
    position: int
    """Index in the row's sequence of the observed token."""
    token_id: int
    token_nll: float
    """-log p(token) under the model at this step (nats)."""
    trigger_probs: dict[int, float]
    """p(trigger token) at this step, for every trigger token id."""
    context_length: int
    """Tokens currently in the row's window (KV cache)."""
    in_prompt: bool = False
    prompt_end: bool = False
    """The prompt's last token: the next one is generated."""


class TriggerPolicy:
    wants_prompt = False
    """True if the policy also looks at prompt positions (costs a softmax over the prompt)."""

    def observe(self, obs: StepObservation) -> str | None:
        raise NotImplementedError

    def reset(self) -> None:
        pass


class SpecialToken(TriggerPolicy):
    """Fires when the row samples one of ``token_ids`` (the trigger tokens)."""

    def __init__(self, token_ids: dict[str, int]):
        self.names = {token_id: name for name, token_id in token_ids.items()}

    def observe(self, obs):
        if not obs.in_prompt and obs.token_id in self.names:
            return f"token:{self.names[obs.token_id]}"
        return None


def check_votes(votes: tuple[int, int]) -> tuple[int, int]:
    """``(k, n)`` with ``1 ≤ k ≤ n``, or a ValueError naming it."""
    k, n = votes
    if not 1 <= k <= n:
        raise ValueError(f"trigger votes {k}/{n}: need 1 ≤ k ≤ n (fire when k of the last n positions pass)")
    return int(k), int(n)


def parse_votes(text: str) -> tuple[int, int]:
    """``"3/4"`` → ``(3, 4)``."""
    k, slash, n = text.partition("/")
    if not slash or not k.isdigit() or not n.isdigit():
        raise ValueError(f"trigger votes {text!r}: expected K/N, e.g. 3/4")
    return check_votes((int(k), int(n)))


class TokenProbability(TriggerPolicy):
    """Fires when p(trigger token) passes ``threshold`` at ``k`` of the last ``n`` observed positions (``votes``; the
    prompt included): ``(1, 1)`` fires on one position, ``(3, 4)`` ignores a lone spike."""

    wants_prompt = True

    def __init__(self, token_id: int, threshold: float = 0.2, name: str = "trigger",
                 votes: tuple[int, int] = (1, 1)):
        if not 0 < threshold <= 1:
            raise ValueError(f"TokenProbability.threshold must be in (0, 1], got {threshold}")
        self.token_id, self.threshold, self.name = token_id, threshold, name
        self.votes = check_votes(votes)
        self.recent: deque[bool] = deque(maxlen=self.votes[1])

    def reset(self):
        self.recent.clear()

    def observe(self, obs):
        p = obs.trigger_probs.get(self.token_id, 0.0)
        self.recent.append(p >= self.threshold)
        k, n = self.votes
        if sum(self.recent) < k:
            return None
        return f"p({self.name})={p:.2f}" + (f" ({k} of the last {n})" if n > 1 else "")


class PromptEnd(TriggerPolicy):
    """Fires once, at the prompt's last token: the update reads the whole prompt before anything is generated (the
    first blend of a conversation, chosen from what the user wrote; later shifts are the trigger's)."""

    wants_prompt = True

    def observe(self, obs):
        return "prompt end" if obs.prompt_end else None


class Surprise(TriggerPolicy):
    """Fires when a token's NLL exceeds its running mean by ``k`` standard deviations.

    Statistics are exponential moving averages (``decay``) after ``warmup`` tokens; a token that
    fires is not folded into them, so one domain change does not mask the next."""

    wants_prompt = True

    def __init__(self, k: float = 3.0, warmup: int = 16, decay: float = 0.98):
        self.k, self.warmup, self.decay = k, warmup, decay
        self.reset()

    def reset(self):
        self.count, self.mean, self.var = 0, 0.0, 0.0

    def observe(self, obs):
        x = obs.token_nll
        if not math.isfinite(x):
            return None
        if self.count >= self.warmup:
            std = math.sqrt(max(self.var, 1e-6))
            if x > self.mean + self.k * std:
                return f"surprise nll={x:.2f}>{self.mean:.2f}+{self.k}σ"
        self.count += 1
        if self.count == 1:
            self.mean = x
        else:
            weight = max(1.0 - self.decay, 1.0 / self.count)
            delta = x - self.mean
            self.mean += weight * delta
            self.var = (1 - weight) * (self.var + weight * delta * delta)
        return None


class WindowPressure(TriggerPolicy):
    """Fires when the row's window holds at least ``budget`` tokens (absorb uses this)."""

    def __init__(self, budget: int):
        if budget < 1:
            raise ValueError(f"WindowPressure.budget must be ≥ 1, got {budget}")
        self.budget = budget

    def observe(self, obs):
        return f"window {obs.context_length}/{self.budget}" if obs.context_length >= self.budget else None


class EveryN(TriggerPolicy):
    """Fires every ``n`` generated tokens: a schedule, the baseline for learned triggers."""

    def __init__(self, n: int):
        if n < 1:
            raise ValueError(f"EveryN.n must be ≥ 1, got {n}")
        self.n = n
        self.reset()

    def reset(self):
        self.seen = 0

    def observe(self, obs):
        if obs.in_prompt:
            return None
        self.seen += 1
        return f"every {self.n}" if self.seen % self.n == 0 else None


@dataclass
class TriggerConfig:
    """Policies (any of them may fire) and the rate limits that keep a trigger-happy model moving."""

    policies: list[TriggerPolicy] = field(default_factory=list)
    min_gap: int = 4
    """At least this many tokens between two firings of a row."""
    max_per_sequence: int = 64
    """At most this many firings per row and generation."""

    def __post_init__(self):
        if self.min_gap < 0 or self.max_per_sequence < 0:
            raise ValueError("TriggerConfig.min_gap and max_per_sequence must be ≥ 0")


class RowTriggers:
    """One row's copy of the policies plus its rate-limit bookkeeping."""

    def __init__(self, config: TriggerConfig):
        self.config = config
        self.policies = copy.deepcopy(config.policies)
        self.fired = 0
        self.last_fired = -10**9

    @property
    def wants_prompt(self) -> bool:
        return any(p.wants_prompt for p in self.policies)

    def observe(self, obs: StepObservation) -> tuple[str | None, str | None]:
        """``(reason, None)`` if the row should update, ``(None, why_not)`` if a policy fired but a rate
        limit held it back, ``(None, None)`` otherwise. Every policy sees every observation."""
        reasons = [r for p in self.policies if (not obs.in_prompt or p.wants_prompt) and (r := p.observe(obs))]
        if not reasons:
            return None, None
        reason = "; ".join(reasons)
        if self.fired >= self.config.max_per_sequence:
            return None, f"{reason} (suppressed: max_per_sequence={self.config.max_per_sequence})"
        if obs.position - self.last_fired < self.config.min_gap:
            return None, f"{reason} (suppressed: min_gap={self.config.min_gap})"
        self.fired += 1
        self.last_fired = obs.position
        return reason, None


class DelayedUpdate:
    """One row's update that waits ``delay`` tokens after its trigger (``EngineConfig.update_delay``).

    Fed each step's firing reason (or ``None``), answers the reason whose update is due at this step: at
    once without a delay, else ``delay`` steps later; a new firing while one waits restarts the wait."""

    def __init__(self, delay: int):
        self.delay = delay
        self.waiting: tuple[int, str] | None = None  # (steps left, reason)

    def due(self, reason: str | None) -> str | None:
        if reason is not None:
            if not self.delay:
                return reason
            self.waiting = (self.delay, reason)
            return None
        if self.waiting is None:
            return None
        left, waiting_reason = self.waiting
        if left > 1:
            self.waiting = (left - 1, waiting_reason)
            return None
        self.waiting = None
        return f"{waiting_reason} (+{self.delay} tokens)"
