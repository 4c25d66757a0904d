"""Bad input gets a clear error naming what is wrong, and leaves the bank and the state unchanged."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dynalora.lora import AdapterError, DynamicLoraModel, LoraBank, StateError, module_shapes_of
from dynalora.lora.peft_io import CONFIG_FILE, WEIGHTS_FILE
from dynalora.models import tiny_model

from conftest import make_peft_adapter


@pytest.fixture
def good_adapter(tmp_path):
    return make_peft_adapter(lambda: tiny_model("llama"), tmp_path / "good", 1, ["q_proj", "v_proj"])


@pytest.fixture
def dyn(good_adapter):
    model = tiny_model("llama")
    bank = LoraBank(module_shapes_of(model))
    bank.add_peft(good_adapter, label="good")
    dyn = DynamicLoraModel.attach(model, bank)
    dyn.state.set_blend(0, [0.5])
    return dyn


def copy_adapter(src, dst):
    shutil.copytree(src, dst)
    return dst


def assert_bank_unchanged(bank, labels):
    assert bank.labels == labels


@pytest.mark.parametrize("missing", [CONFIG_FILE, WEIGHTS_FILE])
def test_missing_file_is_named(good_adapter, dyn, tmp_path, missing):
    broken = copy_adapter(good_adapter, tmp_path / "broken")
    (broken / missing).unlink()
    with pytest.raises(AdapterError, match=missing.replace(".", r"\.") + ": missing"):
        dyn.bank.add_peft(broken, label="broken")
    assert_bank_unchanged(dyn.bank, ["good"])


def test_corrupt_weights_and_config_are_named(good_adapter, dyn, tmp_path):
    broken = copy_adapter(good_adapter, tmp_path / "broken")
    (broken / WEIGHTS_FILE).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AdapterError, match="cannot be read as safetensors"):
        dyn.bank.add_peft(broken)
    broken2 = copy_adapter(good_adapter, tmp_path / "broken2")
    (broken2 / CONFIG_FILE).write_text("{not json")
    with pytest.raises(AdapterError, match="adapter_config.json: not valid JSON"):
        dyn.bank.add_peft(broken2)
    assert_bank_unchanged(dyn.bank, ["good"])


def test_shape_mismatch_names_module_and_shapes(tmp_path, dyn):
    from transformers import LlamaConfig, AutoModelForCausalLM

    wider = lambda: AutoModelForCausalLM.from_config(LlamaConfig(  # noqa: E731
        hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256))
    other = make_peft_adapter(wider, tmp_path / "wider", 2, ["q_proj"])
    with pytest.raises(AdapterError, match=r"model\.layers\.0\.self_attn\.q_proj.*\(4, 96\).*\(r, 64\)"):
        dyn.bank.add_peft(other)
    assert_bank_unchanged(dyn.bank, ["good"])


def test_unknown_target_module_is_named(tmp_path, dyn):
    with pytest.raises(AdapterError, match="'model.layers.7.self_attn.q_proj' is not a linear layer"):
        dyn.bank.add("ghost", {"model.layers.7.self_attn.q_proj": (torch.zeros(2, 64), torch.zeros(64, 2))})
    with pytest.raises(ValueError, match="target module 'nonexistent_proj' matches no linear layer"):
        DynamicLoraModel.attach(tiny_model("llama"), None, __import__("dynalora").InjectConfig(["nonexistent_proj"]))
    assert_bank_unchanged(dyn.bank, ["good"])


def test_nan_weights_in_adapter_file_are_refused(good_adapter, dyn, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = copy_adapter(good_adapter, tmp_path / "nan")
    tensors = load_file(broken / WEIGHTS_FILE)
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, broken / WEIGHTS_FILE)
    with pytest.raises(AdapterError, match=f"tensor '{key}' holds NaN or Inf"):
        dyn.bank.add_peft(broken)
    assert_bank_unchanged(dyn.bank, ["good"])


def test_unsupported_peft_options_are_named(good_adapter, tmp_path, dyn):
    broken = copy_adapter(good_adapter, tmp_path / "dora")
    config = json.loads((broken / CONFIG_FILE).read_text())
    config["use_dora"] = True
    (broken / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="use_dora=True is not supported"):
        dyn.bank.add_peft(broken)


def test_bad_state_updates_leave_the_state_as_it_was(dyn):
    state = dyn.state
    before = state.snapshot()
    module = state.modules[0]
    good_factors = {module: (torch.ones(2, 64), torch.ones(64, 2))}
    bad_updates = [
        (dict(blend=[1.0, 2.0]), "shape \\(2,\\).*holds 1 adapters"),
        (dict(blend=[float("nan")]), "NaN or Inf"),
        (dict(blend=[0.2], generated={module: (torch.ones(2, 64), torch.full((64, 2), float("inf")))}), "NaN or Inf"),
        (dict(blend=[0.2], generated={module: (torch.ones(2, 65), torch.ones(64, 2))}), r"A \(2, 65\).*A \(r, 64\)"),
        (dict(generated={module: (torch.ones(20, 64), torch.ones(64, 20))}),
         "rank 20, above the state's generated_rank=8"),
        (dict(memory=good_factors | {"model.layers.0.mlp.up_proj": (torch.ones(1, 64), torch.ones(128, 1))}),
         "not a target module"),
    ]
    for update, message in bad_updates:
        with pytest.raises(StateError, match=message):
            state.update(0, **update)
        for key, tensor in state.tensors().items():
            assert torch.equal(tensor, before["tensors"][key]), f"{key} changed after a refused update"
    with pytest.raises(StateError, match="row 8 is out of range"):
        state.update(8, blend=[1.0])
    with pytest.raises(StateError, match=r"unknown adapter labels \['nope'\]"):
        state.set_blend_by_label(0, {"nope": 1.0})


def test_state_file_for_another_bank_is_refused(dyn, tmp_path, good_adapter):
    path = dyn.state.save(tmp_path / "s.safetensors")
    other_model = tiny_model("llama")
    bank = LoraBank(module_shapes_of(other_model))
    bank.add_peft(good_adapter, label="renamed")
    other = DynamicLoraModel.attach(other_model, bank)
    with pytest.raises(StateError, match=r"saved for bank \['good'\].*\['renamed'\]"):
        other.state.load(path)
    assert not other.state.blend_weights.any()


def test_forward_with_more_rows_than_the_state_holds(dyn):
    with pytest.raises(RuntimeError, match=r"batch of 9 rows \(from state row 0\), but the LoRA state holds 8"):
        dyn(input_ids=torch.zeros(9, 3, dtype=torch.long))
