"""Stacked hypernetworks (Escalate): exact invariants of lora_on, LevelNet and HyperStack."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dynalora.hyper.shift_net import ShiftHypernetwork, ShiftNet, ShiftNetConfig
from dynalora.hyper.stack import (EscalatingHypernetwork, HyperStack, LevelNet, LevelNetConfig, linear_shapes,
                                  lora_on)

H = 16


def shift_net(seed=0) -> ShiftNet:
    torch.manual_seed(seed)
    return ShiftNet(ShiftNetConfig(feature_size=H, bank_labels=["a", "b", "c"], module_shapes={"0.q_proj": [8, 8]},
                                   width=32, generated_rank=2, embedding_size=4)).eval()


def level_on(below: nn.Module, level=2, nonzero=True, seed=1) -> LevelNet:
    torch.manual_seed(seed)
    net = LevelNet(LevelNetConfig(feature_size=H, target_shapes=linear_shapes(below), rank=2, width=24, level=level))
    if nonzero:  # a trained level writes nonzero B; a fresh one writes exactly zero
        with torch.no_grad():
            for head in net.heads:
                head.weight.normal_(std=0.3)
    return net.eval()


def test_lora_on_adds_b_a_x_per_row_and_leaves_the_layer_untouched():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(5, 3))
    x = torch.randn(2, 4, 5)
    lora_a, lora_b = torch.randn(2, 2, 5), torch.randn(2, 3, 2)
    with lora_on(layer, {"0": (lora_a, lora_b)}):
        got = layer(x)
    for row in range(2):
        expected = x[row] @ (layer[0].weight + lora_b[row] @ lora_a[row]).T + layer[0].bias
        torch.testing.assert_close(got[row], expected)
    torch.testing.assert_close(layer(x), layer[0](x))  # the hook is gone
    with pytest.raises(ValueError, match="not an nn.Linear"):
        with lora_on(layer, {"missing": (lora_a, lora_b)}):
            pass


def test_a_fresh_level_is_the_identity_and_a_trained_one_changes_level_one():
    level1 = shift_net()
    features = torch.randn(3, H)
    alone = level1(features)
    stack = HyperStack([level1, level_on(level1, nonzero=False)])
    same = stack(features, depth=2)
    for key in ("blend", "gate", "base_weight"):
        assert torch.equal(same[key], alone[key])
    for name, (lora_a, lora_b) in alone["factors"].items():
        assert torch.equal(same["factors"][name][0], lora_a) and torch.equal(same["factors"][name][1], lora_b)
    stack = HyperStack([level1, level_on(level1)])
    assert torch.equal(stack(features, depth=1)["blend"], alone["blend"])  # depth 1 never runs level 2
    assert not torch.allclose(stack(features, depth=2)["blend"], alone["blend"])


def test_stack_rows_are_independent_and_levels_are_generic():
    level1 = shift_net()
    level2 = level_on(level1)
    level3 = level_on(level2, level=3, seed=2)
    stack = HyperStack([level1, level2, level3])
    features = torch.randn(4, H)
    batched = stack(features, depth=3)
    for row in range(4):
        alone = stack(features[row:row + 1], depth=3)
        torch.testing.assert_close(batched["blend"][row], alone["blend"][0])
    assert not torch.allclose(batched["blend"], stack(features, depth=2)["blend"])  # level 3 acts
    with pytest.raises(ValueError, match="depth=4"):
        stack(features, depth=4)


def test_training_level_two_leaves_level_one_frozen():
    level1 = shift_net()
    for p in level1.parameters():
        p.requires_grad_(False)
    level2 = level_on(level1, nonzero=False)
    stack = HyperStack([level1, level2])
    before = {k: v.clone() for k, v in level1.state_dict().items()}
    optimizer = torch.optim.SGD(level2.parameters(), lr=0.5)
    features = torch.randn(8, H)
    losses = []
    for _ in range(5):
        loss = -stack(features, depth=2)["blend"][:, 0].log().mean()  # push level 1's blend towards adapter "a"
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 1e-3
    assert all(torch.equal(before[k], v) for k, v in level1.state_dict().items())


def test_level_net_round_trips_and_rejects_layers_the_level_below_lacks(tmp_path):
    level1 = shift_net()
    level2 = level_on(level1)
    level2.save_pretrained(tmp_path / "l2")
    loaded = LevelNet.from_pretrained(tmp_path / "l2")
    features = torch.randn(2, H)
    for name, (lora_a, lora_b) in level2(features).items():
        torch.testing.assert_close(loaded(features)[name][1], lora_b, atol=2e-3, rtol=2e-3)  # fp16 on disk
    stranger = LevelNet(LevelNetConfig(feature_size=H, target_shapes={"nope": [2, 2]}))
    with pytest.raises(ValueError, match="nope"):
        HyperStack([level1, stranger])
    with pytest.raises(FileNotFoundError, match="level_net.json"):
        LevelNet.from_pretrained(tmp_path / "missing")


def test_escalating_hypernetwork_runs_level_two_only_when_think_fires():
    from dynalora.hyper.protocol import TriggerFeatures
    from dynalora.lora import DynamicLoraModel, InjectConfig, LoraBank, module_shapes_of
    from dynalora.models import tiny_model

    model = tiny_model()
    shapes = module_shapes_of(model)
    bank = LoraBank(shapes)
    for label in ("a", "b", "c"):
        bank.add(label, {m: (torch.randn(2, shapes[m][0]), torch.zeros(shapes[m][1], 2)) for m in
                         [n for n in shapes if n.endswith("q_proj")]})
    dyn = DynamicLoraModel.attach(model, bank, InjectConfig(target_modules=["q_proj"]))
    level1 = shift_net()
    stack = HyperStack([level1, level_on(level1)])
    hyper = EscalatingHypernetwork(stack, use_factors=False)
    hidden = torch.randn(H)

    def update(reason):
        return hyper(TriggerFeatures(0, 5, reason, hidden, hidden), dyn.state)

    plain, thought = update("p(<|shift|>)=0.90"), update("p(think)=0.70")
    assert plain.level == 1 and thought.level == 2
    torch.testing.assert_close(plain.blend, ShiftHypernetwork(level1, use_factors=False)(
        TriggerFeatures(0, 5, "x", hidden, hidden), dyn.state).blend)
    assert not torch.allclose(plain.blend, thought.blend)
    # with generated factors: only an escalated answer carries them; level 1 writes zeros (clearing level 2's)
    with_factors = EscalatingHypernetwork(stack, use_factors=True)
    plain = with_factors(TriggerFeatures(0, 5, "p(<|shift|>)=0.90", hidden, hidden), dyn.state)
    thought = with_factors(TriggerFeatures(0, 5, "p(think)=0.70", hidden, hidden), dyn.state)
    assert plain.generated and all(not a.any() and not b.any() for a, b in plain.generated.values())
    assert thought.generated and all(a.any() and b.any() for a, b in thought.generated.values())


def test_continuation_nll_scores_the_original_vocabulary_only():
    """Trigger tokens added after the vocabulary (a large row, as a fitted <|think|> gets) must not take
    probability mass from the text the escalate NLL scores."""
    from dynalora.models import tiny_model
    from dynalora.system.escalate import continuation_nll

    model = tiny_model("llama", vocab_size=256)
    continuations = torch.randint(0, 256, (3, 12))
    before = continuation_nll(model, None, None, continuations, None, False, vocab_size=256)
    model.resize_token_embeddings(257, mean_resizing=False)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[256] = 50 * head[:256].mean(0) + 50
    after = continuation_nll(model, None, None, continuations, None, False, vocab_size=256)
    with_trigger = continuation_nll(model, None, None, continuations, None, False, vocab_size=257)
    assert torch.allclose(before, after, atol=1e-5)
    assert (with_trigger > after + 0.01).all()
