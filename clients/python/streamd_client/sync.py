"""A blocking wrapper around the async Stream, for code without an event loop.

    with streamd_client.sync.connect(url, language="en") as stream:
        for chunk in chunks:
            stream.send(chunk)
        stream.end()
        for event in stream:          # ends after Closed
            ...

The async Stream runs on an event loop in a private thread; every call is handed to it and
waited for, so reconnects and resumes behave exactly as in the async API. `send` and the event
iterator may be used from different threads at the same time. Iterate events while sending long
audio: events are held (up to `max_pending_events`) until read.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from types import TracebackType
from typing import Any, TypeVar

from streamd_client.errors import StreamClosedError
from streamd_client.events import Event
from streamd_client.stream import DEFAULT_URL, Stream
from streamd_client.stream import connect as async_connect

T = TypeVar("T")


def connect(url: str = DEFAULT_URL, **options: Any) -> SyncStream:
    """Connect now (returns after `ready`); the options are those of `streamd_client.connect`.

    Raises what the async `connect` raises on entry (UnauthorizedError, BusyError,
    ConnectError, ...).
    """
    stream = SyncStream(url, options)
    try:
        stream._call(stream._stream.open())
    except BaseException:
        stream.close()
        raise
    return stream


class SyncStream:
    """The blocking twin of `Stream`; build it with `streamd_client.sync.connect`."""

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        # Built here so that bad options raise before a thread exists; asyncio objects bind to
        # a loop on first use, which is the private loop's thread.
        self._stream: Stream = async_connect(url, **options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="streamd-client-sync", daemon=True
        )
        self._thread.start()
        self._closed = False

    # -- state (read from the loop thread's objects; plain attribute reads are safe) ----------

    @property
    def session(self) -> str | None:
        return self._stream.session

    @property
    def last_seq(self) -> int:
        return self._stream.last_seq

    @property
    def reconnects(self) -> int:
        return self._stream.reconnects

    @property
    def connected(self) -> bool:
        return self._stream.connected

    @property
    def buffered_s(self) -> float:
        return self._stream.buffered_s

    @property
    def resent_s(self) -> float:
        return self._stream.resent_s

    @property
    def lost_s(self) -> float:
        return self._stream.lost_s

    # -- operations ---------------------------------------------------------------------------

    def send(self, pcm: Any) -> None:
        """As `Stream.send`: blocks while the network is slower than the audio."""
        self._call(self._stream.send(pcm))

    def finalize(self) -> None:
        self._call(self._stream.finalize())

    def end(self) -> None:
        """No more audio; iterate until Closed to get every final."""
        self._call(self._stream.end())

    def recv(self, timeout_s: float | None = None) -> Event:
        """The next event. Raises TimeoutError after `timeout_s`, StreamClosedError once the
        stream has ended, or the error that ended it."""
        event = self._call(_next(self._stream, timeout_s))
        if event is None:
            raise StreamClosedError("the stream has ended")
        return event

    def __iter__(self) -> Iterator[Event]:
        """Events until Closed (then the iteration stops) or the error that ended the stream."""
        while (event := self._call(_next(self._stream, None))) is not None:
            yield event

    def close(self) -> None:
        """Close the connection and stop the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._call(self._stream.aclose(), allow_closed=True)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> SyncStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, T], *, allow_closed: bool = False) -> T:
        if self._closed and not allow_closed:
            coro.close()
            raise StreamClosedError("the stream was closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            # KeyboardInterrupt in the caller's thread: do not leave the operation running
            future.cancel()
            raise
        finally:
            if not future.done():
                future.cancel()


async def _next(stream: Stream, timeout_s: float | None) -> Event | None:
    try:
        return await asyncio.wait_for(anext(stream), timeout_s)
    except StopAsyncIteration:
        return None
