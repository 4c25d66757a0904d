"""``dynalora eval shift``: per-segment NLL through mixed-domain streams, dynalora against today's options.

Teacher-forced. Each segment's first ``skip`` tokens are left out of its score (time to detect the
change). Every method is scored over the original vocabulary (trigger tokens are never part of the text).

* ``base`` — no LoRA; ``uniform_merge`` — the exact uniform blend of the library;
* ``peft_linear_merge`` — PEFT ``add_weighted_adapter(..., "linear")`` with uniform weights;
* ``router_select`` — told where each segment starts, picks one adapter from the segment's first
  ``skip`` tokens (nearest prototype of pooled hidden states of each adapter's training text);
* ``xlora`` — PEFT X-LoRA over the same library, its per-token classifier trained briefly on
  train-split streams (``dynalora train xlora``; two forward passes per call, no KV cache);
* ``oracle`` — per segment, the single library adapter with the lowest NLL (upper bound for selection);
* ``dynalora`` — no labels: the learned ``<|shift|>`` probability fires the trigger, the shift
  hypernetwork writes the row's LoRA in place and the stream goes on under it (KV cache kept);
* ``dynalora_routed`` — the same, with the token router (``dynalora train route``) re-weighting the row's blend at
  every token inside the same forward.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import DynamicCache

from dynalora.data.streams import read_streams, tokenize_stream
from dynalora.report import report
from dynalora.data.trigger_metrics import trigger_metrics
from dynalora.models import check_placement, model_device
from dynalora.runtime.teacher_forced import schedule_chunks
from dynalora.shipped import shipped

METHODS = ("base", "uniform_merge", "peft_linear_merge", "router_select", "oracle", "dynalora", "dynalora_routed",
           "xlora")


@dataclass
class ShiftEvalConfig:
    data: Path | list[Path]
    """One or more streams JSONL files."""
    library_dir: Path = shipped("library")
    """The trained library (``dynalora train library``)."""
    shift_dir: Path = shipped("shift")
    """The shift network (``dynalora train shift``)."""
    triggers_dir: Path = shipped("triggers")
    """The trained trigger (``dynalora train triggers``)."""
    xlora_dir: Path = shipped("xlora")
    """X-LoRA classifier folder (``dynalora train xlora``)."""
    router_dir: Path = shipped("router")
    """The token router of ``dynalora_routed`` (``dynalora train route``)."""
    model: str | None = None
    """Base model: HF id or folder (None: the embedded SmolLM2-135M-Instruct)."""
    skip: int = 32
    """Each segment's first this many tokens are not scored (time to detect the change)."""
    max_streams: int | None = None
    """Score at most this many streams (None: all)."""
    min_gap: int = 32
    """At least this many tokens between two triggers."""
    prototype_texts: int = 24
    """Texts per adapter averaged into the router's prototypes."""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """Methods to run (e.g. only ``["dynalora"]`` to compare its settings on validation streams)."""
    update_delay: int = 12
    """Tokens between a trigger and its update (0: update at the trigger)."""
    trigger: list[str] = field(default_factory=lambda: ["prob"])
    """The dynalora methods' trigger policies (``--trigger`` forms; ``prompt`` picks the first blend from each
    stream's first ``prompt_tokens``)."""
    prompt_tokens: int = 0
    """Each stream's first this many tokens are read as a prompt (policies that look at prompts see them; an update
    fired there lands when they have been read)."""
    use_factors: bool = False
    """Apply the shift network's generated factors too (off: they raised validation NLL)."""
    device: str = "cpu"
    """Where the models run: cpu, cuda, cuda:N or auto."""
    dtype: str = "float32"
    """The base model's weights: float32, bfloat16 or float16 (scores are computed in float32)."""
    threads: int = 2
    """CPU threads torch uses."""

    def __post_init__(self):
        check_placement(self.device, self.dtype)


class _Scorer:
    """Teacher-forced per-token NLL of a stream under a LoRA schedule (KV cache kept across switches)."""

    def __init__(self, dyn, vocab_size: int):
        self.dyn, self.vocab_size, self.device = dyn, vocab_size, model_device(dyn.model)

    @torch.no_grad()
    def nll(self, tokens: list[int], schedule: list[tuple[int, list[float] | None]]) -> torch.Tensor:
        """``schedule = [(start, blend or None), ...]`` (row 0's blend from each start on, walked by
        :func:`schedule_chunks`); returns the NLL of tokens 1..L-1 ``(L-1,)``."""
        cache = DynamicCache(config=self.dyn.model.config)
        out = []
        for start, stop in schedule_chunks(self.dyn, schedule, len(tokens)):
            ids = torch.tensor([tokens[start:stop]], device=self.device)  # (1, T)
            logits = self.dyn(input_ids=ids, cache=cache, use_cache=True).logits[0]
            out.append(torch.log_softmax(logits[:, :self.vocab_size].float(), dim=-1))
        log_probs = torch.cat(out)[:-1]  # (L-1, V): position t predicts token t+1
        return -log_probs.gather(1, torch.tensor(tokens[1:], device=self.device)[:, None])[:, 0]


def segment_scores(nll: torch.Tensor, starts: list[int], length: int, skip: int) -> list[tuple[float, int]]:
    """(summed NLL, count) per segment over its tokens from ``skip`` on (token t scored by nll[t-1])."""
    bounds = starts + [length]
    scores = []
    for start, stop in zip(bounds, bounds[1:]):
        first = max(start + skip, 1)
        part = nll[first - 1:stop - 1]
        scores.append((float(part.sum()), int(part.numel())))
    return scores


def eval_shift(config: ShiftEvalConfig, out: Path | None = None) -> dict:
    from peft import PeftModel

    from dynalora.hyper import NearestPrototype
    from dynalora.hyper.protocol import TriggerFeatures
    from dynalora.models import load_base_model
    from dynalora.system.assemble import load_shift_system
    from dynalora.data.batches import source_kind, task_pairs, text_token_stream

    torch.set_num_threads(config.threads)
    paths = config.data if isinstance(config.data, list) else [config.data]
    streams = [s for path in paths for s in read_streams(path)][:config.max_streams]
    unknown = sorted(set(config.methods) - set(METHODS))
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    run = set(config.methods)
    system = load_shift_system(config.library_dir, config.shift_dir, config.triggers_dir, config.model,
                               use_factors=config.use_factors, update_delay=config.update_delay, device=config.device,
                               dtype=config.dtype, triggers=config.trigger)
    dyn, capture, base, adapters = system.dyn, system.capture, system.base, system.adapters
    labels, vocab_size = system.bank.labels, system.vocab_size
    scorer = _Scorer(dyn, vocab_size)

    # PEFT's linear merge, as users merge today (a second copy of the base model)
    peft_model, peft_note = None, None
    if "peft_linear_merge" in run:
        try:
            peft_model = PeftModel.from_pretrained(load_base_model(config.model, config.dtype, config.device).model,
                                                   str(config.library_dir / labels[0]), adapter_name=labels[0])
            for label in labels[1:]:
                peft_model.load_adapter(str(config.library_dir / label), adapter_name=label)
            peft_model.add_weighted_adapter(labels, [1.0 / len(labels)] * len(labels), "uniform",
                                            combination_type="linear")
            peft_model.set_adapter("uniform")
            peft_model.eval()
        except Exception as error:  # report, don't hide
            peft_note = f"not run: {type(error).__name__}: {error}"
            peft_model = None

    xlora_model, xlora_note = None, None
    if "xlora" in run:
        from dynalora.system.xlora import load_xlora

        try:
            xlora_model, _ = load_xlora(config.xlora_dir, config.library_dir, config.model, config.device,
                                        config.dtype)
        except FileNotFoundError as error:
            xlora_note = f"not run: {error}"

    token_router, token_router_note = None, None
    if "dynalora_routed" in run:
        from dynalora.hyper.router import TokenRouter

        try:
            token_router = TokenRouter.from_pretrained(config.router_dir, system.dyn.state.device)
        except FileNotFoundError as error:
            token_router_note = f"not run: {error}"

    # router prototypes: pooled hidden states of each adapter's own training text (train split)
    started = time.perf_counter()
    prototypes = []
    for meta in adapters if "router_select" in run else []:
        kind, name = source_kind(meta["source"])
        if kind != "bigbench":
            stream = text_token_stream(base.tokenizer, meta["source"], "train", max_documents=config.prototype_texts)
            texts = [stream[i * 64:(i + 1) * 64] for i in range(config.prototype_texts)]
        else:
            texts = [p + a for p, a in task_pairs(base.tokenizer, name, "train", config.prototype_texts)]
        feats = []
        with torch.no_grad():
            for ids in texts:
                capture.reset()
                dyn(input_ids=torch.tensor([ids[:config.skip]], device=scorer.device), use_cache=False)
                feats.append(capture.pooled(0))
        prototypes.append(torch.stack(feats).mean(0))
    router = NearestPrototype(torch.stack(prototypes), one_hot=True) if prototypes else None
    router_seconds = time.perf_counter() - started

    uniform = [1.0 / len(labels)] * len(labels)
    totals = {name: [0.0, 0] for name in METHODS if name in run}
    unseen_totals = {name: [0.0, 0] for name in totals}
    fired_all, starts_all, lengths, shift_seconds, router_choices = [], [], [], [], []
    per_domain: dict[str, dict[str, list[float]]] = {}
    for stream in tqdm(streams, desc="eval shift"):
        tokens, starts, domains = tokenize_stream(base.tokenizer, stream)
        library_flags = [s.get("library", True) for s in stream["segments"]]
        length = len(tokens)
        scores = {}
        if "base" in run:
            scores["base"] = segment_scores(scorer.nll(tokens, [(0, [0.0] * len(labels))]), starts,
                                            length, config.skip)
        if "uniform_merge" in run:
            scores["uniform_merge"] = segment_scores(scorer.nll(tokens, [(0, uniform)]), starts, length,
                                                     config.skip)
        if peft_model is not None:
            with torch.no_grad():
                ids = torch.tensor([tokens], device=scorer.device)  # (1, L)
                logits = peft_model(input_ids=ids).logits[0, :-1, :vocab_size].float()
            nll = -torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]
            scores["peft_linear_merge"] = segment_scores(nll, starts, length, config.skip)
        if xlora_model is not None:
            from dynalora.system.xlora import xlora_token_nll

            scores["xlora"] = segment_scores(xlora_token_nll(xlora_model, tokens, vocab_size), starts, length,
                                             config.skip)
        if router is not None:  # told the boundaries, picks one adapter from each segment's first `skip` tokens
            schedule = [(0, [0.0] * len(labels))]
            for start in starts:
                capture.reset()
                dyn.state.reset(0)
                with torch.no_grad():
                    dyn(input_ids=torch.tensor([tokens[start:start + config.skip]], device=scorer.device),
                        use_cache=False)
                choice = router(TriggerFeatures(0, start, "router", capture.last(0), capture.pooled(0)),
                                dyn.state).blend
                router_choices.append(labels[int(choice.argmax())])
                schedule.append((min(start + config.skip, length), choice.tolist()))
            scores["router_select"] = segment_scores(scorer.nll(tokens, schedule), starts, length, config.skip)
        if "oracle" in run:
            per_adapter = []
            for k in range(len(labels)):
                one_hot = [1.0 if j == k else 0.0 for j in range(len(labels))]
                per_adapter.append(segment_scores(scorer.nll(tokens, [(0, one_hot)]), starts, length,
                                                  config.skip))
            scores["oracle"] = [min((per_adapter[k][s] for k in range(len(labels))), key=lambda x: x[0] / max(x[1], 1))
                                for s in range(len(starts))]
        starts_all.append(starts)
        lengths.append(length)
        if "dynalora" in run:
            scored = system.run_stream(tokens, config.min_gap, config.prompt_tokens)
            scores["dynalora"] = segment_scores(scored.nll, starts, length, config.skip)
            fired_all.append(scored.fired)
            shift_seconds.extend(event.seconds for event in scored.events)
        if token_router is not None:
            token_router.attach(dyn)
            try:
                scores["dynalora_routed"] = segment_scores(system.run_stream(tokens, config.min_gap,
                                                                             config.prompt_tokens).nll, starts,
                                                           length, config.skip)
            finally:
                token_router.detach(dyn)
        for name, segs in scores.items():
            for (total, count), domain, library in zip(segs, domains, library_flags):
                bucket = totals if library else unseen_totals
                bucket[name][0] += total
                bucket[name][1] += count
                per_domain.setdefault(domain, {}).setdefault(name, [0.0, 0])
                per_domain[domain][name][0] += total
                per_domain[domain][name][1] += count
    dyn.detach()

    def summary(bucket):
        return {name: {"nll": t / c, "ppl": math.exp(t / c), "tokens": c} for name, (t, c) in bucket.items() if c}

    methods = summary(totals)
    if peft_note:
        methods["peft_linear_merge"] = {"note": peft_note}
    if xlora_note:
        methods["xlora"] = {"note": xlora_note}
    if token_router_note:
        methods["dynalora_routed"] = {"note": token_router_note}
    triggers = trigger_metrics(fired_all, starts_all, lengths, config.skip) if "dynalora" in run else {}
    triggers["threshold"], triggers["votes"] = system.threshold, list(system.votes)
    triggers["update_delay"] = config.update_delay
    triggers.update(policies=config.trigger, prompt_tokens=config.prompt_tokens, triggers_dir=str(config.triggers_dir))
    triggers["generated_factors"] = config.use_factors
    triggers["median_shift_ms"] = 1e3 * sorted(shift_seconds)[len(shift_seconds) // 2] if shift_seconds else None
    result = {"methods": methods, "unseen_domains": summary(unseen_totals),
              "per_domain": {d: summary(v) for d, v in per_domain.items()}, "triggers": triggers,
              "segments": sum(len(s) for s in starts_all), "tokens": sum(lengths), "streams": len(streams),
              "data": [str(p) for p in paths], "skip": config.skip, "router_setup_seconds": round(router_seconds, 1),
              "router_choices": {label: router_choices.count(label) for label in labels}}
    result["ratios"] = {}
    for name in ("dynalora", "dynalora_routed"):
        if "nll" in methods.get(name, {}) and "nll" in methods.get("oracle", {}):
            d = methods[name]["nll"]
            result["ratios"].update({f"{name}_vs_oracle": d / methods["oracle"]["nll"],
                                     **{f"{name}_gain_vs_{m}": 1 - d / methods[m]["nll"] for m in
                                        ("uniform_merge", "peft_linear_merge", "base", "router_select", "xlora",
                                         "dynalora") if m != name and "nll" in methods.get(m, {})}})
    return report(result, format_shift_table(result), out)


def format_shift_table(result: dict) -> str:
    lines = [f"{'method':<20} {'NLL':>8} {'PPL':>9}   unseen NLL"]
    for name, m in result["methods"].items():
        unseen = result["unseen_domains"].get(name, {}).get("nll")
        if "nll" in m:
            lines.append(f"{name:<20} {m['nll']:>8.4f} {m['ppl']:>9.3f}   "
                         f"{unseen if unseen is None else f'{unseen:.4f}'}")
        else:
            lines.append(f"{name:<20} {m['note']}")
    t = result["triggers"]
    if "boundary_recall" in t:
        lines.append(f"triggers: recall {t['boundary_recall']:.2f} within {result['skip']} tokens, precision "
                     f"{t['precision']:.2f}, mean delay {t['mean_delay']}, false/1k tokens "
                     f"{t['false_per_1k_tokens']:.2f}")
    return "\n".join(lines)
