"""Hand what dynalora computed — a blend, or a session's LoRA after its shifts and absorbs — to a vLLM server, so a
fleet serves it: the row's effective LoRA written as a PEFT folder at a rank the server accepts, then registered
through vLLM's runtime LoRA API (``POST /v1/load_lora_adapter``, on when the server runs with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` and ``--enable-lora``). Registering again under the same name replaces the
adapter in place (``load_inplace``): how a conversation follows dynalora's shifts on vLLM (see the README)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dynalora.lora.export import ExportReport

VLLM_DEFAULT_MAX_LORA_RANK = 16
"""vLLM's ``--max-lora-rank`` when it is not given."""


def export_for_vllm(dyn, row: int, folder: str | Path, rank: int | None = None,
                    max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK) -> ExportReport:
    """Row ``row``'s LoRA as a PEFT folder vLLM loads: exact when its rank fits ``max_lora_rank`` (the server's
    ``--max-lora-rank``), else compressed by SVD to it (or to ``rank``, which must fit); the report gives the error."""
    if rank is not None and not 1 <= rank <= max_lora_rank:
        raise ValueError(f"--rank {rank}: vLLM accepts ranks 1..{max_lora_rank} (its --max-lora-rank)")
    exact = max((a.shape[0] for a, _ in dyn.state.effective_factors(row).values()), default=0)
    if rank is None and exact > max_lora_rank:
        rank = max_lora_rank
    return dyn.export_peft(row, folder, rank=None if rank is None or rank >= exact else rank)


def register_with_vllm(url: str, name: str, folder: str | Path, api_key: str | None = None,
                       timeout: float = 120.0) -> str:
    """Load (or replace in place) the adapter ``name`` from ``folder`` on the vLLM server at ``url``; returns its
    answer. The folder must be readable by the server (the same machine or a shared disk)."""
    body = {"lora_name": name, "lora_path": str(Path(folder).resolve()), "load_inplace": True}
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    request = urllib.request.Request(f"{url.rstrip('/')}/v1/load_lora_adapter", data=json.dumps(body).encode(),
                                     headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read().decode()
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")
        if error.code in (404, 405):
            raise RuntimeError(f"vLLM at {url} has no runtime LoRA loading (HTTP {error.code}): start it with "
                               "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora") from None
        raise RuntimeError(f"vLLM at {url} refused the adapter {name!r} from {folder} (HTTP {error.code}): "
                           f"{detail}") from None
    except urllib.error.URLError as error:
        raise RuntimeError(f"cannot reach vLLM at {url}: {error.reason}") from None
