"""PEFT X-LoRA over the trained library (the baseline of ``eval shift`` and ``bench xlora``): building it, loading its
trained classifier, scoring a stream."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def build_xlora(library_dir: Path, model_name: str | None = None, depth: int = 1, device: str = "cpu",
                dtype: str = "float32"):
    """A fresh base model wrapped by PEFT X-LoRA over every adapter of a trained library or a bank folder (X-LoRA
    loads each adapter's PEFT folder: a bank's as it was imported), classifier untrained. Returns ``(model,
    tokenizer, adapters)``, the adapters' records in the library's order."""
    from peft import XLoraConfig, get_peft_model

    from dynalora.lora.library_folder import load_library_bank
    from dynalora.models import load_base_model

    base = load_base_model(model_name, dtype, device)
    model = base.model
    bank, adapters = load_library_bank(library_dir, model)
    folders = [Path(info.source) for info in bank.adapters]
    missing = [f"{info.label}: {folder}" for info, folder in zip(bank.adapters, folders)
               if not (folder / "adapter_config.json").is_file()]
    if missing:
        raise FileNotFoundError(f"{library_dir}: X-LoRA loads each adapter's PEFT folder; not found: {missing}")
    model.config.use_cache = False  # X-LoRA refuses a KV cache (it runs the model twice per call)
    config = XLoraConfig(task_type="CAUSAL_LM", hidden_size=model.config.hidden_size, xlora_depth=depth,
                         adapters={str(i): str(folder) for i, folder in enumerate(folders)})
    return get_peft_model(model, config), base.tokenizer, adapters


def xlora_classifier(xlora_model):
    return xlora_model.base_model.internal_xlora_classifier


def load_xlora(folder: Path, library_dir: Path, model_name: str | None = None, device: str = "cpu",
               dtype: str = "float32"):
    """X-LoRA with the classifier trained by ``train_xlora`` (folder from ``dynalora train xlora``)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{folder / CONFIG_FILE}: no X-LoRA classifier here; make one with "
                                f"`dynalora train xlora`")
    saved = json.loads((folder / CONFIG_FILE).read_text())
    model, tokenizer, adapters = build_xlora(library_dir, model_name, saved["config"]["depth"], device, dtype)
    labels = [adapter["label"] for adapter in adapters]
    if labels != saved["labels"]:
        raise ValueError(f"{folder}: classifier trained on adapters {saved['labels']}, library has {labels}")
    classifier = xlora_classifier(model)
    classifier.load_state_dict({k: v.float() for k, v in load_file(str(folder / WEIGHTS_FILE)).items()})
    classifier.to(next(model.parameters()).device)
    return model.eval(), tokenizer


@torch.no_grad()
def xlora_token_nll(model, tokens: list[int], vocab_size: int) -> torch.Tensor:
    """Teacher-forced NLL of tokens 1..L-1 under X-LoRA ``(L-1,)`` (scores over the first ``vocab_size`` logits)."""
    ids = torch.tensor([tokens], device=next(model.parameters()).device)  # (1, L)
    logits = model(input_ids=ids).logits[0, :-1, :vocab_size].float()
    return -torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]


CONFIG_FILE = "xlora.json"


WEIGHTS_FILE = "classifier.safetensors"
