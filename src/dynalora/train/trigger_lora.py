"""``dynalora train triggers --lora``: the trigger's second form — a small LoRA in the top layers as well
as the ``<|shift|>`` row, for when one embedding row cannot tell a domain change from the text.

The row alone reads only the final hidden state, which the frozen model never trained to compare the
current text with what came before. A rank-``r`` LoRA on ``k_proj`` and ``o_proj`` of the last
``layers`` decoder layers lets attention look back at the earlier text for that. Trained jointly with
the row (started from the shipped row) on the same targets as the row-only recipe, run under the same
oracle LoRA schedule, plus ``kl_weight`` × KL(original ‖ new) of the next-token distribution over the
original vocabulary, so the text the model predicts stays what it was.

The LoRA is static (the same at every token), so at run time it is merged into the base weights when
the trigger files are loaded (``merge_trigger_lora``): nothing changes in the engine and it costs
nothing per token. Its modules are not ones the library targets, so the shift LoRA goes on as before.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import DynamicCache

from dynalora.data.batches import config_record
from dynalora.runtime.features import lm_head_inputs
from dynalora.train.triggers import TriggerTrainConfig
from dynalora.runtime.teacher_forced import schedule_chunks
from dynalora.shipped import shipped, trained
from dynalora.training import TrainingRun


@dataclass
class TriggerLoraTrainConfig(TriggerTrainConfig):
    """The row-only recipe's settings (streams, delay, scoring window, threshold rule) plus the LoRA's."""
    row_dir: Path = shipped("triggers")
    """The row-only trigger to start from (``dynalora train triggers``)."""
    out_dir: Path = field(default_factory=lambda: trained("triggers_lora"))
    layers: int = 4
    """The LoRA goes on the last this many decoder layers."""
    target_modules: list[str] = field(default_factory=lambda: ["k_proj", "o_proj"])
    """Module kinds of the top layers the trigger LoRA adapts."""
    rank: int = 4
    """Rank of the trigger LoRA."""
    steps: int = 150
    """Optimizer steps."""
    batch_size: int = 1
    """Streams per step (split over the processes under ``accelerate launch``)."""
    lr: float = 2e-3
    """Adam learning rate on the LoRA."""
    row_lr: float = 0.01
    """Adam learning rate on the trigger row."""
    kl_weight: float = 1.0
    """Weight of KL(base ‖ with the LoRA) on the ordinary vocabulary: the LoRA must not change the text."""

    def __post_init__(self):
        if min(self.layers, self.rank, self.steps, self.batch_size) < 1:
            raise ValueError("TriggerLoraTrainConfig: layers, rank, steps and batch_size must be ≥ 1")


def top_layer_modules(model, layers: int, target_modules: list[str]) -> dict[str, torch.nn.Linear]:
    """``{qualified name: Linear}`` of ``target_modules`` in the last ``layers`` decoder layers (the Linear
    inside a dynalora wrapper where the model has one attached)."""
    found = {name: getattr(module, "base_layer", module) for name, module in model.named_modules()
             if name.rsplit(".", 1)[-1] in target_modules}
    found = {name: module for name, module in found.items() if isinstance(module, torch.nn.Linear)}
    if not found:
        raise ValueError(f"trigger LoRA: the model has no Linear modules named {target_modules}")
    indices = sorted({int(part) for name in found for part in name.split(".") if part.isdigit()})
    keep = set(indices[-layers:])
    return {name: module for name, module in found.items()
            if any(part.isdigit() and int(part) in keep for part in name.split("."))}


class StaticLora:
    """Trainable ``ΔW = B A`` on some Linear modules through forward hooks (removable, nothing replaced)."""

    def __init__(self, modules: dict[str, torch.nn.Linear], rank: int):
        self.factors, self.handles, self.enabled = {}, [], True
        for name, module in modules.items():
            device = module.weight.device
            a = (torch.randn(rank, module.in_features) / module.in_features ** 0.5).to(device).requires_grad_(True)
            b = torch.zeros(module.out_features, rank, device=device, requires_grad=True)  # (out, r); a: (r, in)
            self.factors[name] = (a, b)
            self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def add_delta(module, inputs, output):
            if not self.enabled:
                return output
            a, b = self.factors[name]
            return output + ((inputs[0].to(a.dtype) @ a.T) @ b.T).to(output.dtype)  # (..., in) → (..., out)
        return add_delta

    def parameters(self) -> list[torch.Tensor]:
        return [t for pair in self.factors.values() for t in pair]

    def deltas(self) -> dict[str, torch.Tensor]:
        return {name: (b @ a).detach() for name, (a, b) in self.factors.items()}  # (out, in)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def reference_log_probs(dyn, tokens: list[int], schedule, vocab_size: int) -> torch.Tensor:
    """Next-token log-probs ``(L, V)`` over the original vocabulary under the schedule (KV cache kept)."""
    cache, out = DynamicCache(config=dyn.model.config), []
    for start, stop in schedule_chunks(dyn, schedule, len(tokens)):
        ids = torch.tensor([tokens[start:stop]], device=dyn.model.device)  # (1, T)
        logits = dyn.model(input_ids=ids, cache=cache, use_cache=True).logits[0]
        out.append(torch.log_softmax(logits[:, :vocab_size].float(), -1))
    return torch.cat(out)


def train_step(dyn, tokens: list[int], schedule, target: torch.Tensor, reference: torch.Tensor, row: torch.Tensor,
               vocab_size: int, positive_weight: float, kl_weight: float, scale: float = 1.0,
               backward=torch.Tensor.backward) -> dict:
    """One stream: the weighted trigger loss + ``kl_weight`` × KL(reference ‖ new), back-propagated chunk by
    chunk (the engine's state is rewritten in place between chunks, so each chunk's graph is used and freed
    before the next blend is set; the KV cache of earlier chunks is detached). Gradients accumulate, ``scale``
    times the loss's (``1 / streams`` in a batch), through ``backward`` (accelerate's, which scales for fp16 and
    gradient accumulation)."""
    model = dyn.model
    target = target.to(row.device)
    keep = target >= 0
    weights = torch.where(target == 1, positive_weight, 1.0) * keep  # (L,) 0 where no loss
    weight_total = float(weights.sum())
    cache, trigger_total, kl_total = DynamicCache(config=model.config), 0.0, 0.0
    with lm_head_inputs(model, detach=False) as captured:  # the head's inputs keep their graph
        for start, stop in schedule_chunks(dyn, schedule, len(tokens)):
            ids = torch.tensor([tokens[start:stop]], device=model.device)  # (1, T)
            logits = model(input_ids=ids, cache=cache, use_cache=True).logits[0][:, :vocab_size].float()  # (T, V)
            hidden = captured.pop()[0].float()  # (T, H)
            margin = hidden @ row - torch.logsumexp(logits, -1)  # (T,) logit of p(<|shift|>)
            trigger = (weights[start:stop] * F.binary_cross_entropy_with_logits(
                margin, target[start:stop].clamp(min=0), reduction="none")).sum() / weight_total
            kl = F.kl_div(torch.log_softmax(logits, -1), reference[start:stop], log_target=True,
                          reduction="sum") / len(tokens)
            backward(scale * (trigger + kl_weight * kl))
            trigger_total += float(trigger.detach())
            kl_total += float(kl.detach())
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys.detach(), layer.values.detach()
    return {"trigger": trigger_total, "kl": kl_total}


def train_trigger_lora(config: TriggerLoraTrainConfig) -> dict:
    from dynalora.lora import DynamicLoraModel
    from dynalora.runtime.special_tokens import SHIFT_TOKEN, ordinary_vocab_size, trigger_row_tensor
    from dynalora.runtime.trained_trigger import TrainedTrigger
    from dynalora.runtime.trigger_lora import factor_deltas, lora_factors, merge_trigger_lora
    from dynalora.lora.library_folder import load_library_bank
    from dynalora.plot import plot_losses
    from dynalora.data.streams import library_streams, tokenize_stream
    from dynalora.train.triggers import choose_threshold, collect, oracle_schedule, targets_for

    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    run = TrainingRun(config.run, config.out_dir)
    base = run.load_base(config.model)
    token_ids = TrainedTrigger.from_pretrained(config.row_dir).install(base.model, base.tokenizer)
    shift_id = token_ids[SHIFT_TOKEN]
    vocab_size = ordinary_vocab_size(base.model, base.tokenizer)
    bank, adapters = load_library_bank(config.library_dir, base.model)
    dyn = DynamicLoraModel.attach(base.model, bank)
    make = lambda split, count, seed: library_streams(  # noqa: E731
        adapters, split, count, seed, config.segments, config.segment_chars)
    train = []
    for stream in make("train", config.train_streams, config.seed):
        tokens, starts, names = tokenize_stream(base.tokenizer, stream)
        train.append((tokens, oracle_schedule(starts, names, bank.labels, config.delay, len(tokens)),
                      targets_for(starts, len(tokens), config.delay, config.ignore_after)))

    embedding = trigger_row_tensor(base.model)  # the LM head's row decides p(<|shift|>)
    row = embedding[shift_id].detach().float().requires_grad_(True)  # (H,), trained in float32
    lora = StaticLora(top_layer_modules(base.model, config.layers, config.target_modules), config.rank)
    optimizer = torch.optim.Adam([{"params": lora.parameters(), "lr": config.lr},
                                  {"params": [row], "lr": config.row_lr}])
    optimizer = run.accelerator.prepare(optimizer)
    trained = [*lora.parameters(), row]
    rng = random.Random(config.seed)
    start, history, extra = run.resume(rng)
    if extra:  # the LoRA factors and the row are plain tensors: the recipe saves them itself
        with torch.no_grad():
            for tensor, saved in zip(trained, extra["tensors"]):
                tensor.copy_(saved)
    progress = tqdm(range(start, config.steps), desc="train trigger LoRA", initial=start, total=config.steps,
                    disable=not run.is_main)
    for step in progress:
        batch = [train[rng.randrange(len(train))] for _ in range(config.batch_size)]  # alike on every process
        parts = []
        mine = run.shard(torch.arange(config.batch_size)).tolist()
        with run.accelerator.accumulate():
            for index in mine:
                tokens, schedule, target = batch[index]
                lora.enabled = False  # the reference: the model as it was
                reference = reference_log_probs(dyn, tokens, schedule, vocab_size)
                lora.enabled = True
                with run.accelerator.autocast():
                    parts.append(train_step(dyn, tokens, schedule, target, reference, row, vocab_size,
                                            config.positive_weight, config.kl_weight, 1 / len(mine),
                                            run.accelerator.backward))
            run.update(None, optimizer, trained, average=True)  # the LoRA acts through hooks, not a prepared module
        history.append({key: run.mean(torch.tensor(sum(p[key] for p in parts) / len(parts), device=run.device))
                        for key in parts[0]})
        progress.set_postfix(trigger=f"{history[-1]['trigger']:.3f}", kl=f"{history[-1]['kl']:.4f}")
        run.end_step(step + 1, history, rng, {"tensors": [t.detach().cpu() for t in trained]})
    train_seconds = time.perf_counter() - started
    run.finish()
    lora.remove()
    config.out_dir.mkdir(parents=True, exist_ok=True)
    factors = lora_factors(lora.deltas(), config.rank)
    merge_trigger_lora(base.model, factor_deltas(factors))  # as shipped (fp16 factors), validated as such
    with torch.no_grad():
        embedding[shift_id] = row.detach()

    validation = collect(dyn, base.tokenizer, bank.labels, make("validation", config.validation_streams,
                                                                config.seed + 1), config.delay, config.ignore_after,
                         vocab_size)
    probs = [torch.sigmoid(h @ row.detach() - z) for h, z in zip(validation[0], validation[1])]
    best, candidates = choose_threshold(probs, validation[3], validation[4], config.window, config.min_gap,
                                        config.max_false_per_1k)
    metadata = {"config": config_record(config), "threshold": best["threshold"], "validation": best,
                "threshold_scan": candidates, "form": "lora",
                "trained_parameters": int(row.numel()) + sum(t.numel() for t in lora.parameters()),
                "seconds": round(time.perf_counter() - started, 1), "train_seconds": round(train_seconds, 1),
                "history": history, "initial": history[0], "final": {
                    k: sum(h[k] for h in history[-20:]) / len(history[-20:]) for k in history[0]},
                "processes": run.accelerator.num_processes, "resumed_from_step": start}
    if run.is_main:
        TrainedTrigger.from_model(base.model, token_ids, metadata, factors).save_pretrained(config.out_dir)
        plot_losses([h["trigger"] for h in history], config.out_dir / "loss.png",
                    "trigger LoRA + <|shift|> row: weighted logistic loss")
    dyn.detach()
    return metadata
