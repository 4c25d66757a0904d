"""The shipped shift system in one object: base model, library bank, shift network, learned trigger."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from dynalora.runtime import Engine, EngineConfig, TokenProbability, TriggerConfig
from dynalora.runtime.special_tokens import SHIFT_TOKEN
from dynalora.runtime.teacher_forced import StreamScore, score_stream
from dynalora.runtime.trigger_lora import trigger_lora_merged


@dataclass
class ShiftSystem:
    base: object
    bank: object
    adapters: list[dict]
    dyn: object
    net: object
    hyper: object
    capture: object
    threshold: float
    shift_id: int
    vocab_size: int
    """The base vocabulary (trigger tokens excluded)."""
    trigger_deltas: dict | None = None
    """The trigger LoRA (``dynalora train trigger-lora``) as ``{module: ΔW}``, merged only inside :meth:`live` —
    the other methods of an evaluation see the plain base model — or None."""
    update_delay: int = 12
    """Tokens between a trigger and its update (features then cover the new text; see EngineConfig)."""
    # Chosen on validation streams (results/eval_shift_validation_*.json): the blend alone with update
    # delay 12 (NLL 3.137) beat no delay (3.147) and the blend + generated factors (3.187, 3.201).

    def run_stream(self, tokens: list[int], min_gap: int = 32) -> StreamScore:
        """Teacher-forced pass of a stream through the live engine (:func:`~dynalora.runtime.teacher_forced.
        score_stream`): the learned trigger fires the shift network mid-stream."""
        with self.live(min_gap) as engine:
            return score_stream(engine, tokens, self.vocab_size)

    @contextmanager
    def live(self, min_gap: int = 32) -> Iterator[Engine]:
        """The live engine, with the trigger LoRA (if any) merged into the base weights while the block runs: the
        learned ``<|shift|>`` probability fires the shift network (greedy triggers). Outside the block the base
        model is as loaded, so an evaluation's other methods see the plain model."""
        engine = Engine(self.dyn, self.base.tokenizer, self.hyper,
                        TriggerConfig([TokenProbability(self.shift_id, self.threshold, SHIFT_TOKEN)], min_gap=min_gap),
                        EngineConfig(update_delay=self.update_delay, sample_triggers=False,
                                     feature_layer=self.net.config.feature_layer,
                                     pool_window=self.net.config.pool_window))  # the features it was trained on
        try:
            with trigger_lora_merged(self.base.model, self.trigger_deltas):
                yield engine
        finally:
            engine.close()


def load_shift_system(library_dir: Path, shift_dir: Path, triggers_dir: Path, model: str | None = None,
                      max_batch: int = 1, use_factors: bool = False, device: str = "cpu",
                      dtype: str = "float32") -> ShiftSystem:
    """``use_factors=False`` (default): the shift network's blend only; its generated factors raised the
    NLL on validation streams (see ``ShiftSystem``). ``device``/``dtype``: see :func:`load_base_model`."""
    from dynalora.hyper.shift_net import ShiftHypernetwork, ShiftNet
    from dynalora.lora import DynamicLoraModel, InjectConfig, StateConfig
    from dynalora.models import load_base_model, model_device
    from dynalora.runtime.features import HiddenCapture
    from dynalora.runtime.special_tokens import load_trigger_tokens, ordinary_vocab_size
    from dynalora.runtime.trigger_lora import trigger_lora_beside
    from dynalora.lora.library_folder import load_library_bank

    for folder, command in ((library_dir, "train library"), (shift_dir, "train shift"),
                            (triggers_dir, "train triggers")):
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{folder}: missing; make it with `dynalora {command}`")
    base = load_base_model(model, dtype, device)
    bank, adapters = load_library_bank(library_dir, base.model)
    net = ShiftNet.from_pretrained(shift_dir).to(model_device(base.model))
    threshold = json.loads((Path(triggers_dir) / "triggers.json").read_text())["threshold"]
    token_file = Path(triggers_dir) / "trigger_tokens.safetensors"
    token_ids = load_trigger_tokens(token_file, base.model, base.tokenizer)
    vocab_size = ordinary_vocab_size(base.model, base.tokenizer)
    dyn = DynamicLoraModel.attach(base.model, bank, InjectConfig(
        state=StateConfig(max_batch=max_batch, generated_rank=net.config.generated_rank, memory_rank=0)))
    hyper = ShiftHypernetwork(net, use_factors=use_factors)
    hyper.check_bank(dyn.state)
    capture = HiddenCapture(base.model, net.config.feature_layer, window=100_000)
    return ShiftSystem(base, bank, adapters, dyn, net, hyper, capture, threshold, token_ids[SHIFT_TOKEN], vocab_size,
                       trigger_lora_beside(token_file))
