"""Every evaluation ends the same way: print its table, write its JSON."""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def report(result: dict, table: str, out: Path | None) -> dict:
    logger.info(table)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
        logger.info(f"wrote {out}")
    return result
