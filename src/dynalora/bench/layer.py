"""``dynalora bench layer``: one injected layer in isolation — base matmul vs the exact K-way blend.

Explains where decode time goes: at batch 1 the base layer is memory-bound and the rank-(K·r) blend is
cheap; at larger batches the base matmul becomes efficient while the small LoRA matmuls do not.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dynalora.models import check_placement, resolve_device, resolve_dtype
from dynalora.bench.common import machine, stats, timed, write_result


@dataclass
class LayerBenchConfig:
    in_features: int = 576
    """Input width of the timed Linear (SmolLM2-135M's hidden size by default)."""
    out_features: int = 576
    """Output width of the timed Linear."""
    adapters: int = 8
    """Adapters blended in the layer."""
    rank: int = 8
    """Rank of each adapter."""
    batches: tuple[int, ...] = (1, 8)
    """Batch sizes timed."""
    calls: int = 2000
    """Layer calls per timed run."""
    repeats: int = 5
    """Timed runs per measurement (the median is reported)."""
    device: str = "cpu"
    """Where the models run: cpu, cuda, cuda:N or auto."""
    dtype: str = "float32"
    """The base model's weights and the LoRA state: float32, bfloat16 or float16."""
    threads: int = 2
    """CPU threads torch uses."""

    def __post_init__(self):
        check_placement(self.device, self.dtype)


def _per_call(fn, calls: int) -> float:
    for _ in range(50):
        fn()

    def many():
        for _ in range(calls):
            fn()
    return timed(many) / calls


def run_layer_bench(config: LayerBenchConfig, out: Path | None = None) -> dict:
    torch.set_num_threads(config.threads)
    torch.manual_seed(0)
    place = dict(device=resolve_device(config.device), dtype=resolve_dtype(config.dtype))
    width = config.adapters * config.rank
    base = torch.nn.Linear(config.in_features, config.out_features, bias=False).to(**place)
    a_t = torch.randn(config.in_features, width).to(**place)  # (in, K*r)
    b_t = torch.randn(width, config.out_features).to(**place)  # (K*r, out)
    methods, ratios = {}, {}
    for batch in config.batches:
        x = torch.randn(batch, 1, config.in_features).to(**place)  # (B, T=1, in): one decode step
        rank_weights = torch.randn(batch, width).to(**place)  # (B, K*r)
        with torch.no_grad():
            runs = {"base": lambda: base(x), "blend": lambda: ((x @ a_t) * rank_weights[:, None, :]) @ b_t}
            for name, fn in runs.items():
                methods[f"b{batch}_{name}"] = stats([_per_call(fn, config.calls) for _ in range(config.repeats)], "s")
        ratios[f"b{batch}_blend_over_base"] = methods[f"b{batch}_blend"]["median"] / methods[f"b{batch}_base"]["median"]
    ratios["blend_flops_over_base"] = 2 * width / config.out_features if config.out_features == config.in_features \
        else width * (config.in_features + config.out_features) / (config.in_features * config.out_features)
    result = {"benchmark": "layer", "config": asdict(config), "machine": machine(), "methods": methods,
              "ratios": ratios, "targets": {}}
    write_result(result, out)
    return result
