"""The shipped escalate stack and mix gate (checkpoints/escalate, checkpoints/mix) in the engine on SmolLM2 (slow)."""

from __future__ import annotations

import json

import pytest

from dynalora.system.assemble import EngineSpec, build_engine
from dynalora.shipped import shipped

pytestmark = pytest.mark.slow
CHECKPOINTS = shipped()
PROMPT = "The committee met on Tuesday to discuss the budget for the coming year, and the chair said that"


def shipped_engine(**options):
    return build_engine(EngineSpec(bank=CHECKPOINTS / "library", trigger_tokens=CHECKPOINTS / "triggers" /
                                   "trigger_tokens.safetensors", hypernetwork="shift", shift_dir=CHECKPOINTS / "shift",
                                   min_gap=4, max_batch=1, update_delay=0, **options))  # updates land at once


def test_shipped_escalate_runs_level_2_only_when_think_fires_and_keeps_triggers_out_of_the_text():
    threshold = json.loads((CHECKPOINTS / "escalate" / "escalate.json").read_text())["threshold"]
    assert 0 < threshold < 1  # chosen on validation: it escalates some windows, not all
    engine = shipped_engine(escalate=CHECKPOINTS / "escalate", triggers=["token", "think:0.0001"])
    result = engine.generate([engine.tokenizer(PROMPT)["input_ids"]], max_new_tokens=16)
    applied = result.lora_events("shift")
    assert any("think" in e.reason for e in applied)
    assert all(e.level == (2 if "think" in e.reason else 1) for e in applied)
    assert result.texts[0].strip() and "<|" not in result.texts[0]  # trigger tokens are never shown


def test_shipped_mix_gate_sets_a_memory_weight_when_it_absorbs_past_the_window():
    engine = shipped_engine(mix=CHECKPOINTS / "mix", triggers=["every:4"], window=160,
                            compressor=CHECKPOINTS / "absorb")
    prompt = engine.tokenizer(PROMPT * 10)["input_ids"]
    assert len(prompt) > 160
    result = engine.generate([prompt], max_new_tokens=8)
    assert result.lora_events("absorb")
    shifts = result.lora_events("shift")
    assert shifts and all("memory weight" in e.detail for e in shifts)
    assert float(engine.dyn.state.memory_weights[0]) != 1.0  # the gate's weight, not the row's initial 1
