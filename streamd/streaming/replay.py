"""Replay a recording through the live pipeline: Session + WindowDecoder, two clocks.

- virtual clock (computation-unaware, deterministic): audio is fed chunk by chunk and every due
  window is decoded before more audio arrives, as if the engine took no time. `emitted_at` is
  the audio time fed so far. Tests and quality numbers use this.
- real-time clock (computation-aware): audio is fed at wall-clock pace while a worker thread
  decodes; what a live user sees, and what latency is measured on.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from streamd.errors import DecodeCancelled
from streamd.streaming.events import Event
from streamd.streaming.session import SAMPLE_RATE, Session
from streamd.streaming.window import WindowRequest, WindowResult

DEFAULT_CHUNK_MS = 20

DecodeFn = Callable[[list[WindowRequest]], list[WindowResult]]


class LiveDecodeFn(Protocol):
    """A decode the live loop can stop from the event loop's thread (`WindowDecoder.decode`):
    when `cancel` is set it raises `DecodeCancelled` at its next check."""

    def __call__(
        self, requests: list[WindowRequest], *, cancel: threading.Event | None = None
    ) -> list[WindowResult]: ...


@dataclass(frozen=True)
class Emitted:
    """An event and when it came out, in seconds since the replay started."""

    event: Event
    emitted_at: float


def _chunks(audio: np.ndarray, chunk_ms: int) -> list[np.ndarray]:
    step = SAMPLE_RATE * chunk_ms // 1000
    return [audio[i : i + step] for i in range(0, len(audio), step)]


def _pump(session: Session, decode: DecodeFn, now: float) -> None:
    while requests := session.decode_requests():
        for request, result in zip(requests, decode(requests), strict=True):
            session.decode_done(request, result, now)


def replay_virtual(
    session: Session, audio: np.ndarray, decode: DecodeFn, chunk_ms: int = DEFAULT_CHUNK_MS
) -> list[Emitted]:
    """Feed `audio` through `session` with a virtual clock; every event with its audio time."""
    out: list[Emitted] = []
    fed = 0
    for chunk in _chunks(audio, chunk_ms):
        fed += len(chunk)
        now = fed / SAMPLE_RATE
        session.feed_audio(chunk, now)
        _pump(session, decode, now)
        out.extend(Emitted(e, now) for e in session.events())
    now = fed / SAMPLE_RATE
    session.end_stream(now)
    _pump(session, decode, now)
    out.extend(Emitted(e, now) for e in session.events())
    return out


async def replay_realtime(
    session: Session,
    audio: np.ndarray,
    decode: LiveDecodeFn,
    chunk_ms: int = DEFAULT_CHUNK_MS,
    on_event: Callable[[Emitted], None] | None = None,
) -> list[Emitted]:
    """Feed `audio` at wall-clock pace while decoding in a worker thread."""

    async def paced() -> AsyncIterator[np.ndarray]:
        start = time.perf_counter()
        chunk_s = chunk_ms / 1000
        for i, chunk in enumerate(_chunks(audio, chunk_ms)):
            # the chunk "arrives" when its last sample would have been spoken
            await asyncio.sleep(max(0.0, (i + 1) * chunk_s - (time.perf_counter() - start)))
            yield chunk

    return await run_live(paced(), session, decode, on_event)


async def run_live(
    source: AsyncIterable[np.ndarray],
    session: Session,
    decode: LiveDecodeFn,
    on_event: Callable[[Emitted], None] | None = None,
    stop: asyncio.Event | None = None,
) -> list[Emitted]:
    """Feed `source` into `session` as its audio arrives while a worker thread decodes.

    The live loop of `streamd mic` and of `replay_realtime` (a file paced like a microphone).

    When the source ends or `stop` is set (Ctrl-C), the source is closed, the stream ended and
    its pending finals decoded; every event comes back with its wall time in seconds since the
    call (each also goes to `on_event` as it happens). If the source fails, the finals of the
    audio before the failure are still flushed, then its error is raised. Cancelling the call
    abandons the flush.

    A step the session no longer needs (`Session.superseded`: its final became due while the
    step was decoded) is stopped, so the final does not wait for it.
    """
    out: list[Emitted] = []
    start = time.perf_counter()
    wake = asyncio.Event()
    cancel: threading.Event | None = None  # the decode in flight's

    def cancel_if_superseded() -> None:
        if cancel is not None and session.superseded():
            cancel.set()

    def now() -> float:
        return time.perf_counter() - start

    def drain() -> None:
        for event in session.events():
            item = Emitted(event, now())
            out.append(item)
            if on_event is not None:
                on_event(item)

    async def decoder() -> None:
        while not session.finished:
            requests = session.decode_requests()
            if not requests:
                if session.finished:  # that call retired the last (too short) utterance
                    break
                timer = session.get_timer()
                timeout = None if timer is None else max(timer - now(), 0.0)
                try:
                    await asyncio.wait_for(wake.wait(), timeout)
                except TimeoutError:
                    session.handle_timer(now())
                wake.clear()
                drain()
                continue
            nonlocal cancel
            cancel = threading.Event()
            try:
                results = await asyncio.to_thread(decode, requests, cancel=cancel)
            except DecodeCancelled:
                for request in requests:
                    session.decode_cancelled(request, now())
                continue
            finally:
                cancel = None
            for request, result in zip(requests, results, strict=True):
                session.decode_done(request, result, now())
            drain()

    async def feed() -> None:
        async for chunk in source:
            session.feed_audio(chunk, now())
            drain()
            cancel_if_superseded()
            wake.set()

    decoding = asyncio.create_task(decoder())
    feeding = asyncio.create_task(feed())
    stopping = asyncio.create_task(stop.wait()) if stop is not None else None
    tasks = [t for t in (decoding, feeding, stopping) if t is not None]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        feeding.cancel()  # closes the source's iterator, which stops the device
        await asyncio.wait([feeding])
        failure = None if feeding.cancelled() else feeding.exception()
        if decoding.done():  # it can only have stopped by failing
            decoding.result()
        session.end_stream(now())
        drain()
        cancel_if_superseded()
        wake.set()
        await decoding
        if failure is not None:
            raise failure
        return out
    finally:
        for task in tasks:
            task.cancel()
