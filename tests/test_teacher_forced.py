"""One update path: a stream the engine generated, scored teacher-forced, gives the same events and blends."""

from __future__ import annotations

import pytest
import torch

from dynalora.hyper import NearestPrototype
from dynalora.runtime import SHIFT_TOKEN, TokenProbability, TriggerConfig
from dynalora.runtime.triggers import PromptEnd
from dynalora.runtime.teacher_forced import score_stream
from test_engine import make_engine, recording

VOCAB = 256  # the tiny model's ordinary tokens; the trigger tokens sit above


def shift_engine(update_delay: int, device: str = "cpu"):
    """A tiny engine whose ``<|shift|>`` probability swings between ~0 and ~1 (a random head row), fired at
    p > 0.1 with a soft nearest-prototype hypernetwork: every update moves the blend somewhere new."""
    hyper = NearestPrototype(torch.randn(3, 64, generator=torch.Generator().manual_seed(0)), sharpness=5.0)
    engine, ids = make_engine(hyper, policies=[], sample_triggers=False, update_delay=update_delay, pool_window=4,
                              device=device)
    with torch.no_grad():
        engine.model.get_output_embeddings().weight[ids[SHIFT_TOKEN]] = \
            torch.randn(64, generator=torch.Generator().manual_seed(1)).to(device) * 2
    engine.triggers = TriggerConfig([TokenProbability(ids[SHIFT_TOKEN], 0.1, SHIFT_TOKEN)], min_gap=6)
    return engine


@pytest.mark.parametrize("update_delay", [0, 3])
def test_teacher_forced_scoring_of_a_generated_stream_gives_the_engines_events_blends_and_logits(update_delay):
    engine = shift_engine(update_delay)
    seen = {}
    generated = engine.generate([[7]], max_new_tokens=60, logits_processor=recording(seen, 0, {}))
    tokens = [7] + generated.token_ids[0]
    live = [e for e in generated.lora_events() if e.kind != "suppressed"]
    assert len(live) >= 4 and all(e.kind == "shift" for e in live)
    live_blend = engine.dyn.state.blend_weights[0].clone()

    scored = score_stream(engine, tokens, VOCAB)
    assert [(e.kind, e.position, e.reason) for e in scored.events] == [(e.kind, e.position, e.reason) for e in live]
    for ours, theirs in zip(scored.events, live):
        torch.testing.assert_close(torch.tensor(ours.new_blend), torch.tensor(theirs.new_blend))
    torch.testing.assert_close(engine.dyn.state.blend_weights[0], live_blend)
    # the engine's logits at step s predicted token s+1: the same LoRA was in force at every position
    live_nll = torch.stack([-torch.log_softmax(seen[s][0, :VOCAB], -1)[tokens[s + 1]] for s in range(len(tokens) - 1)])
    torch.testing.assert_close(scored.nll, live_nll, atol=1e-4, rtol=1e-4)
    assert len(scored.blends) == len(tokens)
    for event in scored.events:  # the blend an update writes is in force from the token after it lands
        assert scored.blends[event.position] == event.new_blend
        assert scored.blends[event.position - 1] == event.old_blend
    assert len(scored.fired) in (len(live), len(live) + 1)  # a last firing may fall due after the stream ends


@pytest.mark.parametrize("update_delay", [0, 3])
def test_a_prompt_firing_lands_where_the_engine_puts_it(update_delay):
    """The ``prompt`` policy fires once at the prompt's last token, and the engine applies its update before the first
    generated token is read, with the prompt's features; ``score_stream(prompt_tokens=)`` reads the same stream's
    first tokens as that prompt and gives the same events, blends and NLL."""
    engine = shift_engine(update_delay)
    engine.triggers = TriggerConfig([PromptEnd(), *engine.triggers.policies], min_gap=6)
    prompt = [7, 8, 9, 10, 11, 12, 13]
    seen = {}
    generated = engine.generate([prompt], max_new_tokens=40, logits_processor=recording(seen, 0, {}))
    live = [e for e in generated.lora_events() if e.kind != "suppressed"]
    assert live[0].reason.startswith("prompt: ") and live[0].position < len(prompt) and len(live) >= 2
    alone = shift_engine(update_delay)
    alone.triggers = TriggerConfig([PromptEnd()])
    events = alone.generate([prompt], max_new_tokens=8).lora_events()
    assert [(e.reason, e.position) for e in events] == [("prompt: prompt end", len(prompt) - 1)]
    tokens = prompt + generated.token_ids[0]
    scored = score_stream(engine, tokens, VOCAB, prompt_tokens=len(prompt))
    assert [(e.kind, e.reason) for e in scored.events] == [(e.kind, e.reason) for e in live]
    for ours, theirs in zip(scored.events, live):
        torch.testing.assert_close(torch.tensor(ours.new_blend), torch.tensor(theirs.new_blend))
    offset = len(prompt) - 1  # the engine's step s predicted token offset+s+1
    live_nll = torch.stack([-torch.log_softmax(seen[s][0, :VOCAB], -1)[tokens[offset + s + 1]]
                            for s in range(len(tokens) - 1 - offset)])
    torch.testing.assert_close(scored.nll[offset:], live_nll, atol=1e-4, rtol=1e-4)


def test_teacher_forced_scoring_refuses_a_recomputing_engine():
    engine = shift_engine(0)
    engine.config.kv_policy = "recompute_all"
    with pytest.raises(ValueError, match="keep KV policy"):
        score_stream(engine, [5, 6, 7], VOCAB)
