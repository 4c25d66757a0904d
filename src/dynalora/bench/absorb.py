"""``dynalora bench absorb``: memory and time of absorbing stay flat as a conversation grows 10×.

A long text (invented-fact documents, test seeds) is absorbed chunk by chunk into one row's memory on
SmolLM2 with the shipped compressor. Measured after ``short`` and after ``long`` chunks: the LoRA state's
bytes (preallocated: the memory's rank never grows), the rank in use, and the time of one absorb
(forward of the chunk + compressor + QR/SVD merge) early vs late; beside it, the KV cache the evicted
text would have needed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dynalora.models import check_placement
from dynalora.bench.common import machine, stats, targets_report, write_result
from dynalora.shipped import shipped


@dataclass
class AbsorbBenchConfig:
    model: str | None = None
    """Base model: HF id or folder (None: the embedded SmolLM2-135M-Instruct)."""
    compressor_dir: Path = shipped("absorb")
    """The compressor whose absorb is timed (``dynalora train absorb``)."""
    short: int = 10
    """Chunks of the short conversation."""
    long: int = 100
    """Chunks of the long one (10× the short)."""
    timed_chunks: int = 10
    """Absorbs timed at the start and at the end (median of each)."""
    device: str = "cpu"
    """Where the models run: cpu, cuda, cuda:N or auto."""
    dtype: str = "float32"
    """The base model's weights and the LoRA state: float32, bfloat16 or float16."""
    threads: int = 2
    """CPU threads torch uses."""

    def __post_init__(self):
        check_placement(self.device, self.dtype)


def run_absorb_bench(config: AbsorbBenchConfig, out: Path | None = None) -> dict:
    from dynalora.data.absorb import split_seeds
    from dynalora.data.facts import facts_document
    from dynalora.system.assemble import EngineSpec, System

    torch.set_num_threads(config.threads)
    system = System.from_checkpoints(EngineSpec(model=config.model, device=config.device, dtype=config.dtype,
                                                hypernetwork="none", triggers=[], window=512,
                                                compressor=config.compressor_dir, max_batch=1))
    base, model, absorber = system.base, system.base.model, system.absorber
    dyn, chunk = absorber.dyn, absorber.config.chunk_tokens
    ids, seed = [], split_seeds("test").start
    while len(ids) < config.long * chunk:
        ids += base.tokenizer(facts_document(seed, words=300)["context"] + "\n\n",
                              add_special_tokens=False)["input_ids"]
        seed += 1

    def state_bytes() -> int:
        return sum(t.numel() * t.element_size() for t in dyn.state.tensors().values())

    seconds, footprint = [], {}
    for index in range(config.long):
        report = absorber.absorb(0, ids[index * chunk:(index + 1) * chunk])
        seconds.append(report.seconds)
        if index + 1 in (config.short, config.long):
            footprint[index + 1] = {"state_bytes": state_bytes(), "memory_rank": report.memory_rank,
                                    "rank_cut_error": report.rel_error}
    dyn.detach()
    n = config.timed_chunks
    early, late = stats(seconds[:n], "s"), stats(seconds[-n:], "s")
    kv_per_token = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * \
        (model.config.hidden_size // model.config.num_attention_heads) * 4  # fp32 K and V
    ratios = {"absorb_time_late_vs_early": late["median"] / early["median"],
              "state_bytes_long_vs_short": footprint[config.long]["state_bytes"] /
              footprint[config.short]["state_bytes"],
              "evicted_kv_bytes_long_vs_state_bytes": config.long * chunk * kv_per_token /
              footprint[config.long]["state_bytes"]}
    result = {"methods": {f"absorb one chunk (first {n})": early, f"absorb one chunk (last {n})": late},
              "ratios": ratios,
              "targets": targets_report(ratios, {"absorb_time_late_vs_early": 1.2, "state_bytes_long_vs_short": 1.0},
                                        lower_is_better=("absorb_time_late_vs_early", "state_bytes_long_vs_short")),
              "footprint": footprint, "chunk_tokens": chunk, "kv_bytes_per_token_fp32": kv_per_token,
              "config": {k: str(v) for k, v in asdict(config).items()}, "machine": machine()}
    write_result(result, out)
    return result
