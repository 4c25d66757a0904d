"""``dynalora eval escalate``: continuation NLL against compute, for the stack at each depth and deciding alone.

Examples are contexts from the library domains' ``split`` (held out from ``train escalate``'s train split;
its threshold came from the validation split) and the text that follows; a hypernetwork call per
example writes the LoRA the continuation is scored under. Methods:

* ``base`` — no LoRA; ``level1`` — the shift network alone, every time; ``level2`` — the whole stack,
  every time;
* ``dynalora`` — level 1, and the stack where ``p(<|think|>)`` at the context's last token passes the
  trained threshold;
* ``random`` — the stack on a random subset of the same size (mean and spread over ``random_draws``).

Compute is counted honestly per continuation token: the base forward with the method's LoRA, plus its
hypernetwork calls spread over the continuation (FLOPs from ``torch.utils.flop_counter``, and wall time,
median of ``timing_repeats``). ``quality`` is the share of level 2's NLL gain over level 1 a method gets;
``extra_compute`` the share of level 2's extra compute over level 1 it pays.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from dynalora.models import check_placement
from dynalora.plot import pyplot
from dynalora.report import report
from dynalora.shipped import shipped


@dataclass
class EscalateEvalConfig:
    library_dir: Path = shipped("library")
    """The trained library (``dynalora train library``)."""
    shift_dir: Path = shipped("shift")
    """The shift network (``dynalora train shift``)."""
    triggers_dir: Path = shipped("triggers")
    """The trained trigger (``dynalora train triggers``)."""
    escalate_dir: Path = shipped("escalate")
    """Levels above the shift network (``dynalora train escalate``)."""
    model: str | None = None
    """Base model: HF id or folder (None: the embedded SmolLM2-135M-Instruct)."""
    split: str = "test"
    """The library domains' split the examples come from."""
    per_domain: int = 40
    """Examples per library domain."""
    context_tokens: int = 48
    """Tokens of context the networks read."""
    continuation_tokens: int = 64
    """Tokens whose NLL is scored."""
    random_draws: int = 20
    """Draws of random escalation at the same rate."""
    timing_repeats: int = 20
    """Repeats of each timing (median)."""
    seed: int = 2
    """Random seed."""
    device: str = "cpu"
    """Where the models run: cpu, cuda, cuda:N or auto."""
    dtype: str = "float32"
    """The base model's weights: float32, bfloat16 or float16 (scores are computed in float32)."""
    threads: int = 2
    """CPU threads torch uses."""
    plot: Path | None = None
    """Where to draw the NLL-vs-compute curve (None: beside ``out`` as .png)."""

    def __post_init__(self):
        check_placement(self.device, self.dtype)


def _flops(call) -> int:
    with FlopCounterMode(display=False) as counter:
        call()
    return int(counter.get_total_flops())


def _seconds(call, repeats: int) -> float:
    call()  # warm up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@torch.no_grad()
def compute_costs(dyn, stack, features: torch.Tensor, continuation: torch.Tensor, level2_factors: bool,
                  repeats: int) -> dict:
    """Per continuation token, for ``base`` / ``level1`` / ``level2``: FLOPs and seconds of the scored forward
    under that LoRA plus one hypernetwork call (``features (1, H)``, ``continuation (1, T)``)."""
    from dynalora.system.escalate import level1_lora

    tokens = continuation.shape[1]
    costs = {}
    for name, depth, use_factors in (("base", None, False), ("level1", 1, False), ("level2", 2, level2_factors)):
        def call():
            return None if depth is None else stack(features, depth, with_factors=use_factors)

        def forward():
            if depth is None:
                return dyn(input_ids=continuation, use_cache=False)
            blend, factors = level1_lora(call(), use_factors)
            with dyn.state.functional(dyn.state.expand_blend(blend), factors):
                return dyn(input_ids=continuation, use_cache=False)

        hyper_flops = 0 if depth is None else _flops(call)
        costs[name] = {"flops_per_token": _flops(forward) / tokens, "hyper_flops_per_call": hyper_flops,
                       "seconds_per_token": _seconds(forward, repeats) / tokens,
                       "hyper_seconds_per_call": 0.0 if depth is None else _seconds(call, repeats)}
    return costs


def curve(nll: dict, order: torch.Tensor, rates: list[float]) -> list[float]:
    """Mean NLL when the first ``rate`` share of examples in ``order`` escalate (level 2), the rest use level 1."""
    out = []
    for rate in rates:
        chosen = torch.zeros(len(order), dtype=torch.bool)
        chosen[order[:round(rate * len(order))]] = True
        out.append(float(torch.where(chosen, nll["level2"], nll["level1"]).mean()))
    return out


def eval_escalate(config: EscalateEvalConfig, out: Path | None = None) -> dict:
    from dynalora.hyper.stack import load_stack
    from dynalora.runtime.special_tokens import THINK_TOKEN
    from dynalora.runtime.trained_trigger import TrainedTrigger
    from dynalora.system.assemble import load_shift_system
    from dynalora.system.escalate import escalate_examples, last_hidden_and_log_z, nll_table

    torch.set_num_threads(config.threads)
    trained = json.loads((Path(config.escalate_dir) / "escalate.json").read_text())
    level2_factors, threshold = trained["config"]["level2_factors"], trained["threshold"]
    system = load_shift_system(config.library_dir, config.shift_dir, config.triggers_dir, config.model, max_batch=16,
                               device=config.device, dtype=config.dtype)
    TrainedTrigger.from_pretrained(Path(config.escalate_dir) / "think_token.safetensors").install(
        system.base.model, system.base.tokenizer)
    stack = load_stack(system.net, config.escalate_dir)
    features, continuations, contexts = escalate_examples(system, config, config.split, config.per_domain, config.seed)
    nll = {name: values.cpu() for name, values in  # (N,) per level: the statistics below run on the CPU
           nll_table(system.dyn, stack, features, continuations, level2_factors, system.vocab_size).items()}
    hidden, log_z = last_hidden_and_log_z(system.base.model, contexts, system.vocab_size)
    think_row = system.base.model.get_input_embeddings().weight[
        system.base.tokenizer.convert_tokens_to_ids(THINK_TOKEN)].float()
    p_think = torch.sigmoid(hidden @ think_row - log_z).cpu()  # (N,)
    escalate = p_think >= threshold
    count, rate = int(escalate.sum()), float(escalate.float().mean())
    costs = compute_costs(system.dyn, stack, features[:1], continuations[:1], level2_factors, config.timing_repeats)
    system.dyn.detach()

    tokens = continuations.shape[1]

    def per_token(level: str, unit: str) -> float:
        call = costs[level][f"hyper_{unit}_per_call"]
        return costs[level][f"{unit}_per_token"] + call / tokens

    gain_level2 = float((nll["level1"] - nll["level2"]).mean())
    rng = random.Random(config.seed)
    random_nll = []
    for _ in range(config.random_draws):
        chosen = torch.zeros(len(escalate), dtype=torch.bool)
        chosen[rng.sample(range(len(escalate)), count)] = True
        random_nll.append(float(torch.where(chosen, nll["level2"], nll["level1"]).mean()))
    methods = {name: {"nll": float(v.mean()), "escalation_rate": {"base": 0.0, "level1": 0.0, "level2": 1.0}[name]}
               for name, v in nll.items()}
    methods["dynalora"] = {"nll": float(torch.where(escalate, nll["level2"], nll["level1"]).mean()),
                           "escalation_rate": rate}
    methods["random"] = {"nll": statistics.mean(random_nll), "nll_std": statistics.pstdev(random_nll),
                         "escalation_rate": rate}
    for name, method in methods.items():
        r = method["escalation_rate"]
        level = "base" if name == "base" else "level1"
        for unit in ("flops", "seconds"):
            method[f"{unit}_per_token"] = (1 - r) * per_token(level, unit) + r * per_token("level2", unit)
        method["quality"] = (methods["level1"]["nll"] - method["nll"]) / gain_level2 if gain_level2 else None
    for method in methods.values():
        extra = {u: per_token("level2", u) - per_token("level1", u) for u in ("flops", "seconds")}
        method["extra_compute"] = {u: (method[f"{u}_per_token"] - per_token("level1", u)) / extra[u]
                                   if extra[u] else None for u in extra}
    rates = [i / 10 for i in range(11)]
    result = {
        "methods": methods, "threshold": threshold, "examples": len(escalate),
        "split": config.split, "continuation_tokens": tokens, "costs": costs,
        "curves": {"rates": rates, "by_think": curve(nll, torch.argsort(p_think, descending=True), rates),
                   "by_true_gain": curve(nll, torch.argsort(nll["level1"] - nll["level2"], descending=True), rates),
                   "random_expected": [methods["level1"]["nll"] - r * gain_level2 for r in rates]},
        "target": {"quality_at_least": 0.95, "extra_compute_at_most": 0.5},
    }
    plot = config.plot or (Path(out).with_suffix(".png") if out else None)
    if plot:
        plot_curves(result, plot)
    return report(result, format_escalate_table(result), out)


def plot_curves(result: dict, path: Path) -> None:
    plt = pyplot(path)
    if plt is None:
        return

    curves, methods = result["curves"], result["methods"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("by_think", "escalate by p(<|think|>)"), ("by_true_gain", "oracle order (true gain)"),
                       ("random_expected", "random escalation")):
        ax.plot(curves["rates"], curves[key], marker="o" if key == "by_think" else None, label=label)
    ax.scatter([methods["dynalora"]["escalation_rate"]], [methods["dynalora"]["nll"]], color="red", zorder=5,
               label="dynalora (trained threshold)")
    ax.axhline(methods["base"]["nll"], color="grey", linestyle=":", label="base model")
    ax.set_xlabel("share of triggers escalated to level 2 (extra compute ∝ this)")
    ax.set_ylabel(f"continuation NLL ({result['split']} split)")
    ax.set_title("Escalate: quality vs compute")
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_escalate_table(result: dict) -> str:
    lines = [f"escalate ({result['split']} split, {result['examples']} examples, threshold "
             f"{result['threshold']:.3f})",
             f"{'method':<10} {'NLL':>7} {'rate':>6} {'quality':>8} {'GFLOP/tok':>10} {'extra (flops)':>14} "
             f"{'ms/tok':>7}"]
    for name, m in result["methods"].items():
        quality = "-" if m["quality"] is None else f"{m['quality']:.2f}"
        extra = m["extra_compute"]["flops"]
        lines.append(f"{name:<10} {m['nll']:>7.4f} {m['escalation_rate']:>6.2f} {quality:>8} "
                     f"{m['flops_per_token'] / 1e9:>10.4f} {'-' if extra is None else f'{extra:.2f}':>14} "
                     f"{1000 * m['seconds_per_token']:>7.2f}")
    return "\n".join(lines)
