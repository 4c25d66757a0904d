"""The engine behind ``dynalora serve``: a request checked into a :class:`Turn`, run on a worker thread that holds
the engine (one generation at a time; row 0 is the request's, reset before and after), sessions loaded and committed,
the limits (body size, rate, time)."""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from dynalora.models import dynalora_home
from dynalora.runtime import SamplingConfig, TokenEvent
from dynalora.runtime.session import ChatSession
from dynalora.serve.config import ServeConfig
from dynalora.serve.schema import (ChatCompletionRequest, GenerationRequest, ServeError,
                                   SessionRequest, check_blend, parse_blend)
from dynalora.serve.sessions import SessionStore

BASE_NAMES = ("base",)


@dataclass
class Turn:
    """One generation, checked: what to run inside the engine lock and what to do after it."""

    setup: Callable[[], list[int]]
    """Puts the row's LoRA in place (a blend, or a session's saved state) and returns the prompt ids."""
    max_tokens: int
    sampling: SamplingConfig
    stop: tuple[str, ...]
    done: Callable[[str], None] | None = None
    """Called with the answer when the generation finished (not when it was abandoned): a session's commit."""


@dataclass
class Prompt:
    """The first item of a turn's events: how many prompt tokens it had (for ``usage``)."""

    tokens: int


class EngineServer:
    """The engine behind the HTTP routes: request checks, the row's LoRA, one generation at a time, sessions."""

    def __init__(self, engine, config: ServeConfig, model_name: str):
        self.engine, self.config, self.model_name = engine, config, model_name
        self.labels = list(engine.dyn.state.labels)
        self.engine_lock = threading.Lock()
        """Held by the thread generating: one request at a time on the engine."""
        self.sessions = SessionStore(config.sessions_dir or dynalora_home() / "sessions", config.max_sessions)
        self.recent: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        """Per key: the times of its requests in the last minute (``rate_limit``)."""

    def models(self) -> dict:
        ids = [self.model_name, *self.labels]
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "dynalora"}
                                           for name in ids]}

    def check_key(self, authorization: str | None) -> None:
        if self.config.api_key and authorization != f"Bearer {self.config.api_key}":
            raise ServeError(401, "missing or wrong API key (Authorization: Bearer KEY)", None, "invalid_api_key")

    def check_limits(self, headers, client: str, body_bytes: int | None) -> None:
        """Body size and the per-key rate, checked before a request is read."""
        if body_bytes is not None and body_bytes > self.config.max_body_bytes:
            raise ServeError(413, f"the request body has {body_bytes} bytes, above this server's limit of "
                                  f"{self.config.max_body_bytes}", None, "request_too_large")
        if self.config.rate_limit:
            now, times = time.monotonic(), self.recent[headers.get("authorization") or client]
            while times and now - times[0] > 60:
                times.popleft()
            if len(times) >= self.config.rate_limit:
                raise ServeError(429, f"more than {self.config.rate_limit} requests in a minute; wait a moment", None,
                                 "rate_limit_exceeded", kind="rate_limit_error")
            times.append(now)

    def check_prompt(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise ServeError(400, "the prompt has no tokens", param)
        if len(ids) > self.config.max_prompt_tokens:
            raise ServeError(400, f"the prompt has {len(ids)} tokens, above this server's limit of "
                                  f"{self.config.max_prompt_tokens}", param, "context_length_exceeded")
        return ids

    def prepare(self, request: GenerationRequest, chat: bool) -> Turn:
        """Everything checked before the engine is touched."""
        request.check_supported()
        wanted = (request.max_completion_tokens or request.max_tokens
                  or min(self.config.default_max_tokens, self.config.max_tokens))
        if wanted > self.config.max_tokens:
            raise ServeError(400, f"max_tokens={wanted} is above this server's limit of {self.config.max_tokens}",
                             "max_tokens")
        sampling = SamplingConfig(temperature=request.temperature, top_p=request.top_p, seed=request.seed)
        session_id = request.dynalora.session if request.dynalora is not None else None
        if session_id is not None:
            if not chat:
                raise ServeError(400, "sessions are chats: use /v1/chat/completions", "dynalora.session")
            return self.session_turn(session_id, request, wanted, sampling)
        blend = parse_blend(request.model, request.dynalora, self.labels, (self.model_name, *BASE_NAMES))
        if chat:
            ids = self.engine.encode_messages([m.model_dump() for m in request.messages])
        else:
            ids = self.engine.encode_prompt(request.prompt)
        ids = self.check_prompt(ids, "messages" if chat else "prompt")

        def setup() -> list[int]:
            if blend:
                self.engine.dyn.state.set_blend_by_label(0, blend)
            return ids
        return Turn(setup, wanted, sampling, request.stop_strings())

    def session_turn(self, session_id: str, request: ChatCompletionRequest, max_tokens: int,
                     sampling: SamplingConfig) -> Turn:
        """A turn of a saved session: its transcript and LoRA state loaded, the request's messages added, and —
        when the answer is complete — the new transcript and state saved as the session's next version."""
        self.sessions.record(session_id)  # 404 before anything runs
        if request.model not in (self.model_name, *BASE_NAMES) or request.dynalora.blend is not None:
            raise ServeError(400, "a session keeps its own LoRA: give model='base' and no blend (set a blend when "
                                  "the session is created)", "model")
        if any(m.role == "system" for m in request.messages):
            raise ServeError(400, "a session's system prompt is set when it is created", "messages")
        session = ChatSession(self.engine)

        def setup() -> list[int]:
            self.sessions.load(session_id, session)
            session.messages += [m.model_dump() for m in request.messages]
            return self.check_prompt(session.prompt_ids(), "messages")

        def done(answer: str) -> None:
            session.messages.append({"role": "assistant", "content": answer})
            session.absorbed_tokens += getattr(self.engine, "evicted_tokens", {}).get(0, 0)
            self.sessions.commit(session_id, session)
        return Turn(setup, max_tokens, sampling, request.stop_strings(), done)

    async def run_locked(self, work: Callable):
        """``work()`` on a worker thread holding the engine, its row 0 reset before and after."""
        def locked():
            with self.engine_lock:
                self.engine.dyn.state.reset()
                try:
                    return work()
                finally:
                    self.engine.dyn.state.reset()
        return await asyncio.to_thread(locked)

    async def create_session(self, body: SessionRequest) -> dict:
        blend = check_blend(body.blend or {}, self.labels, "blend")

        def create() -> str:
            if blend:
                self.engine.dyn.state.set_blend_by_label(0, blend)
            return self.sessions.create(ChatSession(self.engine, system=body.system))
        return self.sessions.record(await self.run_locked(create))

    async def events(self, turn: Turn) -> AsyncIterator:
        """A :class:`Prompt`, then the engine's events for the turn's row, generated on a worker thread that holds
        the engine (a thread lock: released only when that thread is done, whatever happens to the request); a
        consumer that stops early — a client gone, its task cancelled — stops the generation."""
        loop, queue, finished, cancel = asyncio.get_running_loop(), asyncio.Queue(), object(), threading.Event()
        state = self.engine.dyn.state

        def send(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the request's event loop is gone (its client left): nobody to tell
                pass

        def work() -> None:
            try:
                with self.engine_lock:
                    state.reset()
                    try:
                        ids = turn.setup()
                        send(Prompt(len(ids)))
                        stream = self.engine.stream([ids], max_new_tokens=turn.max_tokens, sampling=turn.sampling,
                                                    stop_strings=turn.stop)
                        answer = []
                        try:
                            for event in stream:
                                if cancel.is_set():
                                    break
                                if isinstance(event, TokenEvent):
                                    answer.append(event.text)
                                send(event)
                            else:
                                if turn.done is not None:
                                    turn.done("".join(answer))
                        finally:
                            stream.close()
                    finally:
                        state.reset()
            except Exception as error:  # reported to the request, not lost in the thread
                send(error)
            finally:
                send(finished)

        threading.Thread(target=work, name="dynalora-serve", daemon=True).start()
        deadline = time.monotonic() + self.config.timeout_seconds
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), max(deadline - time.monotonic(), 0))
                except TimeoutError:
                    raise ServeError(408, f"the generation took longer than {self.config.timeout_seconds} s and was "
                                          "stopped", None, "timeout") from None
                if item is finished:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            cancel.set()
