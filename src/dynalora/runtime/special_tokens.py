"""Trigger tokens (``<|shift|>``, ``<|think|>``, ...) added to a tokenizer and a model.

New embedding rows start at the mean of the existing ones (a token the model has no opinion about
yet, and whose logit starts near the average), and are saved and loaded apart from the base weights
so a checkpoint of trained trigger tokens is a few KB.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from tqdm import tqdm

SHIFT_TOKEN = "<|shift|>"
THINK_TOKEN = "<|think|>"
DEFAULT_TRIGGER_TOKENS = (SHIFT_TOKEN, THINK_TOKEN)


def add_trigger_tokens(model, tokenizer, tokens=DEFAULT_TRIGGER_TOKENS) -> dict[str, int]:
    """Add ``tokens`` as special tokens (existing ones are reused); returns ``{token: id}``. A newly added
    token's input (and untied output) row starts at the mean of the vocabulary's rows — also when the matrix
    already had a spare row for it (Qwen2 pads its vocabulary), whose values would otherwise be arbitrary.

    Works with a tokenizer (resized vocabulary) or ``tokenizer=None`` (tiny test models: the new ids
    are appended after the model's vocabulary)."""
    embeddings = model.get_input_embeddings()
    old_size = embeddings.weight.shape[0]
    existing = dict(getattr(model.config, "dynalora_trigger_tokens", {}) or {})
    if tokenizer is not None:
        vocabulary = len(tokenizer)  # ids below it are real tokens; a new one gets an id at or past it
        tokenizer.add_tokens(list(tokens), special_tokens=True)
        ids = {token: tokenizer.convert_tokens_to_ids(token) for token in tokens}
        new_size = max(len(tokenizer), old_size)
    else:
        vocabulary = old_size
        ids = {token: existing.get(token, old_size + i) for i, token in enumerate(t for t in tokens)}
        new_size = max(old_size, max(ids.values()) + 1)
    fresh = [i for i in ids.values() if i >= vocabulary]
    real = min(vocabulary, old_size)
    output = model.get_output_embeddings()
    untied = output is not None and output.weight.data_ptr() != embeddings.weight.data_ptr()
    with torch.no_grad():
        input_mean = embeddings.weight[:real].mean(dim=0)
        output_mean = output.weight[:real].mean(dim=0) if untied else None
        if new_size > old_size:
            model.resize_token_embeddings(new_size, mean_resizing=False)
        embeddings, output = model.get_input_embeddings(), model.get_output_embeddings()
        for row in sorted(set(fresh) | set(range(old_size, new_size))):  # new tokens and rows the resize added
            embeddings.weight[row] = input_mean
            if untied:
                output.weight[row] = output_mean
    model.config.dynalora_trigger_tokens = {**existing, **ids}  # adding one token keeps the others registered
    return ids


def ordinary_vocab_size(model, tokenizer=None) -> int:
    """How many ids are ordinary tokens (``0..n-1``): what text is scored over. Not the embedding's rows: a
    padded matrix (Qwen2) has spare rows past the tokenizer, and trigger tokens sit past the ordinary ones."""
    rows = model.get_output_embeddings().weight.shape[0]
    size = min(rows, len(tokenizer)) if tokenizer is not None else rows
    triggers = (getattr(model.config, "dynalora_trigger_tokens", None) or {}).values()
    return min([size, *triggers])


def trigger_row_tensor(model) -> torch.Tensor:
    """The matrix whose trigger rows decide ``p(trigger)``: the LM head's weight (the input embedding too when
    tied). A trigger is consumed, never fed, so its input row of an untied model plays no part."""
    return model.get_output_embeddings().weight


def trigger_token_rows(model, token_ids: dict[str, int]) -> dict[str, torch.Tensor]:
    """The embedding (and untied output) rows of the trigger tokens, for saving (detached copies)."""
    embeddings = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tensors = {}
    for token, token_id in token_ids.items():
        tensors[f"input.{token}"] = embeddings[token_id].detach().clone()
        if output is not None and output.weight.data_ptr() != embeddings.data_ptr():
            tensors[f"output.{token}"] = output.weight[token_id].detach().clone()
    return tensors


def install_trigger_rows(model, tokenizer, tokens: list[str], rows: dict[str, torch.Tensor]) -> dict[str, int]:
    """Add ``tokens`` and copy their ``rows`` (``input.<token>``, ``output.<token>`` for an untied head) in;
    returns ``{token: id}``. Used through :class:`~dynalora.runtime.trained_trigger.TrainedTrigger`."""
    ids = add_trigger_tokens(model, tokenizer, tokens)
    embeddings = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    with torch.no_grad():
        for token, token_id in ids.items():
            row = rows[f"input.{token}"]
            if row.shape != embeddings[token_id].shape:
                raise ValueError(f"trigger row for {token} has shape {tuple(row.shape)}, the model's embeddings "
                                 f"have {tuple(embeddings[token_id].shape)}: trained on another model?")
            embeddings[token_id] = row.to(embeddings.dtype)
            if f"output.{token}" in rows and output is not None:
                output.weight[token_id] = rows[f"output.{token}"].to(output.weight.dtype)
    return ids


def fit_token_row(initial: torch.Tensor, hidden: torch.Tensor, log_z: torch.Tensor, target: torch.Tensor,
                  positive_weight: float, steps: int, lr: float, desc: str = "train trigger row"):
    """Fit one tied embedding row ``e (H,)`` so that ``p(token) = σ(h·e − log Z)`` predicts ``target (N,)`` ∈ {0, 1}
    from final hidden states ``hidden (N, H)`` and ``log_z (N,)`` (weighted logistic regression, Adam).
    Returns the row and the loss per step."""
    row = initial.detach().clone().float().requires_grad_(True)  # (H,)
    weights = torch.where(target == 1, positive_weight, 1.0)
    optimizer = torch.optim.Adam([row], lr=lr)
    losses = []
    for _ in tqdm(range(steps), desc=desc, leave=False):
        margin = hidden @ row - log_z  # (N,) logit of p(token)
        loss = (weights * F.binary_cross_entropy_with_logits(margin, target.float(), reduction="none")).sum() \
            / weights.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return row.detach().to(initial.dtype), losses
