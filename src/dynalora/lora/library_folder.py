"""The adapters the hypernetwork and trigger recipes train over, with where each one's text is: a trained library
folder (``dynalora train library``: ``library.json`` + one PEFT folder per label) or a bank folder of the user's
own adapters (``dynalora adapters import FOLDER --label L --data SOURCE``: ``bank.json`` + their PEFT folders)."""

from __future__ import annotations

import json
from pathlib import Path

from dynalora.lora.bank import LoraBank, is_bank_folder
from dynalora.lora.targets import module_shapes_of

METADATA_FILE = "dynalora_adapter.json"
"""Written into each adapter folder when its training finished (label, description, source, losses)."""


def load_library_bank(library_dir: str | Path, model) -> tuple[LoraBank, list[dict]]:
    """The library (or bank) as a bank, with each adapter's metadata ``{"label", "description", "source"}`` (the
    source: where its text is, :mod:`dynalora.data.text_sources`; empty when the bank does not say)."""
    if is_bank_folder(library_dir):
        bank = LoraBank.load(library_dir, module_shapes_of(model))
        return bank, [{"label": info.label, "description": info.description, "source": info.data}
                      for info in bank.adapters]
    index_path = Path(library_dir) / "library.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{library_dir}: neither a trained library (no library.json; `dynalora train library`) "
                                "nor a bank of adapters (no bank.json; `dynalora adapters import`)")
    adapters = json.loads(index_path.read_text())["adapters"]
    bank = LoraBank(module_shapes_of(model))
    for meta in adapters:
        folder = Path(library_dir) / meta["label"]
        if not (folder / METADATA_FILE).is_file():
            raise FileNotFoundError(f"{folder}: adapter listed in library.json is missing")
        bank.add_peft(folder, label=meta["label"], description=meta["description"])
    return bank, adapters
