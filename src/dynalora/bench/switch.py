"""``dynalora bench switch``: cost of changing a LoRA, and decode speed, vs PEFT and plain transformers.

Same run, same machine, same random bank of K rank-r adapters on q,k,v,o. Decode configurations are
measured round-robin (one run of each per repeat) so machine noise hits them all alike; the JSON holds
the median, min and max of every measurement and the ratios "how many times better dynalora is".
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dynalora.models import check_placement
from dynalora.bench.common import machine, stats, targets_report, timed, write_result

TARGETS = {  # ratio name -> minimum wanted (from the issue)
    "blend_vs_peft_svd": 1000.0, "blend_vs_peft_hotswap": 20.0, "blend_vs_peft_set_scale": 20.0,
    "decode_blend8_vs_peft_multi8": 1.5, "decode_blend8_vs_peft_lora": 0.85, "decode_zero_vs_base": 0.95,
    "batch8_vs_peft_mixed": 2.0, "decode_live_blend8_vs_base": 0.97,
}


@dataclass
class SwitchBenchConfig:
    model: str | None = None
    """Base model (default: the embedded SmolLM2-135M-Instruct)."""
    adapters: int = 8
    """K, adapters in the bank."""
    rank: int = 8
    """Rank of each adapter."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Module kinds each random adapter adapts."""
    repeats: int = 5
    """Runs per measurement; the median is reported (a single run for operations over 10 s)."""
    switch_repeats: int = 50
    """Runs of the sub-millisecond dynalora switch."""
    decode_tokens: int = 32
    """New tokens per timed decode run."""
    prompt_tokens: int = 16
    """Prompt length of the timed decode runs."""
    batch: int = 8
    """Rows of the batched decode runs."""
    skip_svd: bool = False
    """Skip PEFT's svd merge, which takes minutes on CPU."""
    device: str = "cpu"
    """Where the models run: cpu, cuda, cuda:N or auto."""
    dtype: str = "float32"
    """The base model's weights and the LoRA state: float32, bfloat16 or float16."""
    threads: int = 2
    """CPU threads torch uses."""

    def __post_init__(self):
        check_placement(self.device, self.dtype)


def _make_adapters(base_factory, folder: Path, config: SwitchBenchConfig) -> list[Path]:
    from peft import LoraConfig, get_peft_model

    paths = []
    for k in range(config.adapters):
        torch.manual_seed(1000 + k)
        lora = LoraConfig(r=config.rank, lora_alpha=2 * config.rank, target_modules=list(config.target_modules),
                          init_lora_weights=False, lora_dropout=0.0)
        peft_model = get_peft_model(base_factory(), lora)
        peft_model.save_pretrained(str(folder / f"a{k}"))
        paths.append(folder / f"a{k}")
    return paths


def run_switch_bench(config: SwitchBenchConfig, out: Path | None = None) -> dict:
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.utils.hotswap import hotswap_adapter

    from dynalora.lora import DynamicLoraModel, InjectConfig, LoraBank, StateConfig, module_shapes_of
    from dynalora.models import load_base_model, model_device

    torch.set_num_threads(config.threads)
    torch.manual_seed(0)
    base = load_base_model(config.model, config.dtype, config.device)
    factory = lambda: load_base_model(config.model, config.dtype, config.device).model  # noqa: E731
    device = str(model_device(base.model))
    tmp = Path(tempfile.mkdtemp(prefix="dynalora-bench-"))
    paths = _make_adapters(factory, tmp, config)
    labels = [p.name for p in paths]
    generator = torch.Generator().manual_seed(7)
    blends = [torch.softmax(torch.randn(config.adapters, generator=generator), 0).tolist() for _ in range(64)]
    methods: dict[str, dict] = {}

    # -- dynalora ------------------------------------------------------------------------------------
    bank = LoraBank(module_shapes_of(base.model))
    for path in paths:
        bank.add_peft(path)
    dyn = DynamicLoraModel.attach(base.model, bank, InjectConfig(list(config.target_modules),
                                                                  StateConfig(max_batch=config.batch)))
    switch_times = []
    for i in range(config.switch_repeats):
        weights = blends[i % len(blends)]
        switch_times.append(timed(lambda: dyn.state.set_blend(0, weights)))
    methods["switch_dynalora_blend"] = stats(switch_times, "s")
    merge_times = []  # a change when the row is merged: the new blend written, then folded into the weights
    for i in range(config.repeats):
        weights = blends[i % len(blends)]
        merge_times.append(timed(lambda: (dyn.state.set_blend(0, weights), dyn.merge_row(0))))
    dyn.state.reset()
    methods["switch_dynalora_blend_merged"] = stats(merge_times, "s")

    # -- PEFT: one model holding all K adapters ------------------------------------------------------
    peft_model = PeftModel.from_pretrained(factory(), str(paths[0]), adapter_name=labels[0]).eval()
    for label, path in zip(labels[1:], paths[1:]):
        peft_model.load_adapter(str(path), adapter_name=label)
    lora_layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]

    def set_scales(weights):
        peft_model.base_model.set_adapter(labels)
        for layer in lora_layers:
            for label, weight in zip(labels, weights):
                layer.set_scale(label, weight)

    methods["switch_peft_set_scale"] = stats(
        [timed(lambda: set_scales(blends[i])) for i in range(config.repeats)], "s")

    def merge(kind: str, i: int):
        name = f"mix_{kind}_{i}"
        peft_model.add_weighted_adapter(labels, blends[i], name, combination_type=kind)
        peft_model.set_adapter(name)

    cat_times = []
    for i in tqdm(range(config.repeats), desc="peft add_weighted_adapter(cat)", leave=False):
        cat_times.append(timed(lambda: merge("cat", i)))
        peft_model.set_adapter(labels[0])
        peft_model.delete_adapter(f"mix_cat_{i}")
    methods["switch_peft_add_weighted_cat"] = stats(cat_times, "s")
    if not config.skip_svd:
        first = timed(lambda: merge("svd", 0))  # a single run when it takes over 10 s
        svd_times = [first]
        peft_model.set_adapter(labels[0])
        peft_model.delete_adapter("mix_svd_0")
        if first < 10:
            for i in range(1, config.repeats):
                svd_times.append(timed(lambda: merge("svd", i)))
                peft_model.set_adapter(labels[0])
                peft_model.delete_adapter(f"mix_svd_{i}")
        methods["switch_peft_add_weighted_svd"] = stats(svd_times, "s")

    peft_model.set_adapter(labels[0])
    methods["switch_peft_hotswap_from_disk"] = stats(
        [timed(lambda: hotswap_adapter(peft_model, str(paths[1 + i % (len(paths) - 1)]), adapter_name=labels[0],
                                        torch_device=device)) for i in range(config.repeats)], "s")

    def load_new(i):
        peft_model.load_adapter(str(paths[i % len(paths)]), adapter_name=f"loaded_{i}")
        peft_model.set_adapter(f"loaded_{i}")

    load_times = []
    for i in range(config.repeats):
        load_times.append(timed(lambda: load_new(i)))
        peft_model.set_adapter(labels[0])
        peft_model.delete_adapter(f"loaded_{i}")
    methods["switch_peft_load_adapter"] = stats(load_times, "s")
    hotswap_adapter(peft_model, str(paths[0]), adapter_name=labels[0], torch_device=device)  # undo the swaps

    # -- decode --------------------------------------------------------------------------------------
    vocab = min(base.model.config.vocab_size, 10000)
    prompt = torch.randint(vocab // 4, vocab, (1, config.prompt_tokens), generator=generator).to(device)
    batch_prompt = torch.randint(vocab // 4, vocab, (config.batch, config.prompt_tokens),
                                 generator=generator).to(device)
    plain = factory().eval()

    def decode(model, ids, **kwargs):
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=config.decode_tokens,
                           min_new_tokens=config.decode_tokens, do_sample=False, pad_token_id=0, **kwargs)

    def setup_dyn(blend_rows: int):
        dyn.state.reset()
        for row in range(blend_rows):
            dyn.state.set_blend(row, blends[row])

    def setup_peft_single():
        peft_model.set_adapter(labels[0])
        for layer in lora_layers:
            layer.set_scale(labels[0], 1.0)

    decode_runs = {  # name -> (setup, model, ids, generate kwargs)
        "decode_b1_base": (lambda: None, plain, prompt, {}),
        "decode_b1_peft_lora": (setup_peft_single, peft_model, prompt, {}),
        "decode_b1_peft_multi8_set_scale": (lambda: set_scales(blends[0]), peft_model, prompt, {}),
        "decode_b1_dynalora_blend8": (lambda: setup_dyn(1), dyn, prompt, {}),
        "decode_b1_dynalora_blend8_merged": (lambda: (setup_dyn(1), dyn.merge_row(0)), dyn, prompt, {}),
        "decode_b1_dynalora_zero": (lambda: setup_dyn(0), dyn, prompt, {}),
        "decode_b8_base": (lambda: None, plain, batch_prompt, {}),
        "decode_b8_peft_mixed": (setup_peft_single, peft_model, batch_prompt,
                                 {"adapter_names": [labels[i % len(labels)] for i in range(config.batch)]}),
        "decode_b8_dynalora_blend_per_row": (lambda: setup_dyn(config.batch), dyn, batch_prompt, {}),
    }
    for setup, model, ids, kwargs in decode_runs.values():  # warm-up
        setup()
        decode(model, ids, **kwargs)
    samples = {name: [] for name in decode_runs}
    for _ in tqdm(range(config.repeats), desc="decode round-robin", leave=False):
        for name, (setup, model, ids, kwargs) in decode_runs.items():
            setup()
            seconds = timed(lambda: decode(model, ids, **kwargs))
            samples[name].append(ids.shape[0] * config.decode_tokens / seconds)
    for name, values in samples.items():
        methods[name] = stats(values, "tokens/s")

    def median(name):
        return methods[name]["median"]

    switch = median("switch_dynalora_blend")
    ratios = {
        "blend_vs_peft_cat": median("switch_peft_add_weighted_cat") / switch,
        "blend_vs_peft_hotswap": median("switch_peft_hotswap_from_disk") / switch,
        "blend_vs_peft_load_adapter": median("switch_peft_load_adapter") / switch,
        "blend_vs_peft_set_scale": median("switch_peft_set_scale") / switch,
        "decode_blend8_vs_peft_multi8": median("decode_b1_dynalora_blend8") / median("decode_b1_peft_multi8_set_scale"),
        "decode_blend8_vs_peft_lora": median("decode_b1_dynalora_blend8") / median("decode_b1_peft_lora"),
        "decode_zero_vs_base": median("decode_b1_dynalora_zero") / median("decode_b1_base"),
        "decode_live_blend8_vs_base": median("decode_b1_dynalora_blend8_merged") / median("decode_b1_base"),
        "batch8_vs_peft_mixed": median("decode_b8_dynalora_blend_per_row") / median("decode_b8_peft_mixed"),
    }
    if "switch_peft_add_weighted_svd" in methods:
        ratios["blend_vs_peft_svd"] = median("switch_peft_add_weighted_svd") / switch
    result = {
        "benchmark": "switch", "config": asdict(config), "model": base.name,
        "machine": machine(),
        "methods": methods, "ratios": ratios,
        "targets": targets_report(ratios, TARGETS),
    }
    write_result(result, out)
    return result
