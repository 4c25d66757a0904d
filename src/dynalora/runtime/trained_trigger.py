"""A trained trigger as one object: its token rows, its firing threshold and, in the LoRA form, its trigger LoRA —
read with :meth:`TrainedTrigger.from_pretrained` and written with :meth:`TrainedTrigger.save_pretrained`
(safetensors and JSON only).

A trigger folder holds ``trigger_tokens.safetensors`` (the rows, a few KB), ``triggers.json`` (the threshold chosen
on validation streams, its metrics and the recipe's config) and, for the LoRA form, ``trigger_lora.safetensors``; for
the head form (:mod:`~dynalora.runtime.trigger_head`), ``trigger_head.safetensors`` (its config is ``triggers.json``'s
``head``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dynalora.runtime.special_tokens import SHIFT_TOKEN, install_trigger_rows, trigger_token_rows
from dynalora.runtime.trigger_head import HEAD_FILE, TriggerHead, TriggerHeadConfig
from dynalora.runtime.trigger_lora import LORA_FILE, factor_deltas

TOKENS_FILE = "trigger_tokens.safetensors"
RECORD_FILE = "triggers.json"


@dataclass
class TrainedTrigger:
    tokens: list[str]
    """The trigger tokens, in the order they are added to a tokenizer."""
    rows: dict[str, torch.Tensor]
    """``input.<token>`` (and for an untied LM head ``output.<token>``) rows ``(H,)``."""
    record: dict = field(default_factory=dict)
    """``triggers.json``: ``threshold`` and what the recipe measured (empty when the folder has none)."""
    lora: dict[str, torch.Tensor] | None = None
    """The trigger LoRA's factors ``{"<module>.A": (r, in), "<module>.B": (out, r)}``, or None (the row-only form)."""
    head: TriggerHead | None = None
    """The trigger head that sets ``<|shift|>``'s logit (the head form), or None."""

    @property
    def threshold(self) -> float | None:
        """The ``p(<|shift|>)`` threshold chosen on validation streams, if the record has one."""
        return self.record.get("threshold")

    @property
    def votes(self) -> tuple[int, int]:
        """Fire when the threshold is passed at ``k`` of the last ``n`` positions (chosen with the threshold; 1/1 when
        the record names none)."""
        k, n = self.record.get("votes", (1, 1))
        return int(k), int(n)

    @property
    def deltas(self) -> dict[str, torch.Tensor] | None:
        """The trigger LoRA as ``{module: ΔW (out, in)}``, or None."""
        return factor_deltas(self.lora) if self.lora else None

    @classmethod
    def from_model(cls, model, token_ids: dict[str, int], record: dict | None = None,
                   lora: dict[str, torch.Tensor] | None = None, head: TriggerHead | None = None) -> "TrainedTrigger":
        """The trigger tokens' current rows in ``model`` (as a recipe leaves them)."""
        return cls(list(token_ids), trigger_token_rows(model, token_ids), dict(record or {}), lora, head)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "TrainedTrigger":
        """A trigger folder, or a token file (its folder's ``triggers.json`` and trigger LoRA are read if there)."""
        path = Path(path)
        token_file = path / TOKENS_FILE if path.is_dir() else path
        if not token_file.is_file():
            raise FileNotFoundError(f"{token_file}: no trigger token file (make one with `dynalora train triggers`)")
        with safe_open(str(token_file), framework="pt") as handle:
            tokens = json.loads((handle.metadata() or {}).get("tokens", "[]"))
            rows = {key: handle.get_tensor(key) for key in handle.keys()}
        missing = [token for token in tokens if f"input.{token}" not in rows]
        if missing or not tokens:
            raise ValueError(f"{token_file}: no rows for {missing or 'any token'} (a trigger token file lists its "
                             "tokens in its metadata and holds an input.<token> row for each)")
        record_file, lora_file = token_file.with_name(RECORD_FILE), token_file.with_name(LORA_FILE)
        record = json.loads(record_file.read_text()) if record_file.is_file() else {}
        head, head_file = None, token_file.with_name(HEAD_FILE)
        if head_file.is_file():
            if "head" not in record:
                raise ValueError(f"{record_file}: no 'head' config for {head_file.name}")
            head = TriggerHead(TriggerHeadConfig(**record["head"]))
            head.load_state_dict({key: value.float() for key, value in load_file(str(head_file)).items()})
        return cls(tokens, rows, record, load_file(str(lora_file)) if lora_file.is_file() else None, head)

    def save_pretrained(self, folder: str | Path, token_file: str = TOKENS_FILE) -> Path:
        """Write the folder (rows under ``token_file``; ``triggers.json`` when there is a record); returns it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({key: row.contiguous() for key, row in self.rows.items()}, str(folder / token_file),
                  metadata={"tokens": json.dumps(self.tokens)})
        if self.record:
            (folder / RECORD_FILE).write_text(json.dumps(self.record, indent=2))
        if self.lora:
            save_file({key: value.contiguous() for key, value in self.lora.items()}, str(folder / LORA_FILE))
        if self.head is not None:
            save_file({key: value.half().contiguous() for key, value in self.head.state_dict().items()},
                      str(folder / HEAD_FILE))
        return folder

    def install(self, model, tokenizer) -> dict[str, int]:
        """Add the tokens to ``tokenizer`` and ``model`` and copy the trained rows in, and attach the trigger head if
        there is one (the trigger LoRA is not merged: see :func:`~dynalora.runtime.trigger_lora.trigger_lora_merged`);
        returns ``{token: id}``."""
        ids = install_trigger_rows(model, tokenizer, self.tokens, self.rows)
        if self.head is not None:
            self.head.to(next(model.parameters()).device).attach(model, ids[SHIFT_TOKEN])
        return ids
