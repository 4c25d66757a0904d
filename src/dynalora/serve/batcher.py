"""Continuous batching for ``dynalora serve``: one thread runs the engine; requests join the running batch between
steps, each on its own LoRA state row (its blend, or its session's saved state), get their own events back, and leave
when they finish or their client goes — so concurrent requests share every forward pass.

Work that needs a free LoRA row but no generation (creating a session from a blend) runs on the same thread between
steps (:meth:`Batcher.call`)."""

from __future__ import annotations

import collections
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from dynalora.runtime import FinishEvent, RowSettings, SamplingConfig, TokenEvent, TriggerConfig

FINISHED = object()
"""The last item a job's ``send`` receives, whatever happened."""


@dataclass
class Prompt:
    """The first item a job's ``send`` receives: how many prompt tokens it had (for ``usage``)."""

    tokens: int


@dataclass
class Job:
    """One generation: how to set up its row and what to do with its answer, where its events go, whether its client
    is still there."""

    setup: Callable[[int], list[int]]
    """Puts the request's LoRA into the given state row (zeroed) and returns the prompt ids."""
    max_tokens: int
    sampling: SamplingConfig
    stop: tuple[str, ...]
    send: Callable[[object], None] | None
    """Receives a :class:`Prompt`, then the engine's events for the row, an exception if one ended it, and
    :data:`FINISHED` (set by whoever submits the job)."""
    done: Callable[[str, int], None] | None = None
    """Called with the answer and the row (its LoRA state still there) when the generation finished — not when it was
    cancelled or failed: a session's commit."""
    ended: Callable[[], None] | None = None
    """Called once the job is over, however it ended (on the engine thread)."""
    ignore_eos: bool = False
    triggers: TriggerConfig | None = None
    """The request's own trigger policies (None: the engine's)."""
    cancel: threading.Event = field(default_factory=threading.Event)
    answer: list[str] = field(default_factory=list)

    def settings(self, device) -> RowSettings:
        seed = self.sampling.seed
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        return RowSettings(self.max_tokens, self.sampling, self.stop, generator, self.ignore_eos, self.triggers)

    def end(self, error: Exception | None = None) -> None:
        if error is not None:
            self.send(error)
        try:
            if self.ended is not None:
                self.ended()
        finally:
            self.send(FINISHED)


@dataclass
class _Call:
    work: Callable[[int], object]
    future: Future


class Batcher:
    """Runs ``engine`` on one thread for every request: at most ``engine.dyn.state.max_batch`` rows at once, the rest
    wait their turn in order."""

    def __init__(self, engine):
        self.engine = engine
        self.capacity = engine.dyn.state.max_batch
        self.pending: collections.deque = collections.deque()
        self.wake = threading.Condition()
        self.running: list[Job] = []
        """The jobs in the engine's run, by row."""
        self.thread: threading.Thread | None = None

    def submit(self, job: Job) -> None:
        self._queue(job)

    def call(self, work: Callable[[int], object]) -> Future:
        """``work(row)`` on the engine thread between steps, with a free LoRA state row (zeroed before and after)."""
        future: Future = Future()
        self._queue(_Call(work, future))
        return future

    def _queue(self, item) -> None:
        with self.wake:
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="dynalora-engine", daemon=True)
                self.thread.start()
            self.pending.append(item)
            self.wake.notify()

    # -- the engine thread ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.wake:
                while not self.pending and not self.running:
                    self.wake.wait()
            try:
                self._admit()
                if self.running:
                    self._route(self.engine.step())
                    self._leave()
                if self.running:
                    self._route(self.engine.advance())
            except Exception as error:  # noqa: BLE001 - the batch is lost, the server is not
                self._fail_running(error)

    def _admit(self) -> None:
        """Pending work while rows are free: calls run at once, jobs are set up and join the batch together."""
        state, joining, prompts = self.engine.dyn.state, [], []
        if not self.running:  # an empty batch starts a fresh run (on this thread, whatever used the engine between)
            self.engine.start()
        while True:
            with self.wake:
                if not self.pending or len(self.running) + len(joining) >= self.capacity:
                    break
                item = self.pending.popleft()
            row = len(self.running) + len(joining)
            state.reset(row)
            if isinstance(item, _Call):
                try:
                    item.future.set_result(item.work(row))
                except Exception as error:  # noqa: BLE001 - the caller gets it
                    item.future.set_exception(error)
                finally:
                    state.reset(row)
                continue
            if item.cancel.is_set():
                item.end()
                continue
            try:
                ids = item.setup(row)
            except Exception as error:  # noqa: BLE001 - a bad request ends alone
                state.reset(row)
                item.end(error)
                continue
            item.send(Prompt(len(ids)))
            joining.append(item)
            prompts.append(ids)
        if joining:
            self.running += joining
            self._route(self.engine.join(prompts, [job.settings(self.engine.device) for job in joining]))

    def _route(self, events) -> None:
        for event in events:
            job = self.running[event.row]
            if isinstance(event, TokenEvent):
                job.answer.append(event.text)
            job.send(event)
            if isinstance(event, FinishEvent) and job.done is not None:
                try:
                    job.done("".join(job.answer), event.row)
                except Exception as error:  # noqa: BLE001 - reported to its request
                    job.send(error)

    def _leave(self) -> None:
        """Cancelled rows finish; finished rows leave the batch and their jobs end."""
        for row, job in enumerate(self.running):
            if job.cancel.is_set() and not self.engine.row_finished(row):
                self.engine.cancel(row)
        ended = [job for row, job in enumerate(self.running) if self.engine.row_finished(row)]
        keep = self.engine.leave()
        self.running = [self.running[row] for row in keep]
        for job in ended:
            job.end()

    def _fail_running(self, error: Exception) -> None:
        """Something broke the batch: every job in it gets the error, and the engine starts a fresh, empty run."""
        jobs, self.running = self.running, []
        self.engine.dyn.state.reset()
        self.engine.start()
        for job in jobs:
            job.end(error)
