"""Shared fixtures: tiny random models and random PEFT adapters written to disk (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from dynalora.models import tiny_model  # noqa: E402

ATTENTION = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj"], "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
             "gpt2": ["c_attn", "attn.c_proj"]}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_peft_adapter(model_factory, folder: Path, seed: int, target_modules, rank: int = 4, alpha: float = 8,
                      use_rslora: bool = False, fan_in_fan_out: bool = False) -> Path:
    """Train-free random LoRA (B nonzero) saved as a PEFT folder."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=False,
                        use_rslora=use_rslora, fan_in_fan_out=fan_in_fan_out, lora_dropout=0.0)
    peft_model = get_peft_model(model_factory(), config)
    with torch.no_grad():  # make the deltas large enough to matter in the logits
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    peft_model.save_pretrained(str(folder))
    return folder


@pytest.fixture
def tokens():
    torch.manual_seed(123)
    return torch.randint(0, 256, (1, 12))


@pytest.fixture(params=["llama", "qwen2", "gpt2"])
def family(request):
    return request.param


@pytest.fixture
def adapter_dirs(tmp_path, family):
    """Three adapters on one tiny model family: differing ranks, alphas, rsLoRA and target sets."""
    factory = lambda: tiny_model(family)  # noqa: E731
    attention = ATTENTION[family]
    gpt2 = family == "gpt2"
    return [
        make_peft_adapter(factory, tmp_path / "a0", 1, attention, rank=4, alpha=8, fan_in_fan_out=gpt2),
        make_peft_adapter(factory, tmp_path / "a1", 2, attention[:2], rank=2, alpha=4, use_rslora=True,
                          fan_in_fan_out=gpt2),
        make_peft_adapter(factory, tmp_path / "a2", 3, attention, rank=8, alpha=16, fan_in_fan_out=gpt2),
    ]
