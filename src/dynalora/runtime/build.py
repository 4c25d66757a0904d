"""Build an engine from plain settings (what the CLI and the server take)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dynalora.lora import DynamicLoraModel, InjectConfig, LoraBank, StateConfig, module_shapes_of
from dynalora.lora.bank import is_bank_folder
from dynalora.models import load_base_model
from dynalora.runtime.engine import Engine, EngineConfig
from dynalora.runtime.special_tokens import add_trigger_tokens, load_trigger_tokens
from dynalora.runtime.trigger_lora import merge_trigger_lora, trigger_lora_beside
from dynalora.runtime.triggers import (EveryN, SpecialToken, Surprise, TokenProbability, TriggerConfig,
                                       TriggerPolicy, WindowPressure)

HYPERNETWORKS = ("prototype", "none")
TRIGGER_SPECS = "token | prob[:THRESHOLD] | surprise[:K] | every:N | window:TOKENS"


@dataclass
class EngineSpec:
    model: str | None = None
    """Base model id or folder (None: the embedded SmolLM2-135M-Instruct)."""
    bank: Path | None = None
    """Bank folder (None: no adapters)."""
    trigger_tokens: Path | None = None
    """Trained trigger-token rows (safetensors); None adds untrained ``<|shift|>``/``<|think|>``."""
    hypernetwork: str = "prototype"
    """``prototype`` (nearest bank adapter by its description's features) or ``none``."""
    triggers: list[str] = field(default_factory=lambda: ["token"])
    """Trigger policies, each one of: """ + TRIGGER_SPECS
    min_gap: int = 8
    max_per_sequence: int = 32
    kv_policy: str = "keep"
    max_batch: int = 8
    window: int | None = None
    """Window budget in tokens: past it the oldest chunk is absorbed into memory and evicted (None: off)."""
    compressor: Path = Path("checkpoints/absorb")
    """The absorb compressor folder (used with ``window``)."""


def parse_trigger(spec: str, token_ids: dict[str, int]) -> TriggerPolicy:
    """``"every:16"`` → ``EveryN(16)`` etc.; raises naming the accepted forms."""
    name, _, value = spec.partition(":")
    try:
        if name == "token" and not value:
            return SpecialToken(token_ids)
        if name == "prob":
            token_id = token_ids.get("<|shift|>", next(iter(token_ids.values())))
            return TokenProbability(token_id, float(value) if value else 0.2, name="<|shift|>")
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
    base = load_base_model(spec.model)
    if spec.trigger_tokens:
        token_ids = load_trigger_tokens(spec.trigger_tokens, base.model, base.tokenizer)
        trigger_lora = trigger_lora_beside(spec.trigger_tokens)
        if trigger_lora:  # the trigger's LoRA form: static, so merged into the base weights once
            merge_trigger_lora(base.model, trigger_lora)
    else:
        token_ids = add_trigger_tokens(base.model, base.tokenizer)
    shapes = module_shapes_of(base.model)
    if spec.bank is not None and not is_bank_folder(spec.bank):
        raise FileNotFoundError(f"{spec.bank}: not a bank folder (no bank.json)")
    bank = LoraBank.load(spec.bank, shapes) if spec.bank else LoraBank(shapes)
    compressor = None
    inject = InjectConfig(state=StateConfig(max_batch=spec.max_batch))
    if spec.window is not None:
        from dynalora.hyper.compressor import load_compressor

        compressor = load_compressor(spec.compressor)
        kinds = {name.rsplit(".", 1)[-1] for name in list(bank.modules) + compressor.modules_list}
        inject = InjectConfig(target_modules=sorted(kinds | {"q_proj", "k_proj", "v_proj", "o_proj"}),
                              state=StateConfig(max_batch=spec.max_batch, memory_rank=compressor.config.rank))
    dyn = DynamicLoraModel.attach(base.model, bank, inject)
    triggers = TriggerConfig([parse_trigger(s, token_ids) for s in spec.triggers], min_gap=spec.min_gap,
                             max_per_sequence=spec.max_per_sequence)
    absorber = None
    if compressor is not None:
        from dynalora.runtime.absorb import AbsorbConfig, Absorber, trained_chunk_tokens

        absorber = Absorber(dyn, compressor, AbsorbConfig(window=spec.window,
                                                          chunk_tokens=trained_chunk_tokens(spec.compressor)))
    engine = Engine(dyn, base.tokenizer, None, triggers, EngineConfig(kv_policy=spec.kv_policy), absorber=absorber)
    if spec.hypernetwork == "prototype" and len(bank):
        from dynalora.hyper import NearestPrototype

        texts = [[info.description or info.label] for info in bank.adapters]
        engine.hypernetwork = NearestPrototype.from_texts(engine, texts)
    elif spec.hypernetwork not in HYPERNETWORKS:
        raise ValueError(f"--hyper {spec.hypernetwork!r}: choose one of {HYPERNETWORKS}")
    return engine
