"""A trained library folder (``dynalora train library``): ``library.json`` plus one PEFT adapter folder per label."""

from __future__ import annotations

import json
from pathlib import Path

from dynalora.lora.bank import LoraBank
from dynalora.lora.targets import module_shapes_of

METADATA_FILE = "dynalora_adapter.json"
"""Written into each adapter folder when its training finished (label, description, source, losses)."""


def load_library_bank(library_dir: str | Path, model) -> tuple[LoraBank, list[dict]]:
    """The trained library as a bank, with each adapter's metadata (label, description, source)."""
    index_path = Path(library_dir) / "library.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path}: missing; train the library first (`dynalora train library`)")
    adapters = json.loads(index_path.read_text())["adapters"]
    bank = LoraBank(module_shapes_of(model))
    for meta in adapters:
        folder = Path(library_dir) / meta["label"]
        if not (folder / METADATA_FILE).is_file():
            raise FileNotFoundError(f"{folder}: adapter listed in library.json is missing")
        bank.add_peft(folder, label=meta["label"], description=meta["description"])
    return bank, adapters
