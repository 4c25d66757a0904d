"""PEFT X-LoRA over the trained library (the baseline of ``eval shift`` and ``bench xlora``): building it, loading its
trained classifier, scoring a stream."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def library_labels(library_dir: Path) -> list[str]:
    index = Path(library_dir) / "library.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index}: no library here; train one with `dynalora train library`")
    return [a["label"] for a in json.loads(index.read_text())["adapters"]]


def build_xlora(library_dir: Path, model_name: str | None = None, depth: int = 1):
    """A fresh base model wrapped by PEFT X-LoRA over every library adapter (classifier untrained)."""
    from peft import XLoraConfig, get_peft_model

    from dynalora.models import load_base_model

    base = load_base_model(model_name)
    model = base.model
    model.config.use_cache = False  # X-LoRA refuses a KV cache (it runs the model twice per call)
    labels = library_labels(library_dir)
    config = XLoraConfig(task_type="CAUSAL_LM", hidden_size=model.config.hidden_size, xlora_depth=depth,
                         adapters={str(i): str(Path(library_dir) / label) for i, label in enumerate(labels)})
    return get_peft_model(model, config), base.tokenizer, labels


def xlora_classifier(xlora_model):
    return xlora_model.base_model.internal_xlora_classifier


def load_xlora(folder: Path, library_dir: Path, model_name: str | None = None):
    """X-LoRA with the classifier trained by ``train_xlora`` (folder from ``dynalora train xlora``)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{folder / CONFIG_FILE}: no X-LoRA classifier here; make one with "
                                f"`dynalora train xlora`")
    saved = json.loads((folder / CONFIG_FILE).read_text())
    model, tokenizer, labels = build_xlora(library_dir, model_name, saved["config"]["depth"])
    if labels != saved["labels"]:
        raise ValueError(f"{folder}: classifier trained on adapters {saved['labels']}, library has {labels}")
    xlora_classifier(model).load_state_dict({k: v.float() for k, v in load_file(str(folder / WEIGHTS_FILE)).items()})
    return model.eval(), tokenizer


@torch.no_grad()
def xlora_token_nll(model, tokens: list[int], vocab_size: int) -> torch.Tensor:
    """Teacher-forced NLL of tokens 1..L-1 under X-LoRA ``(L-1,)`` (scores over the first ``vocab_size`` logits)."""
    logits = model(input_ids=torch.tensor([tokens])).logits[0, :-1, :vocab_size].float()
    return -torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens[1:])[:, None])[:, 0]


CONFIG_FILE = "xlora.json"


WEIGHTS_FILE = "classifier.safetensors"
