"""``dynalora bench ...``: flags generated from each benchmark's config (``--help`` shows them all)."""

from __future__ import annotations

from pathlib import Path

from dynalora.cli_config import add_config_command


def add_bench_commands(commands) -> None:
    from dynalora.bench.absorb import AbsorbBenchConfig, run_absorb_bench
    from dynalora.bench.engine import EngineBenchConfig, run_engine_bench
    from dynalora.bench.layer import LayerBenchConfig, run_layer_bench
    from dynalora.bench.serve import ServeBenchConfig, run_serve_bench
    from dynalora.bench.switch import SwitchBenchConfig, run_switch_bench
    from dynalora.bench.xlora import XLoraBenchConfig, run_xlora_bench

    bench = commands.add_parser("bench", help="speed benchmarks (write JSON, print a table)")
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    benchmarks = [
        ("switch", SwitchBenchConfig, run_switch_bench, {"decode_tokens": "--tokens"},
         "LoRA switch cost and decode speed vs PEFT and plain transformers"),
        ("engine", EngineBenchConfig, run_engine_bench, {"new_tokens": "--tokens"},
         "engine decode speed vs model.generate, cost of a trigger and of KV policies"),
        ("layer", LayerBenchConfig, run_layer_bench, {},
         "one layer in isolation: base matmul vs the exact 8-way blend, batch 1 and 8"),
        ("absorb", AbsorbBenchConfig, run_absorb_bench, {"compressor_dir": "--compressor"},
         "absorb time and memory footprint over a 10x longer conversation"),
        ("xlora", XLoraBenchConfig, run_xlora_bench, {"new_tokens": "--tokens"},
         "generation time per token: PEFT X-LoRA vs dynalora's engine vs plain generate"),
        ("serve", ServeBenchConfig, run_serve_bench, {},
         "dynalora serve: tokens/s and time to first token, 1/4/8 concurrent clients vs one at a time"),
    ]
    for name, config_cls, bench_fn, aliases, help_text in benchmarks:
        add_config_command(sub, name, config_cls, bench_fn, help_text, aliases, out=Path(f"results/bench_{name}.json"))
