"""``dynalora train triggers``: teach the model to emit ``<|shift|>`` when the text leaves its LoRA's domain.

Smallest form: only the new token's embedding row ``e`` is trained. With tied embeddings its logit is
``s_t = h_t · e`` (``h_t`` = the final normed hidden state), so ``p_t(<|shift|>) = σ(s_t − log Z_t)`` where
``Z_t`` sums the original vocabulary's exponentiated logits. The LM loss restricted to this one row is
therefore a weighted logistic regression on cached ``(h_t, log Z_t)``: one forward pass over the
training streams, no backward through the model.

Streams come from the library domains' train split. They are run under the LoRA the engine would hold:
zero until ``delay`` tokens into the first segment, then each segment's own adapter from ``delay``
tokens into it (so the text just after a boundary is seen under the previous domain's LoRA, as at run
time). The target is ``<|shift|>`` after ``delay`` tokens of each new segment; the other positions of the
first ``ignore_after`` tokens of a segment carry no loss (detecting the change early is fine).
The firing threshold is chosen on validation streams for ≤ ``max_false_per_1k`` false triggers.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from dynalora.data.batches import config_record
from transformers import DynamicCache

from dynalora.data.streams import library_streams, tokenize_stream
from dynalora.data.trigger_metrics import simulate_policy, trigger_metrics
from dynalora.runtime.features import lm_head_inputs
from dynalora.runtime.teacher_forced import schedule_chunks
from dynalora.runtime.special_tokens import fit_token_row
from dynalora.shipped import shipped, trained
from dynalora.training import RunConfig, TrainingRun


@dataclass
class TriggerTrainConfig:
    library_dir: Path = shipped("library")
    """The trained library whose domains make the streams (``dynalora train library``)."""
    out_dir: Path = field(default_factory=lambda: trained("triggers"))
    """Where the trigger rows and ``triggers.json`` (threshold, metrics) are written."""
    model: str | None = None
    """Base model: HF id or folder (None: the embedded SmolLM2-135M-Instruct)."""
    train_streams: int = 48
    """Training streams (library domains, train split)."""
    validation_streams: int = 16
    """Validation streams: the firing threshold is chosen on them."""
    segments: int = 4
    """Segments (domain changes + 1) per stream."""
    segment_chars: int = 600
    """Characters per segment."""
    delay: int = 12
    """Tokens into a new segment after which the trigger should be emitted."""
    ignore_after: int = 32
    """Positions of a segment's first this many tokens carry no loss (detecting early is fine)."""
    window: int = 32
    """A trigger within this many tokens after a boundary counts as detecting it."""
    min_gap: int = 32
    """At least this many tokens between two firings when scoring thresholds."""
    steps: int = 400
    """Optimizer steps on the row."""
    lr: float = 0.02
    """Adam learning rate on the row."""
    positive_weight: float = 30.0
    """Loss weight of the (rare) positions where the trigger should fire."""
    max_false_per_1k: float = 1.0
    """The chosen threshold allows at most this many false triggers per 1,000 validation tokens."""
    seed: int = 0
    """Random seed (streams, data order)."""
    threads: int = 2
    """CPU threads torch uses."""
    run: RunConfig = field(default_factory=RunConfig)
    """The device (accelerate). The row-only fit takes seconds on cached features: it runs in full precision, on one
    process, and keeps no resumable state (the LoRA form, ``train trigger-lora``, uses the rest)."""


@torch.no_grad()  # on a generator function: each step runs without grad, the caller's code between steps as it was
def run_under_schedule(dyn, tokens: list[int], schedule: list[tuple[int, list[float] | None]]):
    """Run a stream in chunks under a LoRA schedule ``[(start, blend or None), ...]`` with a KV cache (keep policy),
    as the engine runs it; yields each chunk's logits ``(T, V)`` (what the caller's hooks capture rides along)."""
    model = dyn.model
    cache = DynamicCache(config=model.config)
    for start, stop in schedule_chunks(dyn, schedule, len(tokens)):
        ids = torch.tensor([tokens[start:stop]], device=model.device)  # (1, T)
        yield model(input_ids=ids, cache=cache, use_cache=True).logits[0]


def stream_hidden_states(dyn, tokens: list[int], schedule: list[tuple[int, list[float] | None]],
                         vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states ``(L, H)`` and ``log Z`` over the original vocab ``(L,)`` (float32) of a stream run under a
    LoRA schedule (:func:`run_under_schedule`)."""
    with lm_head_inputs(dyn.model) as captured:
        log_z = [torch.logsumexp(logits[:, :vocab_size].float(), dim=-1)
                 for logits in run_under_schedule(dyn, tokens, schedule)]
    captured = [hidden[0] for hidden in captured]  # (T, H) per chunk
    return torch.cat(captured).float(), torch.cat(log_z)


def oracle_schedule(starts: list[int], domains: list[str], labels: list[str], delay: int, length: int):
    """Zero until ``delay`` tokens in, then each segment's own adapter from ``delay`` tokens into it."""
    schedule = [(0, None)]
    for start, domain in zip(starts, domains):
        blend = [1.0 if label == domain else 0.0 for label in labels]
        schedule.append((min(start + delay, length), blend if any(blend) else None))
    return schedule


def targets_for(starts: list[int], length: int, delay: int, ignore_after: int) -> torch.Tensor:
    """Per position: 1 = emit the trigger here, 0 = don't, -1 = no loss."""
    target = torch.zeros(length)
    for start in starts:
        target[start:min(start + ignore_after, length)] = -1
        if start + delay - 1 < length:
            target[start + delay - 1] = 1
    return target


def walk_streams(tokenizer, labels, streams, delay: int, features_of, targets_of, desc: str):
    """Per stream, run under the oracle schedule (:func:`oracle_schedule` with ``delay``): ``features_of(tokens,
    schedule)``, ``targets_of(starts, length)``, the segment starts and the length — four lists."""
    features, targets, starts_all, lengths = [], [], [], []
    for stream in tqdm(streams, desc=desc, leave=False):
        tokens, starts, domains = tokenize_stream(tokenizer, stream)
        features.append(features_of(tokens, oracle_schedule(starts, domains, labels, delay, len(tokens))))
        targets.append(targets_of(starts, len(tokens)))
        starts_all.append(starts)
        lengths.append(len(tokens))
    return features, targets, starts_all, lengths


def collect(dyn, tokenizer, labels, streams, delay: int, ignore_after: int, vocab_size: int):
    """Per stream, under the oracle schedule: final hidden states, log Z, targets, segment starts, length."""
    states, targets, starts, lengths = walk_streams(
        tokenizer, labels, streams, delay,
        lambda tokens, schedule: stream_hidden_states(dyn, tokens, schedule, vocab_size),
        lambda starts, length: targets_for(starts, length, delay, ignore_after), "trigger features")
    hidden, log_z = [h for h, _ in states], [z for _, z in states]
    return hidden, log_z, [t.to(h.device) for t, h in zip(targets, hidden)], starts, lengths


THRESHOLDS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999,
              0.9995, 0.9998)


def choose_threshold(probs: list[torch.Tensor], starts: list[list[int]], lengths: list[int], window: int,
                     min_gap: int, max_false_per_1k: float,
                     votes: tuple[tuple[int, int], ...] = ((1, 1),)) -> tuple[dict, list[dict]]:
    """Scan firing thresholds (and firing rules: pass at ``k`` of the last ``n`` positions, each of ``votes``) on
    validation streams; the best recall with ≤ ``max_false_per_1k`` false triggers, then the fewest false triggers
    (or the fewest false triggers when none qualifies). Returns (best, every candidate)."""
    candidates = []
    for rule in votes:
        for threshold in THRESHOLDS:
            fired = [simulate_policy(p, threshold, min_gap, rule) for p in probs]
            candidates.append({"threshold": threshold, "votes": list(rule),
                               **trigger_metrics(fired, starts, lengths, window)})
    allowed = [c for c in candidates if c["false_per_1k_tokens"] <= max_false_per_1k] or \
        [min(candidates, key=lambda c: c["false_per_1k_tokens"])]
    return max(allowed, key=lambda c: (c["boundary_recall"], -c["false_per_1k_tokens"], c["threshold"])), candidates


def train_triggers(config: TriggerTrainConfig) -> dict:
    from dynalora.lora import DynamicLoraModel
    from dynalora.runtime.special_tokens import SHIFT_TOKEN, add_trigger_tokens, ordinary_vocab_size, trigger_row_tensor
    from dynalora.runtime.trained_trigger import TrainedTrigger
    from dynalora.plot import plot_losses
    from dynalora.lora.library_folder import load_library_bank

    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    run = TrainingRun(config.run, config.out_dir)
    base = run.load_base(config.model)
    token_ids = add_trigger_tokens(base.model, base.tokenizer)
    vocab_size = ordinary_vocab_size(base.model, base.tokenizer)
    shift_id = token_ids[SHIFT_TOKEN]
    bank, adapters = load_library_bank(config.library_dir, base.model)
    dyn = DynamicLoraModel.attach(base.model, bank)
    make = lambda split, count, seed: library_streams(  # noqa: E731
        adapters, split, count, seed, config.segments, config.segment_chars)
    train = collect(dyn, base.tokenizer, bank.labels, make("train", config.train_streams, config.seed), config.delay,
                    config.ignore_after, vocab_size)
    validation = collect(dyn, base.tokenizer, bank.labels,
                         make("validation", config.validation_streams, config.seed + 1),
                         config.delay, config.ignore_after, vocab_size)
    feature_seconds = time.perf_counter() - started

    embedding = trigger_row_tensor(base.model)  # the LM head's row decides p(<|shift|>)
    h = torch.cat(train[0])  # (N, H)
    log_z = torch.cat(train[1])  # (N,)
    target = torch.cat(train[2])  # (N,)
    keep = target >= 0
    row, losses = fit_token_row(embedding[shift_id], h[keep], log_z[keep], target[keep], config.positive_weight,
                                config.steps, config.lr)
    with torch.no_grad():
        embedding[shift_id] = row

    def probs_of(data):
        return [torch.sigmoid(hh @ row.float() - zz) for hh, zz in zip(data[0], data[1])]  # features are float32

    best, candidates = choose_threshold(probs_of(validation), validation[3], validation[4], config.window,
                                        config.min_gap, config.max_false_per_1k)
    train_fired = [simulate_policy(p, best["threshold"], config.min_gap) for p in probs_of(train)]
    metadata = {"config": config_record(config),
                "threshold": best["threshold"], "validation": best, "threshold_scan": candidates,
                "train": trigger_metrics(train_fired, train[3], train[4], config.window),
                "trained_parameters": int(row.numel()), "seconds": round(time.perf_counter() - started, 1),
                "feature_seconds": round(feature_seconds, 1), "initial_loss": losses[0], "final_loss": losses[-1]}
    if run.is_main:
        TrainedTrigger.from_model(base.model, token_ids, metadata).save_pretrained(config.out_dir)
        plot_losses(losses, config.out_dir / "loss.png", "<|shift|> row: weighted logistic loss")
    dyn.detach()
    return metadata


def rescan_thresholds(triggers_dir: Path, library_dir: Path = shipped("library"), model: str | None = None,
                      threads: int = 2) -> dict:
    """Choose the firing threshold again on the same validation streams (the grid in ``THRESHOLDS``) for a
    trained trigger — the row or the LoRA form; its LoRA, if any, is merged — and rewrite ``triggers.json``'s threshold,
    validation and scan. Nothing is trained: the trigger's weights stay as they are."""
    from dynalora.lora import DynamicLoraModel
    from dynalora.models import load_base_model
    from dynalora.runtime.special_tokens import SHIFT_TOKEN, ordinary_vocab_size, trigger_row_tensor
    from dynalora.runtime.trained_trigger import RECORD_FILE, TrainedTrigger
    from dynalora.runtime.trigger_lora import merge_trigger_lora
    from dynalora.lora.library_folder import load_library_bank

    torch.set_num_threads(threads)
    trigger = TrainedTrigger.from_pretrained(triggers_dir)
    if trigger.head is not None:
        raise ValueError(f"{triggers_dir}: a trigger head (`train trigger-head` chooses its threshold itself); "
                         "rescan-triggers reads the row and LoRA forms")
    record, saved = trigger.record, trigger.record["config"]
    base = load_base_model(model)
    shift_id = trigger.install(base.model, base.tokenizer)[SHIFT_TOKEN]
    vocab_size = ordinary_vocab_size(base.model, base.tokenizer)
    if trigger.deltas:
        merge_trigger_lora(base.model, trigger.deltas)
    bank, adapters = load_library_bank(library_dir, base.model)
    dyn = DynamicLoraModel.attach(base.model, bank)
    streams = library_streams(adapters, "validation", saved["validation_streams"], saved["seed"] + 1,
                             saved["segments"], saved["segment_chars"])
    validation = collect(dyn, base.tokenizer, bank.labels, streams, saved["delay"], saved["ignore_after"], vocab_size)
    row = trigger_row_tensor(base.model)[shift_id].detach().float()  # as both recipes train it
    probs = [torch.sigmoid(h @ row - z) for h, z in zip(validation[0], validation[1])]
    best, candidates = choose_threshold(probs, validation[3], validation[4], saved["window"], saved["min_gap"],
                                        saved["max_false_per_1k"])
    dyn.detach()
    record.update({"threshold": best["threshold"], "validation": best, "threshold_scan": candidates,
                   "rescanned_thresholds": list(THRESHOLDS)})
    (Path(triggers_dir) / RECORD_FILE).write_text(json.dumps(record, indent=2))
    return record
