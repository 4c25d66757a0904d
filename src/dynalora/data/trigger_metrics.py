"""How well a trigger finds the domain changes of a stream: firing positions from p(trigger), recall and
false triggers against the segment starts."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def simulate_policy(probs: torch.Tensor, threshold: float, min_gap: int, votes: tuple[int, int] = (1, 1)) -> list[int]:
    """Positions where ``p > threshold`` at ``k`` of the last ``n`` positions (``votes``) fires, honouring
    ``min_gap`` (as :class:`~dynalora.runtime.triggers.TokenProbability` with ``RowTriggers`` fires)."""
    k, n = votes
    above = (probs > threshold).float()  # (L,)
    passed = F.conv1d(above[None, None], above.new_ones(1, 1, n), padding=n - 1)[0, 0, :len(probs)]  # (L,) in last n
    fired, last = [], -10**9
    for t in torch.nonzero(passed >= k).flatten().tolist():
        if t - last >= min_gap:
            fired.append(t)
            last = t
    return fired


def trigger_metrics(fired_per_stream: list[list[int]], starts_per_stream: list[list[int]],
                    lengths: list[int], window: int) -> dict:
    """Boundary recall/precision within ``window`` tokens, mean delay, false triggers per 1k tokens.
    Boundaries are segment starts after the first (the stream start is the initial shift, not scored)."""
    hits, boundaries, delays, false, total_fired = 0, 0, [], 0, 0
    for fired, starts, length in zip(fired_per_stream, starts_per_stream, lengths):
        total_fired += len(fired)
        for start in starts[1:]:
            boundaries += 1
            inside = [t for t in fired if start <= t < start + window]
            if inside:
                hits += 1
                delays.append(inside[0] - start)
        allowed = [(s, s + window) for s in starts]
        false += sum(1 for t in fired if not any(a <= t < b for a, b in allowed))
    tokens = sum(lengths)
    return {"boundary_recall": hits / max(boundaries, 1),
            "precision": (total_fired - false) / max(total_fired, 1),
            "mean_delay": sum(delays) / len(delays) if delays else None,
            "false_per_1k_tokens": 1000 * false / max(tokens, 1), "boundaries": boundaries,
            "fired": total_fired, "tokens": tokens}
