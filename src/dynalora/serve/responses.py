"""A turn's events as OpenAI responses: a whole completion, or server-sent event chunks, with the LoRA events as the
``dynalora`` extension field."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict
from typing import AsyncIterator

from dynalora.runtime import FinishEvent, LoraEvent, TokenEvent
from dynalora.serve.batcher import Prompt
from dynalora.serve.engine_server import EngineServer
from dynalora.serve.schema import GenerationRequest


def event_record(event: LoraEvent) -> dict:
    """A LoRA event as the ``dynalora`` extension reports it (blends rounded for reading)."""
    record = asdict(event)
    for key in ("old_blend", "new_blend"):
        if record[key] is not None:
            record[key] = [round(w, 4) for w in record[key]]
    return record


def _finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


async def complete(server: EngineServer, request: GenerationRequest, chat: bool) -> dict:
    """A whole (non-streaming) completion in the OpenAI schema, with the LoRA events as ``dynalora.events``."""
    text, tokens, finish, lora, prompt = [], 0, "length", [], 0
    async for event in server.events(server.prepare(request, chat)):
        if isinstance(event, Prompt):
            prompt = event.tokens
        elif isinstance(event, TokenEvent):
            text.append(event.text)
            tokens += 1
        elif isinstance(event, LoraEvent):
            lora.append(event_record(event))
        elif isinstance(event, FinishEvent):
            finish = _finish_reason(event.reason)
    content = "".join(text)
    choice = ({"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish} if chat
              else {"index": 0, "text": content, "finish_reason": finish, "logprobs": None})
    response = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": request.model, "choices": [choice],
                "usage": {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens}}
    if request.dynalora is None or request.dynalora.events:
        response["dynalora"] = {"events": lora}
    return response


async def stream_chunks(server: EngineServer, request: GenerationRequest, chat: bool) -> AsyncIterator[str]:
    """Server-sent event payloads: OpenAI chunks (the text as it comes), LoRA events as chunks whose only content is
    ``dynalora.event``, a final chunk with the finish reason and usage, then ``[DONE]``. The request is checked
    before the first chunk, so a bad one is an error response, not a broken stream."""
    return _chunks(request, chat, server.events(server.prepare(request, chat)))


async def _chunks(request, chat, events) -> AsyncIterator[str]:
    ident, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
    report = request.dynalora is None or request.dynalora.events

    def chunk(delta: str | None = None, finish: str | None = None, **extra) -> str:
        if chat:
            choice = {"index": 0, "delta": {} if delta is None else {"content": delta}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        body = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": request.model, "choices": [choice], **extra}
        return json.dumps(body)

    if chat:
        yield json.dumps({"id": ident, "object": "chat.completion.chunk", "created": created, "model": request.model,
                          "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                       "finish_reason": None}]})
    tokens, finish, prompt = 0, "length", 0
    async for event in events:
        if isinstance(event, Prompt):
            prompt = event.tokens
        elif isinstance(event, TokenEvent):
            tokens += 1
            if event.text:
                yield chunk(event.text)
        elif isinstance(event, LoraEvent) and report:
            yield chunk(dynalora={"event": event_record(event)})
        elif isinstance(event, FinishEvent):
            finish = _finish_reason(event.reason)
    yield chunk(finish=finish, usage={"prompt_tokens": prompt, "completion_tokens": tokens,
                                      "total_tokens": prompt + tokens})
    yield "[DONE]"
