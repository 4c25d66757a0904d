"""Read and write PEFT LoRA adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``).

Only safetensors is read: a ``.bin`` adapter is refused rather than unpickled. Factors are returned
per base-model module name (``model.layers.0.self_attn.q_proj``) with the LoRA scaling already folded
into ``B``, so ``ΔW = B @ A`` exactly as PEFT applies it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY_PATTERN = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter folder or tensor that cannot be used; the message names the file, field or module."""


@dataclass
class PeftAdapter:
    """One LoRA read from a PEFT folder. ``factors[module] = (A (r, in), B_scaled (out, r))``."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    config: dict
    source: str
    ranks: dict[str, int] = field(default_factory=dict)

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values())


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name suffix (regex)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_scaling(config: dict, module: str, rank: int) -> float:
    """The factor PEFT multiplies ``B A x`` by: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
    if config.get("use_rslora", False):
        return alpha / math.sqrt(rank)
    return alpha / rank


def read_peft_adapter(folder: str | Path, dtype: torch.dtype = torch.float32) -> PeftAdapter:
    """Load a PEFT LoRA folder; raises :class:`AdapterError` naming the file or field at fault."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not folder.is_dir():
        raise AdapterError(f"{folder}: not a folder (expected a PEFT adapter folder)")
    if not config_path.is_file():
        raise AdapterError(f"{config_path}: missing (a PEFT adapter folder holds {CONFIG_FILE})")
    if not weights_path.is_file():
        hint = (" (.bin pickles are refused; convert it to safetensors)"
                if (folder / "adapter_model.bin").exists() else "")
        raise AdapterError(f"{weights_path}: missing{hint}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterError(f"{config_path}: not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise AdapterError(f"{config_path}: expected a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise AdapterError(f"{config_path}: peft_type is {peft_type!r}; only LORA adapters are supported")
    for flag, allowed in (("use_dora", False), ("bias", "none")):
        if config.get(flag, allowed) not in (allowed, None):
            raise AdapterError(f"{config_path}: {flag}={config[flag]!r} is not supported (need {allowed!r})")
    if config.get("modules_to_save"):
        raise AdapterError(f"{config_path}: modules_to_save={config['modules_to_save']} is not supported")

    try:
        raw: dict[str, torch.Tensor] = {}
        with safe_open(str(weights_path), framework="pt") as handle:
            for key in handle.keys():
                raw[key] = handle.get_tensor(key)
    except Exception as error:  # safetensors raises several types for a damaged file
        raise AdapterError(f"{weights_path}: cannot be read as safetensors ({error})") from error

    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in raw.items():
        match = _KEY_PATTERN.match(key)
        if match is None:
            raise AdapterError(f"{weights_path}: tensor {key!r} is not a LoRA A/B weight (embeddings, DoRA "
                               "magnitudes and biases are not supported)")
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"{weights_path}: tensor {key!r} holds NaN or Inf values")
        halves.setdefault(match["module"], {})[match["which"]] = tensor
    if not halves:
        raise AdapterError(f"{weights_path}: holds no LoRA tensors")

    factors, ranks = {}, {}
    for module, pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{weights_path}: module {module!r} has lora_{'A' if 'A' in pair else 'B'} "
                               "but not its partner")
        lora_a, lora_b = pair["A"], pair["B"]
        if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[0] != lora_b.shape[1]:
            raise AdapterError(f"{weights_path}: module {module!r}: lora_A {tuple(lora_a.shape)} and lora_B "
                               f"{tuple(lora_b.shape)} do not form a low-rank pair (A is (r, in), B is (out, r))")
        rank = lora_a.shape[0]
        scaling = lora_scaling(config, module, rank)
        factors[module] = (lora_a.to(dtype).contiguous(), (lora_b.to(torch.float64) * scaling).to(dtype).contiguous())
        ranks[module] = rank
    return PeftAdapter(factors=factors, config=config, source=str(folder), ranks=ranks)


def write_peft_adapter(
    folder: str | Path,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    base_model_name: str | None = None,
    fan_in_fan_out: bool = False,
) -> Path:
    """Write ``factors[module] = (A (r, in), B (out, r))`` as a PEFT folder with scaling 1.

    All modules are padded with zero rows to one rank ``r`` (PEFT wants one rank unless told otherwise);
    ``lora_alpha = r`` makes PEFT's scaling exactly 1, so the written ``B @ A`` is the applied delta.
    ``fan_in_fan_out`` is only a flag PEFT wants for GPT-2's ``Conv1D``; the tensors are the same.
    """
    from peft import LoraConfig

    if not factors:
        raise AdapterError("nothing to export: the LoRA is empty (all blend weights and factors are zero)")
    folder = Path(folder)
    rank = max(a.shape[0] for a, _ in factors.values())
    tensors = {}
    for module, (lora_a, lora_b) in factors.items():
        pad = rank - lora_a.shape[0]
        if pad:
            lora_a = torch.cat([lora_a, lora_a.new_zeros(pad, lora_a.shape[1])])
            lora_b = torch.cat([lora_b, lora_b.new_zeros(lora_b.shape[0], pad)], dim=1)
        tensors[f"base_model.model.{module}.lora_A.weight"] = lora_a.detach().cpu().contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = lora_b.detach().cpu().contiguous()
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=sorted(factors), lora_dropout=0.0, bias="none",
        base_model_name_or_path=base_model_name, init_lora_weights=True, fan_in_fan_out=fan_in_fan_out,
    )
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    return folder
