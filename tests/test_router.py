"""The token router on a tiny Llama: the routed path of the layer is the blend path when the routing is the prior; a
routed model decodes token by token (KV cache) exactly as a teacher-forced pass scores the same tokens; only the
layers above the feature layer are routed; a fresh router applies the prior up to its smoothing; it saves and loads."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from dynalora.hyper.router import TokenRouter, TokenRouterConfig
from dynalora.lora import DynamicLoraModel
from dynalora.models import tiny_model
from test_engine import random_bank

TOKENS = torch.tensor([[5, 17, 99, 3, 42, 7, 8, 120, 33, 64]])


def routed_model(seed=0, feature_layer=0):
    torch.manual_seed(seed)
    model = tiny_model("llama")
    dyn = DynamicLoraModel.attach(model, random_bank(model))
    router = TokenRouter(TokenRouterConfig(feature_size=model.config.hidden_size, bank_labels=dyn.state.labels,
                                           feature_layer=feature_layer))
    torch.nn.init.normal_(router.net[-1].weight, std=2.0)  # a router that moves: routing differs per position
    return dyn, router


def test_routing_to_the_prior_is_the_unrouted_model():
    dyn, router = routed_model()
    dyn.state.set_blend(0, [0.5, 0.3, 0.0])
    with torch.no_grad():
        plain = dyn(input_ids=TOKENS).logits
        router.attach(dyn)
        router.forward = lambda hidden, prior: prior.expand(-1, hidden.shape[1], -1)  # route to the prior itself
        assert torch.allclose(dyn(input_ids=TOKENS).logits, plain, atol=1e-6)
        del router.forward
        moved = dyn(input_ids=TOKENS).logits
    assert not torch.allclose(moved, plain, atol=1e-3)  # a real router changes the output
    assert dyn.state.routed is not None and dyn.state.routed[1] == frozenset(dyn.state.slots)  # feature layer 0: all


def test_only_the_feature_layer_and_the_ones_above_are_routed():
    dyn, router = routed_model(feature_layer=1)
    router.attach(dyn)
    with torch.no_grad():
        dyn(input_ids=TOKENS)
    assert dyn.state.routed[1] == frozenset(m for m in dyn.state.slots if ".layers.1." in m)  # tiny: layers 0 and 1


def test_decoding_token_by_token_equals_the_teacher_forced_pass():
    dyn, router = routed_model(feature_layer=1)
    dyn.state.set_blend(0, [0.2, 0.0, 0.7])
    router.attach(dyn)
    with torch.no_grad():
        whole = dyn(input_ids=TOKENS).logits[0]  # (T, V)
        cache, steps = DynamicCache(config=dyn.model.config), []
        for t in range(TOKENS.shape[1]):
            steps.append(dyn(input_ids=TOKENS[:, t:t + 1], cache=cache, use_cache=True).logits[0, -1])
    assert torch.allclose(torch.stack(steps), whole, atol=1e-5)


def test_a_fresh_router_applies_the_prior_up_to_its_smoothing_and_saves(tmp_path):
    _, trained = routed_model()
    fresh = TokenRouter(trained.config)
    hidden = torch.randn(2, 4, trained.config.feature_size)
    prior = torch.tensor([[[0.6, 0.4, 0.0]], [[0.0, 0.0, 0.0]]])  # (B, 1, K): a blend, and the base model
    routed = fresh(hidden, prior)
    assert torch.allclose(routed[0], torch.tensor([0.6, 0.4, 0.0]).expand(4, 3), atol=0.02)
    assert routed[1].abs().max() < 0.02
    trained.save_pretrained(tmp_path, dtype=torch.float32)
    loaded = TokenRouter.from_pretrained(tmp_path)
    assert torch.equal(loaded(hidden, prior), trained.eval()(hidden, prior))


def test_a_system_with_a_router_routes_its_engine_and_saves_it(tmp_path):
    from dynalora.system.assemble import System
    from dynalora.system.spec import EngineSpec

    model = tiny_model("llama")
    random_bank(model).save(tmp_path / "bank")
    _, router = routed_model(feature_layer=1)
    router.save_pretrained(tmp_path / "router", dtype=torch.float32)
    spec = EngineSpec(model="tiny:llama", bank=tmp_path / "bank", hypernetwork="none", triggers=[])
    plain = System.from_checkpoints(spec).engine()
    routed = System.from_checkpoints(EngineSpec(**{**vars(spec), "router": tmp_path / "router"}))
    assert routed.dyn.state.router is not None and plain.dyn.state.router is None
    prompts = [[5, 17, 99, 3]]
    for engine in (plain, routed.engine()):
        engine.dyn.state.set_blend(0, [0.4, 0.4, 0.2])
    assert plain.generate(prompts, max_new_tokens=6).token_ids != routed.engine().generate(
        prompts, max_new_tokens=6).token_ids
    saved = routed.save_pretrained(tmp_path / "system")
    assert (saved / "router" / "router.safetensors").is_file()
    assert System.from_pretrained(saved).dyn.state.router is not None


def test_a_routed_row_reports_its_blend_on_large_moves_only():
    from dynalora.runtime import Engine, EngineConfig, TriggerConfig

    dyn, router = routed_model(feature_layer=1)
    router.attach(dyn)
    dyn.state.set_blend(0, [0.4, 0.4, 0.2])

    def routes(threshold):
        engine = Engine(dyn, None, None, TriggerConfig([]), EngineConfig(route_report=threshold))
        events = engine.generate([[5, 17, 99, 3]], max_new_tokens=12).lora_events("route")
        engine.close()
        return events

    every, some = routes(0.0), routes(0.5)
    assert len(every) == 12 and 0 < len(some) < 12
    assert all(sum(abs(a - b) for a, b in zip(e.new_blend, e.old_blend)) >= 0.5 for e in some)
    at = {e.position: e.new_blend for e in every}  # the same greedy tokens: the same routed blend at each position
    assert all(e.new_blend == at[e.position] for e in some)
