"""`Scheduler`: one per engine; batches decode requests from every session.

Sessions `await scheduler.submit(requests)`; a single worker runs the engine in its own thread
(torch releases the GIL, so the event loop keeps serving sockets meanwhile). Batching policy
(finals first, then first come first served):
- while the engine is busy, requests pile up and the next call takes up to `max_batch` of them
  (natural batching: the busier the engine, the larger its batches);
- an idle engine waits at most `batch_wait_ms` for a batch to fill before it starts.

The queue is bounded by construction: each session has at most one request in flight
(`Session.decode_requests`), so it never holds more than `max_sessions` entries. Overload
policy: a session whose step waited behind others simply sends a longer window next time
(fewer, larger steps); `behind_s()` and the overload metrics say when that happens.

A failed batch is retried request by request, so one bad window fails only its own session.

Cancelling (`cancel`): a session whose partial step only delays its final
(`Session.superseded`) withdraws it. A waiting request leaves the queue; a batch being decoded
is stopped (`streamd.engine.cancel`) only when every request in it is withdrawn, since the
others still want their results. A withdrawn request's `submit` raises `DecodeCancelled`.

Load-aware decoding: `busy_decode` (if given) runs a batch when the engine is contended (more
than one window in the batch, or more waiting behind it). The daemon passes the same decoder
with small encoder context buckets there: a 10 s bucket costs a quarter of the 30 s encoder
pass, which is what lets one engine keep up with several streams, while a lone stream keeps
full context (docs/benchmarks.md has both).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

from streamd.errors import DecodeCancelled, EngineError
from streamd.streaming.replay import LiveDecodeFn as DecodeFn
from streamd.streaming.window import WindowRequest, WindowResult

LOAD_WINDOW_S = 3.0  # the engine load average's time constant


@dataclass
class _Job:
    request: WindowRequest
    future: asyncio.Future[WindowResult]
    submitted_at: float
    urgent: bool = False  # its session has a final waiting behind it
    withdrawn: bool = False  # its session no longer wants it (`Scheduler.cancel`)


def _priority(job: _Job) -> bool:
    """Sort key: finals (probes, and steps that hold one up) first, FIFO otherwise."""
    return not (job.request.final or job.request.probe or job.urgent)


@dataclass(frozen=True)
class BatchReport:
    """What one engine call did, for metrics."""

    size: int
    queue_wait_s: tuple[float, ...]  # per request: submit -> engine start
    engine_s: float
    failed: int
    busy: bool  # decoded with `busy_decode`


class Scheduler:
    def __init__(
        self,
        decode: DecodeFn,
        max_batch: int,
        batch_wait_ms: int = 5,
        on_batch: Callable[[BatchReport], None] | None = None,
        busy_decode: DecodeFn | None = None,
    ) -> None:
        self._decode = decode
        self._busy_decode = busy_decode or decode
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_ms / 1000
        self._on_batch = on_batch
        self._pending: deque[_Job] = deque()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="streamd-engine")
        self._task: asyncio.Task[None] | None = None
        self.busy_s = 0.0  # engine time so far (for the RTF)
        self._load = 0.0  # fraction of recent wall time the engine was busy (moving average)
        self._load_at = time.monotonic()
        self.last_progress = time.monotonic()  # the watchdog's liveness signal
        self._running: list[_Job] = []  # the batch in the engine
        self._stop_running = threading.Event()  # set: the engine drops that batch

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="scheduler")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for job in self._pending:
            job.future.cancel()
        self._executor.shutdown(wait=True)

    async def submit(self, requests: list[WindowRequest]) -> list[WindowResult]:
        """Results in order. Raises EngineError if the engine failed on one of them."""
        if self._task is None or self._task.done():
            raise EngineError("the scheduler is not running")
        loop = asyncio.get_running_loop()
        jobs = [_Job(r, loop.create_future(), time.monotonic()) for r in requests]
        self._pending.extend(jobs)
        self._wake.set()
        return list(await asyncio.gather(*(j.future for j in jobs)))

    def promote(self, session_id: str) -> None:
        """`session_id`'s utterance just ended: its waiting step goes ahead of other partial
        steps, since the session's final cannot be requested until that step is done."""
        for job in self._pending:
            if job.request.session_id == session_id:
                job.urgent = True

    def cancel(self, session_id: str) -> None:
        """`session_id` withdraws its request (`Session.superseded`): gone from the queue at
        once, or stopped in the engine if nobody else in its batch needs the batch; `submit`
        raises `DecodeCancelled`. A request the engine goes on with (others share its
        batch) still gets its result."""
        for job in [j for j in self._pending if j.request.session_id == session_id]:
            self._pending.remove(job)
            if not job.future.done():
                job.future.set_exception(DecodeCancelled(f"request {job.request.request_id}"))
        for job in self._running:
            if job.request.session_id == session_id:
                job.withdrawn = True
        if self._running and all(j.withdrawn for j in self._running):
            self._stop_running.set()

    def load(self) -> float:
        """How busy the engine has been lately, 0..1 (an average over ~LOAD_WINDOW_S)."""
        self._decay(time.monotonic())
        return self._load

    def _decay(self, now: float, busy_s: float = 0.0) -> None:
        elapsed = max(now - self._load_at, 1e-6)
        keep = math.exp(-elapsed / LOAD_WINDOW_S)
        # over `elapsed`, the engine was busy `busy_s` of it
        self._load = keep * self._load + (1 - keep) * min(busy_s / elapsed, 1.0)
        self._load_at = now

    def behind_s(self) -> float:
        """How long the oldest waiting request has waited (0 when none): the engine's lag."""
        if not self._pending:
            return 0.0
        return time.monotonic() - min(job.submitted_at for job in self._pending)

    @property
    def queued(self) -> int:
        return len(self._pending)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._pending:
                continue
            if len(self._pending) < self.max_batch and self.batch_wait_s > 0:
                await asyncio.sleep(self.batch_wait_s)
            # finals first: they are what finalization latency waits on
            ordered = sorted(self._pending, key=_priority)
            batch = ordered[: self.max_batch]
            self._pending = deque(ordered[self.max_batch :])
            batch = [j for j in batch if not j.future.cancelled()]  # its session went away
            if batch:
                await self._run_batch(batch)
            if self._pending:
                self._wake.set()

    async def _run_batch(self, batch: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        failed = 0
        busy = len(batch) > 1 or bool(self._pending)
        decode = self._busy_decode if busy else self._decode
        stop = threading.Event()
        self._running, self._stop_running = batch, stop
        try:
            results = await loop.run_in_executor(
                self._executor, partial(decode, [j.request for j in batch], cancel=stop)
            )
            outcomes: list[WindowResult | BaseException] = list(results)
        except DecodeCancelled as exc:
            outcomes = [exc] * len(batch)
        except Exception:
            outcomes = []
            for job in batch:  # isolate the window that breaks the engine
                try:
                    (one,) = await loop.run_in_executor(
                        self._executor, partial(decode, [job.request])
                    )
                    outcomes.append(one)
                except Exception as exc:
                    failed += 1
                    outcomes.append(
                        EngineError(f"decoding request {job.request.request_id} failed: {exc}")
                    )
        finally:
            self._running = []
        elapsed = time.monotonic() - started
        self.busy_s += elapsed
        self._decay(time.monotonic(), elapsed)
        self.last_progress = time.monotonic()
        for job, outcome in zip(batch, outcomes, strict=True):
            if job.future.done():
                continue
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)
        if self._on_batch is not None:
            waits = tuple(started - j.submitted_at for j in batch)
            self._on_batch(BatchReport(len(batch), waits, elapsed, failed, busy))
