"""The escalation stack scored as the evaluations and its recipe use it: level 1's answer as a LoRA, continuation
NLL under each depth, the LM-head statistics a think row is fitted on, and the examples they read."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dynalora.hyper.shift_net import gated_answer, row_factors
from dynalora.runtime.features import lm_head_inputs


def level1_lora(out: dict, use_factors: bool) -> tuple[torch.Tensor, dict]:
    """Level 1's answer against a zero current blend, as :class:`ShiftHypernetwork` applies it:
    ``blend (N, K)`` and row factors ``{module: (A_t (N, in, r), B_t (N, r, out))}`` (empty without factors)."""
    blend, factors = gated_answer(out)
    return blend, row_factors(factors) if use_factors else {}


def continuation_nll(dyn, stack, features: torch.Tensor, continuations: torch.Tensor, depth: int | None,
                     use_factors: bool, vocab_size: int) -> torch.Tensor:
    """Per-example NLL ``(N,)`` (nats/token, over the first ``vocab_size`` tokens: the original vocabulary) of
    ``continuations (N, T)`` under the LoRA the stack writes at ``depth`` from ``features (N, H)``;
    ``depth=None``: the base model (zero LoRA)."""
    if depth is None:
        logits = dyn(input_ids=continuations, use_cache=False).logits[:, :-1, :vocab_size]  # (N, T-1, V)
    else:
        blend, factors = level1_lora(stack(features, depth, with_factors=use_factors), use_factors)
        with dyn.state.functional(dyn.state.expand_blend(blend), factors):
            logits = dyn(input_ids=continuations, use_cache=False).logits[:, :-1, :vocab_size]  # (N, T-1, V)
    return F.cross_entropy(logits.transpose(1, 2).float(), continuations[:, 1:], reduction="none").mean(-1)


@torch.no_grad()
def last_hidden_and_log_z(model, contexts: torch.Tensor, vocab_size: int, batch_size: int = 16):
    """At each context's last token (zero LoRA): the final hidden state ``(N, H)`` the LM head reads and
    ``log Z (N,)`` over the original vocabulary — what ``p(<|think|>) = σ(h·e − log Z)`` needs."""
    log_z = []
    with lm_head_inputs(model) as captured:
        for start in range(0, len(contexts), batch_size):
            logits = model(input_ids=contexts[start:start + batch_size], use_cache=False, logits_to_keep=1).logits
            log_z.append(torch.logsumexp(logits[:, -1, :vocab_size].float(), dim=-1))
    hidden = [h[:, -1] for h in captured]  # (B, H) per batch: the last position
    return torch.cat(hidden).float(), torch.cat(log_z)


@torch.no_grad()
def nll_table(dyn, stack, features, continuations, level2_factors: bool, vocab_size: int,
              batch_size: int = 16, names: tuple[str, ...] = ("base", "level1", "level2")) -> dict:
    """``{name: per-example continuation NLL (N,)}`` for ``names`` among base, level1 and level2."""
    settings = {"base": (None, False), "level1": (1, False), "level2": (2, level2_factors)}
    table = {}
    for name in names:
        depth, use_factors = settings[name]
        table[name] = torch.cat([continuation_nll(dyn, stack, features[i:i + batch_size],
                                                  continuations[i:i + batch_size], depth, use_factors, vocab_size)
                                 for i in tqdm(range(0, len(features), batch_size), desc=f"nll {name}",
                                               leave=False)])
    return table


def escalate_examples(system, config, split: str, per_domain: int, seed: int):
    """``(features (N, H), continuations (N, Ty), contexts (N, Tc))`` from the library domains' ``split``:
    the state vector pooled as level 1 was trained to read it (``train shift``)."""
    from dynalora.data.batches import build_examples
    from dynalora.models import model_device
    from dynalora.runtime.features import HiddenCapture
    from dynalora.runtime.features import pooled_features

    contexts, continuations, _ = build_examples(system.base.tokenizer, system.adapters, config, split, per_domain, seed)
    device = model_device(system.base.model)
    contexts, continuations = contexts.to(device), continuations.to(device)  # (N, Tc), (N, Ty)
    capture = HiddenCapture(system.base.model, system.net.config.feature_layer, system.net.config.pool_window)
    try:
        return pooled_features(system.dyn, capture, contexts), continuations, contexts
    finally:
        capture.remove()
