"""``dynalora serve``: an OpenAI-compatible HTTP server over the engine — ``/v1/models``, ``/v1/completions`` and
``/v1/chat/completions``, streaming (server-sent events) or not — where each request names its own LoRA (a bank label
or a blend) and the response carries the LoRA events (``shift``, ``identity``, ``rejected``, ``absorb``) the engine
produced while generating, as a ``dynalora`` extension field.

Concurrent requests share the engine's forward passes, each on its own LoRA row (:mod:`dynalora.serve.batcher`,
:mod:`dynalora.serve.engine_server`); sessions keep a conversation and its LoRA on disk
(:mod:`dynalora.serve.sessions`); responses are built by :mod:`dynalora.serve.responses`; ``GET /`` serves a chat page
(``page.html``).
"""

from __future__ import annotations

from pathlib import Path

from dynalora.serve.config import ServeConfig
from dynalora.serve.engine_server import EngineServer
from dynalora.serve.responses import complete, stream_chunks
from dynalora.serve.schema import (ChatCompletionRequest, CompletionRequest, GenerationRequest, ServeError,
                                   SessionRequest)

PAGE = Path(__file__).with_name("page.html")
"""The web page ``GET /`` serves: a chat coloured by the active blend, the blend timeline, the events, the memory."""


def create_app(engine, config: ServeConfig | None = None, model_name: str = "dynalora"):
    """The FastAPI application serving ``engine`` (``build_engine(EngineSpec(...))``) as ``model_name``."""
    from fastapi import FastAPI, Header, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
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

    @app.middleware("http")
    async def limits(request: Request, call_next):
        try:
            length = request.headers.get("content-length")
            server.check_limits(request.headers, request.client.host if request.client else "",
                                int(length) if length and length.isdigit() else None)
        except ServeError as error:
            return JSONResponse(error.body(), status_code=error.status)
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    async def page():  # the chat page; it asks for the API key itself when the server has one
        return PAGE.read_text()

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

    @app.post("/v1/sessions")
    async def create_session(body: SessionRequest, authorization: str | None = Header(default=None)):
        server.check_key(authorization)
        return await server.create_session(body)

    @app.get("/v1/sessions")
    async def list_sessions(authorization: str | None = Header(default=None)):
        server.check_key(authorization)
        return server.sessions.list()

    @app.get("/v1/sessions/{session_id}")
    async def get_session(session_id: str, authorization: str | None = Header(default=None)):
        server.check_key(authorization)
        return server.sessions.record(session_id)

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str, authorization: str | None = Header(default=None)):
        server.check_key(authorization)
        server.delete_session(session_id)
        return {"id": session_id, "object": "session.deleted", "deleted": True}

    @app.exception_handler(Exception)
    async def server_error(_: Request, error: Exception):  # anything else: reported, not a bare 500
        return JSONResponse(ServeError(500, f"{type(error).__name__}: {error}", kind="server_error").body(),
                            status_code=500)

    return app
