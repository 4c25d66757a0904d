"""``dynalora serve``: an OpenAI-compatible HTTP server over the engine — ``/v1/models``, ``/v1/completions`` and
``/v1/chat/completions``, streaming (server-sent events) or not — where each request names its own LoRA (a bank label
or a blend) and the response carries the LoRA events (``shift``, ``identity``, ``rejected``, ``absorb``) the engine
produced while generating, as a ``dynalora`` extension field.

Requests are served one at a time on the one engine (its LoRA state row 0 is the request's; it is reset before and
after each): concurrent requests wait their turn. A streaming client that disconnects stops its generation.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import asdict
from typing import AsyncIterator

from dynalora.runtime import FinishEvent, LoraEvent, SamplingConfig, TokenEvent
from dynalora.serve.config import ServeConfig
from dynalora.serve.schema import (ChatCompletionRequest, CompletionRequest, GenerationRequest, ServeError,
                                   parse_blend)

BASE_NAMES = ("base",)


def event_record(event: LoraEvent) -> dict:
    """A LoRA event as the ``dynalora`` extension reports it (blends rounded for reading)."""
    record = asdict(event)
    for key in ("old_blend", "new_blend"):
        if record[key] is not None:
            record[key] = [round(w, 4) for w in record[key]]
    return record


class EngineServer:
    """The engine behind the HTTP routes: request checks, the row's LoRA, one generation at a time."""

    def __init__(self, engine, config: ServeConfig, model_name: str):
        self.engine, self.config, self.model_name = engine, config, model_name
        self.labels = list(engine.dyn.state.labels)
        self.engine_lock = threading.Lock()
        """Held by the thread generating: one request at a time on the engine."""

    def models(self) -> dict:
        ids = [self.model_name, *self.labels]
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "dynalora"}
                                           for name in ids]}

    def check_key(self, authorization: str | None) -> None:
        if self.config.api_key and authorization != f"Bearer {self.config.api_key}":
            raise ServeError(401, "missing or wrong API key (Authorization: Bearer KEY)", None, "invalid_api_key")

    def prepare(self, request: GenerationRequest, chat: bool) -> tuple[list[int], dict | None, int, SamplingConfig]:
        """Everything checked before the engine is touched: ``(prompt ids, blend, max new tokens, sampling)``."""
        request.check_supported()
        blend = parse_blend(request.model, request.dynalora, self.labels, (self.model_name, *BASE_NAMES))
        wanted = (request.max_completion_tokens or request.max_tokens
                  or min(self.config.default_max_tokens, self.config.max_tokens))
        if wanted > self.config.max_tokens:
            raise ServeError(400, f"max_tokens={wanted} is above this server's limit of {self.config.max_tokens}",
                             "max_tokens")
        tokenizer = self.engine.tokenizer
        if chat:
            messages = [m.model_dump() for m in request.messages]
            ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"])
        else:
            ids = self.engine.encode_prompt(request.prompt)
        if not ids:
            raise ServeError(400, "the prompt has no tokens", "messages" if chat else "prompt")
        if len(ids) > self.config.max_prompt_tokens:
            raise ServeError(400, f"the prompt has {len(ids)} tokens, above this server's limit of "
                                  f"{self.config.max_prompt_tokens}", "messages" if chat else "prompt",
                             "context_length_exceeded")
        sampling = SamplingConfig(temperature=request.temperature, top_p=request.top_p, seed=request.seed)
        return ids, blend, wanted, sampling

    async def events(self, ids: list[int], blend: dict | None, max_tokens: int, sampling: SamplingConfig,
                     stop: tuple[str, ...]) -> AsyncIterator:
        """The engine's events for one row, generated on a worker thread that holds the engine (a thread lock: it is
        released only when that thread is done, whatever happens to the request); a consumer that stops early — a
        client gone, its task cancelled — stops the generation."""
        loop, queue, done, cancel = asyncio.get_running_loop(), asyncio.Queue(), object(), threading.Event()
        state = self.engine.dyn.state

        def work() -> None:
            try:
                with self.engine_lock:
                    state.reset()
                    if blend:
                        state.set_blend_by_label(0, blend)
                    stream = self.engine.stream([ids], max_new_tokens=max_tokens, sampling=sampling,
                                                stop_strings=stop)
                    try:
                        for event in stream:
                            if cancel.is_set():
                                break
                            loop.call_soon_threadsafe(queue.put_nowait, event)
                    finally:
                        stream.close()
                        state.reset()
            except Exception as error:  # reported to the request, not lost in the thread
                loop.call_soon_threadsafe(queue.put_nowait, error)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, done)

        threading.Thread(target=work, name="dynalora-serve", daemon=True).start()
        try:
            while (item := await queue.get()) is not done:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            cancel.set()


def _finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


async def complete(server: EngineServer, request: GenerationRequest, chat: bool) -> dict:
    """A whole (non-streaming) completion in the OpenAI schema, with the LoRA events as ``dynalora.events``."""
    ids, blend, max_tokens, sampling = server.prepare(request, chat)
    text, tokens, finish, lora = [], 0, "length", []
    async for event in server.events(ids, blend, max_tokens, sampling, request.stop_strings()):
        if isinstance(event, TokenEvent):
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
                "usage": {"prompt_tokens": len(ids), "completion_tokens": tokens, "total_tokens": len(ids) + tokens}}
    if request.dynalora is None or request.dynalora.events:
        response["dynalora"] = {"events": lora, "blend": blend}
    return response


async def stream_chunks(server: EngineServer, request: GenerationRequest, chat: bool) -> AsyncIterator[str]:
    """Server-sent event payloads: OpenAI chunks (the text as it comes), LoRA events as chunks whose only content is
    ``dynalora.event``, a final chunk with the finish reason and usage, then ``[DONE]``. The request is checked
    before the first chunk, so a bad one is an error response, not a broken stream."""
    ids, blend, max_tokens, sampling = server.prepare(request, chat)
    events = server.events(ids, blend, max_tokens, sampling, request.stop_strings())
    return _chunks(server, request, chat, ids, events)


async def _chunks(server, request, chat, ids, events) -> AsyncIterator[str]:
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
    tokens, finish = 0, "length"
    async for event in events:
        if isinstance(event, TokenEvent):
            tokens += 1
            if event.text:
                yield chunk(event.text)
        elif isinstance(event, LoraEvent) and report:
            yield chunk(dynalora={"event": event_record(event)})
        elif isinstance(event, FinishEvent):
            finish = _finish_reason(event.reason)
    yield chunk(finish=finish, usage={"prompt_tokens": len(ids), "completion_tokens": tokens,
                                      "total_tokens": len(ids) + tokens})
    yield "[DONE]"


def create_app(engine, config: ServeConfig | None = None, model_name: str = "dynalora"):
    """The FastAPI application serving ``engine`` (``build_engine(EngineSpec(...))``) as ``model_name``."""
    from fastapi import FastAPI, Header, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from sse_starlette.sse import EventSourceResponse

    server = EngineServer(engine, config or ServeConfig(), model_name)
    app = FastAPI(title="dynalora", description=__doc__.split("\n\n")[0])
    app.state.server = server

    @app.exception_handler(ServeError)
    async def serve_error(_, error: ServeError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, error: RequestValidationError):
        first = error.errors()[0]
        param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        return JSONResponse(ServeError(400, message, param).body(), status_code=400)

    @app.get("/v1/models")
    async def models(authorization: str | None = Header(default=None)):
        server.check_key(authorization)
        return server.models()

    async def generate(request: GenerationRequest, chat: bool, authorization: str | None):
        server.check_key(authorization)
        if request.stream:
            chunks = await stream_chunks(server, request, chat)
            return EventSourceResponse(({"data": payload} async for payload in chunks), ping=600)
        return await complete(server, request, chat)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, authorization: str | None = Header(default=None)):
        return await generate(request, True, authorization)

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, authorization: str | None = Header(default=None)):
        return await generate(request, False, authorization)

    @app.exception_handler(Exception)
    async def server_error(_: Request, error: Exception):  # anything else: reported, not a bare 500
        return JSONResponse(ServeError(500, f"{type(error).__name__}: {error}", kind="server_error").body(),
                            status_code=500)

    return app
