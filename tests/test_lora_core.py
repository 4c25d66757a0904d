"""Exact invariants of the dynamic LoRA core on tiny Llama / Qwen2 / GPT-2 models."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from dynalora.lora.state import StateError
from dynalora.lora import DynamicLoraModel, InjectConfig, LoraBank, StateConfig, module_shapes_of
from dynalora.models import tiny_model

TOL = 1e-5


def attach_bank(family, adapter_dirs, **state_kwargs):
    model = tiny_model(family)
    bank = LoraBank(module_shapes_of(model))
    for k, folder in enumerate(adapter_dirs):
        bank.add_peft(folder, label=f"a{k}", description=f"adapter {k}")
    return DynamicLoraModel.attach(model, bank, InjectConfig(state=StateConfig(**state_kwargs)))


def logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def max_diff(a, b):
    return (a - b).abs().max().item()


def test_zero_state_gives_base_logits_exactly(family, adapter_dirs, tokens):
    base = logits(tiny_model(family), tokens)
    dyn = attach_bank(family, adapter_dirs)
    assert torch.equal(logits(dyn, tokens), base)
    dyn.state.set_blend(0, [0.3, 0.3, 0.4])
    assert not torch.equal(logits(dyn, tokens), base)
    dyn.state.reset()
    assert torch.equal(logits(dyn, tokens), base)


def test_one_hot_blend_matches_peft_adapter(family, adapter_dirs, tokens):
    dyn = attach_bank(family, adapter_dirs)
    for k, folder in enumerate(adapter_dirs):
        peft_model = PeftModel.from_pretrained(tiny_model(family), str(folder)).eval()
        one_hot = [0.0] * len(adapter_dirs)
        one_hot[k] = 1.0
        dyn.state.set_blend(0, one_hot)
        ours, theirs = logits(dyn, tokens), logits(peft_model, tokens)
        assert max_diff(ours, theirs) <= TOL, f"adapter {k}"
        assert max_diff(theirs, logits(tiny_model(family), tokens)) > 1e-2  # the adapter does something


def test_weighted_blend_matches_peft_cat_combination(family, adapter_dirs, tokens):
    weights = [0.7, -0.4, 1.3]
    peft_model = PeftModel.from_pretrained(tiny_model(family), str(adapter_dirs[0]), adapter_name="a0")
    for k, folder in enumerate(adapter_dirs[1:], start=1):
        peft_model.load_adapter(str(folder), adapter_name=f"a{k}")
    peft_model.add_weighted_adapter(["a0", "a1", "a2"], weights, "mix", combination_type="cat")
    peft_model.set_adapter("mix")
    peft_model.eval()
    dyn = attach_bank(family, adapter_dirs)
    dyn.state.set_blend(0, weights)
    assert max_diff(logits(dyn, tokens), logits(peft_model, tokens)) <= TOL


def random_factors(dyn, rank, seed, scale=0.1):
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for module in dyn.target_modules[::2]:
        in_features, out_features = dyn.bank.module_shapes[module]
        out[module] = (torch.randn(rank, in_features, generator=generator) * scale,
                       torch.randn(out_features, rank, generator=generator) * scale)
    return out


def test_export_reproduces_logits_in_peft(family, adapter_dirs, tokens, tmp_path):
    dyn = attach_bank(family, adapter_dirs, generated_rank=4, memory_rank=2)
    dyn.state.update(1, blend=[0.5, 0.0, -0.8], generated=random_factors(dyn, 3, 0),
                     memory=random_factors(dyn, 2, 1))
    ours = logits(dyn, tokens.repeat(2, 1))[1:2]
    report = dyn.export_peft(1, tmp_path / "export")
    assert report.exact and report.rank == 4 + 8 + 3 + 2  # adapter a1 has weight 0: dropped
    theirs = logits(PeftModel.from_pretrained(tiny_model(family), str(tmp_path / "export")).eval(), tokens)
    assert max_diff(ours, theirs) <= TOL


def test_import_export_round_trips_tensors(family, adapter_dirs, tmp_path):
    from dynalora.lora.peft_io import read_peft_adapter

    dyn = attach_bank(family, adapter_dirs)
    dyn.state.set_blend(0, [0.0, 1.0, 0.0])
    dyn.export_peft(0, tmp_path / "out")
    original, exported = read_peft_adapter(adapter_dirs[1]), read_peft_adapter(tmp_path / "out")
    assert set(original.factors) == set(exported.factors)
    for module, (lora_a, lora_b) in original.factors.items():  # scaling is folded into B on both sides
        assert torch.equal(exported.factors[module][0], lora_a)
        assert torch.equal(exported.factors[module][1], lora_b)


def test_rows_of_a_batch_match_rows_run_alone(family, adapter_dirs):
    torch.manual_seed(5)
    batch_tokens = torch.randint(0, 256, (4, 10))
    dyn = attach_bank(family, adapter_dirs, max_batch=4)
    updates = [dict(blend=[1.0, 0.0, 0.0]), dict(blend=[0.2, 0.5, -0.3], generated=random_factors(dyn, 2, 9)),
               dict(), dict(memory=random_factors(dyn, 4, 3))]
    for row, update in enumerate(updates):
        dyn.state.update(row, **update)
    batched = logits(dyn, batch_tokens)
    snapshot = dyn.state.snapshot()
    for row in range(4):
        dyn.state.reset()
        dyn.state.restore(dyn.state.snapshot(0)
                          | {"tensors": {k: v[row:row + 1] for k, v in snapshot["tensors"].items()}})
        alone = logits(dyn, batch_tokens[row:row + 1])
        assert max_diff(batched[row:row + 1], alone) <= TOL, f"row {row}"
    assert not torch.allclose(batched[0], batched[2])


def test_memory_weight_scales_the_memory_term_exactly_and_keeps_the_memory(family, adapter_dirs, tokens, tmp_path):
    dyn = attach_bank(family, adapter_dirs[:1], generated_rank=2, memory_rank=3)
    memory, generated = random_factors(dyn, 3, 1, scale=0.3), random_factors(dyn, 2, 2, scale=0.3)
    dyn.state.update(0, blend=[0.7], generated=generated)
    without = logits(dyn, tokens)
    scaled = {m: (a, 0.4 * b) for m, (a, b) in memory.items()}
    dyn.state.update(0, memory=scaled)
    reference = logits(dyn, tokens)  # the memory with B scaled by 0.4
    dyn.state.update(0, memory=memory)
    dyn.state.set_memory_weight(0, 0.4)
    assert max_diff(logits(dyn, tokens), reference) <= TOL
    assert all(torch.equal(dyn.state.row_factors(0, "memory")[m][1], b) for m, (_, b) in memory.items())  # unscaled
    dyn.state.save(tmp_path / "s.safetensors")
    dyn.state.set_memory_weight(0, 0.0)
    assert max_diff(logits(dyn, tokens), without) <= TOL  # off, and the generated factors untouched
    dyn.state.load(tmp_path / "s.safetensors")
    assert dyn.state.memory_weights[0] == pytest.approx(0.4) and max_diff(logits(dyn, tokens), reference) <= TOL
    dyn.state.reset(0)
    assert dyn.state.memory_weights[0] == 1.0 and not dyn.state.rows_scaled
    with pytest.raises(StateError, match="memory weight"):
        dyn.state.set_memory_weight(0, float("nan"))


def test_updates_keep_every_buffer_in_place(adapter_dirs, family, tmp_path):
    dyn = attach_bank(family, adapter_dirs)
    state = dyn.state
    pointers = lambda: [state.blend_weights.data_ptr(), state.rank_weights.data_ptr()] + [  # noqa: E731
        t.data_ptr() for s in state.slots.values() for t in (s.row_a_t, s.row_b_t, s.bank_a_t) if t is not None]
    before = pointers()
    state.update(0, blend=[1.0, 2.0, 3.0], generated=random_factors(dyn, 3, 0), memory=random_factors(dyn, 1, 1))
    snap = state.snapshot()
    state.reset(0)
    state.restore(snap)
    state.save(tmp_path / "s.safetensors")
    state.load(tmp_path / "s.safetensors")
    state.set_blend_by_label(2, {"a1": 0.5})
    assert pointers() == before


def test_state_save_load_and_snapshot_restore(adapter_dirs, family, tokens, tmp_path):
    dyn = attach_bank(family, adapter_dirs)
    dyn.state.update(0, blend=[0.1, 0.2, 0.3], generated=random_factors(dyn, 2, 4))
    expected = logits(dyn, tokens)
    dyn.state.save(tmp_path / "state.safetensors")
    snap = dyn.state.snapshot(0)
    dyn.state.reset()
    assert not torch.equal(logits(dyn, tokens), expected)
    dyn.state.load(tmp_path / "state.safetensors")
    assert torch.equal(logits(dyn, tokens), expected)
    dyn.state.reset()
    dyn.state.restore(snap)
    assert torch.equal(logits(dyn, tokens), expected)


def test_one_row_of_a_state_saves_alone_and_loads_into_any_row(adapter_dirs, family, tokens, tmp_path):
    """A server's session keeps its own row: saved as a one-row file, loaded into whichever row is free."""
    dyn = attach_bank(family, adapter_dirs)
    state = dyn.state
    state.update(1, blend=[0.1, 0.2, 0.3], generated=random_factors(dyn, 2, 4))
    with state.use_rows(1):
        expected = logits(dyn, tokens)
    state.save(tmp_path / "row.safetensors", row=1)
    state.reset()
    state.load(tmp_path / "row.safetensors", row=3)
    assert not state.blend_weights[:3].any()
    with state.use_rows(3):
        assert torch.equal(logits(dyn, tokens), expected)
    state.load(tmp_path / "row.safetensors")  # no row: a one-row file goes into row 0, the others zeroed
    assert torch.equal(logits(dyn, tokens), expected) and not state.blend_weights[1:].any()


def test_compressed_export_reports_the_true_error(adapter_dirs, family, tmp_path):
    from dynalora.lora.peft_io import read_peft_adapter

    dyn = attach_bank(family, adapter_dirs)
    dyn.state.set_blend(0, [1.0, 1.0, 1.0])
    full = dyn.state.effective_factors(0)
    report = dyn.export_peft(0, tmp_path / "r2", rank=2)
    assert report.rank == 2 and not report.exact
    compressed = read_peft_adapter(tmp_path / "r2").factors
    error_sq = total_sq = 0.0
    for module, (lora_a, lora_b) in full.items():
        dense = lora_b.double() @ lora_a.double()
        approx = compressed[module][1].double() @ compressed[module][0].double()
        optimal = torch.linalg.svdvals(dense)[2:].pow(2).sum()  # Eckart–Young: best rank-2 error
        assert abs((dense - approx).pow(2).sum() - optimal) <= 1e-5 * dense.pow(2).sum()
        error_sq += (dense - approx).pow(2).sum().item()
        total_sq += dense.pow(2).sum().item()
    assert abs(report.relative_error - (error_sq / total_sq) ** 0.5) < 1e-4
    assert dyn.export_peft(0, tmp_path / "r64", rank=64).relative_error < 1e-6


def test_detach_restores_the_plain_model(adapter_dirs, family, tokens):
    dyn = attach_bank(family, adapter_dirs)
    dyn.state.set_blend(0, [1.0, 1.0, 1.0])
    plain = dyn.detach()
    assert torch.equal(logits(plain, tokens), logits(tiny_model(family), tokens))


def test_functional_mode_equals_the_buffers_and_passes_gradients(adapter_dirs, family, tokens):
    dyn = attach_bank(family, adapter_dirs, max_batch=2)
    factors = random_factors(dyn, 3, 2)
    blend = torch.tensor([[0.3, -0.5, 0.8], [0.0, 1.0, 0.2]])
    for row in range(2):
        dyn.state.update(row, blend=blend[row], generated=factors if row == 1 else {})
    batch = tokens.repeat(2, 1)
    expected = logits(dyn, batch)
    dyn.state.reset()
    blend_param = blend.clone().requires_grad_(True)
    row_factors = {m: (torch.stack([torch.zeros_like(a.T), a.T]), torch.stack([torch.zeros_like(b.T), b.T]))
                   for m, (a, b) in factors.items()}
    with dyn.state.functional(dyn.state.expand_blend(blend_param), row_factors):
        out = dyn(input_ids=batch).logits
    assert max_diff(out, expected) <= TOL
    out.sum().backward()
    assert blend_param.grad is not None and blend_param.grad.abs().sum() > 0
    assert torch.equal(logits(dyn, batch), logits(tiny_model(family), batch))  # buffers untouched: zero state


def test_factor_activity_is_tracked_per_row(adapter_dirs, family):
    dyn = attach_bank(family, adapter_dirs, max_batch=3)
    module = dyn.target_modules[0]
    slot = dyn.state.slots[module]
    factors = random_factors(dyn, 2, 0)
    dyn.state.update(1, generated=factors)
    dyn.state.update(2, memory=factors)
    assert slot.active_rows == {1, 2}
    dyn.state.update(1, generated={})  # clearing row 1 leaves row 2 active
    assert slot.active_rows == {2} and slot.rows_active
    dyn.state.reset(2)
    assert not slot.rows_active
