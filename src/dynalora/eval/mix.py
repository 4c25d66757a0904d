"""``dynalora eval mix``: the learned gate against fixed mixes of the shift and memory LoRAs.

The examples of ``train mix`` (domain text after a trigger with an unrelated absorbed document in
memory; questions about an absorbed document), built from held-out data: the library domains' ``test``
split and fact documents generated with test seeds (``dynalora data absorb --kind facts --split test``).
Methods: ``shift_only``, ``absorb_only``, ``fixed_half`` (50/50), ``both`` (the two summed, as without a
gate), ``base``, and the learned ``gate``. Target: the gate beats each single LoRA and the fixed mix on
both the domain NLL and the absorbed-fact answers' NLL. ``worst_gap``: each method's largest distance to
the best method on either kind (no fixed mix is good on both kinds; a gate can be).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dynalora.models import check_placement
from dynalora.report import report
from dynalora.shipped import shipped

RIVALS = ("shift_only", "absorb_only", "fixed_half")


@dataclass
class MixEvalConfig:
    facts: Path
    """Fact documents JSONL (``dynalora data absorb --kind facts --split test``)."""
    library_dir: Path = shipped("library")
    """The trained library (``dynalora train library``)."""
    shift_dir: Path = shipped("shift")
    """The shift network (``dynalora train shift``)."""
    compressor_dir: Path = shipped("absorb")
    """The absorb compressor (``dynalora train absorb``)."""
    gate_dir: Path = shipped("mix")
    """The mix gate (``dynalora train mix``)."""
    model: str | None = None
    """Base model: HF id or folder (None: the embedded SmolLM2-135M-Instruct)."""
    max_docs: int = 12
    """Fact documents scored."""
    examples_per_domain: int = 24
    """Domain contexts per library domain."""
    context_tokens: int = 48
    """Tokens of context read."""
    continuation_tokens: int = 64
    """Tokens whose NLL is scored."""
    split: str = "test"
    """The library domains' split the examples come from."""
    seed: int = 3
    """Random seed."""
    batch_size: int = 8
    """Rows per scoring batch."""
    device: str = "cpu"
    """Where the models run: cpu, cuda, cuda:N or auto."""
    dtype: str = "float32"
    """The base model's weights: float32, bfloat16 or float16 (scores are computed in float32)."""
    threads: int = 2
    """CPU threads torch uses."""

    def __post_init__(self):
        check_placement(self.device, self.dtype)


def eval_mix(config: MixEvalConfig, out: Path | None = None) -> dict:
    from dynalora.hyper.mix_gate import MixGate
    from dynalora.data.absorb import read_docs
    from dynalora.system.mix import MixSetup, mix_examples, score_mixes

    torch.set_num_threads(config.threads)
    gate = MixGate.from_pretrained(config.gate_dir)
    setup = MixSetup(config, config.device, config.dtype)
    gate.to(setup.device)
    docs = read_docs(Path(config.facts))[:config.max_docs]
    examples, memories = mix_examples(setup, config, docs, config.split, config.seed)
    methods = score_mixes(setup, examples, memories, gate, config.batch_size)
    setup.close()
    result = {"methods": methods, "split": {"domains": config.split, "facts": str(config.facts)},
              "examples": {kind: sum(e.kind == kind for e in examples) for kind in ("domain", "facts")},
              "gate_beats": {rival: {kind: methods["gate"][kind] < methods[rival][kind] for kind in ("domain", "facts")}
                             for rival in RIVALS}}
    result["target_met"] = all(all(v.values()) for v in result["gate_beats"].values())
    result["worst_gap"] = worst_gaps(methods)
    return report(result, format_mix_table(result), out)


def worst_gaps(methods: dict) -> dict:
    """Per method, its largest NLL gap over the two kinds to the best method on that kind: one number that
    says whether a method is good on both (0: best on both)."""
    best = {kind: min(m[kind] for m in methods.values()) for kind in ("domain", "facts")}
    return {name: max(m[kind] - best[kind] for kind in best) for name, m in methods.items()}


def format_mix_table(result: dict) -> str:
    lines = [f"mix ({result['examples']['domain']} domain examples, {result['examples']['facts']} fact questions; "
             f"NLL, lower is better)",
             f"{'method':<12} {'domain NLL':>11} {'facts NLL':>10} {'worst gap':>10} {'w (domain rows)':>16} "
             f"{'w (fact rows)':>14}"]
    for name, m in result["methods"].items():
        weights = [" ".join(f"{w:.2f}" for w in m[f"{kind}_weights"]) for kind in ("domain", "facts")]
        lines.append(f"{name:<12} {m['domain']:>11.4f} {m['facts']:>10.4f} {result['worst_gap'][name]:>10.4f} "
                     f"{weights[0]:>16} {weights[1]:>14}")
    lines.append(f"target met (gate beats {', '.join(RIVALS)} on both): {result['target_met']}")
    return "\n".join(lines)
