"""Export one row's effective LoRA as a PEFT adapter folder (exact, or SVD-compressed to a rank)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from dynalora.lora.lowrank import truncate
from dynalora.lora.peft_io import write_peft_adapter

EXPORT_REPORT = "dynalora_export.json"


@dataclass
class ExportReport:
    folder: str
    row: int
    rank: int
    exact: bool
    relative_error: float
    """Frobenius ‖ΔW − ΔW'‖ / ‖ΔW‖ over all modules together (0 for an exact export)."""
    worst_module: str | None
    worst_module_error: float
    blend: dict[str, float]


def export_row(dyn, row: int, folder: str | Path, rank: int | None = None) -> ExportReport:
    """Write row ``row`` of ``dyn`` (a DynamicLoraModel) to ``folder``; ``rank`` compresses by SVD."""
    factors = dyn.state.effective_factors(row)
    errors: dict[str, float] = {}
    squared_error = squared_total = 0.0
    if rank is not None:
        if rank < 1:
            raise ValueError(f"--rank must be ≥ 1, got {rank}")
        for module, (lora_a, lora_b) in list(factors.items()):
            new_a, new_b, rel = truncate(lora_a, lora_b, rank)
            norm_sq = float(((lora_b.double() @ lora_a.double()).norm() ** 2)) if rel else 0.0
            squared_error += rel * rel * norm_sq
            squared_total += norm_sq
            errors[module] = rel
            factors[module] = (new_a, new_b)
    base_name = getattr(getattr(dyn.model, "config", None), "_name_or_path", None) or None
    conv1d = any(type(layer.base_layer).__name__ == "Conv1D" for layer in dyn.layers.values())
    write_peft_adapter(folder, factors, base_model_name=base_name, fan_in_fan_out=conv1d)
    worst = max(errors, key=errors.get) if errors else None
    report = ExportReport(
        folder=str(folder), row=row, rank=max(a.shape[0] for a, _ in factors.values()),
        exact=rank is None or not any(errors.values()),
        relative_error=(squared_error / squared_total) ** 0.5 if squared_total else 0.0,
        worst_module=worst, worst_module_error=errors.get(worst, 0.0) if worst else 0.0,
        blend=dict(zip(dyn.state.labels, dyn.state.blend_weights[row].tolist())),
    )
    (Path(folder) / EXPORT_REPORT).write_text(json.dumps(asdict(report), indent=2))
    return report
