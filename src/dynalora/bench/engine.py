"""``dynalora bench engine``: the engine's decode speed vs ``model.generate``, and what a trigger costs.

Same run, same machine: decode tokens/s with no trigger (batch 1 and 8) for the engine and for HF
``generate`` round-robin; the cost of one trigger (features + hypernetwork + guard + in-place update)
and of each KV policy at ``context`` tokens of context, against one decode step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import DynamicCache

from dynalora.models import check_placement
from dynalora.bench.common import machine, stats, targets_report, timed, write_result

TARGETS = {"engine_vs_hf_decode_b1": 0.9, "engine_vs_hf_decode_b8": 0.9, "trigger_cost_in_decode_steps": 1.0,
           "routed_vs_blend_decode_b1": 0.9, "routed_vs_blend_decode_b8": 0.9}


@dataclass
class EngineBenchConfig:
    model: str | None = None
    """Base model: HF id or folder (None: the embedded SmolLM2-135M-Instruct)."""
    new_tokens: int = 128
    """Tokens generated per timed run."""
    repeats: int = 3
    """Timed runs per measurement (the median is reported)."""
    batch: int = 8
    """Rows generated together in the batched runs."""
    adapters: int = 8
    """Random adapters in the bank."""
    rank: int = 8
    """Rank of each adapter."""
    context: int = 512
    """Context length at which trigger and KV-policy costs are measured."""
    trigger_repeats: int = 20
    """Timed runs of a trigger (hypernetwork call and LoRA update) at ``context`` tokens."""
    device: str = "cpu"
    """Where the models run: cpu, cuda, cuda:N or auto."""
    dtype: str = "float32"
    """The base model's weights and the LoRA state: float32, bfloat16 or float16."""
    threads: int = 2
    """CPU threads torch uses."""

    def __post_init__(self):
        check_placement(self.device, self.dtype)


def _random_bank(model, count: int, rank: int):
    from dynalora.lora import LoraBank, module_shapes_of

    generator = torch.Generator().manual_seed(0)
    bank = LoraBank(module_shapes_of(model))
    for k in range(count):
        factors = {}
        for module, (in_features, out_features) in bank.module_shapes.items():
            if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")):
                factors[module] = (torch.randn(rank, in_features, generator=generator) * 0.01,
                                   torch.randn(out_features, rank, generator=generator) * 0.01)
        bank.add(f"a{k}", factors)
    return bank


def run_engine_bench(config: EngineBenchConfig, out: Path | None = None) -> dict:
    from dynalora.hyper import NearestPrototype
    from dynalora.hyper.router import TokenRouter, TokenRouterConfig
    from dynalora.lora import DynamicLoraModel, InjectConfig, StateConfig
    from dynalora.lora.targets import decoder_layers
    from dynalora.models import load_base_model, model_device
    from dynalora.runtime import Engine, EngineConfig, RowSettings, SamplingConfig, TriggerConfig

    torch.set_num_threads(config.threads)
    base = load_base_model(config.model, config.dtype, config.device)
    model = base.model
    device = model_device(model)
    dyn = DynamicLoraModel.attach(model, _random_bank(model, config.adapters, config.rank),
                                  InjectConfig(state=StateConfig(max_batch=config.batch)))
    hidden = model.config.hidden_size
    prototypes = torch.randn(config.adapters, hidden, generator=torch.Generator().manual_seed(1))  # (K, H)
    hyper = NearestPrototype(prototypes.to(device))
    engine = Engine(dyn, base.tokenizer, hyper, TriggerConfig([]))
    vocab = min(model.config.vocab_size, 10000)
    generator = torch.Generator().manual_seed(2)
    prompts = torch.randint(vocab // 4, vocab, (config.batch, 16), generator=generator).to(device)  # (B, 16)
    n = config.new_tokens

    def hf(batch):
        ids = prompts[:batch]
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)

    def ours(batch):
        engine.eos_ids = set()  # same work as min_new_tokens: never stop early
        engine.generate([p.tolist() for p in prompts[:batch]], max_new_tokens=n)

    # the token router's cost: every row on the uniform blend of the bank, re-weighted at every token or not (a random
    # router: what it costs does not depend on what it learned)
    router = TokenRouter(TokenRouterConfig(hidden, dyn.state.labels, feature_layer=len(decoder_layers(model)) // 2))
    torch.nn.init.normal_(router.net[-1].weight, std=0.1)

    def blended(batch, routed):
        dyn.state.reset()
        for row in range(batch):
            dyn.state.set_blend(row, [1.0 / config.adapters] * config.adapters)
        if routed:
            router.attach(dyn)
        try:
            ours(batch)
        finally:
            if routed:
                router.detach(dyn)
            dyn.state.reset()

    runs = {"decode_b1_hf_generate": lambda: hf(1), "decode_b1_engine": lambda: ours(1),
            f"decode_b{config.batch}_hf_generate": lambda: hf(config.batch),
            f"decode_b{config.batch}_engine": lambda: ours(config.batch)}
    for batch in (1, config.batch):
        runs[f"decode_b{batch}_engine_blend"] = lambda batch=batch: blended(batch, False)
        runs[f"decode_b{batch}_engine_blend_routed"] = lambda batch=batch: blended(batch, True)
    for fn in runs.values():  # warm-up with a short run
        saved, n = n, 4
        fn()
        n = saved
    samples = {name: [] for name in runs}
    for _ in tqdm(range(config.repeats), desc="decode round-robin", leave=False):
        for name, fn in runs.items():
            rows = config.batch if name.startswith(f"decode_b{config.batch}") else 1
            samples[name].append(rows * n / timed(fn))
    methods = {name: stats(values, "tokens/s") for name, values in samples.items()}

    # -- one trigger at `context` tokens: features + hypernetwork + guard + update (+ KV policy) ----------
    context_ids = torch.randint(vocab // 4, vocab, (1, config.context), generator=generator)
    engine.start()
    with torch.no_grad():
        list(engine.join([context_ids[0].tolist()], [RowSettings(1, SamplingConfig())]))  # the row, prefilled
        batch, cache = engine._batch, engine._cache
        step_times = []
        for _ in range(config.trigger_repeats):  # one decode step at this context, for the ratio
            cropped = DynamicCache(config=model.config)
            for index, layer in enumerate(cache.layers):
                cropped.update(layer.keys.clone(), layer.values.clone(), index)
            batch.append(torch.tensor([7], device=device))
            step_times.append(timed(lambda: engine._forward(batch, 1, cropped)))
            batch.length -= 1  # the step's token goes again: every repeat times the same step
    methods[f"decode_step_at_{config.context}"] = stats(step_times, "s")
    for policy in ("keep", "recompute_last", "recompute_all"):
        engine.config = EngineConfig(kv_policy=policy, recompute_tokens=32)
        times = []
        for i in range(config.trigger_repeats if policy != "recompute_all" else max(3, config.trigger_repeats // 4)):
            dyn.state.reset()
            event = None

            def fire():
                nonlocal event
                event = engine._apply(0, config.context, "bench")
            times.append(timed(fire))
            assert event.kind == "shift", event
        methods[f"trigger_{policy}_at_{config.context}"] = stats(times, "s")
    engine.close()
    step = methods[f"decode_step_at_{config.context}"]["median"]
    ratios = {
        "engine_vs_hf_decode_b1": methods["decode_b1_engine"]["median"] / methods["decode_b1_hf_generate"]["median"],
        "engine_vs_hf_decode_b8": methods[f"decode_b{config.batch}_engine"]["median"]
        / methods[f"decode_b{config.batch}_hf_generate"]["median"],
        "routed_vs_blend_decode_b1": methods["decode_b1_engine_blend_routed"]["median"]
        / methods["decode_b1_engine_blend"]["median"],
        "routed_vs_blend_decode_b8": methods[f"decode_b{config.batch}_engine_blend_routed"]["median"]
        / methods[f"decode_b{config.batch}_engine_blend"]["median"],
        "trigger_cost_in_decode_steps": methods[f"trigger_keep_at_{config.context}"]["median"] / step,
        "recompute_last_cost_in_decode_steps": methods[f"trigger_recompute_last_at_{config.context}"]["median"] / step,
        "recompute_all_cost_in_decode_steps": methods[f"trigger_recompute_all_at_{config.context}"]["median"] / step,
    }
    result = {"benchmark": "engine", "config": asdict(config), "model": base.name, "machine": machine(),
              "methods": methods, "ratios": ratios,
              "targets": targets_report(ratios, TARGETS, lower_is_better=("trigger_cost_in_decode_steps",))}
    write_result(result, out)
    return result
