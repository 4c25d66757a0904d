"""Token batches for training and evaluating LoRAs: domain text windows and task prompt→answer pairs."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dynalora.data.splits import split_documents
from dynalora.data.text_sources import adapter_text_sources, parse_source, source_documents

IGNORE = -100  # label id that the loss skips


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), IGNORE where no loss

    def rows(self, index: torch.Tensor) -> "TokenBatch":
        """Some rows of the batch (a process's slice of it)."""
        return TokenBatch(self.input_ids[index], self.attention_mask[index], self.labels[index])


def config_record(config) -> dict:
    """A recipe config dataclass as JSON-ready values (paths as strings), for checkpoint metadata."""
    def plain(value):
        return (str(value) if isinstance(value, Path)
                else [plain(v) for v in value] if isinstance(value, list) else value)

    return {k: plain(v) for k, v in asdict(config).items()}


def source_kind(source: str) -> tuple[str, str]:
    """``"domain:news"`` → ``("domain", "news")``; ``"jsonl:a.jsonl#body"`` → ``("jsonl", "a.jsonl")``; the forms
    are in :mod:`dynalora.data.text_sources` (``bigbench:TASK`` is a task, every other kind is text)."""
    kind, target, _ = parse_source(source)
    return kind, target


def random_windows(rng, lengths: list[int], count: int, window: int) -> list[tuple[int, int]]:
    """``count`` random windows ``(sequence index, start)`` of up to ``window`` tokens over sequences of ``lengths``,
    drawn from ``rng`` (a ``random.Random``: seeded, every process of a run draws the same global batch)."""
    draws = []
    for _ in range(count):
        index = rng.randrange(len(lengths))
        draws.append((index, rng.randrange(0, max(1, lengths[index] - window))))
    return draws


def text_token_stream(tokenizer, source: str, split: str, max_documents: int | None = None,
                      seed: int = 0) -> list[int]:
    """All documents of one split of a text source, tokenised and joined with EOS (documents shuffled)."""
    documents = split_documents(source_documents(source), split)
    if not documents:
        raise ValueError(f"data source {source!r} has no documents in split {split!r} (too little text: give it "
                         "more, every split needs some)")
    random.Random(seed).shuffle(documents)
    documents = documents[:max_documents] if max_documents else documents
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for document in documents:
        stream.extend(tokenizer(document.text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
    return stream


def window_batches(stream: list[int], seq_len: int, batch_size: int, count: int, seed: int) -> list[TokenBatch]:
    """``count`` batches of random windows of ``seq_len`` tokens from ``stream`` (all tokens scored)."""
    if len(stream) <= seq_len:
        raise ValueError(f"the token stream ({len(stream)} tokens) is shorter than seq_len={seq_len}")
    rng = random.Random(seed)
    data = torch.tensor(stream)
    batches = []
    for _ in range(count):
        starts = [rng.randrange(0, len(stream) - seq_len) for _ in range(batch_size)]
        ids = torch.stack([data[s:s + seq_len] for s in starts])  # (B, T)
        batches.append(TokenBatch(ids, torch.ones_like(ids), ids.clone()))
    return batches


def task_pairs(tokenizer, task_name: str, split: str,
               max_examples: int | None = None) -> list[tuple[list[int], list[int]]]:
    """``(prompt ids, answer ids)`` per example of a BIG-Bench task split (answer = target or correct choice)."""
    from dynalora.data import load_task, split_examples

    task = load_task(task_name, progress=False)
    pairs = []
    for example in split_examples(task, split):
        answer = example.target if example.target is not None else example.choices[example.correct]
        prompt = task.format_prompt(example, with_choices=example.target is None)  # no decoys for generation
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            answer_ids = answer_ids + [tokenizer.eos_token_id]
        pairs.append((prompt_ids, answer_ids))
    if not pairs:
        raise ValueError(f"task {task_name!r} has no examples in split {split!r}")
    return pairs[:max_examples] if max_examples else pairs


def pair_batches(pairs: list[tuple[list[int], list[int]]], seq_len: int, batch_size: int, count: int, seed: int,
                 pad_id: int) -> list[TokenBatch]:
    """Right-padded prompt+answer batches; only answer tokens carry labels. Prompts are cut from the left."""
    rng = random.Random(seed)
    batches = []
    for _ in range(count):
        chosen = [pairs[rng.randrange(len(pairs))] for _ in range(batch_size)]
        rows = []
        for prompt, answer in chosen:
            answer = answer[:seq_len // 2]
            prompt = prompt[-(seq_len - len(answer)):]
            rows.append((prompt + answer, [IGNORE] * len(prompt) + answer))
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((batch_size, width), pad_id)
        labels = torch.full((batch_size, width), IGNORE)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for b, (row_ids, row_labels) in enumerate(rows):
            ids[b, :len(row_ids)] = torch.tensor(row_ids)
            labels[b, :len(row_labels)] = torch.tensor(row_labels)
            mask[b, :len(row_ids)] = 1
        batches.append(TokenBatch(ids, mask, labels))
    return batches


def batch_nll(model, batch: TokenBatch) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over labelled positions, and their count. Differentiable; on the model's device."""
    device = next(model.parameters()).device
    logits = model(input_ids=batch.input_ids.to(device),
                   attention_mask=batch.attention_mask.to(device)).logits[:, :-1]  # (B, T-1, V)
    targets = batch.labels[:, 1:].to(device)  # (B, T-1)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                             ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())


def build_examples(tokenizer, adapters: list[dict], config, split: str, per_domain: int, seed: int):
    """(contexts (N, Tc), continuations (N, Ty), adapter index (N,)) from every domain adapter's split."""
    rng = random.Random(seed)
    contexts, continuations, labels = [], [], []
    span = config.context_tokens + config.continuation_tokens
    sources = adapter_text_sources(adapters)
    for index, meta in enumerate(adapters):
        if meta["label"] not in sources:
            continue
        stream = text_token_stream(tokenizer, sources[meta["label"]], split, seed=seed)
        for _ in range(per_domain):
            start = rng.randrange(0, len(stream) - span)
            contexts.append(stream[start:start + config.context_tokens])
            continuations.append(stream[start + config.context_tokens:start + span])
            labels.append(index)
    return torch.tensor(contexts), torch.tensor(continuations), torch.tensor(labels)
