"""Chat-format token ids shared by absorb's writers, its training recipe and its evaluation."""

from __future__ import annotations

import torch

from dynalora.runtime.padding import pad_rows

ANSWER_INSTRUCTION = "Answer in a few words."


def chat_prompt(tokenizer, question: str, context: str | None = None,
                instruction: str = ANSWER_INSTRUCTION) -> list[int]:
    """The chat-template prompt for a question (with the document before it when ``context`` is given), then
    ``instruction``."""
    request = f"{question} {instruction}".strip()
    content = request if context is None else f"{context}\n\n{request}"
    return list(tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"])


def end_of_turn_id(tokenizer) -> int | None:
    """The token that ends an assistant turn: ``<|im_end|>`` in ChatML templates, else EOS."""
    try:
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    except (KeyError, ValueError):  # a tokenizer without it
        end = None
    if isinstance(end, int) and end != getattr(tokenizer, "unk_token_id", None):
        return end
    return getattr(tokenizer, "eos_token_id", None)


def answer_tokens(tokenizer, answer: str, end_id: int | None) -> list[int]:
    """The answer as the assistant says it, then the end-of-turn token (so the student learns to stop)."""
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + ([end_id] if end_id is not None else [])


def answer_log_probs(model, sequences: list[list[int]], answer_lengths: list[int], pad_id: int,
                     device) -> torch.Tensor:
    """Log-probs at the positions that predict each sequence's answer (its last tokens), concatenated:
    ``(sum(answer_lengths), V)``. Rows are left-padded so the answers end together and the LM head runs
    on the last ``max(answer)+1`` positions only (the full ``(N, T, V)`` logits would dominate the cost)."""
    ids, mask = pad_rows(sequences, pad_id, device, left=True)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    keep = max(answer_lengths) + 1
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                   logits_to_keep=keep).logits  # (N, keep, V)
    parts = [logits[i, keep - answer - 1:keep - 1] for i, answer in enumerate(answer_lengths)]
    return torch.log_softmax(torch.cat(parts).float(), dim=-1)
