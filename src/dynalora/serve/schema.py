"""The OpenAI-compatible request bodies ``dynalora serve`` accepts, its extension object, and OpenAI-style errors.

A request names its LoRA by ``model``: the base model's name (or ``base``), one bank label, or
``blend:LABEL=WEIGHT,...``; the ``dynalora`` extension object (sent by the ``openai`` client as
``extra_body={"dynalora": {...}}``) can give the blend as a mapping instead.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from dynalora.lora.bank import blend_from_text


class ServeError(Exception):
    """An error the client caused (or may see), reported as OpenAI does: ``{"error": {message, type, param, code}}``
    with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class DynaloraOptions(BaseModel):
    """The ``dynalora`` extension of a request."""

    model_config = ConfigDict(extra="forbid")
    blend: dict[str, float] | None = None
    """``{label: weight}``: the row's blend for this request (in place of one named by ``model``)."""
    events: bool = True
    """Report the LoRA events (shift, identity, rejected, absorb) in the response's ``dynalora`` field."""
    session: str | None = None
    """Continue this session (``POST /v1/sessions``): its transcript and LoRA state, saved again after the turn."""
    trigger: list[str] | None = None
    """This request's trigger policies, in the CLI's ``--trigger`` forms (e.g. ``["every:16"]``; ``[]``: none, the
    LoRA stays as requested); None: the server's."""


class SessionRequest(BaseModel):
    """``POST /v1/sessions``: a new session, with its system prompt and starting blend."""

    model_config = ConfigDict(extra="forbid")
    system: str | None = None
    blend: dict[str, float] | None = None


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class GenerationRequest(BaseModel):
    """What chat and text completions share. Unknown OpenAI fields are accepted and ignored, as most servers do;
    those that would change the result and are not supported (``n`` > 1, logprobs) are refused."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1
    logprobs: bool | int | None = None
    ignore_eos: bool = False
    """vLLM's extension: generate past end-of-text tokens (their text included) up to ``max_tokens`` — fixed-length
    answers, for benchmarks."""
    dynalora: DynaloraOptions | None = None

    def check_supported(self) -> None:
        if self.n != 1:
            raise ServeError(400, f"n={self.n}: one choice per request is supported", "n", "unsupported_parameter")
        if self.logprobs:
            raise ServeError(400, "logprobs are not supported", "logprobs", "unsupported_parameter")

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class ChatCompletionRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(GenerationRequest):
    prompt: str | list[int]


def parse_blend(model: str, options: DynaloraOptions | None, labels: list[str], base_names: tuple[str, ...],
                named: dict[str, dict[str, float]]) -> dict[str, float] | None:
    """The request's blend ``{label: weight}`` (None: the base model, no LoRA) — from ``dynalora.blend``, a
    ``blend:LABEL=WEIGHT,...`` model, a label, or a blend the server was started with (``named``) — checked against
    the bank's labels: every weight finite and ≥ 0. Errors name the field and the label at fault."""
    if options is not None and options.blend is not None:
        blend, param = dict(options.blend), "dynalora.blend"
    elif model in base_names:
        return None
    elif model.startswith("blend:"):
        try:
            blend, param = blend_from_text(model.removeprefix("blend:"), f"model {model!r}"), "model"
        except ValueError as error:
            raise ServeError(400, str(error), "model") from None
    elif model in labels:
        return {model: 1.0}
    elif model in named:
        return dict(named[model])
    else:
        raise ServeError(404, f"the model {model!r} does not exist: use {base_names[0]!r}, one of the bank's labels "
                              f"{labels}, a named blend {sorted(named)}, or blend:LABEL=WEIGHT,...", "model",
                         "model_not_found")
    return check_blend(blend, labels, param)


def named_blends(entries: list[str], labels: list[str], taken: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """``["news-code:news=0.7,code-python=0.3", ...]`` (``ServeConfig.blends``) → ``{name: blend}``, checked at start:
    a ``ValueError`` names the entry at fault."""
    named = {}
    for entry in entries:
        name, sep, text = entry.partition(":")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"--blends: {entry!r} is not NAME:LABEL=WEIGHT,...")
        if name in taken or name in labels or name in named or name.startswith("blend"):
            raise ValueError(f"--blends: the name {name!r} is taken (the base model, a label, another named blend) "
                             "or starts with 'blend'")
        try:
            named[name] = check_blend(blend_from_text(text, f"--blends {name}"), labels, f"--blends {name}")
        except ServeError as error:
            raise ValueError(error.message) from None
    return named


def check_blend(blend: dict[str, float], labels: list[str], param: str) -> dict[str, float]:
    """``blend`` if every label is the bank's and every weight finite and ≥ 0; else the error naming ``param``."""
    unknown = sorted(set(blend) - set(labels))
    if unknown:
        raise ServeError(404, f"{param}: unknown adapter labels {unknown}; the bank holds {labels}", param,
                         "model_not_found")
    bad = {label: weight for label, weight in blend.items() if not math.isfinite(weight) or weight < 0}
    if bad:
        raise ServeError(400, f"{param}: weights must be finite and ≥ 0, got {bad}", param)
    return blend
