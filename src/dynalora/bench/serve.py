"""``dynalora bench serve``: what batching across requests buys ``dynalora serve`` — total tokens/s and time to first
token with 1, 4 and 8 concurrent streaming clients, each on its own blend, against the same requests served one at a
time by the same server.

The server is the one ``dynalora serve --bank`` runs with its other flags at their defaults (the embedded model and the
shipped library unless ``--model``/``--bank`` say otherwise), in this process on a loopback port; the clients are
threads streaming over real HTTP (server-sent events). Modes are measured round-robin (one run of each per repeat) so
machine noise hits them all alike. Greedy decoding to exactly ``max_tokens`` (``ignore_eos``, as vLLM's serving
benchmark does: several of the shipped adapters — plural, negation, … — end an answer within a few tokens, which would
time end-of-text tokens, not serving); throughput counts the tokens produced (``usage.completion_tokens``).
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dynalora.bench.common import machine, stats, targets_report, write_result
from dynalora.models import check_placement
from dynalora.shipped import shipped

TARGETS = {"clients8_vs_sequential": 3.0}
TOPICS = ["the sea", "a city at night", "bread", "a chess game", "winter", "a lost key", "trains", "the moon"]


@dataclass
class ServeBenchConfig:
    model: str | None = None
    """Base model (default: the embedded SmolLM2-135M-Instruct)."""
    bank: Path = shipped("library")
    """The adapter library the requests blend (default: the shipped one)."""
    clients: tuple[int, ...] = (1, 4, 8)
    """Concurrent streaming clients of each concurrent mode (the server holds as many rows as the largest)."""
    max_tokens: int = 32
    """New tokens each request asks for."""
    repeats: int = 3
    """Runs of every mode; medians are reported."""
    device: str = "cpu"
    """Where the model runs: cpu, cuda, cuda:N or auto."""
    dtype: str = "float32"
    """The base model's weights and the LoRA state: float32, bfloat16 or float16."""
    threads: int = 2
    """CPU threads torch uses."""

    def __post_init__(self):
        check_placement(self.device, self.dtype)
        if not self.clients or min(self.clients) < 1 or self.max_tokens < 1 or self.repeats < 1:
            raise ValueError("ServeBenchConfig: clients (each ≥ 1), max_tokens and repeats must be ≥ 1")


def run_serve_bench(config: ServeBenchConfig, out: Path | None = None) -> dict:
    import uvicorn

    from dynalora.serve.app import create_app
    from dynalora.serve.config import ServeConfig
    from dynalora.system.assemble import System
    from dynalora.system.spec import EngineSpec

    torch.set_num_threads(config.threads)
    most = max(config.clients)
    system = System.from_checkpoints(EngineSpec(model=config.model, bank=config.bank, device=config.device,
                                                dtype=config.dtype, max_batch=most))
    system.merge_trigger_lora()
    labels = system.bank.labels
    requests = [{"model": "base",
                 "messages": [{"role": "user", "content": f"Write a few sentences about {TOPICS[i % len(TOPICS)]}."}],
                 "max_tokens": config.max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
                 "dynalora": {"blend": {labels[i % len(labels)]: 0.6, labels[(i + 1) % len(labels)]: 0.4},
                              "events": False}}
                for i in range(most)]  # request i: its own topic and blend
    app = create_app(system.engine(), ServeConfig(port=0, max_tokens=config.max_tokens), system.base.name)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1/chat/completions"
    modes = {"sequential": None, **{f"clients{c}": c for c in config.clients}}
    throughput = {mode: [] for mode in modes}
    first_token = {mode: [] for mode in modes}
    try:
        _run_all(url, requests[:1], concurrent=True)  # warm-up
        for _ in tqdm(range(config.repeats), desc="serve round-robin", leave=False):
            for mode, clients in modes.items():
                batch = requests if clients is None else requests[:clients]
                started = time.perf_counter()
                results = _run_all(url, batch, concurrent=clients is not None)
                seconds = time.perf_counter() - started
                throughput[mode].append(sum(tokens for tokens, _ in results) / seconds)
                first_token[mode] += [ttft for _, ttft in results]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    methods = {f"tokens_per_s_{mode}": stats(values, "tokens/s") for mode, values in throughput.items()}
    for mode, values in first_token.items():
        methods[f"ttft_{mode}"] = {**stats(values, "s"), "p99": _quantile(values, 0.99)}
    sequential = methods["tokens_per_s_sequential"]["median"]
    ratios = {f"clients{c}_vs_sequential": methods[f"tokens_per_s_clients{c}"]["median"] / sequential
              for c in config.clients}
    result = {"benchmark": "serve", "config": {k: str(v) if isinstance(v, Path) else v
                                               for k, v in asdict(config).items()},
              "machine": machine(), "requests": len(requests), "methods": methods, "ratios": ratios,
              "targets": targets_report(ratios, TARGETS)}
    write_result(result, out)
    return result


def _run_all(url: str, requests: list[dict], concurrent: bool) -> list[tuple[int, float]]:
    """``(completion tokens, seconds to the first text)`` of each request: all at once, or one after another."""
    if not concurrent:
        return [_stream(url, body) for body in requests]
    results: list = [None] * len(requests)

    def client(i: int) -> None:
        results[i] = _stream(url, requests[i])
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if any(result is None for result in results):
        raise RuntimeError("a benchmark client failed (see the error above)")
    return results


def _stream(url: str, body: dict) -> tuple[int, float]:
    """One streaming request over HTTP: its completion tokens and the seconds until its first text arrived."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    started, first, tokens = time.perf_counter(), None, 0
    with urllib.request.urlopen(request) as response:
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data:"):])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return tokens, first if first is not None else time.perf_counter() - started


def _quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1] if len(values) > 1 else values[0]
