"""One assembler: a base model with its bank, hypernetwork, trigger tokens and policies and memory writer, built
from checkpoint folders named by an :class:`EngineSpec` — for the CLI, the demo, the evaluations, the benchmarks and
the recipes that run a trained system."""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Iterator

from dynalora.cli_config import construct
from dynalora.lora import DynamicLoraModel, InjectConfig, LoraBank, StateConfig, module_shapes_of
from dynalora.lora.library_folder import load_library_bank
from dynalora.models import load_base_model, model_device, resolve_dtype
from dynalora.runtime.engine import KV_POLICIES, Engine, EngineConfig
from dynalora.runtime.features import HiddenCapture
from dynalora.runtime.memory_writers import WRITERS, DistillConfig
from dynalora.runtime.special_tokens import SHIFT_TOKEN, THINK_TOKEN, add_trigger_tokens, ordinary_vocab_size
from dynalora.runtime.teacher_forced import StreamScore, score_stream
from dynalora.runtime.trained_trigger import TrainedTrigger
from dynalora.runtime.trigger_lora import merge_trigger_lora, trigger_lora_merged
from dynalora.runtime.triggers import (EveryN, SpecialToken, Surprise, TokenProbability, TriggerConfig,
                                       TriggerPolicy, WindowPressure)
from dynalora.shipped import shipped

HYPERNETWORKS = ("prototype", "shift", "none")
SHIFT_UPDATE_DELAY = 12
"""Tokens between a trigger and the shift network's update (its features then cover the new text), chosen on
validation streams (results/eval_shift_validation_*.json): the blend alone with delay 12 (NLL 3.137) beat no delay
(3.147) and the blend + generated factors (3.187, 3.201)."""
SYSTEM_FILE = "system.json"
SYSTEM_PARTS = {"bank": "library", "trigger_tokens": "triggers", "shift_dir": "shift", "escalate": "escalate",
                "mix": "mix", "compressor": "absorb", "distill.step_sizes": "absorb_steps"}
"""The spec's checkpoint fields and the names :meth:`System.save_pretrained` copies them to."""
LOAD_TIME_FIELDS = ("device", "dtype", "max_batch")
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
    """A bank folder (``dynalora adapters import``) or a trained library (``dynalora train library``); None: no
    adapters."""
    trigger_tokens: Path | None = None
    """A trained trigger (its folder or its ``trigger_tokens.safetensors``; its ``triggers.json`` threshold is the
    ``prob`` trigger's default, its trigger LoRA is merged); None adds untrained ``<|shift|>``/``<|think|>`` when a
    policy reads them."""
    hypernetwork: str = "prototype"
    """``prototype`` (nearest bank adapter by its description's features), ``shift`` (the trained shift
    network in ``shift_dir``; the bank must be the one it was trained on) or ``none``."""
    shift_dir: Path = shipped("shift")
    """The trained shift network (with --hyper shift)."""
    use_factors: bool = False
    """With --hyper shift: apply the network's generated LoRA factors besides its blend (they raised the NLL on
    validation streams, so the shipped system uses the blend alone)."""
    update_delay: int | None = None
    """Tokens between a trigger and its update, which then reads features of the new text (None: 12 with --hyper
    shift, chosen on validation streams; 0 otherwise)."""
    escalate: Path | None = None
    """With ``hypernetwork="shift"``: the levels above it (``dynalora train escalate``). ``<|think|>`` then
    runs the whole stack; its trained probability threshold is added as a trigger."""
    mix: Path | None = None
    """With ``hypernetwork="shift"``: the mix gate (``dynalora train mix``) that weighs the shift answer and the
    row's memory at every trigger (useful with ``window``)."""
    triggers: list[str] = field(default_factory=lambda: ["token"])
    """Trigger policies, each one of: token | prob[:THRESHOLD] | think[:THRESHOLD] | surprise[:K] | every:N |
    window:TOKENS (``prob`` without a threshold: the trained one in the trigger's triggers.json, or 0.2)."""
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
    distill: DistillConfig = field(default_factory=DistillConfig)
    """The distilling writers' settings (``distill.steps``: steps per absorbed chunk; ``distill.step_sizes``: the
    meta-learned step sizes, ``dynalora train absorb-steps``)."""
    sink_tokens: int = 4
    """First tokens of a row never evicted (attention sinks)."""
    chunk_tokens: int | None = None
    """Tokens absorbed at a time (None: the compressor's training chunk, or 3/4 of the window for ``distill``)."""
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

    def parts(self) -> dict[str, Path]:
        """``{field: path}`` of the checkpoints this spec's system reads (``SYSTEM_PARTS`` it uses)."""
        used = {"bank": self.bank, "trigger_tokens": self.trigger_tokens,
                "shift_dir": self.shift_dir if self.hypernetwork == "shift" else None,
                "escalate": self.escalate, "mix": self.mix,
                "compressor": self.compressor if self.window is not None and self.absorber != "distill" else None,
                "distill.step_sizes": self.distill.step_sizes if self.window is not None else None}
        return {name: Path(path) for name, path in used.items() if path is not None}

    def reads_trigger_tokens(self) -> bool:
        """Whether a trigger policy reads a trigger token (then untrained ones are added when none are given)."""
        reads = any(spec.partition(":")[0] in ("token", "prob", "think") for spec in self.triggers)
        return reads or self.escalate is not None


def parse_trigger(spec: str, token_ids: dict[str, int], shift_threshold: float | None = None) -> TriggerPolicy:
    """``"every:16"`` → ``EveryN(16)`` etc. (``prob`` without a threshold: ``shift_threshold``, the trained one, or
    0.2); raises naming the accepted forms."""
    name, _, value = spec.partition(":")
    try:
        if name == "token" and not value:
            return SpecialToken(token_ids)
        if name == "prob":
            token_id = token_ids.get(SHIFT_TOKEN, next(iter(token_ids.values())))
            threshold = float(value) if value else (0.2 if shift_threshold is None else shift_threshold)
            return TokenProbability(token_id, threshold, name=SHIFT_TOKEN)
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


@dataclass
class System:
    """A base model with its bank, hypernetwork, trigger tokens and policies and memory writer: what
    :meth:`from_checkpoints` assembles from an :class:`EngineSpec`, and the one place engines are built from."""

    spec: EngineSpec
    base: object
    """The :class:`~dynalora.models.BaseModel` (frozen), with the trigger tokens added."""
    bank: LoraBank
    adapters: list[dict]
    """The library's adapters' records (empty for a plain bank folder)."""
    dyn: DynamicLoraModel
    hyper: object
    """The hypernetwork the engine calls (None: the engine only records triggers)."""
    triggers: TriggerConfig
    engine_config: EngineConfig
    token_ids: dict[str, int]
    """``{trigger token: id}`` (empty when no policy reads a trigger token)."""
    vocab_size: int
    """The ordinary vocabulary (trigger tokens excluded): what text is scored over."""
    threshold: float | None = None
    """The trained ``<|shift|>`` probability threshold (``triggers.json`` beside the token file), if any."""
    absorber: object = None
    """The :class:`~dynalora.runtime.absorb.Absorber` writing memory past ``spec.window`` (None: off)."""
    trigger_deltas: dict | None = None
    """The trigger LoRA (``dynalora train trigger-lora``) as ``{module: ΔW}``, merged only inside :meth:`live` (or
    for good by :meth:`merge_trigger_lora`): an evaluation's other methods see the plain base model."""

    @classmethod
    def from_checkpoints(cls, spec: EngineSpec) -> "System":
        """Load and wire everything ``spec`` names; paths are checked before the model loads."""
        for name, path in spec.parts().items():
            if not path.exists():
                raise FileNotFoundError(f"EngineSpec.{name}: {path} does not exist")
        if spec.hypernetwork == "shift" and spec.bank is None:
            raise ValueError("--hyper shift needs --bank: the library the shift network was trained on "
                             "(e.g. checkpoints/library)")
        base = load_base_model(spec.model, spec.dtype, spec.device)
        device = model_device(base.model)
        threshold, trigger_deltas, token_ids = None, None, {}
        if spec.trigger_tokens is not None:
            trigger = TrainedTrigger.from_pretrained(spec.trigger_tokens)
            token_ids = trigger.install(base.model, base.tokenizer)
            threshold, trigger_deltas = trigger.threshold, trigger.deltas
        elif spec.reads_trigger_tokens():
            token_ids = add_trigger_tokens(base.model, base.tokenizer)
        bank, adapters = _load_bank(spec.bank, base.model)
        plan = None
        inject = InjectConfig(state=StateConfig(max_batch=spec.max_batch, generated_rank=0, memory_rank=0))
        if spec.window is not None:  # the state also covers what the memory writer writes, at its rank
            from dynalora.runtime.absorb import plan_writer

            plan = plan_writer(spec.absorber, None if spec.absorber == "distill" else spec.compressor, base.tokenizer,
                               spec.distill, spec.chunk_tokens, spec.window)
            kinds = {name.rsplit(".", 1)[-1] for name in bank.modules} | set(plan.target_kinds)
            inject = InjectConfig(target_modules=sorted(kinds), state=StateConfig(
                max_batch=spec.max_batch, generated_rank=0, memory_rank=plan.memory_rank))
        policies = [parse_trigger(s, token_ids, threshold) for s in spec.triggers]
        engine_config = EngineConfig(kv_policy=spec.kv_policy, background_absorb=spec.background_absorb,
                                     update_delay=spec.update_delay or 0,
                                     sample_triggers=any(s == "token" for s in spec.triggers))
        shift_hyper = None
        if spec.hypernetwork == "shift":
            shift_hyper, think_policy = _shift_hypernetwork(spec, base, device)
            policies += [think_policy] if think_policy else []
            net = shift_hyper.net
            engine_config.feature_layer = net.config.feature_layer  # the features it was trained on
            engine_config.pool_window = net.config.pool_window
            engine_config.update_delay = SHIFT_UPDATE_DELAY if spec.update_delay is None else spec.update_delay
            inject.state.generated_rank = net.config.generated_rank if shift_hyper.use_factors else 0
        dyn = DynamicLoraModel.attach(base.model, bank, inject)
        hyper = None
        absorber = plan and plan.absorber(dyn, base.tokenizer, spec.window, spec.sink_tokens, spec.relevance_gate)
        if shift_hyper is not None:
            shift_hyper.check_bank(dyn.state)
            hyper = shift_hyper
            if spec.mix is not None:
                from dynalora.hyper.mix_gate import MixGate, MixHypernetwork

                hyper = MixHypernetwork(shift_hyper, MixGate.from_pretrained(spec.mix).to(device))
        elif spec.hypernetwork == "prototype" and len(bank):
            from dynalora.hyper import NearestPrototype

            hyper = NearestPrototype.from_texts(Engine(dyn, base.tokenizer, config=engine_config),
                                                [[info.description or info.label] for info in bank.adapters])
        triggers = TriggerConfig(policies, min_gap=spec.min_gap, max_per_sequence=spec.max_per_sequence)
        return cls(spec, base, bank, adapters, dyn, hyper, triggers, engine_config, token_ids,
                   ordinary_vocab_size(base.model, base.tokenizer), threshold, absorber, trigger_deltas)

    @property
    def net(self):
        """The shift network (None without ``--hyper shift``)."""
        return getattr(self.hyper, "net", None) if self.spec.hypernetwork == "shift" else None

    @property
    def shift_id(self) -> int:
        return self.token_ids[SHIFT_TOKEN]

    @cached_property
    def capture(self) -> HiddenCapture:
        """Hidden states of the shift network's feature layer over whole texts (an evaluation's pooled features;
        the engine has its own). Made on first use; :meth:`close` removes it."""
        if self.net is None:
            raise ValueError("System.capture: there is no shift network (--hyper shift) whose features to capture")
        return HiddenCapture(self.base.model, self.net.config.feature_layer, window=100_000)

    def engine(self, min_gap: int | None = None) -> Engine:
        """A new engine over the system (close it when done). The trigger LoRA is not merged: use :meth:`live`,
        or :meth:`merge_trigger_lora` once for good."""
        triggers = self.triggers if min_gap is None else replace(self.triggers, min_gap=min_gap)
        return Engine(self.dyn, self.base.tokenizer, self.hyper, triggers, replace(self.engine_config),
                      absorber=self.absorber)

    @contextmanager
    def live(self, min_gap: int | None = None) -> Iterator[Engine]:
        """A new engine with the trigger LoRA (if any) merged into the base weights while the block runs; outside
        it the base model is as loaded, so an evaluation's other methods see the plain model."""
        engine = self.engine(min_gap)
        try:
            with trigger_lora_merged(self.base.model, self.trigger_deltas):
                yield engine
        finally:
            engine.close()

    def merge_trigger_lora(self) -> None:
        """Merge the trigger LoRA (if any) into the base weights for good (a system that only runs live)."""
        if self.trigger_deltas:
            merge_trigger_lora(self.base.model, self.trigger_deltas)
            self.trigger_deltas = None

    def run_stream(self, tokens: list[int], min_gap: int | None = None) -> StreamScore:
        """Teacher-forced pass of a stream through the live engine (:func:`~dynalora.runtime.teacher_forced.
        score_stream`): the learned trigger fires the hypernetwork mid-stream, as in generation."""
        with self.live(min_gap) as engine:
            return score_stream(engine, tokens, self.vocab_size)

    def save_pretrained(self, folder: str | Path) -> Path:
        """The system as one folder: each checkpoint it was built from, copied under a fixed name
        (``SYSTEM_PARTS``), and ``system.json`` holding the rest of its spec with those names. The base model is
        named, not copied; device, dtype and batch size are chosen when it is loaded again."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        record = {name: value for name, value in asdict(self.spec).items() if name not in LOAD_TIME_FIELDS}
        for name in SYSTEM_PARTS:
            holder, key = _nested(record, name)
            holder[key] = None
        for name, source in self.spec.parts().items():
            target = folder / SYSTEM_PARTS[name]
            if source.is_dir():
                shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("resume"))
            else:  # a token file or step sizes: its folder's siblings (threshold record, trigger LoRA) go with it
                target.mkdir(parents=True, exist_ok=True)
                for sibling in source.parent.iterdir():
                    if sibling.is_file():
                        shutil.copy2(sibling, target / sibling.name)
                target = target / source.name
            holder, key = _nested(record, name)
            holder[key] = str(target.relative_to(folder))
        (folder / SYSTEM_FILE).write_text(json.dumps(record, indent=2, default=str))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, **load_options) -> "System":
        """A folder :meth:`save_pretrained` wrote; ``load_options`` set the spec's load-time fields (device, dtype,
        max_batch) or override any other."""
        path = Path(folder) / SYSTEM_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not a saved system (System.save_pretrained writes one)")
        record = json.loads(path.read_text())
        for name in SYSTEM_PARTS:  # a part the system does not use takes the spec's default
            holder, key = _nested(record, name)
            if holder.get(key) is None:
                holder.pop(key, None)
            else:
                holder[key] = str(Path(folder) / holder[key])
        return cls.from_checkpoints(construct(EngineSpec, {**record, **load_options}, str(path)))

    def close(self) -> None:
        """Take the system's hooks and wrappers off the base model."""
        if "capture" in self.__dict__:
            self.capture.remove()
        self.dyn.detach()


def build_engine(spec: EngineSpec) -> Engine:
    """The engine the CLI runs: the system ``spec`` names, its trigger LoRA merged for good."""
    system = System.from_checkpoints(spec)
    system.merge_trigger_lora()
    return system.engine()


def load_shift_system(library_dir: Path, shift_dir: Path, triggers_dir: Path, model: str | None = None,
                      max_batch: int = 1, use_factors: bool = False, device: str = "cpu",
                      dtype: str = "float32", update_delay: int | None = None) -> System:
    """The shift system as the evaluations and the demo run it: the library, the shift network (its blend only
    unless ``use_factors``: its generated factors raised the NLL on validation streams) and the learned
    ``<|shift|>`` trigger at its trained threshold, read greedily; at least 32 tokens between updates."""
    return System.from_checkpoints(EngineSpec(
        model=model, device=device, dtype=dtype, bank=Path(library_dir), trigger_tokens=Path(triggers_dir),
        hypernetwork="shift", shift_dir=Path(shift_dir), use_factors=use_factors, update_delay=update_delay,
        triggers=["prob"], min_gap=32, max_per_sequence=64, max_batch=max_batch))


def _nested(record: dict, path: str) -> tuple[dict, str]:
    """The dict of ``record`` holding a dotted field and that field's name (``distill.step_sizes`` →
    ``record["distill"], "step_sizes"``)."""
    *parents, name = path.split(".")
    for parent in parents:
        record = record[parent]
    return record, name


def _load_bank(folder, model) -> tuple[LoraBank, list[dict]]:
    """A trained library or a bank folder (:func:`load_library_bank`), or an empty bank: ``(bank, records)``."""
    if folder is None:
        return LoraBank(module_shapes_of(model)), []
    return load_library_bank(folder, model)


def _shift_hypernetwork(spec: EngineSpec, base, device):
    """The trained shift network, or with ``spec.escalate`` the stack above it and the
    ``<|think|>`` probability trigger that calls it (its trained threshold)."""
    from dynalora.hyper.shift_net import ShiftHypernetwork, ShiftNet

    net = ShiftNet.from_pretrained(spec.shift_dir).to(device)
    if spec.escalate is None:
        return ShiftHypernetwork(net, use_factors=spec.use_factors), None
    from dynalora.hyper.stack import EscalatingHypernetwork, load_stack

    trained = json.loads((Path(spec.escalate) / "escalate.json").read_text())
    think_id = TrainedTrigger.from_pretrained(Path(spec.escalate) / "think_token.safetensors").install(
        base.model, base.tokenizer)[THINK_TOKEN]
    hyper = EscalatingHypernetwork(load_stack(net, spec.escalate).to(device),
                                   use_factors=trained["config"]["level2_factors"])
    return hyper, TokenProbability(think_id, trained["threshold"], name="think")
