"""Every benchmark runs end to end on a tiny model with the smallest settings and writes its JSON: the numbers are
meaningless here (and never asserted), but a refactor that breaks a benchmark fails here, not in a release."""

from __future__ import annotations

import json
import math

from dynalora.bench.absorb import AbsorbBenchConfig, run_absorb_bench
from dynalora.bench.engine import EngineBenchConfig, run_engine_bench
from dynalora.bench.layer import LayerBenchConfig, run_layer_bench
from dynalora.bench.switch import SwitchBenchConfig, run_switch_bench


def check_written(result: dict, out, methods: set[str], ratios: set[str]) -> None:
    """The JSON on disk is the result, every method was measured, every ratio is a positive number."""
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert methods <= set(result["methods"]), sorted(result["methods"])
    assert ratios <= set(result["ratios"]), sorted(result["ratios"])
    assert all(math.isfinite(value) and value > 0 for value in result["ratios"].values()), result["ratios"]


def test_bench_engine_times_decoding_and_each_kv_policy(tmp_path):
    result = run_engine_bench(EngineBenchConfig(model="tiny:llama", new_tokens=4, repeats=1, batch=2, adapters=2,
                                                rank=2, context=32, trigger_repeats=1, threads=1), tmp_path / "e.json")
    check_written(result, tmp_path / "e.json",
                  {"decode_b1_engine", "decode_b1_hf_generate", "trigger_keep_at_32", "trigger_recompute_all_at_32"},
                  {"engine_vs_hf_decode_b1", "trigger_cost_in_decode_steps", "routed_vs_blend_decode_b1",
                   "routed_vs_blend_decode_b8"})


def test_bench_switch_times_dynalora_against_peft(tmp_path):
    result = run_switch_bench(SwitchBenchConfig(model="tiny:llama", adapters=2, rank=2, repeats=1, switch_repeats=2,
                                                decode_tokens=2, prompt_tokens=4, batch=2, skip_svd=True,
                                                threads=1), tmp_path / "s.json")
    check_written(result, tmp_path / "s.json", {"switch_peft_hotswap_from_disk", "decode_b1_dynalora_blend8",
                                                "decode_b1_dynalora_blend8_merged", "switch_dynalora_blend_merged"},
                  {"decode_blend8_vs_peft_lora", "decode_zero_vs_base", "decode_live_blend8_vs_base"})


def test_bench_layer_times_the_blended_layer(tmp_path):
    result = run_layer_bench(LayerBenchConfig(in_features=16, out_features=16, adapters=2, rank=2, calls=5, repeats=1,
                                              threads=1), tmp_path / "l.json")
    check_written(result, tmp_path / "l.json", {"b1_base", "b1_blend", "b8_blend"}, {"b1_blend_over_base"})


def test_bench_absorb_times_absorbing_a_long_conversation(tmp_path):
    from dynalora.train.absorb import AbsorbTrainConfig, train_absorb

    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"context": "Zorb lives in Quell.", "questions": [{"question": "Where does Zorb live?",
                                                                                "answer": "Quell"}]}) + "\n")
    train_absorb(AbsorbTrainConfig(data=[docs], out_dir=tmp_path / "absorb", model="tiny:llama", rank=2,
                                   chunk_tokens=16, steps=0, threads=1, bottleneck=8))
    result = run_absorb_bench(AbsorbBenchConfig(model="tiny:llama", compressor_dir=tmp_path / "absorb", short=2,
                                                long=4, timed_chunks=1, threads=1), tmp_path / "a.json")
    check_written(result, tmp_path / "a.json", {"absorb one chunk (first 1)", "absorb one chunk (last 1)"},
                  {"absorb_time_late_vs_early", "state_bytes_long_vs_short"})
    assert set(result["footprint"]) == {2, 4}


def test_bench_serve_times_concurrent_clients_against_one_at_a_time(tmp_path):
    from dynalora.bench.serve import ServeBenchConfig, run_serve_bench
    from dynalora.models import tiny_model
    from test_engine import random_bank

    random_bank(tiny_model("llama")).save(tmp_path / "bank")
    result = run_serve_bench(ServeBenchConfig(model="tiny:llama", bank=tmp_path / "bank", clients=(1, 2), max_tokens=4,
                                              repeats=1, threads=1), tmp_path / "v.json")
    check_written(result, tmp_path / "v.json", {"tokens_per_s_sequential", "tokens_per_s_clients2", "ttft_clients2"},
                  {"clients1_vs_sequential", "clients2_vs_sequential"})
