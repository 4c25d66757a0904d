"""The engine on a tiny Llama: exactness vs HF generate, trigger consumption, KV policies, batching, safety."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from dynalora.hyper import FixedSchedule, LoraUpdate, NearestPrototype
from dynalora.lora import DynamicLoraModel, InjectConfig, LoraBank, StateConfig, module_shapes_of
from dynalora.models import tiny_model
from dynalora.runtime import (SHIFT_TOKEN, Engine, EngineConfig, EveryN, GuardConfig, RowSettings,
                              SamplingConfig, SpecialToken, Surprise, TriggerConfig, add_trigger_tokens)


def random_bank(model, count=3, rank=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    bank = LoraBank(module_shapes_of(model))
    for k in range(count):
        factors = {}
        for module in bank.module_shapes:
            if module.endswith(("q_proj", "v_proj", "o_proj")):
                in_features, out_features = bank.module_shapes[module]
                factors[module] = (torch.randn(rank, in_features, generator=generator) * 0.3,
                                   torch.randn(out_features, rank, generator=generator) * 0.3)
        bank.add(f"adapter{k}", factors)
    return bank


def make_engine(hypernetwork=None, policies=None, max_batch=4, device="cpu", dtype=torch.float32, **engine_kwargs):
    model = tiny_model("llama").to(device=device, dtype=dtype)
    ids = add_trigger_tokens(model, None)
    dyn = DynamicLoraModel.attach(model, random_bank(model), InjectConfig(state=StateConfig(max_batch=max_batch)))
    triggers = TriggerConfig(policies if policies is not None else [SpecialToken(ids)], min_gap=1)
    return Engine(dyn, None, hypernetwork, triggers, EngineConfig(**engine_kwargs)), ids


class CountingHypernetwork:
    def __init__(self, blend):
        self.blend, self.calls = torch.tensor(blend), []

    def __call__(self, features, state):
        self.calls.append(features)
        return LoraUpdate(blend=self.blend)


def force_token(token_id, at_steps: dict[int, list[int]]):
    """A logits processor that makes ``token_id`` the argmax for the rows listed per step."""
    def process(step, logits):
        for row in at_steps.get(step, []):
            logits[row, token_id] = logits[row].max() + 10
        return logits
    return process


def recording(seen: dict, token_id, at_steps):
    """``force_token`` that also records the logits it was given at every step."""
    force = force_token(token_id, at_steps)

    def process(step, logits):
        seen[step] = logits.clone()
        return force(step, logits)
    return process


PROMPT = [5, 17, 99, 3, 42, 7]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_trigger_greedy_equals_hf_generate(dtype):
    engine, _ = make_engine(dtype=dtype)
    assert engine.dyn.state.blend_weights.dtype == dtype  # the LoRA state follows the model's dtype
    engine.dyn.state.set_blend(0, [0.5, -0.2, 0.4])
    ours = engine.generate([PROMPT], max_new_tokens=20).token_ids[0]
    reference = engine.model.generate(torch.tensor([PROMPT]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                                      pad_token_id=0)[0, len(PROMPT):].tolist()
    assert ours == reference


class FactorsAndBlend:
    """Answers every call with a new blend and generated factors made on the CPU (as user code would)."""

    def __init__(self, state):
        self.state, self.calls = state, 0

    def __call__(self, features, state):
        self.calls += 1
        generator = torch.Generator(device="cpu").manual_seed(self.calls)
        factors = {module: (torch.randn(2, shape[0], generator=generator, device="cpu") * 0.1,
                            torch.randn(shape[1], 2, generator=generator, device="cpu") * 0.1)
                   for module, shape in list(state.bank.module_shapes.items())[:2]}
        blend = torch.rand(len(state.labels), generator=generator, device="cpu")
        return LoraUpdate(blend=blend, generated=factors)


@pytest.mark.parametrize("kv_policy", ["keep", "recompute_last"])
def test_every_tensor_the_engine_makes_lives_on_the_models_device(kv_policy):
    """With the default device set to ``meta``, any tensor the engine or the teacher-forced scorer made
    without naming the model's device would be a meta tensor and fail at its first use."""
    from dynalora.runtime.teacher_forced import score_stream

    model = tiny_model("llama")
    dyn = DynamicLoraModel.attach(model, random_bank(model), InjectConfig(state=StateConfig(max_batch=2,
                                                                                          generated_rank=2)))
    engine = Engine(dyn, None, FactorsAndBlend(dyn.state), TriggerConfig([EveryN(3)], min_gap=1),
                    EngineConfig(kv_policy=kv_policy, update_delay=1))
    with torch.device("meta"):
        result = engine.generate([PROMPT, PROMPT[:3]], max_new_tokens=8, sampling=SamplingConfig(temperature=1.0,
                                                                                                 seed=1))
        assert [e.kind for e in result.lora_events()].count("shift") == 4, result.lora_events()
        if kv_policy == "keep":
            engine.triggers = TriggerConfig([Surprise(k=0.0, warmup=2)], min_gap=3)
            assert score_stream(engine, PROMPT + result.token_ids[0], 256).events


def test_batched_left_padded_rows_equal_hf_generate_per_row():
    engine, _ = make_engine()
    prompts = [PROMPT, [9, 8, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    result = engine.generate(prompts, max_new_tokens=12)
    for row, prompt in enumerate(prompts):
        with engine.dyn.state.use_rows(row):
            reference = engine.model.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12,
                                              do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        assert result.token_ids[row] == reference, f"row {row}"


def without_triggers(logits: torch.Tensor, ids: dict) -> int:
    """The best ordinary token of ``logits (V,)``: what the engine takes in place of a consumed trigger."""
    masked = logits.clone()
    masked[list(ids.values())] = float("-inf")
    return int(masked.argmax())


def test_a_fired_trigger_is_consumed_and_the_next_token_is_fed_under_the_new_lora():
    """``keep``: the trigger's step takes the best ordinary token of the same logits, and that token is the first
    one fed under the new LoRA (the cached positions keep the old one's view)."""
    hyper = CountingHypernetwork([1.0, 0.0, 0.0])
    engine, ids = make_engine(hyper)
    shift = ids[SHIFT_TOKEN]
    seen_logits = {}
    result = engine.generate([PROMPT], max_new_tokens=6, logits_processor=recording(seen_logits, shift, {3: [0]}))
    tokens = result.token_ids[0]
    assert shift not in tokens and len(tokens) == 6  # the trigger's step still gives a token
    assert len(hyper.calls) == 1 and hyper.calls[0].reason == f"token:{SHIFT_TOKEN}"
    assert [e.kind for e in result.lora_events()] == ["shift"]
    assert tokens[3] == without_triggers(seen_logits[3][0], ids)
    order = [(type(e).__name__, e.position) for e in result.events if hasattr(e, "position")]
    at = result.lora_events("shift")[0].position
    assert order.index(("LoraEvent", at)) == order.index(("TokenEvent", at)) - 1  # the update, then its step's token
    model, state = engine.model, engine.dyn.state
    state.reset()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([PROMPT + tokens[:3]]), cache=cache, use_cache=True)
        state.set_blend(0, [1.0, 0.0, 0.0])
        expected = model(input_ids=torch.tensor([[tokens[3]]]), cache=cache, use_cache=True).logits[0, -1]
    assert torch.allclose(seen_logits[4][0], expected, atol=1e-5)


def test_recompute_all_equals_a_fresh_forward_under_the_new_lora():
    """``recompute_all``: the trigger's step already takes its token from a fresh forward under the new LoRA."""
    engine, ids = make_engine(CountingHypernetwork([0.0, 1.0, 0.5]), kv_policy="recompute_all")
    shift = ids[SHIFT_TOKEN]
    seen = {}
    result = engine.generate([PROMPT], max_new_tokens=5, logits_processor=recording(seen, shift, {2: [0]}))
    assert "recomputed" in result.lora_events("shift")[0].detail
    tokens = result.token_ids[0]
    engine.dyn.state.set_blend(0, [0.0, 1.0, 0.5])
    with torch.no_grad():
        at_trigger = engine.model(input_ids=torch.tensor([PROMPT + tokens[:2]])).logits[0, -1]
        fresh = engine.model(input_ids=torch.tensor([PROMPT + tokens[:3]])).logits[0, -1]
    assert tokens[2] == without_triggers(at_trigger, ids)
    assert torch.allclose(seen[3][0], fresh, atol=1e-5)
    # with `keep` the same step differs: past positions kept the old LoRA's keys and values
    keep_engine, _ = make_engine(CountingHypernetwork([0.0, 1.0, 0.5]))
    keep_seen = {}
    kept = keep_engine.generate([PROMPT], max_new_tokens=5, logits_processor=recording(keep_seen, shift, {2: [0]}))
    with torch.no_grad():
        kept_fresh = engine.model(input_ids=torch.tensor([PROMPT + kept.token_ids[0][:3]])).logits[0, -1]
    assert not torch.allclose(keep_seen[3][0], kept_fresh, atol=1e-4)


def test_recompute_last_matches_manual_partial_recompute():
    engine, ids = make_engine(CountingHypernetwork([0.0, 0.0, 1.0]), kv_policy="recompute_last", recompute_tokens=3)
    shift = ids[SHIFT_TOKEN]
    seen = {}
    result = engine.generate([PROMPT], max_new_tokens=4, logits_processor=recording(seen, shift, {2: [0]}))
    tokens = PROMPT + result.token_ids[0][:2]
    model, state = engine.model, engine.dyn.state
    state.reset()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([tokens[:-3]]), cache=cache, use_cache=True)
        state.set_blend(0, [0.0, 0.0, 1.0])
        at_trigger = model(input_ids=torch.tensor([tokens[-3:]]), cache=cache, use_cache=True).logits[0, -1]
        replaced = result.token_ids[0][2]
        expected = model(input_ids=torch.tensor([[replaced]]), cache=cache, use_cache=True).logits[0, -1]
    assert replaced == without_triggers(at_trigger, ids)
    assert torch.allclose(seen[3][0], expected, atol=1e-5)


def test_rows_trigger_independently_and_match_rows_run_alone():
    def build():
        torch.manual_seed(3)
        return make_engine(NearestPrototype(torch.randn(3, 64), sharpness=5.0))

    engine, ids = build()
    shift = ids[SHIFT_TOKEN]
    prompts = [PROMPT, [11, 12, 13], [200, 201, 202, 203, 204]]
    schedule = {2: [0], 3: [2], 5: [0]}  # row 1 never triggers
    batched = engine.generate(prompts, max_new_tokens=8, logits_processor=force_token(shift, schedule))
    fired = {row: [e.position for e in batched.lora_events("shift") if e.row == row] for row in range(3)}
    assert len(fired[0]) == 2 and len(fired[2]) == 1 and fired[1] == []
    assert not engine.dyn.state.blend_weights[1].any() and engine.dyn.state.blend_weights[0].any()
    for row, prompt in enumerate(prompts):
        alone_engine, _ = build()
        steps = {step: [0] for step, rows in schedule.items() if row in rows}
        alone = alone_engine.generate([prompt], max_new_tokens=8, logits_processor=force_token(shift, steps))
        assert alone.token_ids[0] == batched.token_ids[row], f"row {row}"
        assert torch.allclose(alone_engine.dyn.state.blend_weights[0], engine.dyn.state.blend_weights[row], atol=1e-5)


def test_rate_limits_keep_a_trigger_spamming_model_moving():
    hyper = CountingHypernetwork([0.2, 0.2, 0.2])
    engine, ids = make_engine(hyper)
    engine.triggers = TriggerConfig([SpecialToken(ids)], min_gap=3, max_per_sequence=2)
    always = force_token(ids[SHIFT_TOKEN], {step: [0] for step in range(30)})
    result = engine.generate([PROMPT], max_new_tokens=30, logits_processor=always)
    assert len(hyper.calls) == 2
    assert len(result.lora_events("suppressed")) == 28
    # every trigger, fired or held back, is consumed and the row takes its best ordinary token instead
    assert result.finish_reasons == ["length"] and len(result.token_ids[0]) == 30
    assert not set(result.token_ids[0]) & set(ids.values())


def test_a_trigger_no_policy_fires_on_is_dropped_and_the_row_goes_on_as_if_it_had_not_been_sampled():
    """Held-back trigger tokens never enter the context: forcing them where nothing fires leaves the tokens of an
    unforced run exactly (the replacement is the best ordinary token under the same logits)."""
    hyper = CountingHypernetwork([0.2, 0.2, 0.2])
    engine, ids = make_engine(hyper, policies=[])
    plain = engine.generate([PROMPT], max_new_tokens=10)
    forced = engine.generate([PROMPT], max_new_tokens=10,
                             logits_processor=force_token(ids[SHIFT_TOKEN], {2: [0], 3: [0], 7: [0]}))
    assert forced.token_ids == plain.token_ids and len(forced.token_ids[0]) == 10 and not hyper.calls
    assert len(forced.lora_events("suppressed")) == 3


def test_a_nan_update_is_rejected_and_generation_continues():
    engine, _ = make_engine(lambda features, state: LoraUpdate(blend=torch.tensor([float("nan"), 0.0, 0.0])),
                            policies=[EveryN(3)])
    engine.dyn.state.set_blend(0, [0.1, 0.2, 0.3])
    before = engine.dyn.state.snapshot()
    result = engine.generate([PROMPT], max_new_tokens=10)
    rejected = result.lora_events("rejected")
    assert len(rejected) == 3 and "non-finite" in rejected[0].detail
    assert len(result.token_ids[0]) == 10
    for key, tensor in engine.dyn.state.tensors().items():
        assert torch.equal(tensor, before["tensors"][key])


def test_guard_refuses_oversized_steps_and_raising_hypernetworks():
    engine, _ = make_engine(FixedSchedule([[10.0, 0.0, 0.0]]), policies=[EveryN(2)])
    result = engine.generate([PROMPT], max_new_tokens=4)
    assert {e.kind for e in result.lora_events()} == {"rejected"}
    assert "max_blend_step" in result.lora_events()[0].detail
    engine.config = EngineConfig(guard=GuardConfig(max_blend_step=100.0))
    assert "max_blend_mass" in engine.generate([PROMPT], max_new_tokens=4).lora_events()[0].detail
    model_dim = 64
    huge = {engine.dyn.state.modules[0]: (torch.full((2, model_dim), 3.0), torch.full((model_dim, 2), 3.0))}
    engine.hypernetwork = lambda features, state: LoraUpdate(generated=huge)
    assert "max_module_delta" in engine.generate([PROMPT], max_new_tokens=4).lora_events()[0].detail

    def broken(features, state):
        raise RuntimeError("boom")

    engine.hypernetwork = broken
    result = engine.generate([PROMPT], max_new_tokens=4)
    assert "hypernetwork raised RuntimeError: boom" in result.lora_events()[0].detail
    assert len(result.token_ids[0]) == 4


def test_sampling_is_reproducible_with_a_seed_and_respects_top_k():
    engine, _ = make_engine()
    config = SamplingConfig(temperature=1.0, top_k=5, seed=11)
    first = engine.generate([PROMPT], max_new_tokens=10, sampling=config).token_ids[0]
    assert first == engine.generate([PROMPT], max_new_tokens=10, sampling=config).token_ids[0]
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingConfig(top_p=0)


def test_features_come_from_the_normal_forward_without_an_extra_pass():
    hyper = CountingHypernetwork([0.0, 0.0, 0.0])
    engine, _ = make_engine(hyper, policies=[EveryN(4)])
    calls = []
    handle = engine.model.register_forward_hook(lambda *args: calls.append(1))
    engine.generate([PROMPT], max_new_tokens=8)
    handle.remove()
    assert len(calls) == 8  # one prefill + 7 decode steps; triggers added none
    assert len(hyper.calls) == 2 and hyper.calls[0].pooled_hidden.shape == (64,)


def test_update_delay_applies_the_update_later_with_fresh_features():
    hyper = CountingHypernetwork([0.5, 0.5, 0.0])
    engine, ids = make_engine(hyper, update_delay=3)
    result = engine.generate([PROMPT], max_new_tokens=10, logits_processor=force_token(ids[SHIFT_TOKEN], {2: [0]}))
    shifts = result.lora_events("shift")
    assert len(hyper.calls) == 1 and len(shifts) == 1
    trigger_position = len(PROMPT) + 2
    assert shifts[0].position == trigger_position + 3 and "(+3 tokens)" in shifts[0].reason
    assert hyper.calls[0].position == trigger_position + 3


def test_lowrank_norm_is_exact():
    from dynalora.runtime.guard import lowrank_norm

    a, b = torch.randn(3, 20), torch.randn(30, 3)
    assert abs(lowrank_norm(a, b) - float((b @ a).norm())) < 1e-4


def test_masked_trigger_tokens_are_never_sampled_but_still_observed():
    hyper = CountingHypernetwork([0.3, 0.3, 0.3])
    engine, ids = make_engine(hyper, policies=[], sample_triggers=False)
    from dynalora.runtime import TokenProbability

    engine.triggers = TriggerConfig([TokenProbability(ids[SHIFT_TOKEN], 0.5)], min_gap=100)
    result = engine.generate([PROMPT], max_new_tokens=6, logits_processor=force_token(ids[SHIFT_TOKEN], {2: [0]}))
    assert len(result.token_ids[0]) == 6 and ids[SHIFT_TOKEN] not in result.token_ids[0]
    assert len(hyper.calls) == 1  # p(<|shift|>) passed the threshold at step 2 although it was not sampled


def test_loading_one_trigger_token_keeps_the_others_registered(tmp_path):
    """An escalate checkpoint saves only ``<|think|>``; loading it must not make ``<|shift|>`` an ordinary token."""
    from dynalora.runtime import THINK_TOKEN, TrainedTrigger

    model = tiny_model("llama")
    ids = add_trigger_tokens(model, None)
    folder = TrainedTrigger.from_model(model, {THINK_TOKEN: ids[THINK_TOKEN]}).save_pretrained(tmp_path, "think.st")
    assert TrainedTrigger.from_pretrained(folder / "think.st").install(model, None) == {THINK_TOKEN: ids[THINK_TOKEN]}
    assert model.config.dynalora_trigger_tokens == ids
    assert Engine(DynamicLoraModel.attach(model, random_bank(model), InjectConfig()), None).trigger_token_ids == ids


def test_new_trigger_tokens_start_at_the_mean_row_even_in_spare_embedding_rows():
    """Qwen2 pads its embedding matrix past the vocabulary: a token added into a spare row must not keep that
    row's arbitrary values; a token the tokenizer already had keeps its (trained) row."""
    from dynalora.models import ByteTokenizer

    model, tokenizer = tiny_model("qwen2", vocab_size=300), ByteTokenizer()  # rows 256..299 are spare
    embeddings = model.get_input_embeddings().weight
    mean = embeddings[:256].mean(dim=0).clone()
    ids = add_trigger_tokens(model, tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == 300  # no resize was needed
    for token_id in ids.values():
        assert 256 <= token_id < 300
        torch.testing.assert_close(embeddings[token_id], mean)
    with torch.no_grad():
        embeddings[ids["<|shift|>"]] += 1.0  # as if trained
    trained = embeddings[ids["<|shift|>"]].clone()
    assert add_trigger_tokens(model, tokenizer) == ids
    torch.testing.assert_close(embeddings[ids["<|shift|>"]], trained)


def test_streamed_text_is_the_decode_of_the_tokens_however_a_character_is_cut():
    from dynalora.models import ByteTokenizer
    from dynalora.runtime.detokenize import IncrementalDecoder

    tokenizer = ByteTokenizer()
    ids = tokenizer("héllo wörld, 世界 🙂!")["input_ids"]  # characters of 2, 3 and 4 bytes
    decoder = IncrementalDecoder(tokenizer.decode)
    pieces = [decoder.add(token) for token in ids]
    assert "".join(pieces) == decoder.text == tokenizer.decode(ids)
    assert "\ufffd" not in "".join(pieces) and pieces[ids.index(0xe4)] == ""  # held back mid-character


def test_a_transformers_logits_processor_steers_the_engine_as_it_steers_generate():
    from transformers import LogitsProcessorList, SuppressTokensLogitsProcessor

    engine, _ = make_engine()
    engine.dyn.state.set_blend(0, [0.5, -0.2, 0.4])
    first = engine.generate([PROMPT], max_new_tokens=12).token_ids[0]
    suppress = LogitsProcessorList([SuppressTokensLogitsProcessor(first[:3], device="cpu")])
    ours = engine.generate([PROMPT], max_new_tokens=12, logits_processor=suppress).token_ids[0]
    reference = engine.model.generate(torch.tensor([PROMPT]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                      pad_token_id=0, logits_processor=suppress)[0, len(PROMPT):].tolist()
    assert ours == reference and not set(first[:3]) & set(ours)


def test_the_id_buffers_grow_in_place_past_their_room():
    from dynalora.runtime.decode_batch import DecodeBatch

    batch = DecodeBatch([[5, 6, 7], [8]], pad_id=0, device=torch.device("cpu"), room=2)
    expected_ids = torch.tensor([[5, 6, 7], [0, 0, 8]])
    for step in range(40):
        tokens = torch.tensor([step, 100 + step])
        batch.append(tokens)
        expected_ids = torch.cat([expected_ids, tokens[:, None]], dim=1)
    assert torch.equal(batch.ids, expected_ids)
    assert batch.positions[1].tolist() == [0, 0] + list(range(41)) and batch.row_tokens(1)[:2] == [8, 100]


def test_without_sampling_settings_the_models_generation_config_is_honoured():
    engine, _ = make_engine()
    engine.model.generation_config.do_sample = True
    engine.model.generation_config.temperature = 1.5
    engine.model.generation_config.top_k = 5
    engine.model.generation_config.repetition_penalty = 1.2
    assert SamplingConfig.from_generation_config(engine.model.generation_config) == SamplingConfig(
        temperature=1.5, top_k=5, top_p=1.0, repetition_penalty=1.2)
    greedy = engine.generate([PROMPT], max_new_tokens=12, sampling=SamplingConfig()).token_ids[0]
    torch.manual_seed(0)
    sampled = engine.generate([PROMPT], max_new_tokens=12).token_ids[0]
    assert sampled != greedy


def test_a_merged_row_decodes_as_unmerged_and_comes_out_exactly():
    """merge_row folds row 0's whole LoRA into the weights: the same logits (float rounding apart); a write to the
    state, a batch forward or a stream's end puts the original weights back bit for bit."""
    model = tiny_model("llama")
    dyn = DynamicLoraModel.attach(model, random_bank(model), InjectConfig(state=StateConfig(max_batch=2,
                                                                                          generated_rank=2)))
    original = {name: layer.base_layer.weight.detach().clone() for name, layer in dyn.layers.items()}
    dyn.state.set_blend(0, [0.5, 0.3, 0.2])
    dyn.state.update(0, generated=FactorsAndBlend(dyn.state)(None, dyn.state).generated)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        plain = dyn(input_ids=ids).logits
        plain_both = dyn(input_ids=torch.tensor([PROMPT, PROMPT])).logits
        dyn.merge_row(0)
        assert dyn.state.merged_row == 0 and any(
            not torch.equal(layer.base_layer.weight, original[name]) for name, layer in dyn.layers.items())
        merged = dyn(input_ids=ids).logits
        torch.testing.assert_close(merged, plain, atol=1e-5, rtol=1e-5)
        both = dyn(input_ids=torch.tensor([PROMPT, PROMPT])).logits  # a batch: taken out first, then as usual
        assert dyn.state.merged_row is None and torch.equal(both, plain_both)
        dyn.merge_row(0)
        dyn.state.set_blend(0, [0.0, 1.0, 0.0])  # any write takes it out
    assert dyn.state.merged_row is None
    assert all(torch.equal(layer.base_layer.weight, original[name]) for name, layer in dyn.layers.items())
    engine = Engine(dyn, None, FactorsAndBlend(dyn.state), TriggerConfig([EveryN(3)], min_gap=1),
                    EngineConfig(merge_alone=True))
    dyn.state.reset()
    alone = engine.generate([PROMPT], max_new_tokens=8)  # shifts every 3 tokens: merged, taken out, merged again
    assert all(torch.equal(layer.base_layer.weight, original[name]) for name, layer in dyn.layers.items())
    engine.config, engine.hypernetwork = EngineConfig(), FactorsAndBlend(dyn.state)  # its answers start over
    dyn.state.reset()
    assert engine.generate([PROMPT], max_new_tokens=8).token_ids == alone.token_ids  # the same greedy tokens


def test_rows_that_join_and_leave_a_running_batch_match_rows_run_alone():
    """Continuous batching: rows join between steps (prefilled alone, padded in, their KV cache and captured features
    joined), leave when done (the rest move up, their LoRA rows with them, padding columns trimmed); every row's tokens
    and shifts equal the row run alone — prompt-time and generated triggers, recomputed cache positions included."""
    def build():
        torch.manual_seed(3)
        return make_engine(NearestPrototype(torch.randn(3, 64), sharpness=5.0),
                           policies=[EveryN(4), Surprise(k=0.5, warmup=2)], kv_policy="recompute_last",
                           recompute_tokens=4)

    plan = [(PROMPT, 0, 7), ([11, 12, 13], 2, 3), ([200, 201, 202, 203, 204, 9, 8, 7, 6, 5], 2, 9), ([40, 41], 6, 4)]
    engine, _ = build()
    greedy = SamplingConfig(temperature=0)
    tokens, shifts, running = {i: [] for i in range(len(plan))}, {i: [] for i in range(len(plan))}, []

    def record(events):
        for event in events:
            if event.kind == "token":
                tokens[running[event.row]].append(event.token_id)
            elif event.kind == "shift":
                shifts[running[event.row]].append(event.position)

    engine.start()
    sizes = []
    for step in range(30):
        joining = [i for i, (_, at, _) in enumerate(plan) if at == step]
        if joining:
            running += joining
            record(list(engine.join([plan[i][0] for i in joining], [RowSettings(plan[i][2], greedy) for i in joining])))
        if not running:
            break
        sizes.append(engine.running_rows)
        record(list(engine.step()))
        running = [running[row] for row in engine.leave()]
        if running:
            record(list(engine.advance()))
    assert max(sizes) == 3 and sizes[0] == 1 and step < 29  # rows overlapped, and all of them finished
    assert any(shifts.values())
    for i, (prompt, _, count) in enumerate(plan):
        alone_engine, _ = build()
        alone = alone_engine.generate([prompt], max_new_tokens=count, sampling=greedy)
        assert tokens[i] == alone.token_ids[0], f"row {i}"
        assert shifts[i] == [e.position for e in alone.lora_events("shift")], f"row {i}"


def test_ignore_eos_goes_on_past_end_of_text_to_max_new_tokens():
    engine, _ = make_engine(policies=[])
    eos = min(engine.eos_ids)

    def run(ignore_eos: bool):
        engine.start(logits_processor=force_token(eos, {1: [0]}))  # end-of-text is the argmax at step 1
        events = list(engine.join([PROMPT], [RowSettings(6, SamplingConfig(temperature=0), ignore_eos=ignore_eos)]))
        while not engine.row_finished(0):
            events += engine.step()
            events += engine.advance()
        return [e.token_id for e in events if e.kind == "token"], [e.reason for e in events if e.kind == "finish"]

    assert run(False) == (run(True)[0][:1], ["eos"])
    tokens, finish = run(True)
    assert len(tokens) == 6 and tokens[1] == eos and finish == ["length"]
