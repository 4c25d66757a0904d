"""Hypernetwork folders: a JSON config beside fp16 safetensors weights (loaders upcast to fp32).

Every network class mixes in :class:`PretrainedNetwork`: ``net.save_pretrained(folder)`` and
``ShiftNet.from_pretrained(folder, device="cuda")``, as with transformers and PEFT models (safetensors only).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class PretrainedNetwork:
    """``save_pretrained`` / ``from_pretrained`` for an ``nn.Module`` built from one config dataclass.

    A class sets ``config_class`` (its config dataclass), ``config_file`` and ``weights_file`` (the names in the
    folder) and ``folder_kind`` (named in errors, e.g. ``"shift network folder; make one with ..."``)."""

    config_class: type
    config_file: str
    weights_file: str
    folder_kind: str

    def save_pretrained(self, folder: str | Path, dtype: torch.dtype = torch.float16) -> Path:
        """Write the config and the weights (as ``dtype``: fp16 keeps shipped checkpoints small)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / self.config_file).write_text(json.dumps(asdict(self.config), indent=2))
        save_file({k: v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()},
                  str(folder / self.weights_file))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu"):
        """The network saved in ``folder``, in fp32 on ``device``, in eval mode."""
        folder = Path(folder)
        for name in (cls.config_file, cls.weights_file):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name}: missing (not a {cls.folder_kind})")
        network = cls(cls.config_class(**json.loads((folder / cls.config_file).read_text())))
        network.load_state_dict({k: v.float() for k, v in load_file(str(folder / cls.weights_file)).items()})
        return network.to(device).eval()
