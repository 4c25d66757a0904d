"""``dynalora bench xlora``: what re-weighting the library at every token costs when generating.

Same run, same machine, batch 1, greedy, the same prompt: seconds per generated token of plain HF
``generate`` (no LoRA), of dynalora's engine with the shipped shift system (learned trigger live, KV
cache kept across LoRA updates) and of PEFT X-LoRA's ``generate`` over the same library (its scaling
pass plus the real pass at every step; PEFT forces ``use_cache=False`` for X-LoRA, so every step
re-reads the whole sequence).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dynalora.models import check_placement
from dynalora.bench.common import machine, stats, timed, write_result
from dynalora.shipped import shipped

PROMPT = ("The committee met on Tuesday to discuss the budget for the coming year. Several members argued that "
          "the library and the parks deserved more money, while others wanted to repair the roads first. ")


@dataclass
class XLoraBenchConfig:
    checkpoints: Path = shipped()
    """Folder with ``library``, ``shift``, ``triggers`` and ``xlora`` (the shipped ones by default), and ``router``
    (the token router: the engine is timed with it too when it is there)."""
    model: str | None = None
    """Base model: HF id or folder (None: the embedded SmolLM2-135M-Instruct)."""
    prompt_tokens: int = 256
    """Prompt length of the timed runs."""
    new_tokens: int = 32
    """Tokens generated per timed run."""
    repeats: int = 3
    """Timed runs per method (the median is reported)."""
    device: str = "cpu"
    """Where the models run: cpu, cuda, cuda:N or auto."""
    dtype: str = "float32"
    """The base model's weights and the LoRA state: float32, bfloat16 or float16."""
    threads: int = 2
    """CPU threads torch uses."""

    def __post_init__(self):
        check_placement(self.device, self.dtype)


def run_xlora_bench(config: XLoraBenchConfig, out: Path | None = None) -> dict:
    from dynalora.models import load_base_model, model_device
    from dynalora.system.assemble import load_shift_system
    from dynalora.system.xlora import load_xlora

    torch.set_num_threads(config.threads)
    folder = Path(config.checkpoints)
    system = load_shift_system(folder / "library", folder / "shift", folder / "triggers", config.model,
                               device=config.device, dtype=config.dtype)
    tokenizer = system.base.tokenizer
    ids = tokenizer(PROMPT * 20, add_special_tokens=False)["input_ids"][:config.prompt_tokens]
    if len(ids) < config.prompt_tokens:
        raise ValueError(f"prompt_tokens={config.prompt_tokens}: the bench prompt has only {len(ids)} tokens")
    prompt = torch.tensor([ids], device=model_device(system.base.model))  # (1, P)
    plain = load_base_model(config.model, config.dtype, config.device).model.eval()
    xlora, _ = load_xlora(folder / "xlora", folder / "library", config.model, config.device, config.dtype)

    def hf_generate(model):
        def run():
            with torch.no_grad():
                made = model.generate(input_ids=prompt, max_new_tokens=config.new_tokens,
                                      min_new_tokens=config.new_tokens, do_sample=False)
            counts.append(made.shape[1] - prompt.shape[1])
        return run

    router = None
    if (folder / "router").is_dir():
        from dynalora.hyper.router import TokenRouter

        router = TokenRouter.from_pretrained(folder / "router", model_device(system.base.model))

    def dynalora_generate(routed: bool = False):
        def run():
            system.dyn.state.reset()
            if routed:
                router.attach(system.dyn)
            try:
                result = engine.generate([ids], max_new_tokens=config.new_tokens)
            finally:
                if routed:
                    router.detach(system.dyn)
            counts.append(len(result.token_ids[0]))
            shifts.append(sum(1 for e in result.events if getattr(e, "kind", "") == "shift"))
        return run

    runs = [("hf_generate_base", hf_generate(plain)), ("dynalora_engine", dynalora_generate()),
            ("peft_xlora_generate", hf_generate(xlora))]
    if router is not None:
        runs.append(("dynalora_engine_routed", dynalora_generate(routed=True)))
    with system.live() as engine:  # the trigger LoRA, if any, merged while the engine runs
        methods, tokens_made, shifts_made = {}, {}, {}
        for name, run in runs:
            counts, shifts = [], []
            run()  # warm-up
            counts.clear()
            shifts.clear()
            seconds = [timed(run) for _ in range(config.repeats)]
            per_token = [s / max(c, 1) for s, c in zip(seconds, counts)]
            methods[f"{name}_s_per_token"] = stats(per_token, "s")
            tokens_made[name] = counts
            if shifts:
                shifts_made[name] = shifts
    median = {name: m["median"] for name, m in methods.items()}
    ratios = {"dynalora_vs_hf_time_per_token": median["dynalora_engine_s_per_token"]
              / median["hf_generate_base_s_per_token"],
              "xlora_vs_hf_time_per_token": median["peft_xlora_generate_s_per_token"]
              / median["hf_generate_base_s_per_token"],
              "xlora_vs_dynalora_time_per_token": median["peft_xlora_generate_s_per_token"]
              / median["dynalora_engine_s_per_token"]}
    if router is not None:
        ratios["routed_vs_dynalora_time_per_token"] = (median["dynalora_engine_routed_s_per_token"]
                                                       / median["dynalora_engine_s_per_token"])
        ratios["xlora_vs_routed_time_per_token"] = (median["peft_xlora_generate_s_per_token"]
                                                    / median["dynalora_engine_routed_s_per_token"])
    result = {"methods": methods, "ratios": ratios, "targets": {}, "tokens_generated": tokens_made,
              "shifts_per_run": shifts_made, "config": {k: str(v) for k, v in asdict(config).items()},
              "machine": machine()}
    write_result(result, out)
    return result
