"""A protocol v1 test client for the real daemon (DESIGN.md §5), and PCM made from real files.

    pcm = pcm_of(AUDIO / "en/jfk.flac")                      # s16le, 16 kHz, mono
    async with stream_client(daemon.ws_url) as client:
        ready = await client.start()
        await client.send_audio(pcm)
        closed = await client.end()                           # every final, then `closed`
        client.finals()

A background task reads every server message into `client.messages` (so the server is never
blocked on us), and `wait_for` waits for one with a deadline; nothing here sleeps to wait.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import av
import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

WAIT_S = 120.0  # a deadline for one awaited message; the machine is small and shared
SCENARIO_S = 600.0  # a whole test scenario
CHUNK_S = 0.1  # audio per binary frame
_PYAV_FORMATS = {"pcm_s16le": ("s16", "<i2"), "pcm_f32le": ("flt", "<f4")}
_SYNC = {"type": "sync"}  # no such message: the server answers bad_message, in order

T = TypeVar("T")


def run(scenario: Coroutine[Any, Any, T], timeout_s: float = SCENARIO_S) -> T:
    """Run an async test scenario to completion, failing it if it takes longer than timeout_s."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout_s):
            return await scenario

    return asyncio.run(bounded())


def pcm_of(
    path: Path,
    *,
    rate: int = 16_000,
    channels: int = 1,
    encoding: str = "pcm_s16le",
    start_s: float = 0.0,
    end_s: float | None = None,
) -> bytes:
    """`path` decoded by FFmpeg (PyAV) to interleaved PCM at `rate` / `channels` / `encoding`.

    Independent of the daemon's own decoding and resampling (soxr), which it is meant to test.
    """
    fmt, dtype = _PYAV_FORMATS[encoding]
    layout = {1: "mono", 2: "stereo"}[channels]
    parts: list[np.ndarray] = []
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format=fmt, layout=layout, rate=rate)
        for frame in [*container.decode(stream), None]:
            parts.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(frame))
    samples = np.concatenate(parts).astype(dtype)
    frames = samples.reshape(-1, channels)
    first = round(start_s * rate)
    last = len(frames) if end_s is None else round(end_s * rate)
    return frames[first:last].tobytes()


def words(text: str) -> str:
    """Lower case, letters/digits/apostrophes only, single spaces."""
    return " ".join(re.sub(r"[^\w' ]+", " ", text.lower()).split())


class StreamClient:
    """One connection to `/v1/stream`; `messages` holds every JSON message received so far."""

    def __init__(
        self, ws: ClientConnection, on_message: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        self.ws = ws
        self.messages: list[dict[str, Any]] = []
        self.binary_frames = 0  # the server never sends binary frames; counted to check that
        self._on_message = on_message
        self._arrived = asyncio.Event()
        self._reader = asyncio.create_task(self._read(), name="test-client-reader")
        self.start_fields: dict[str, Any] = {}

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                if isinstance(frame, bytes):
                    self.binary_frames += 1
                    continue
                message = json.loads(frame)
                self.messages.append(message)
                if self._on_message is not None:
                    self._on_message(message)
                self._arrived.set()
        except ConnectionClosed:
            pass
        finally:
            self._arrived.set()

    @property
    def disconnected(self) -> bool:
        return self._reader.done()

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    async def aclose(self) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)

    # -- waiting ---------------------------------------------------------------------------------

    async def wait_for(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        *,
        since: int = 0,
        timeout_s: float = WAIT_S,
        what: str = "a message",
    ) -> dict[str, Any]:
        """The first message at index >= `since` satisfying `predicate`; AssertionError if none
        arrives within `timeout_s` or the connection closes first."""
        deadline = time.monotonic() + timeout_s
        index = since
        while True:
            while index < len(self.messages):
                message = self.messages[index]
                index += 1
                if predicate(message):
                    return message
            if self.disconnected:
                raise AssertionError(
                    f"connection closed (code {self.close_code}) before {what}; got "
                    f"{self.brief(since)}"
                )
            self._arrived.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {what} within {timeout_s} s; got {self.brief(since)}")
            try:
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()
            except TimeoutError:
                pass

    async def wait_type(
        self, kind: str, *, since: int = 0, timeout_s: float = WAIT_S
    ) -> dict[str, Any]:
        return await self.wait_for(
            lambda m: m.get("type") == kind, since=since, timeout_s=timeout_s, what=repr(kind)
        )

    async def wait_error(
        self, code: str, *, since: int = 0, timeout_s: float = WAIT_S
    ) -> dict[str, Any]:
        return await self.wait_for(
            lambda m: m.get("type") == "error" and m.get("code") == code,
            since=since,
            timeout_s=timeout_s,
            what=f"error {code!r}",
        )

    async def wait_disconnected(self, timeout_s: float = WAIT_S) -> int | None:
        """Wait until the server has closed the connection; its close code."""
        async with asyncio.timeout(timeout_s):
            await asyncio.shield(self._reader)
            await self.ws.wait_closed()
        return self.close_code

    # -- sending ---------------------------------------------------------------------------------

    async def send_json(self, message: Any) -> int:
        """Send `message` (anything JSON, or a str sent as is); the index of the next message."""
        mark = len(self.messages)
        await self.ws.send(message if isinstance(message, str) else json.dumps(message))
        return mark

    async def start(self, **fields: Any) -> dict[str, Any]:
        """Send `start` with `fields`; the `ready` reply (AssertionError on an error)."""
        self.start_fields = fields
        mark = await self.send_json({"type": "start", **fields})
        reply = await self.wait_for(
            lambda m: m.get("type") in ("ready", "error"), since=mark, what="ready"
        )
        assert reply["type"] == "ready", f"start {fields} refused: {reply}"
        return reply

    async def send_audio(
        self, pcm: bytes, *, chunk_bytes: int = 3_200, realtime: float | None = None
    ) -> None:
        """Send `pcm` in binary frames of `chunk_bytes`; as fast as possible, or paced so that
        each frame leaves when its audio would have been heard at `realtime` x speed, given the
        bytes per second (16 kHz s16 mono unless `start` said otherwise)."""
        rate = self.start_fields.get("sample_rate", 16_000)
        channels = self.start_fields.get("channels", 1)
        width = 4 if self.start_fields.get("encoding") == "pcm_f32le" else 2
        bytes_per_s = rate * channels * width
        began = time.monotonic()
        for offset in range(0, len(pcm), chunk_bytes):
            if realtime is not None:
                due = began + offset / bytes_per_s / realtime
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)  # pacing the source, not waiting for the server
            await self.ws.send(pcm[offset : offset + chunk_bytes])

    async def sync(self) -> int:
        """Wait until the server has taken in everything sent so far.

        The server reads frames in order and answers an unknown message type with a non-fatal
        bad_message error, so that error's arrival means every earlier audio frame was fed to
        the session. The index of the next message."""
        mark = await self.send_json(_SYNC)
        await self.wait_error("bad_message", since=mark)
        return len(self.messages)

    async def end(self, timeout_s: float = WAIT_S) -> dict[str, Any]:
        """Send `end`; the `closed` message, after which the server closes the connection."""
        mark = await self.send_json({"type": "end"})
        closed = await self.wait_type("closed", since=mark, timeout_s=timeout_s)
        await self.wait_disconnected(timeout_s)
        return closed

    def abort(self) -> None:
        """Vanish: drop the TCP connection without a close frame."""
        self.ws.transport.abort()

    # -- reading ---------------------------------------------------------------------------------

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == kind]

    def finals(self) -> list[dict[str, Any]]:
        return self.of_type("final")

    def text(self) -> str:
        return " ".join(f["text"].strip() for f in self.finals())

    def brief(self, since: int = 0) -> str:
        shown = [
            {k: m[k] for k in ("type", "seq", "code", "text", "reason") if k in m}
            for m in self.messages[since:]
        ]
        return json.dumps(shown, ensure_ascii=False)[-2_000:]


@asynccontextmanager
async def stream_client(
    url: str,
    *,
    headers: dict[str, str] | None = None,
    on_message: Callable[[dict[str, Any]], None] | None = None,
) -> AsyncIterator[StreamClient]:
    """A connected `StreamClient`; the connection is closed (or found closed) on exit."""
    async with connect(
        url, additional_headers=headers, compression=None, open_timeout=WAIT_S, close_timeout=10
    ) as ws:
        client = StreamClient(ws, on_message)
        try:
            yield client
        finally:
            await client.aclose()
