"""JSON-lines files: one record a line, each line checked on read so a bad one is named with its number."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path: str | Path, check: Callable[[dict], None], noun: str, expected: str,
               missing_hint: str = "") -> list[dict]:
    """Records of ``path``; ``check(record)`` raises (KeyError/TypeError/ValueError) on a malformed one, and the
    error names ``path:line``, the file kind (``noun``, e.g. ``"streams"``) and the ``expected`` shape."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {noun} file{missing_hint}")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            check(record)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}:{number}: not a valid {noun} line ({error!r}); expected {expected}") from error
        records.append(record)
    return records
