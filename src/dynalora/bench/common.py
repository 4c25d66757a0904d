"""Shared pieces of the benchmark scripts: timing, stats, the printed table, the JSON file."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch

from dynalora.report import report


def timed(fn) -> float:
    """Seconds ``fn()`` takes, its GPU work included (CUDA is synchronised before and after)."""
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def stats(values: list[float], unit: str) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "unit": unit,
            "runs": len(values)}


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def targets_report(ratios: dict, targets: dict, lower_is_better: tuple[str, ...] = ()) -> dict:
    report = {}
    for name, target in targets.items():
        if name in ratios:
            met = ratios[name] <= target if name in lower_is_better else ratios[name] >= target
            report[name] = {"target": target, "measured": ratios[name], "met": met,
                            "direction": "≤" if name in lower_is_better else "≥"}
    return report


def format_table(result: dict) -> str:
    lines = [f"{'measurement':<40} {'median':>12} {'min':>12} {'max':>12}  unit      runs"]
    for name, m in result["methods"].items():
        scale, unit = (1e3, "ms") if m["unit"] == "s" else (1.0, m["unit"])
        lines.append(f"{name:<40} {m['median'] * scale:>12.4g} {m['min'] * scale:>12.4g} {m['max'] * scale:>12.4g}"
                     f"  {unit:<9} {m['runs']}" + (f"  p99 {m['p99'] * scale:.4g}" if "p99" in m else ""))
    lines.append("")
    lines.append(f"{'ratio':<40} {'measured':>12} {'target':>12}  met")
    for name, value in result["ratios"].items():
        target = result["targets"].get(name)
        wanted = f"{target['direction']}{target['target']:g}" if target else ""
        met = ("yes" if target["met"] else "NO") if target else ""
        lines.append(f"{name:<40} {value:>12.4g} {wanted:>12}  {met}")
    return "\n".join(lines)


def write_result(result: dict, out: Path | None) -> None:
    report(result, format_table(result), out)
