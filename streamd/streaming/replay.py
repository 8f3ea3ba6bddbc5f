"""Replay a recording through the live pipeline: Session + WindowDecoder, two clocks.

- virtual clock (computation-unaware, deterministic): audio is fed chunk by chunk and every due
  window is decoded before more audio arrives, as if the engine took no time. `emitted_at` is
  the audio time fed so far. Tests and quality numbers use this.
- real-time clock (computation-aware): audio is fed at wall-clock pace while a worker thread
  decodes; what a live user sees, and what latency is measured on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from streamd.streaming.events import Event
from streamd.streaming.session import SAMPLE_RATE, Session
from streamd.streaming.window import WindowRequest, WindowResult

DEFAULT_CHUNK_MS = 20

DecodeFn = Callable[[list[WindowRequest]], list[WindowResult]]


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
    decode: DecodeFn,
    chunk_ms: int = DEFAULT_CHUNK_MS,
    on_event: Callable[[Emitted], None] | None = None,
) -> list[Emitted]:
    """Feed `audio` at wall-clock pace while decoding in a worker thread."""
    out: list[Emitted] = []
    start = time.perf_counter()
    wake = asyncio.Event()

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
                timer = session.get_timer()
                timeout = None if timer is None else max(timer - now(), 0.0)
                try:
                    await asyncio.wait_for(wake.wait(), timeout)
                except TimeoutError:
                    session.handle_timer(now())
                wake.clear()
                drain()
                continue
            results = await asyncio.to_thread(decode, requests)
            for request, result in zip(requests, results, strict=True):
                session.decode_done(request, result, now())
            drain()

    task = asyncio.create_task(decoder())
    chunk_s = chunk_ms / 1000
    for i, chunk in enumerate(_chunks(audio, chunk_ms)):
        await asyncio.sleep(max(0.0, (i + 1) * chunk_s - now()))  # the chunk has now "arrived"
        session.feed_audio(chunk, now())
        drain()
        wake.set()
    session.end_stream(now())
    drain()
    wake.set()
    await task
    return out
