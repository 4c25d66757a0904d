"""How ``dynalora serve`` listens and what it accepts (no web dependencies: the CLI reads it to make its flags)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    """Address to bind (anything beyond loopback requires ``api_key``)."""
    port: int = 8000
    """TCP port (0: any free one)."""
    api_key: str | None = None
    """Bearer token every request must carry (``Authorization: Bearer KEY``); None: none asked (loopback only)."""
    max_tokens: int = 1024
    """The most new tokens a request may ask for."""
    default_max_tokens: int = 256
    """New tokens when a request does not say (at most ``max_tokens``)."""
    max_prompt_tokens: int = 8192
    """The longest prompt accepted, in tokens."""
    sessions_dir: Path | None = None
    """Where sessions are kept (SQLite index + one folder each; None: $DYNALORA_HOME/sessions)."""
    max_sessions: int = 1000
    """The most sessions kept at once."""
    max_body_bytes: int = 1_000_000
    """The largest request body accepted."""
    rate_limit: int = 0
    """Requests per minute per API key (or per client address without one); 0: no limit."""
    timeout_seconds: float = 600.0
    """A generation still running after this long is stopped and answered with a timeout error."""
    blends: list[str] = field(default_factory=list)
    """Named blends offered as models, each ``NAME:LABEL=WEIGHT,...`` (e.g. ``news-code:news=0.7,code-python=0.3``):
    listed by ``/v1/models``, asked for with ``"model": NAME``."""

    def __post_init__(self):
        if self.host not in LOOPBACK and not self.api_key:
            raise ValueError(f"ServeConfig.host={self.host!r} is beyond loopback: give an api_key (--api-key)")
        if min(self.max_tokens, self.default_max_tokens, self.max_prompt_tokens, self.max_body_bytes) < 1:
            raise ValueError("ServeConfig: max_tokens, default_max_tokens, max_prompt_tokens and max_body_bytes must "
                             "be ≥ 1")
        if self.rate_limit < 0 or self.timeout_seconds <= 0:
            raise ValueError("ServeConfig: rate_limit must be ≥ 0 and timeout_seconds > 0")
