"""Hypernetwork folders: a JSON config beside fp16 safetensors weights (loaders upcast to fp32)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def save_network(network: nn.Module, config, folder: str | Path, config_file: str, weights_file: str,
                 dtype: torch.dtype = torch.float16) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / config_file).write_text(json.dumps(asdict(config), indent=2))
    save_file({k: v.detach().to(dtype).contiguous() for k, v in network.state_dict().items()},
              str(folder / weights_file))
    return folder


def load_network(cls, config_cls, folder: str | Path, config_file: str, weights_file: str, what: str) -> nn.Module:
    """``what`` names the folder kind in the error, e.g. ``"shift network folder; make one with ..."``."""
    folder = Path(folder)
    for name in (config_file, weights_file):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: missing (not a {what})")
    network = cls(config_cls(**json.loads((folder / config_file).read_text())))
    network.load_state_dict({k: v.float() for k, v in load_file(str(folder / weights_file)).items()})
    return network.eval()
