"""What a system is made of, by name: the checkpoint folders, trigger policies and engine settings that
:class:`~dynalora.system.assemble.System` assembles (the CLI's ``generate``/``chat`` flags are this spec's fields)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dynalora.models import check_placement
from dynalora.runtime.engine import KV_POLICIES
from dynalora.runtime.memory_writers import WRITERS, DistillConfig
from dynalora.runtime.special_tokens import SHIFT_TOKEN, THINK_TOKEN
from dynalora.runtime.triggers import (EveryN, PromptEnd, SpecialToken, Surprise, TokenProbability,
                                       TriggerPolicy, WindowPressure, parse_votes)
from dynalora.shipped import shipped

HYPERNETWORKS = ("prototype", "shift", "none")
SHIFT_UPDATE_DELAY = 12
"""Tokens between a trigger and the shift network's update (its features then cover the new text), chosen on
validation streams (results/eval_shift_validation_*.json): the blend alone with delay 12 (NLL 3.137) beat no delay
(3.147) and the blend + generated factors (3.187, 3.201)."""
SYSTEM_PARTS = {"bank": "library", "trigger_tokens": "triggers", "shift_dir": "shift", "escalate": "escalate",
                "mix": "mix", "router": "router", "compressor": "absorb", "distill.step_sizes": "absorb_steps"}
"""The spec's checkpoint fields (:meth:`EngineSpec.parts`) and the names ``System.save_pretrained`` copies them
to."""
FLAG_ALIASES = {"hypernetwork": "--hyper", "shift_dir": "--shift", "triggers": "--trigger",
                "distill.steps": "--absorb-steps", "distill.step_sizes": "--absorb-step-sizes"}
"""Short command-line names of some fields (``generate``, ``chat``, ``serve``; the generated ones work too)."""
TRIGGER_SPECS = "token | prob[:THRESHOLD[:K/N]] | think[:THRESHOLD] | prompt | surprise[:K] | every:N | window:TOKENS"


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
    router: Path | None = None
    """A token router (``dynalora train route``): the bank's blend re-weighted at every token inside the forward,
    with the row's blend as its prior (trained over the shift network's blends)."""
    triggers: list[str] = field(default_factory=lambda: ["token"])
    """Trigger policies, each one of: token | prob[:THRESHOLD[:K/N]] | think[:THRESHOLD] | prompt | surprise[:K] |
    every:N | window:TOKENS (``prob`` without a threshold or votes: the trained ones in the trigger's triggers.json,
    or 0.2 and 1/1 — ``prob:0.9:3/4`` fires when p passes 0.9 at 3 of the last 4 positions; ``prompt``
    once at the prompt's last token: the first blend read from the whole prompt)."""
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
    merge_alone: bool = False
    """With one row, fold its LoRA into the base weights between changes: decoding at the base model's speed,
    outputs equal up to float rounding (``EngineConfig.merge_alone``)."""
    relevance_gate: bool = False
    """Memory on only for prompts that name something it absorbed (``AbsorbConfig.relevance_gate``)."""

    def __post_init__(self):  # choices checked before any model loads
        for name, value, allowed in (("hypernetwork", self.hypernetwork, HYPERNETWORKS),
                                     ("kv_policy", self.kv_policy, KV_POLICIES), ("absorber", self.absorber, WRITERS)):
            if value not in allowed:
                raise ValueError(f"EngineSpec.{name}={value!r}: choose one of {list(allowed)}")
        check_placement(self.device, self.dtype)

    def parts(self) -> dict[str, Path]:
        """``{field: path}`` of the checkpoints this spec's system reads (``SYSTEM_PARTS`` it uses)."""
        used = {"bank": self.bank, "trigger_tokens": self.trigger_tokens,
                "shift_dir": self.shift_dir if self.hypernetwork == "shift" else None,
                "escalate": self.escalate, "mix": self.mix, "router": self.router,
                "compressor": self.compressor if self.window is not None and self.absorber != "distill" else None,
                "distill.step_sizes": self.distill.step_sizes if self.window is not None else None}
        return {name: Path(path) for name, path in used.items() if path is not None}

    def reads_trigger_tokens(self) -> bool:
        """Whether a trigger policy reads a trigger token (then untrained ones are added when none are given)."""
        reads = any(spec.partition(":")[0] in ("token", "prob", "think") for spec in self.triggers)
        return reads or self.escalate is not None


def parse_trigger(spec: str, token_ids: dict[str, int], shift_threshold: float | None = None,
                  shift_votes: tuple[int, int] = (1, 1)) -> TriggerPolicy:
    """``"every:16"`` → ``EveryN(16)`` etc. (``prob:T:K/N`` fires when p passes T at K of the last N positions;
    without a threshold: ``shift_threshold``, the trained one, or 0.2; without votes: ``shift_votes``, the trained
    ones, or 1/1); raises naming the accepted forms."""
    name, _, value = spec.partition(":")
    try:
        if name == "token" and not value:
            return SpecialToken(token_ids)
        if name == "prob":
            token_id = token_ids.get(SHIFT_TOKEN, next(iter(token_ids.values())))
            threshold_text, _, votes_text = value.partition(":")
            threshold = float(threshold_text) if threshold_text else (0.2 if shift_threshold is None else
                                                                      shift_threshold)
            votes = parse_votes(votes_text) if votes_text else shift_votes
            return TokenProbability(token_id, threshold, name=SHIFT_TOKEN, votes=votes)
        if name == "think" and THINK_TOKEN in token_ids:
            return TokenProbability(token_ids[THINK_TOKEN], float(value) if value else 0.5, name="think")
        if name == "prompt" and not value:
            return PromptEnd()
        if name == "surprise":
            return Surprise(k=float(value) if value else 3.0)
        if name == "every":
            return EveryN(int(value))
        if name == "window":
            return WindowPressure(int(value))
    except ValueError as error:
        raise ValueError(f"--trigger {spec!r}: {error}") from None
    raise ValueError(f"--trigger {spec!r}: use one of {TRIGGER_SPECS}")
