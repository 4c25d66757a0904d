"""Next-token choice: greedy, temperature, top-k, top-p, repetition penalty (HF semantics)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingConfig:
    """How the next token is picked. ``temperature=0`` (default) is greedy."""

    temperature: float = 0.0
    """0 = greedy; otherwise logits are divided by it before sampling."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = all)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability sums to at least p (1 = all)."""
    repetition_penalty: float = 1.0
    """>1 discourages tokens already in the row (prompt included), as in HF transformers."""
    seed: int | None = None
    """Seed of the sampling generator (None: torch's global generator)."""

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"SamplingConfig.temperature must be ≥ 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k must be ≥ 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"SamplingConfig.repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_generation_config(cls, generation_config) -> "SamplingConfig":
        """The model's own defaults (``model.generation_config``): greedy unless it sets ``do_sample``."""
        if generation_config is None:
            return cls()
        get = lambda name, default: getattr(generation_config, name, None) or default  # noqa: E731
        penalty = get("repetition_penalty", 1.0)
        if not getattr(generation_config, "do_sample", False):
            return cls(repetition_penalty=penalty)
        return cls(temperature=get("temperature", 1.0), top_k=get("top_k", 0), top_p=get("top_p", 1.0),
                   repetition_penalty=penalty)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """``logits (B, V)``, ``seen (B, V)`` bool: tokens already in each row."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Temperature, top-k and top-p on ``logits (B, V)``; removed tokens get -inf."""
    logits = logits / config.temperature
    if config.top_k:
        kth = torch.topk(logits, min(config.top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)  # (B, V)
        remove_sorted = cumulative - sorted_logits.softmax(-1) >= config.top_p  # keep the token that crosses p
        remove = remove_sorted.scatter(1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def choose_next(logits: torch.Tensor, seen: torch.Tensor, config: SamplingConfig,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row: ``logits (B, V)`` → ``(B,)``."""
    logits = apply_repetition_penalty(logits.float(), seen, config.repetition_penalty)
    if config.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, config).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
