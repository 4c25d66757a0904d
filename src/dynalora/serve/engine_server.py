"""The engine behind ``dynalora serve``: a request checked into a :class:`~dynalora.serve.batcher.Job` and run in the
shared batch (:mod:`dynalora.serve.batcher`), sessions loaded and committed, the limits (body size, rate, time)."""

from __future__ import annotations

import asyncio
import collections
import time
from typing import AsyncIterator

from dynalora.models import dynalora_home
from dynalora.runtime import SHIFT_TOKEN, SamplingConfig, TokenProbability, TriggerConfig
from dynalora.runtime.session import ChatSession
from dynalora.serve.batcher import FINISHED, Batcher, Job
from dynalora.serve.config import ServeConfig
from dynalora.serve.schema import (ChatCompletionRequest, GenerationRequest, ServeError,
                                   SessionRequest, check_blend, named_blends, parse_blend)
from dynalora.serve.sessions import SessionStore
from dynalora.system.spec import parse_trigger

BASE_NAMES = ("base",)


class EngineServer:
    """The engine behind the HTTP routes: request checks, each request's LoRA row in the shared batch, sessions."""

    def __init__(self, engine, config: ServeConfig, model_name: str):
        if engine.config.background_absorb:
            raise ValueError("dynalora serve batches requests, whose rows come and go; background absorb keeps writes "
                             "keyed by row: serve without it (EngineConfig.background_absorb=False)")
        self.engine, self.config, self.model_name = engine, config, model_name
        self.labels = list(engine.dyn.state.labels)
        self.named_blends = named_blends(config.blends, self.labels, (model_name, *BASE_NAMES))
        self.batcher = Batcher(engine)
        self.busy_sessions: set[str] = set()
        """Sessions with a turn in the batch: another turn, or a delete, waits for it to end (409)."""
        self.sessions = SessionStore(config.sessions_dir or dynalora_home() / "sessions", config.max_sessions)
        self.recent: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        """Per key: the times of its requests in the last minute (``rate_limit``)."""

    def models(self) -> dict:
        """The base model, every label of the bank and every named blend (with its ``dynalora.blend``)."""
        blends = {self.model_name: {}, **{label: {label: 1.0} for label in self.labels}, **self.named_blends}
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "dynalora",
                                            "dynalora": {"blend": blend}} for name, blend in blends.items()],
                "dynalora": {"labels": self.labels}}

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

    def prepare(self, request: GenerationRequest, chat: bool) -> Job:
        """Everything checked before the engine is touched."""
        request.check_supported()
        wanted = (request.max_completion_tokens or request.max_tokens
                  or min(self.config.default_max_tokens, self.config.max_tokens))
        if wanted > self.config.max_tokens:
            raise ServeError(400, f"max_tokens={wanted} is above this server's limit of {self.config.max_tokens}",
                             "max_tokens")
        sampling = SamplingConfig(temperature=request.temperature, top_p=request.top_p, seed=request.seed)
        options = request.dynalora
        triggers = self.request_triggers(options.trigger) if options and options.trigger is not None else None
        if options is not None and options.session is not None:
            if not chat:
                raise ServeError(400, "sessions are chats: use /v1/chat/completions", "dynalora.session")
            job = self.session_turn(options.session, request, wanted, sampling)
            job.triggers = triggers
            return job
        blend = parse_blend(request.model, request.dynalora, self.labels, (self.model_name, *BASE_NAMES),
                            self.named_blends)
        if chat:
            ids = self.engine.encode_messages([m.model_dump() for m in request.messages])
        else:
            ids = self.engine.encode_prompt(request.prompt)
        ids = self.check_prompt(ids, "messages" if chat else "prompt")

        def setup(row: int) -> list[int]:
            if blend:
                self.engine.dyn.state.set_blend_by_label(row, blend)
            return ids
        return Job(setup, wanted, sampling, request.stop_strings(), send=None, ignore_eos=request.ignore_eos,
                   triggers=triggers)

    def request_triggers(self, specs: list[str]) -> TriggerConfig:
        """A request's own trigger policies (the server's rate limits; ``prob`` without a threshold or votes: the
        server's)."""
        token_ids = self.engine.trigger_token_ids
        server = self.engine.triggers
        shift = next((p for p in server.policies if isinstance(p, TokenProbability) and p.name == SHIFT_TOKEN), None)
        threshold, votes = (shift.threshold, shift.votes) if shift else (None, (1, 1))
        policies = []
        for spec in specs:
            if spec.partition(":")[0] in ("token", "prob", "think") and not token_ids:
                raise ServeError(400, f"dynalora.trigger {spec!r}: this server's model has no trigger tokens "
                                      "(start it with --trigger-tokens)", "dynalora.trigger")
            try:
                policies.append(parse_trigger(spec, token_ids, threshold, votes))
            except ValueError as error:
                message = str(error).replace("--trigger ", "")
                raise ServeError(400, f"dynalora.trigger: {message}", "dynalora.trigger") from None
        return TriggerConfig(policies, min_gap=server.min_gap, max_per_sequence=server.max_per_sequence)

    def session_turn(self, session_id: str, request: ChatCompletionRequest, max_tokens: int,
                     sampling: SamplingConfig) -> Job:
        """A turn of a saved session: its transcript and LoRA state loaded, the request's messages added, and —
        when the answer is complete — the new transcript and state saved as the session's next version."""
        self.sessions.record(session_id)  # 404 before anything runs
        if request.model not in (self.model_name, *BASE_NAMES) or request.dynalora.blend is not None:
            raise ServeError(400, "a session keeps its own LoRA: give model='base' and no blend (set a blend when "
                                  "the session is created)", "model")
        if any(m.role == "system" for m in request.messages):
            raise ServeError(400, "a session's system prompt is set when it is created", "messages")
        session, claimed = ChatSession(self.engine), []

        def setup(row: int) -> list[int]:
            self.claim(session_id)
            claimed.append(session_id)
            session.row = row
            self.sessions.load(session_id, session)
            session.messages += [m.model_dump() for m in request.messages]
            return self.check_prompt(session.prompt_ids(), "messages")

        def done(answer: str, row: int) -> None:
            session.row = row  # rows move up as others leave
            session.messages.append({"role": "assistant", "content": answer})
            session.absorbed_tokens += session.evicted_now()
            self.sessions.commit(session_id, session)
        return Job(setup, max_tokens, sampling, request.stop_strings(), send=None, done=done,
                   ended=lambda: claimed and self.release(session_id), ignore_eos=request.ignore_eos)

    def claim(self, session_id: str) -> None:
        """Mark a session as having a turn in the batch (or being deleted); refused while it has one already."""
        with self.sessions.lock:
            if session_id in self.busy_sessions:
                raise ServeError(409, f"session {session_id!r} has a turn in progress; wait for it to end", "session",
                                 "session_busy")
            self.busy_sessions.add(session_id)

    def release(self, session_id: str) -> None:
        with self.sessions.lock:
            self.busy_sessions.discard(session_id)

    async def create_session(self, body: SessionRequest) -> dict:
        blend = check_blend(body.blend or {}, self.labels, "blend")

        def create(row: int) -> str:
            if blend:
                self.engine.dyn.state.set_blend_by_label(row, blend)
            return self.sessions.create(ChatSession(self.engine, system=body.system, row=row))
        return self.sessions.record(await asyncio.wrap_future(self.batcher.call(create)))

    def delete_session(self, session_id: str) -> None:
        self.claim(session_id)  # not while a turn of it runs
        try:
            self.sessions.delete(session_id)
        finally:
            self.release(session_id)

    async def events(self, job: Job) -> AsyncIterator:
        """A :class:`~dynalora.serve.batcher.Prompt`, then the engine's events for the job's row, as the batch
        produces them; a consumer that stops early — a client gone, its task cancelled, its time up — cancels the
        row (it leaves the batch at the next step)."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def send(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the request's event loop is gone (its client left): nobody to tell
                pass

        job.send = send
        self.batcher.submit(job)
        deadline = time.monotonic() + self.config.timeout_seconds
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), max(deadline - time.monotonic(), 0))
                except TimeoutError:
                    raise ServeError(408, f"the generation took longer than {self.config.timeout_seconds} s and was "
                                          "stopped", None, "timeout") from None
                if item is FINISHED:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            job.cancel.set()
