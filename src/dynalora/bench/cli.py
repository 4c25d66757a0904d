"""``dynalora bench ...``"""

from __future__ import annotations

from pathlib import Path


def cmd_switch(args) -> int:
    from dynalora.bench.switch import SwitchBenchConfig, run_switch_bench

    config = SwitchBenchConfig(model=args.model, repeats=args.repeats, decode_tokens=args.tokens,
                               skip_svd=args.skip_svd)
    run_switch_bench(config, out=args.out)
    return 0


def cmd_engine(args) -> int:
    from dynalora.bench.engine import EngineBenchConfig, run_engine_bench

    run_engine_bench(EngineBenchConfig(model=args.model, repeats=args.repeats, new_tokens=args.tokens,
                                       context=args.context), out=args.out)
    return 0


def cmd_layer(args) -> int:
    from dynalora.bench.layer import LayerBenchConfig, run_layer_bench

    run_layer_bench(LayerBenchConfig(), out=args.out)
    return 0


def cmd_absorb(args) -> int:
    from dynalora.bench.absorb import AbsorbBenchConfig, run_absorb_bench

    run_absorb_bench(AbsorbBenchConfig(model=args.model, compressor_dir=args.compressor, short=args.short,
                                       long=args.short * 10), out=args.out)
    return 0


def cmd_xlora(args) -> int:
    from dynalora.bench.xlora import XLoraBenchConfig, run_xlora_bench

    run_xlora_bench(XLoraBenchConfig(checkpoints=args.checkpoints, model=args.model, repeats=args.repeats,
                                     new_tokens=args.tokens, prompt_tokens=args.prompt_tokens), out=args.out)
    return 0


def add_bench_commands(commands) -> None:
    bench = commands.add_parser("bench", help="speed benchmarks (write JSON, print a table)")
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    p = sub.add_parser("switch", help="LoRA switch cost and decode speed vs PEFT and plain transformers")
    p.add_argument("--out", type=Path, default=Path("results/bench_switch.json"), help="JSON result file")
    p.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--repeats", type=int, default=5, help="runs per measurement (median reported)")
    p.add_argument("--tokens", type=int, default=32, help="decode tokens per timed run")
    p.add_argument("--skip-svd", action="store_true", help="skip PEFT's svd merge (slow: minutes)")
    p.set_defaults(handler=cmd_switch)

    p = sub.add_parser("engine", help="engine decode speed vs model.generate, cost of a trigger and of KV policies")
    p.add_argument("--out", type=Path, default=Path("results/bench_engine.json"), help="JSON result file")
    p.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--repeats", type=int, default=3, help="runs per decode measurement (median reported)")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per decode run")
    p.add_argument("--context", type=int, default=512, help="context length for trigger / KV-policy costs")
    p.set_defaults(handler=cmd_engine)

    p = sub.add_parser("layer", help="one layer in isolation: base matmul vs the exact 8-way blend, batch 1 and 8")
    p.add_argument("--out", type=Path, default=Path("results/bench_layer.json"), help="JSON result file")
    p.set_defaults(handler=cmd_layer)

    p = sub.add_parser("absorb", help="absorb time and memory footprint over a 10x longer conversation")
    p.add_argument("--out", type=Path, default=Path("results/bench_absorb.json"), help="JSON result file")
    p.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--compressor", type=Path, default=Path("checkpoints/absorb"))
    p.add_argument("--short", type=int, default=10, help="chunks of the short conversation (the long one is 10x)")
    p.set_defaults(handler=cmd_absorb)

    p = sub.add_parser("xlora", help="generation time per token: PEFT X-LoRA vs dynalora's engine vs plain generate")
    p.add_argument("--out", type=Path, default=Path("results/bench_xlora.json"), help="JSON result file")
    p.add_argument("--checkpoints", type=Path, default=Path("checkpoints"),
                   help="folder with library, shift, triggers and xlora")
    p.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement (median reported)")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per run")
    p.add_argument("--prompt-tokens", type=int, default=256, help="prompt length in tokens")
    p.set_defaults(handler=cmd_xlora)
