"""The engine's triggers and updates on a given token stream: teacher-forced scoring for evaluations.

:func:`score_stream` feeds a stream to an :class:`Engine`'s model as if the engine had generated it: the
same trigger policies see the same observations, the same delayed updates land at the same positions
through the same :func:`apply_update`, with the same pooled features. The stream runs in chunks with the
KV cache kept (the engine's ``keep`` policy): a forward of the rest of the stream, the first update that
falls due, the cache cropped there, the update applied, the next chunk from there under the new LoRA.
Generating a stream greedily with the engine and scoring it here give the same events and blends (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from dynalora.hyper.protocol import TriggerFeatures
from dynalora.runtime.engine import Engine
from dynalora.runtime.events import LoraEvent
from dynalora.runtime.triggers import DelayedUpdate, RowTriggers, StepObservation
from dynalora.runtime.update import apply_update


@dataclass
class StreamScore:
    nll: torch.Tensor
    """(L-1,) NLL of tokens 1..L-1 over the first ``vocab_size`` logits (trigger tokens left out)."""
    events: list[LoraEvent]
    """Every update the engine would have run (``shift``, ``identity``, ``rejected``), at the position of the
    token after which it lands."""
    fired: list[int]
    """Where each trigger fired: the last token read when it did (the update lands ``update_delay`` later)."""
    blends: list[list[float]]
    """(L, K) the blend in force when predicting each token after the first (``blends[t]`` predicts t+1)."""


@torch.no_grad()
def score_stream(engine: Engine, tokens: list[int], vocab_size: int, row: int = 0, prompt_tokens: int = 0
                 ) -> StreamScore:
    """Teacher-force ``tokens`` through ``engine``'s model on LoRA row ``row`` (reset first). The first
    ``prompt_tokens`` are the prompt, as the engine reads one: policies that look at prompts see them, and an update
    fired there lands at once after the prompt's last token, read with the prompt's features."""
    if engine.config.kv_policy != "keep":
        raise ValueError(f"score_stream runs the keep KV policy; the engine has kv_policy={engine.config.kv_policy!r}")
    if len(tokens) < 2:
        raise ValueError(f"score_stream needs at least 2 tokens, got {len(tokens)}")
    state, capture, pool_window = engine.dyn.state, engine.capture, engine.config.pool_window
    trigger_ids = list(engine.trigger_token_ids.values())
    triggers, delayed = RowTriggers(engine.triggers), DelayedUpdate(engine.config.update_delay)
    state.reset(row)
    cache = DynamicCache(config=engine.model.config)
    recent = None  # (≤W, H) feature-layer states of the last fed positions, across chunks
    log_probs, blends, events, fired = [], [], [], []
    held = None  # a prompt firing: its update lands when the prompt has been read
    start, saved_window = 0, capture.window
    try:
        while start < len(tokens) - 1:
            capture.reset()
            capture.window = len(tokens)
            with state.use_rows(row):
                logits = engine.model(input_ids=torch.tensor([tokens[start:]], device=engine.device), cache=cache,
                                      use_cache=True).logits[0].float()  # (T, V): logits[i] predicts start+i+1
            hidden = capture.recent[0]  # (T, H)
            full = torch.log_softmax(logits, dim=-1)  # trigger tokens included, as the engine observes them
            dues, last = [], len(tokens) - 1 - start  # logits rows used: 0..last-1
            for i in range(last):
                position = start + i + 1  # the token this row of logits predicts
                token = tokens[position]
                in_prompt = position < prompt_tokens
                if in_prompt and (held or not triggers.wants_prompt):  # the engine reads a prompt to its first firing
                    continue
                reason, _ = triggers.observe(StepObservation(
                    position=position, token_id=token, token_nll=-float(full[i, token]),
                    trigger_probs={t: float(full[i, t].exp()) for t in trigger_ids}, context_length=position + 1,
                    in_prompt=in_prompt, prompt_end=position == prompt_tokens - 1))
                if reason:
                    fired.append(position - 1)
                if in_prompt:
                    held = held or (reason and f"prompt: {reason}")
                    continue
                # a prompt's update lands first (the engine applies it when the prompt has been read), then this one
                dues, held = [due for due in (held, delayed.due(reason)) if due], None
                if dues:
                    last = i + 1
                    break
            log_probs.append(torch.log_softmax(logits[:last, :vocab_size], dim=-1))
            blends.extend([state.blend_weights[row].tolist()] * last)
            fed = hidden[:last] if recent is None else torch.cat([recent, hidden[:last]])  # (·, H)
            recent = fed[-pool_window:]
            if not dues:
                break
            position = start + last  # the token just read under the old LoRA; the new one starts after it
            cache.crop(position - cache.get_seq_length())  # a negative count: drop what follows
            for due in dues:
                features = TriggerFeatures(row, position, due, trigger_hidden=recent[-1],
                                           pooled_hidden=recent.mean(0), token_ids=tokens[:position + 1])
                events.append(apply_update(state, engine.hypernetwork, features, engine.config.guard))
            start = position
    finally:
        capture.window = saved_window
        capture.reset()
    blends.append(state.blend_weights[row].tolist())  # in force after the last token
    log_probs = torch.cat(log_probs)  # (L-1, V)
    nll = -log_probs.gather(1, torch.tensor(tokens[1:], device=log_probs.device)[:, None])[:, 0]
    return StreamScore(nll, events, fired, blends)


def schedule_chunks(dyn, schedule: list[tuple[int, list[float] | None]], length: int):
    """Walk a LoRA schedule ``[(start, blend or None), ...]`` over a stream of ``length`` tokens: yields
    ``(start, stop)`` of each non-empty span with row 0 of the state set to its blend (zero for None);
    the state is reset when the walk ends."""
    bounds = [s for s, _ in schedule] + [length]
    try:
        for (start, blend), stop in zip(schedule, bounds[1:]):
            if stop <= start:
                continue
            dyn.state.reset(0)
            if blend is not None:
                dyn.state.set_blend(0, blend)
            yield start, stop
    finally:
        dyn.state.reset(0)
