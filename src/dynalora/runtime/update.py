"""The one update step: run the hypernetwork for a row, check its answer, write it into the LoRA state.

Used by the engine (live generation) and by teacher-forced scoring (:mod:`dynalora.runtime.teacher_forced`),
so a row's blends and events are the same whichever of them runs the stream.
"""

from __future__ import annotations

import math
import time

from dynalora.hyper.protocol import Hypernetwork, LoraUpdate, TriggerFeatures
from dynalora.lora.state import LoraState
from dynalora.runtime.events import LoraEvent
from dynalora.runtime.guard import GuardConfig, check_update


def apply_update(state: LoraState, hypernetwork: Hypernetwork | None, features: TriggerFeatures,
                 guard: GuardConfig) -> LoraEvent:
    """Ask ``hypernetwork`` for row ``features.row``'s update and apply it unless the guard refuses it.

    Returns a ``shift`` event (applied; ``detail`` names the parts written), ``identity`` (no change asked,
    or no hypernetwork) or ``rejected`` (the guard refused it, or the hypernetwork raised: the row keeps its
    state). Never raises for a bad answer: a failing hypernetwork must not stop generation."""
    row, started = features.row, time.perf_counter()
    old_blend = state.blend_weights[row].tolist()

    def event(kind: str, detail: str = "", level: int | None = None) -> LoraEvent:
        return LoraEvent(kind, row, features.position, features.reason, time.perf_counter() - started, old_blend,
                         state.blend_weights[row].tolist(), detail, level=level)

    if hypernetwork is None:
        return event("identity", "no hypernetwork attached")
    try:
        update = hypernetwork(features, state) or LoraUpdate()
        blend = update.resolved_blend(state.blend_weights[row])
        refusal = check_update(guard, state, row, blend, update.generated, update.memory)
        weight = update.memory_weight
        if refusal is None and weight is not None and not (math.isfinite(weight) and weight >= 0):
            refusal = f"memory weight {weight!r} is not a finite number ≥ 0"
    except Exception as error:  # noqa: BLE001 - reported as a rejected update
        update, blend, refusal = LoraUpdate(), None, f"hypernetwork raised {type(error).__name__}: {error}"
    if refusal:
        return event("rejected", refusal)
    if update.is_identity:
        return event("identity", level=update.level)
    state.update(row, blend=blend, generated=update.generated, memory=update.memory)
    if weight is not None:
        state.set_memory_weight(row, weight)
    parts = [name for name, value in (("blend", blend), ("generated", update.generated), ("memory", update.memory))
             if value is not None]
    if weight is not None:
        parts.append(f"memory weight {weight:.2f}")
    return event("shift", "updated " + ", ".join(parts), level=update.level)
