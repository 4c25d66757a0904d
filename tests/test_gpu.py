"""The engine's invariants on a CUDA device (skipped on a machine without one; see conftest)."""

from __future__ import annotations

import pytest
import torch

from dynalora.hyper import NearestPrototype
from dynalora.runtime import EngineConfig, EveryN, SamplingConfig
from dynalora.runtime.teacher_forced import score_stream
from test_engine import PROMPT, FactorsAndBlend, make_engine
from test_teacher_forced import shift_engine

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_with_a_blend_equals_hf_generate_on_cuda(dtype):
    engine, _ = make_engine(device="cuda", dtype=dtype)
    assert engine.dyn.state.blend_weights.device.type == "cuda"
    engine.dyn.state.set_blend(0, [0.5, -0.2, 0.4])
    ours = engine.generate([PROMPT], max_new_tokens=20).token_ids[0]
    reference = engine.model.generate(torch.tensor([PROMPT], device="cuda"), max_new_tokens=20, min_new_tokens=20,
                                      do_sample=False, pad_token_id=0)[0, len(PROMPT):].tolist()
    assert ours == reference


def test_batched_rows_equal_rows_run_alone_on_cuda():
    prompts = [PROMPT, [9, 8, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    engine, _ = make_engine(NearestPrototype(torch.randn(3, 64, device="cuda")), policies=[EveryN(4)],
                            device="cuda", kv_policy="recompute_all")
    together = engine.generate(prompts, max_new_tokens=12).token_ids
    for row, prompt in enumerate(prompts):
        engine.dyn.state.reset()
        assert engine.generate([prompt], max_new_tokens=12).token_ids[0] == together[row], f"row {row}"


def test_updates_with_cpu_made_factors_and_seeded_sampling_run_on_cuda():
    engine, _ = make_engine(policies=[EveryN(3)], device="cuda", kv_policy="recompute_last")
    engine.hypernetwork = FactorsAndBlend(engine.dyn.state)
    engine.config = EngineConfig(kv_policy="recompute_last", update_delay=1)
    first = engine.generate([PROMPT], max_new_tokens=10, sampling=SamplingConfig(temperature=1.0, seed=3))
    engine.dyn.state.reset()
    second = engine.generate([PROMPT], max_new_tokens=10, sampling=SamplingConfig(temperature=1.0, seed=3))
    assert [e.kind for e in first.lora_events()].count("shift") == 3
    assert first.token_ids == second.token_ids


def test_teacher_forced_scoring_equals_the_engine_on_cuda():
    engine = shift_engine(3, device="cuda")
    generated = engine.generate([[7]], max_new_tokens=60)
    live = [e for e in generated.lora_events() if e.kind != "suppressed"]
    scored = score_stream(engine, [7] + generated.token_ids[0], 256)
    assert [(e.position, e.reason) for e in scored.events] == [(e.position, e.reason) for e in live]
