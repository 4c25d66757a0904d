"""One assembler: a base model with its bank, hypernetwork, trigger tokens and policies and memory writer, built
from checkpoint folders named by an :class:`EngineSpec` — for the CLI, the demo, the evaluations, the benchmarks and
the recipes that run a trained system."""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Iterator

from dynalora.cli_config import construct
from dynalora.lora import DynamicLoraModel, InjectConfig, LoraBank, StateConfig, module_shapes_of
from dynalora.lora.library_folder import load_library_bank
from dynalora.models import load_base_model, model_device
from dynalora.runtime.engine import Engine, EngineConfig
from dynalora.runtime.features import HiddenCapture
from dynalora.runtime.special_tokens import SHIFT_TOKEN, THINK_TOKEN, add_trigger_tokens, ordinary_vocab_size
from dynalora.runtime.teacher_forced import StreamScore, score_stream
from dynalora.runtime.trained_trigger import TrainedTrigger
from dynalora.runtime.trigger_lora import merge_trigger_lora, trigger_lora_merged
from dynalora.runtime.triggers import TokenProbability, TriggerConfig
from dynalora.system.spec import SHIFT_UPDATE_DELAY, SYSTEM_PARTS, EngineSpec, parse_trigger

__all__ = ["EngineSpec", "System", "build_engine", "load_shift_system"]
SYSTEM_FILE = "system.json"
LOAD_TIME_FIELDS = ("device", "dtype", "max_batch")
"""Spec fields chosen when a saved system is loaded, not saved with it."""

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
    votes: tuple[int, int] = (1, 1)
    """The trained trigger fires when ``threshold`` is passed at ``k`` of the last ``n`` positions."""
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
        threshold, votes, trigger_deltas, token_ids = None, (1, 1), None, {}
        if spec.trigger_tokens is not None:
            trigger = TrainedTrigger.from_pretrained(spec.trigger_tokens)
            token_ids = trigger.install(base.model, base.tokenizer)
            threshold, votes, trigger_deltas = trigger.threshold, trigger.votes, trigger.deltas
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
        policies = [parse_trigger(s, token_ids, threshold, votes) for s in spec.triggers]
        engine_config = EngineConfig(kv_policy=spec.kv_policy, background_absorb=spec.background_absorb,
                                     merge_alone=spec.merge_alone,
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
        if spec.router is not None:
            from dynalora.hyper.router import TokenRouter

            TokenRouter.from_pretrained(spec.router, device).attach(dyn)
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

            probe = Engine(dyn, base.tokenizer, config=engine_config)  # reads the descriptions' features
            hyper = NearestPrototype.from_texts(probe, [[info.description or info.label] for info in bank.adapters])
            probe.close()
        triggers = TriggerConfig(policies, min_gap=spec.min_gap, max_per_sequence=spec.max_per_sequence)
        return cls(spec, base, bank, adapters, dyn, hyper, triggers, engine_config, token_ids,
                   ordinary_vocab_size(base.model, base.tokenizer), threshold, votes, absorber, trigger_deltas)

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

    def run_stream(self, tokens: list[int], min_gap: int | None = None, prompt_tokens: int = 0) -> StreamScore:
        """Teacher-forced pass of a stream through the live engine (:func:`~dynalora.runtime.teacher_forced.
        score_stream`; its first ``prompt_tokens`` read as a prompt): the learned trigger fires the hypernetwork
        mid-stream, as in generation."""
        with self.live(min_gap) as engine:
            return score_stream(engine, tokens, self.vocab_size, prompt_tokens=prompt_tokens)

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
                      dtype: str = "float32", update_delay: int | None = None,
                      triggers: tuple[str, ...] | list[str] = ("prob",)) -> System:
    """The shift system as the evaluations and the demo run it: the library, the shift network (its blend only
    unless ``use_factors``: its generated factors raised the NLL on validation streams) and the learned
    ``<|shift|>`` trigger at its trained threshold, read greedily (``triggers``: the policies); at least 32 tokens
    between updates."""
    return System.from_checkpoints(EngineSpec(
        model=model, device=device, dtype=dtype, bank=Path(library_dir), trigger_tokens=Path(triggers_dir),
        hypernetwork="shift", shift_dir=Path(shift_dir), use_factors=use_factors, update_delay=update_delay,
        triggers=list(triggers), min_gap=32, max_per_sequence=64, max_batch=max_batch))


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
