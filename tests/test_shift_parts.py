"""Shift pieces that need no trained weights: the shift network, trigger targets and metrics, scoring."""

from __future__ import annotations

import pytest
import torch

from dynalora.eval.shift import segment_scores
from dynalora.hyper.protocol import TriggerFeatures
from dynalora.hyper.shift_net import ShiftHypernetwork, ShiftNet, ShiftNetConfig
from dynalora.lora import DynamicLoraModel, InjectConfig, StateConfig
from dynalora.lora.targets import find_target_modules
from dynalora.models import tiny_model
from dynalora.data.trigger_metrics import simulate_policy, trigger_metrics
from dynalora.runtime.special_tokens import SHIFT_TOKEN
from dynalora.runtime.triggers import RowTriggers, StepObservation, TokenProbability, TriggerConfig
from dynalora.system.spec import parse_trigger
from dynalora.train.triggers import oracle_schedule, targets_for

from test_engine import random_bank


def tiny_shift_setup():
    model = tiny_model("llama")
    bank = random_bank(model)
    modules = find_target_modules(model, ["q_proj", "v_proj"])
    net = ShiftNet(ShiftNetConfig(feature_size=64, bank_labels=bank.labels, width=32, generated_rank=2,
                                  module_shapes={m: list(bank.module_shapes[m]) for m in modules}))
    dyn = DynamicLoraModel.attach(model, bank, InjectConfig(state=StateConfig(max_batch=2, generated_rank=2)))
    return net, dyn


def test_shift_net_shapes_and_a_fresh_net_generates_nothing():
    net, dyn = tiny_shift_setup()
    out = net(torch.randn(5, 64))
    assert out["blend"].shape == (5, 3) and out["gate"].shape == (5,)
    assert torch.allclose(out["blend"].sum(-1) + out["base_weight"], torch.ones(5))
    a, b = out["factors"]["model.layers.1.self_attn.v_proj"]
    assert a.shape == (5, 2, 64) and b.shape == (5, 32, 2)
    assert all(a.any() and not b.any() for a, b in out["factors"].values())  # as LoRA: A random, B zero
    for a, b in out["factors"].values():
        torch.einsum("nor,nri->noi", b, a).sum().backward(retain_graph=True)
    assert all(layer.bias.grad.abs().sum() > 0 for layer in net.factor_out.values())  # B can learn


def test_shift_net_round_trips_through_files(tmp_path):
    net, _ = tiny_shift_setup()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    net.save_pretrained(tmp_path / "net", dtype=torch.float32)
    loaded = ShiftNet.from_pretrained(tmp_path / "net")
    x = torch.randn(3, 64)
    assert torch.allclose(net(x)["blend"], loaded(x)["blend"])


def test_hypernetwork_gate_interpolates_from_the_current_blend():
    net, dyn = tiny_shift_setup()
    with torch.no_grad():
        net.gate_head.bias.fill_(-50.0)  # gate ≈ 0: keep the current LoRA (identity)
    dyn.state.set_blend(0, [0.2, 0.3, 0.5])
    features = TriggerFeatures(0, 10, "test", torch.randn(64), torch.randn(64))
    update = ShiftHypernetwork(net)(features, dyn.state)
    assert torch.allclose(update.blend, torch.tensor([0.2, 0.3, 0.5]), atol=1e-6)
    with torch.no_grad():
        net.gate_head.bias.fill_(50.0)  # gate ≈ 1: take the proposal
    update = ShiftHypernetwork(net)(features, dyn.state)
    assert torch.allclose(update.blend, net(features.pooled_hidden[None])["blend"][0], atol=1e-6)


def test_trigger_targets_schedule_and_metrics():
    target = targets_for([0, 50, 120], 200, delay=12, ignore_after=32)
    assert target[11] == 1 and target[61] == 1 and target[131] == 1
    assert target[20] == -1 and target[40] == 0 and target[100] == 0 and int((target == 1).sum()) == 3
    schedule = oracle_schedule([0, 50], ["news", "code"], ["code", "news"], delay=12, length=100)
    assert schedule == [(0, None), (12, [0.0, 1.0]), (62, [1.0, 0.0])]
    probs = torch.zeros(200)
    probs[[5, 6, 60, 170]] = 0.9  # 6 is held back by min_gap, 170 is a false trigger
    fired = simulate_policy(probs, 0.5, min_gap=8)
    assert fired == [5, 60, 170]
    metrics = trigger_metrics([fired], [[0, 50, 120]], [200], window=32)
    assert metrics["boundary_recall"] == 0.5 and metrics["false_per_1k_tokens"] == 5.0
    assert metrics["mean_delay"] == 10 and abs(metrics["precision"] - 2 / 3) < 1e-9


def test_votes_ignore_a_lone_spike_and_the_policy_fires_where_the_simulation_does():
    """``k`` of the last ``n``: a lone spike does not fire, a run fires at its k-th position; the engine's
    policy (with the row's rate limit) and the simulation the recipes choose thresholds with agree exactly."""
    probs = torch.zeros(200)
    probs[[5, 60, 61, 62, 100, 102, 170]] = 0.9
    assert simulate_policy(probs, 0.5, min_gap=8, votes=(2, 3)) == [61, 102]
    assert simulate_policy(probs, 0.5, min_gap=8, votes=(3, 3)) == [62]
    assert simulate_policy(probs, 0.5, min_gap=8) == [5, 60, 100, 170]
    probs = torch.rand(400, generator=torch.Generator().manual_seed(0))
    for votes in ((1, 1), (2, 3), (3, 4)):
        row = RowTriggers(TriggerConfig([TokenProbability(7, 0.7, votes=votes)], min_gap=5))
        fired = [t for t, p in enumerate(probs.tolist())
                 if row.observe(StepObservation(t, 0, 0.0, {7: p}, t + 1))[0] is not None]
        assert fired == simulate_policy(probs, 0.7, min_gap=5, votes=votes)


def test_prob_trigger_specs_take_a_threshold_and_votes_or_the_trained_ones():
    ids = {SHIFT_TOKEN: 9}
    policy = parse_trigger("prob:0.7:3/4", ids, 0.99, (2, 2))
    assert (policy.threshold, policy.votes) == (0.7, (3, 4))
    policy = parse_trigger("prob", ids, 0.99, (2, 2))
    assert (policy.threshold, policy.votes) == (0.99, (2, 2))
    assert parse_trigger("prob:0.5", ids).votes == (1, 1)
    with pytest.raises(ValueError, match=r"--trigger 'prob:0.5:4/3'.*1 ≤ k ≤ n"):
        parse_trigger("prob:0.5:4/3", ids)
    with pytest.raises(ValueError, match=r"--trigger 'prob:0.5:3'.*K/N"):
        parse_trigger("prob:0.5:3", ids)


def test_segment_scores_skip_the_first_tokens_of_each_segment():
    nll = torch.arange(1, 100, dtype=torch.float)  # nll[t-1] scores token t
    scores = segment_scores(nll, [0, 40], 100, skip=32)
    assert scores[0] == (float(sum(range(32, 40))), 8)  # tokens 32..39
    assert scores[1] == (float(sum(range(72, 100))), 28)  # tokens 72..99
