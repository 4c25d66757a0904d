"""Absorb without stalling generation: a memory writer runs on a background thread.

When a row passes the window, the engine hands its oldest chunk (after the sink) to the worker and keeps
generating with that chunk still in context, under the row's current memory. The writer works on a copy of
the memory taken at the start. At a later step boundary the engine collects the finished write and merges
it in one validated in-place update (:meth:`Absorber.merge`), so a step sees the old memory or the new one,
never a mix; only then is the chunk evicted. A write that raises leaves the old memory and the chunk in
place. LoRA state overrides and capture hooks are per thread, so the writer's forward and backward passes
on the shared model do not disturb the engine's.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from dynalora.runtime.absorb import Absorber


@dataclass
class AbsorbJob:
    row: int
    token_ids: list[int]
    """The chunk being written (the oldest tokens after the sink when the job started)."""
    started: float
    future: Future


class AbsorbWorker:
    """Example::

        worker = AbsorbWorker(absorber)
        worker.start(row, chunk_ids)            # returns at once
        ...                                     # decode steps
        for job, factors, error in worker.collect():
            absorber.merge(job.row, factors, job.token_ids)    # at a step boundary
    """

    def __init__(self, absorber: Absorber):
        self.absorber = absorber
        self.jobs: dict[int, AbsorbJob] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dynalora-absorb")

    def busy(self, row: int) -> bool:
        return row in self.jobs

    def start(self, row: int, token_ids: list[int], following: list[int] = ()) -> AbsorbJob:
        """Write ``token_ids`` for ``row`` on the worker (``following``: the window tokens after them), from a
        snapshot of the row's memory and replay taken now."""
        if row in self.jobs:
            raise RuntimeError(f"row {row} already has an absorb in flight")
        memory = {m: (a.clone(), b.clone()) for m, (a, b) in self.absorber.dyn.state.row_factors(row, "memory").items()}
        future = self._executor.submit(self._write, row, list(token_ids), list(following), memory,
                                       self.absorber.replay(row))
        self.jobs[row] = AbsorbJob(row, list(token_ids), time.perf_counter(), future)
        return self.jobs[row]

    def _write(self, row: int, token_ids: list[int], following: list[int], memory: dict,
               replay: list[list[int]]) -> dict:
        with torch.no_grad():
            return self.absorber.encode(token_ids, row, following, memory, replay)

    def collect(self, wait: bool = False) -> list[tuple[AbsorbJob, dict | None, BaseException | None]]:
        """Finished jobs (all in-flight ones with ``wait``) as ``(job, factors, None)`` or ``(job, None, error)``."""
        done = []
        for row, job in list(self.jobs.items()):
            if wait or job.future.done():
                del self.jobs[row]
                error = job.future.exception()
                done.append((job, None if error else job.future.result(), error))
        return done

    def close(self) -> None:
        self.collect(wait=True)
        self._executor.shutdown(wait=True)
