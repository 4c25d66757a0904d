"""Every evaluation ends the same way: print its table, write its JSON."""

from __future__ import annotations

import json
from pathlib import Path


def report(result: dict, table: str, out: Path | None) -> dict:
    print(table)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
    return result
