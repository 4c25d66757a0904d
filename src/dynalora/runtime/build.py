"""Build an engine from plain settings (what the CLI and the server take)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dynalora.lora import DynamicLoraModel, InjectConfig, LoraBank, StateConfig, module_shapes_of
from dynalora.lora.bank import is_bank_folder
from dynalora.models import load_base_model, model_device, resolve_dtype
from dynalora.runtime.engine import KV_POLICIES, Engine, EngineConfig
from dynalora.runtime.memory_writers import WRITERS, DistillConfig
from dynalora.runtime.special_tokens import THINK_TOKEN, add_trigger_tokens, load_trigger_tokens
from dynalora.runtime.trigger_lora import merge_trigger_lora, trigger_lora_beside
from dynalora.runtime.triggers import (EveryN, SpecialToken, Surprise, TokenProbability, TriggerConfig,
                                       TriggerPolicy, WindowPressure)
from dynalora.shipped import shipped

HYPERNETWORKS = ("prototype", "shift", "none")
TRIGGER_SPECS = "token | prob[:THRESHOLD] | think[:THRESHOLD] | surprise[:K] | every:N | window:TOKENS"


@dataclass
class EngineSpec:
    model: str | None = None
    """Base model id or folder (None: the embedded SmolLM2-135M-Instruct)."""
    device: str = "cpu"
    """Where the model, its LoRA state and the hypernetworks run: cpu, cuda, cuda:N or auto."""
    dtype: str = "float32"
    """The base model's weights and the LoRA state: float32, bfloat16 or float16 (hypernetworks stay float32)."""
    bank: Path | None = None
    """Bank folder (None: no adapters)."""
    trigger_tokens: Path | None = None
    """Trained trigger-token rows (safetensors); None adds untrained ``<|shift|>``/``<|think|>``."""
    hypernetwork: str = "prototype"
    """``prototype`` (nearest bank adapter by its description's features), ``shift`` (the trained shift
    network in ``shift_dir``; the bank must be the one it was trained on) or ``none``."""
    shift_dir: Path = shipped("shift")
    """The trained shift network (with --hyper shift)."""
    escalate: Path | None = None
    """With ``hypernetwork="shift"``: the levels above it (``dynalora train escalate``). ``<|think|>`` then
    runs the whole stack; its trained probability threshold is added as a trigger."""
    mix: Path | None = None
    """With ``hypernetwork="shift"``: the mix gate (``dynalora train mix``) that weighs the shift answer and the
    row's memory at every trigger (useful with ``window``)."""
    triggers: list[str] = field(default_factory=lambda: ["token"])
    """Trigger policies, each one of: """ + TRIGGER_SPECS
    min_gap: int = 8
    """At least this many tokens between two updates of a row."""
    max_per_sequence: int = 32
    """At most this many updates per row and generation."""
    kv_policy: str = "keep"
    """After a LoRA change: keep the cache, recompute_last (its last 32 positions) or recompute_all."""
    max_batch: int = 8
    """Rows the LoRA state holds (prompts generated together)."""
    window: int | None = None
    """Window budget in tokens: past it the oldest chunk is absorbed into memory and evicted (None: off)."""
    compressor: Path = shipped("absorb")
    """The absorb compressor folder (used with ``window`` by the writers that use it)."""
    absorber: str = "compressor"
    """The memory writer used with ``window``: compressor, distill or compressor+distill."""
    absorb_steps: int = DistillConfig.steps
    """Distillation steps per absorbed chunk (the distilling writers)."""
    absorb_step_sizes: Path | None = None
    """Meta-learned step sizes for the distilling writers (``DistillConfig.step_sizes``; None: its ``lr``)."""
    background_absorb: bool = False
    """Write absorbed chunks on a background thread while generation goes on (``EngineConfig``)."""
    relevance_gate: bool = False
    """Memory on only for prompts that name something it absorbed (``AbsorbConfig.relevance_gate``)."""

    def __post_init__(self):  # choices checked before any model loads
        for name, value, allowed in (("hypernetwork", self.hypernetwork, HYPERNETWORKS),
                                     ("kv_policy", self.kv_policy, KV_POLICIES), ("absorber", self.absorber, WRITERS)):
            if value not in allowed:
                raise ValueError(f"EngineSpec.{name}={value!r}: choose one of {list(allowed)}")
        resolve_dtype(self.dtype)


def parse_trigger(spec: str, token_ids: dict[str, int]) -> TriggerPolicy:
    """``"every:16"`` → ``EveryN(16)`` etc.; raises naming the accepted forms."""
    name, _, value = spec.partition(":")
    try:
        if name == "token" and not value:
            return SpecialToken(token_ids)
        if name == "prob":
            token_id = token_ids.get("<|shift|>", next(iter(token_ids.values())))
            return TokenProbability(token_id, float(value) if value else 0.2, name="<|shift|>")
        if name == "think" and THINK_TOKEN in token_ids:
            return TokenProbability(token_ids[THINK_TOKEN], float(value) if value else 0.5, name="think")
        if name == "surprise":
            return Surprise(k=float(value) if value else 3.0)
        if name == "every":
            return EveryN(int(value))
        if name == "window":
            return WindowPressure(int(value))
    except ValueError as error:
        raise ValueError(f"--trigger {spec!r}: {error}") from None
    raise ValueError(f"--trigger {spec!r}: use one of {TRIGGER_SPECS}")


def build_engine(spec: EngineSpec) -> Engine:
    base = load_base_model(spec.model, spec.dtype, spec.device)
    device = model_device(base.model)
    if spec.trigger_tokens:
        token_ids = load_trigger_tokens(spec.trigger_tokens, base.model, base.tokenizer)
        trigger_lora = trigger_lora_beside(spec.trigger_tokens)
        if trigger_lora:  # the trigger's LoRA form: static, so merged into the base weights once
            merge_trigger_lora(base.model, trigger_lora)
    else:
        token_ids = add_trigger_tokens(base.model, base.tokenizer)
    shapes = module_shapes_of(base.model)
    if spec.hypernetwork == "shift" and spec.bank is None:
        raise ValueError("--hyper shift needs --bank: the library the shift network was trained on "
                         "(e.g. checkpoints/library)")
    if spec.bank is not None and (Path(spec.bank) / "library.json").is_file():  # a trained library folder
        from dynalora.lora.library_folder import load_library_bank

        bank, _ = load_library_bank(spec.bank, base.model)
    elif spec.bank is not None and not is_bank_folder(spec.bank):
        raise FileNotFoundError(f"{spec.bank}: not a bank folder (no bank.json) nor a trained library "
                                "(no library.json)")
    else:
        bank = LoraBank.load(spec.bank, shapes) if spec.bank else LoraBank(shapes)
    plan = None
    inject = InjectConfig(state=StateConfig(max_batch=spec.max_batch))
    if spec.window is not None:
        from dynalora.runtime.absorb import plan_writer

        plan = plan_writer(spec.absorber, None if spec.absorber == "distill" else spec.compressor, base.tokenizer,
                           DistillConfig(steps=spec.absorb_steps, step_sizes=spec.absorb_step_sizes and
                                         str(spec.absorb_step_sizes)), window=spec.window)
        kinds = {name.rsplit(".", 1)[-1] for name in bank.modules} | set(plan.target_kinds)
        inject = InjectConfig(target_modules=sorted(kinds | {"q_proj", "k_proj", "v_proj", "o_proj"}),
                              state=StateConfig(max_batch=spec.max_batch, memory_rank=plan.memory_rank))
    policies = [parse_trigger(s, token_ids) for s in spec.triggers]
    engine_config = EngineConfig(kv_policy=spec.kv_policy, background_absorb=spec.background_absorb)
    shift_hyper = None
    if spec.hypernetwork == "shift":
        shift_hyper, think_policy = _shift_hypernetwork(spec, base, device)
        policies += [think_policy] if think_policy else []
        net = shift_hyper.net
        engine_config = EngineConfig(kv_policy=spec.kv_policy, background_absorb=spec.background_absorb,
                                     feature_layer=net.config.feature_layer,
                                     pool_window=net.config.pool_window)
        inject.state.generated_rank = net.config.generated_rank if shift_hyper.use_factors else 0
    dyn = DynamicLoraModel.attach(base.model, bank, inject)
    triggers = TriggerConfig(policies, min_gap=spec.min_gap, max_per_sequence=spec.max_per_sequence)
    absorber = None
    if plan is not None:
        from dynalora.runtime.absorb import AbsorbConfig, Absorber

        absorber = Absorber(dyn, plan.build(dyn, base.tokenizer), AbsorbConfig(
            window=spec.window, chunk_tokens=plan.chunk_tokens, relevance_gate=spec.relevance_gate), base.tokenizer)
    engine = Engine(dyn, base.tokenizer, None, triggers, engine_config, absorber=absorber)
    if shift_hyper is not None:
        shift_hyper.check_bank(dyn.state)
        engine.hypernetwork = shift_hyper
        if spec.mix is not None:
            from dynalora.hyper.mix_gate import MixGate, MixHypernetwork

            engine.hypernetwork = MixHypernetwork(shift_hyper, MixGate.from_pretrained(spec.mix).to(device))
    elif spec.hypernetwork == "prototype" and len(bank):
        from dynalora.hyper import NearestPrototype

        texts = [[info.description or info.label] for info in bank.adapters]
        engine.hypernetwork = NearestPrototype.from_texts(engine, texts)
    elif spec.hypernetwork not in HYPERNETWORKS:
        raise ValueError(f"--hyper {spec.hypernetwork!r}: choose one of {HYPERNETWORKS}")
    return engine


def _shift_hypernetwork(spec: EngineSpec, base, device):
    """The trained shift network (blend only, as shipped), or with ``spec.escalate`` the stack above it and the
    ``<|think|>`` probability trigger that calls it (its trained threshold)."""
    import json

    from dynalora.hyper.shift_net import ShiftHypernetwork, ShiftNet

    net = ShiftNet.from_pretrained(spec.shift_dir).to(device)
    if spec.escalate is None:
        return ShiftHypernetwork(net, use_factors=False), None
    from dynalora.hyper.stack import EscalatingHypernetwork, load_stack

    trained = json.loads((Path(spec.escalate) / "escalate.json").read_text())
    think_id = load_trigger_tokens(Path(spec.escalate) / "think_token.safetensors", base.model,
                                   base.tokenizer)[THINK_TOKEN]
    hyper = EscalatingHypernetwork(load_stack(net, spec.escalate).to(device),
                                   use_factors=trained["config"]["level2_factors"])
    return hyper, TokenProbability(think_id, trained["threshold"], name="think")
