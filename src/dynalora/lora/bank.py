"""A library of K labelled LoRAs, stacked per module so any blend of them is two matmuls.

For each module the bank keeps ``A_t (in, K*r)`` and ``B_t (K*r, out)`` where adapter ``k`` owns rank
slots ``[k*r, (k+1)*r)``; ``r`` is the largest rank in the bank and smaller ranks (or modules an
adapter does not touch) are zero-padded, so a blend ``Σ_k w_k ΔW_k`` is exact:
``x @ A_t * repeat(w, r) @ B_t``. LoRA scaling (alpha/r, rsLoRA) is folded into ``B`` on import.

A bank saved to disk is a folder: ``bank.json`` (labels, descriptions, sources) and one PEFT folder
per adapter under ``adapters/<label>/``, so every adapter stays loadable by PEFT on its own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dynalora.data.text_sources import parse_source
from dynalora.lora.peft_io import CONFIG_FILE, WEIGHTS_FILE, AdapterError, PeftAdapter, read_peft_adapter
from dynalora.lora.targets import ModuleShapes

BANK_INDEX = "bank.json"
_LABEL_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def blend_from_text(text: str, where: str) -> dict[str, float]:
    """``"news=0.7,scripture=0.3"`` → ``{"news": 0.7, "scripture": 0.3}``: the syntax only (labels and weights are the
    caller's to check); a ``ValueError`` names ``where`` (the flag or field) and the part at fault."""
    weights = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        label, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"{where}: {part!r} is not LABEL=WEIGHT")
        try:
            weights[label.strip()] = float(value)
        except ValueError:
            raise ValueError(f"{where}: the weight of {label!r} is not a number: {value!r}") from None
    if not weights:
        raise ValueError(f"{where} is empty; give LABEL=WEIGHT pairs")
    return weights


@dataclass
class AdapterInfo:
    """What the bank knows about one adapter besides its tensors."""

    label: str
    description: str
    source: str
    """Where the factors came from (a PEFT folder), or empty."""
    rank: int
    modules: list[str]
    data: str = ""
    """Where the adapter's text is (:mod:`dynalora.data.text_sources`, e.g. ``jsonl:news.jsonl``): what the shift
    and trigger recipes train on; empty when unknown."""


class LoraBank:
    """K LoRAs for one base model; validated against its module shapes on import.

    Example::

        bank = LoraBank(module_shapes_of(model))
        bank.add_peft("adapters/news", label="news", description="news articles")
        A_t, B_t = bank.stacked()["model.layers.0.self_attn.q_proj"]  # (in, K*r), (K*r, out)
    """

    def __init__(self, module_shapes: ModuleShapes):
        self.module_shapes = dict(module_shapes)
        self.adapters: list[AdapterInfo] = []
        self._factors: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []

    # -- contents -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.adapters)

    @property
    def labels(self) -> list[str]:
        return [info.label for info in self.adapters]

    @property
    def rank(self) -> int:
        """Rank slots per adapter in the stacked layout (the largest adapter rank; 0 when empty)."""
        return max((info.rank for info in self.adapters), default=0)

    @property
    def modules(self) -> list[str]:
        """Modules touched by at least one adapter, in model order."""
        touched = {m for info in self.adapters for m in info.modules}
        return [m for m in self.module_shapes if m in touched]

    def index(self, label: str) -> int:
        try:
            return self.labels.index(label)
        except ValueError:
            raise KeyError(f"no adapter labelled {label!r} in the bank; it has {self.labels}") from None

    def factors(self, label_or_index: str | int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module: (A (r, in), B_scaled (out, r))}`` of one adapter."""
        k = self.index(label_or_index) if isinstance(label_or_index, str) else label_or_index
        return self._factors[k]

    # -- adding ---------------------------------------------------------------------------------
    def add(self, label: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
            description: str = "", source: str = "", data: str = "") -> AdapterInfo:
        """Add factors ``{module: (A (r, in), B (out, r))}`` (scaling already in B). Validates everything
        first: on any error the bank is unchanged."""
        if not _LABEL_PATTERN.match(label or ""):
            raise AdapterError(f"label {label!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
                               "letter or digit")
        if label in self.labels:
            raise AdapterError(f"label {label!r} is already in the bank")
        if not factors:
            raise AdapterError(f"adapter {label!r} has no factors")
        checked = {}
        for module, (lora_a, lora_b) in factors.items():
            if module not in self.module_shapes:
                near = [m for m in self.module_shapes if m.split(".")[-1] == module.split(".")[-1]][:3]
                raise AdapterError(f"adapter {label!r} ({source or 'in memory'}): module {module!r} is not a "
                                   f"linear layer of the base model" + (f" (e.g. {near})" if near else ""))
            in_features, out_features = self.module_shapes[module]
            if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[1] != in_features \
                    or lora_b.shape[0] != out_features or lora_a.shape[0] != lora_b.shape[1]:
                raise AdapterError(
                    f"adapter {label!r} ({source or 'in memory'}): module {module!r} has A {tuple(lora_a.shape)} "
                    f"and B {tuple(lora_b.shape)}, but the base layer needs A (r, {in_features}) and "
                    f"B ({out_features}, r)")
            if not (torch.isfinite(lora_a).all() and torch.isfinite(lora_b).all()):
                raise AdapterError(f"adapter {label!r}: module {module!r} holds NaN or Inf values")
            checked[module] = (lora_a.detach().clone(), lora_b.detach().clone())
        if data:
            parse_source(data)  # a malformed source fails at import, naming the accepted forms
        info = AdapterInfo(label=label, description=description, source=source,
                           rank=max(a.shape[0] for a, _ in checked.values()),
                           modules=[m for m in self.module_shapes if m in checked], data=data)
        self.adapters.append(info)
        self._factors.append(checked)
        return info

    def add_peft(self, folder: str | Path, label: str | None = None, description: str = "",
                 data: str = "") -> AdapterInfo:
        """Import a PEFT LoRA folder (label defaults to the folder name); ``data``: where its text is."""
        adapter: PeftAdapter = read_peft_adapter(folder)
        return self.add(label or Path(folder).name, adapter.factors, description, source=str(folder), data=data)

    def remove(self, label: str) -> None:
        k = self.index(label)
        del self.adapters[k], self._factors[k]

    # -- the layout the layers use -------------------------------------------------------------------
    def stacked(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module: (A_t (in, K*r), B_t (K*r, out))}`` for every module any adapter touches."""
        rank, count = self.rank, len(self)
        out = {}
        for module in self.modules:
            in_features, out_features = self.module_shapes[module]
            a_t = torch.zeros(in_features, count * rank, dtype=dtype, device=device)  # (in, K*r)
            b_t = torch.zeros(count * rank, out_features, dtype=dtype, device=device)  # (K*r, out)
            for k, factors in enumerate(self._factors):
                if module in factors:
                    lora_a, lora_b = factors[module]  # (r_k, in), (out, r_k)
                    r_k = lora_a.shape[0]
                    a_t[:, k * rank:k * rank + r_k] = lora_a.T
                    b_t[k * rank:k * rank + r_k] = lora_b.T
            out[module] = (a_t, b_t)
        return out

    # -- persistence ------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write the bank as ``bank.json`` + one PEFT folder per adapter; replaces ``folder`` atomically."""
        from dynalora.lora.peft_io import write_peft_adapter

        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".bank-", dir=folder.parent))
        try:
            for info, factors in zip(self.adapters, self._factors):
                target = staging / "adapters" / info.label
                if info.source and is_peft_folder(info.source):  # keep the user's files verbatim
                    target.mkdir(parents=True)
                    for name in (CONFIG_FILE, WEIGHTS_FILE):
                        shutil.copyfile(Path(info.source) / name, target / name)
                else:
                    write_peft_adapter(target, factors)
            index = {"format": "dynalora-bank/1", "adapters": [asdict(info) for info in self.adapters]}
            (staging / BANK_INDEX).write_text(json.dumps(index, indent=2))
            if folder.exists():
                backup = folder.with_name(folder.name + ".old")
                shutil.rmtree(backup, ignore_errors=True)
                os.replace(folder, backup)
                os.replace(staging, folder)
                shutil.rmtree(backup)
            else:
                os.replace(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return folder

    @classmethod
    def load(cls, folder: str | Path, module_shapes: ModuleShapes) -> "LoraBank":
        folder = Path(folder)
        index_path = folder / BANK_INDEX
        if not index_path.is_file():
            raise AdapterError(f"{index_path}: missing (not a dynalora bank folder; create one with "
                               "`dynalora adapters import`)")
        try:
            index = json.loads(index_path.read_text())
            entries = index["adapters"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise AdapterError(f"{index_path}: not a valid bank index ({error!r})") from error
        bank = cls(module_shapes)
        for entry in entries:
            adapter = read_peft_adapter(folder / "adapters" / entry["label"])
            bank.add(entry["label"], adapter.factors, entry.get("description", ""), entry.get("source", ""),
                     data=entry.get("data", ""))
        return bank


def is_bank_folder(folder: str | Path) -> bool:
    return (Path(folder) / BANK_INDEX).is_file()


def is_peft_folder(folder: str | Path) -> bool:
    return (Path(folder) / CONFIG_FILE).is_file() and (Path(folder) / WEIGHTS_FILE).is_file()
