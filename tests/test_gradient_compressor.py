"""The gradient compressor: exact invariants on a tiny model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dynalora.hyper.compressor import Compressor, CompressorConfig, load_compressor
from dynalora.hyper.gradient_compressor import GradientCompressor, GradientCompressorConfig, chunk_signals
from dynalora.lora import DynamicLoraModel, InjectConfig, LoraBank, StateConfig, module_shapes_of
from dynalora.models import tiny_model
from dynalora.runtime.absorb import AbsorbConfig, Absorber

TARGETS = ["o_proj", "down_proj"]


def make(memory_rank=4, seed=0, trained=False):
    torch.manual_seed(seed)
    model = tiny_model("llama")
    shapes = module_shapes_of(model)
    dyn = DynamicLoraModel.attach(model, LoraBank(shapes), InjectConfig(
        target_modules=TARGETS, state=StateConfig(max_batch=2, generated_rank=0, memory_rank=memory_rank)))
    compressor = GradientCompressor(GradientCompressorConfig(
        module_shapes={m: list(shapes[m]) for m in dyn.state.modules}, rank=memory_rank, bottleneck=8))
    if trained:  # a trained compressor's MLP is not the identity
        with torch.no_grad():
            for layer in compressor.mlp_out.values():
                layer.weight.normal_(std=0.3)
    return dyn, compressor


def dense(factors, row=0):
    return {m: b[row] @ a[row] for m, (a, b) in factors.items()}  # (out, in)


def test_untrained_compressor_writes_exactly_one_sgd_step():
    dyn, compressor = make()
    ids = torch.randint(3, 200, (1, 10))
    weights = {m: dyn.layers[m].base_layer.weight for m in compressor.modules_list}
    for weight in weights.values():
        weight.requires_grad_(True)
    logits = dyn.model(input_ids=ids).logits
    loss = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
    gradients = dict(zip(weights, torch.autograd.grad(loss, list(weights.values()))))
    for weight in weights.values():
        weight.requires_grad_(False)
    written = dense(compressor.read(dyn, ids))
    for module, delta in written.items():
        step = compressor.config.init_step / 10 ** 0.5  # 10 tokens
        torch.testing.assert_close(delta, -step * gradients[module], atol=1e-6, rtol=1e-4)


def test_padding_and_batching_change_nothing():
    dyn, compressor = make(trained=True)
    first, second = torch.randint(3, 200, (1, 9)), torch.randint(3, 200, (1, 6))
    batch = torch.cat([first, torch.cat([second, torch.zeros(1, 3, dtype=torch.long)], 1)])
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    together = compressor.read(dyn, batch, mask)
    for row, alone in ((0, compressor.read(dyn, first)), (1, compressor.read(dyn, second))):
        for module, delta in dense(alone).items():
            torch.testing.assert_close(dense(together, row)[module], delta, atol=1e-6, rtol=1e-4)
    _, pad_b = together[compressor.modules_list[0]]
    assert float(pad_b[1, :, 6:].detach().abs().max()) == 0.0  # padding tokens write nothing


def test_signals_leave_the_base_weights_without_gradients():
    dyn, compressor = make()
    for p in dyn.model.parameters():
        p.requires_grad_(True)
    signals = chunk_signals(dyn, compressor.modules_list, torch.randint(3, 200, (2, 7)))
    assert all(p.grad is None for p in dyn.model.parameters())
    x, grad = signals[compressor.modules_list[0]]
    assert x.shape[:2] == grad.shape[:2] == (2, 7) and not x.requires_grad and not grad.requires_grad


def test_absorber_keeps_the_memory_rank_with_a_gradient_compressor():
    dyn, compressor = make(memory_rank=3, trained=True)
    absorber = Absorber(dyn, compressor, AbsorbConfig(window=24, sink_tokens=2, chunk_tokens=8))
    before = {k: v.numel() for k, v in dyn.state.tensors().items()}
    reports = absorber.absorb_text(0, torch.randint(3, 200, (40,)).tolist())
    assert len(reports) == 5 and all(r.memory_rank == 3 for r in reports)
    assert reports[-1].rel_error > 0  # 8 tokens per chunk > rank 3: the cut is real
    assert {k: v.numel() for k, v in dyn.state.tensors().items()} == before
    assert any(float(a.abs().max()) > 0 for a, _ in dyn.state.row_factors(0, "memory").values())


def test_save_load_round_trip_and_load_compressor_picks_the_kind(tmp_path):
    dyn, compressor = make(trained=True)
    compressor.save_pretrained(tmp_path / "g", dtype=torch.float32)
    loaded = load_compressor(tmp_path / "g")
    assert isinstance(loaded, GradientCompressor)
    ids = torch.randint(3, 200, (1, 8))
    for module, delta in dense(compressor.read(dyn, ids)).items():
        torch.testing.assert_close(dense(loaded.read(dyn, ids))[module], delta)
    with pytest.raises(FileNotFoundError, match="compressor"):
        load_compressor(tmp_path / "missing")
    hidden = dyn.model.config.hidden_size
    Compressor(CompressorConfig(hidden, {m: list(s) for m, s in compressor.config.module_shapes.items()},
                                rank=2, width=16, heads=2)).save_pretrained(tmp_path / "p")
    assert type(load_compressor(tmp_path / "p")) is Compressor


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="module_shapes"):
        GradientCompressorConfig()
    with pytest.raises(ValueError, match="init_step"):
        GradientCompressorConfig(module_shapes={"model.layers.0.mlp.down_proj": [8, 4]}, init_step=0)
    with pytest.raises(ValueError, match="one MLP per kind"):
        GradientCompressor(GradientCompressorConfig(module_shapes={"model.layers.0.mlp.down_proj": [8, 4],
                                                                   "model.layers.1.mlp.down_proj": [6, 4]}))


@pytest.mark.parametrize("writer", ["compressor", "distill"])
def test_absorb_demo_runs_on_a_tiny_model(tmp_path, writer):
    import json

    from dynalora.demo_absorb import run_absorb_demo

    _, compressor = make(memory_rank=4, trained=True)
    compressor.save_pretrained(tmp_path / "absorb")
    (tmp_path / "absorb" / "train_absorb.json").write_text(json.dumps({"config": {"chunk_tokens": 32}}))
    result = run_absorb_demo(tmp_path / "absorb", "tiny:llama", questions=2, writer=writer, steps=1)
    assert result["questions"] == 2 and result["document_tokens"] > 384  # more than one chunk was absorbed
    assert all(0 <= hits <= 2 for hits in result["correct"].values()) and result["absorb_seconds"] > 0


def test_engine_eviction_with_a_gradient_compressor_equals_a_fresh_forward():
    from dynalora.runtime import Engine, SamplingConfig

    dyn, compressor = make(memory_rank=4, trained=True)
    absorber = Absorber(dyn, compressor, AbsorbConfig(window=24, sink_tokens=2, chunk_tokens=8))
    prompt = torch.randint(3, 200, (40,)).tolist()
    with torch.no_grad():  # reference: no KV cache, a fresh forward of the kept tokens at every step
        row, expected = absorber.evict(0, list(prompt))[0], []
        for _ in range(20):
            expected.append(int(dyn(input_ids=torch.tensor([row])).logits[0, -1].argmax()))
            row, _ = absorber.evict(0, row + [expected[-1]])
    dyn.state.reset()
    engine = Engine(dyn, None, None, absorber=absorber)
    engine.eos_ids = set()
    result = engine.generate([prompt], max_new_tokens=20, sampling=SamplingConfig())
    assert result.token_ids[0] == expected
    assert len(result.lora_events("absorb")) == (40 + 20 - 24 + 7) // 8
