"""The same invariants on the real SmolLM2-135M-Instruct (slow: loads ~0.5 GB; run by make test)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from dynalora.lora import DynamicLoraModel, LoraBank, module_shapes_of
from dynalora.models import load_base_model
from dynalora.runtime import Engine

from conftest import make_peft_adapter

pytestmark = pytest.mark.slow
PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "List three prime numbers."]


@pytest.fixture(scope="module")
def smollm2():
    return load_base_model()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return make_peft_adapter(lambda: load_base_model().model, tmp_path_factory.mktemp("a") / "rand", 1,
                             ["q_proj", "v_proj"], rank=8, alpha=16)


def chat_ids(tokenizer, prompt):
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]


def test_engine_greedy_equals_hf_generate(smollm2):
    dyn = DynamicLoraModel.attach(smollm2.model)
    engine = Engine(dyn, smollm2.tokenizer)
    try:
        for prompt in PROMPTS:
            ids = chat_ids(smollm2.tokenizer, prompt)
            reference = smollm2.model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
            reference = [t for t in reference if t not in engine.eos_ids]
            result = engine.generate([ids[0].tolist()], max_new_tokens=24)
            assert result.token_ids[0] == reference, prompt
            # the streamed pieces (decoded incrementally) add up to the decode of the whole row
            assert result.texts[0] == smollm2.tokenizer.decode(reference), prompt
    finally:
        engine.close()
        dyn.detach()


def test_one_hot_blend_and_export_match_peft(smollm2, adapter, tmp_path):
    ids = chat_ids(smollm2.tokenizer, PROMPTS[0])
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(load_base_model().model, str(adapter)).eval()(input_ids=ids).logits
    bank = LoraBank(module_shapes_of(smollm2.model))
    bank.add_peft(adapter, label="rand")
    dyn = DynamicLoraModel.attach(smollm2.model, bank)
    try:
        with torch.no_grad():
            zero = dyn(input_ids=ids).logits
            dyn.state.set_blend(0, [1.0])
            ours = dyn(input_ids=ids).logits
        # 30 layers of fp32 rounding in another order: 1e-5 relative to the largest logit (~1e-4 absolute)
        tolerance = 1e-5 * peft_logits.abs().max()
        assert (ours - peft_logits).abs().max() <= tolerance
        assert (zero - peft_logits).abs().max() > 1e-2
        dyn.state.set_blend(0, [0.6])
        with torch.no_grad():
            blended = dyn(input_ids=ids).logits
        dyn.export_peft(0, tmp_path / "export")
        with torch.no_grad():
            exported = PeftModel.from_pretrained(load_base_model().model,
                                                 str(tmp_path / "export")).eval()(input_ids=ids).logits
        assert (blended - exported).abs().max() <= tolerance
    finally:
        dyn.detach()
