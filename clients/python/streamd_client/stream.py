"""The async client: one audio stream to the daemon, typed transcript events back.

    async with connect("ws://127.0.0.1:8765/v1/stream", language="en") as stream:
        await stream.send(pcm)          # bytes, or float samples in [-1, 1]
        await stream.end()              # no more audio: the daemon flushes every final
        async for event in stream:      # ends after Closed
            ...

If the connection drops (no `closed` from the daemon), the stream reconnects with backoff and
resumes its session: the daemon re-sends the finals this client missed, and finals already
delivered are not delivered again. Audio sent while disconnected waits in a bounded buffer and
goes out, in order, after the reconnect.

Audio is not acknowledged frame by frame, so audio already handed to a connection that then
died (in the socket buffers, the network, the daemon's receive buffer) may or may not have been
heard. The stream keeps the audio it sent (the last `max_buffer_s`) with its position in the
session; the resumed `ready` says how much the daemon heard (`audio_s`), and what it sent after
that goes out again first, before the audio held while disconnected. `resent_s` counts it, and
`lost_s` counts audio the daemon never heard that was older than what the stream still kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from streamd_client.errors import (
    BufferOverflowError,
    BusyError,
    ConnectError,
    ConnectionLostError,
    ProtocolError,
    ServerError,
    StreamClosedError,
    StreamdClientError,
    UnauthorizedError,
    server_error,
)
from streamd_client.events import (
    Closed,
    Error,
    Event,
    Final,
    Partial,
    Ready,
    SpeechEnded,
    SpeechStarted,
    Unknown,
    parse_message,
)
from streamd_client.pcm import ENCODINGS, PcmEncoder
from streamd_client.reconnect import ReconnectPolicy

DEFAULT_URL = "ws://127.0.0.1:8765/v1/stream"
# Per binary frame: 2 s of 16 kHz s16 audio. Well under the daemon's 1 MiB limit, and small
# enough that a big send() does not hold the connection for long in one piece.
DEFAULT_FRAME_BYTES = 64 * 1024
DEFAULT_MAX_PENDING_EVENTS = 10_000
OPEN_TIMEOUT_S = 10.0  # TCP + websocket handshake, and again for `ready`
CLOSE_TIMEOUT_S = 5.0
_CLOSE_POLICY_VIOLATION = 1008  # what the daemon closes with after `unauthorized`
_CLOSE_TRY_AGAIN_LATER = 1013  # ... after `busy`
_END_MESSAGE = json.dumps({"type": "end"})
_FINALIZE_MESSAGE = json.dumps({"type": "finalize"})
_CONTENT = (SpeechStarted, SpeechEnded, Partial, Final, Unknown)


@dataclass(frozen=True)
class StreamOptions:
    """What the `start` message declares about the audio and the transcription."""

    sample_rate: int = 16_000
    encoding: str = "pcm_s16le"
    channels: int = 1
    language: str | None = None  # None: the daemon detects it (or uses its default)
    task: str = "transcribe"  # or "translate" (to English)
    prompt: str | None = None  # vocabulary / context: names, jargon
    # input level against a close microphone at normal gain (dB); None: the daemon's setting
    level_offset_db: float | None = None

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}")
        if not 1 <= self.channels <= 2:
            raise ValueError(f"channels must be 1 or 2, got {self.channels}")
        if self.sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {self.sample_rate}")
        if self.task not in ("transcribe", "translate"):
            raise ValueError(f"task must be transcribe or translate, got {self.task!r}")

    def start_message(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "type": "start",
            "sample_rate": self.sample_rate,
            "encoding": self.encoding,
            "channels": self.channels,
            "language": self.language,
            "task": self.task,
        }
        if self.prompt:
            message["prompt"] = self.prompt
        if self.level_offset_db is not None:
            message["level_offset_db"] = self.level_offset_db
        return message


def connect(
    url: str = DEFAULT_URL,
    *,
    token: str | None = None,
    sample_rate: int = 16_000,
    encoding: str = "pcm_s16le",
    channels: int = 1,
    language: str | None = None,
    task: str = "transcribe",
    prompt: str | None = None,
    level_offset_db: float | None = None,
    reconnect: bool | ReconnectPolicy = True,
    max_buffer_s: float = 30.0,
    open_timeout_s: float = OPEN_TIMEOUT_S,
    frame_bytes: int = DEFAULT_FRAME_BYTES,
    max_pending_events: int = DEFAULT_MAX_PENDING_EVENTS,
) -> Stream:
    """A stream to the daemon at `url`; `async with` it to connect (it returns after `ready`).

    token: sent as `Authorization: Bearer`; a wrong one raises UnauthorizedError on entry.
    level_offset_db: how much quieter (negative) than a close microphone at normal gain the
        audio is, e.g. -6; the daemon's VAD moves its level thresholds by it.
    reconnect: True for the default ReconnectPolicy, a policy of your own, or False to fail with
        ConnectionLostError when the connection drops.
    max_buffer_s: audio (seconds) held while disconnected; beyond it send() raises
        BufferOverflowError rather than drop audio. Also how much audio already sent is kept
        to be sent again after a drop, if the daemon turns out not to have heard it.
    max_pending_events: events received but not yet iterated; when full, the stream stops
        reading the socket until you catch up (so read events while you send).

    Raises on entry: UnauthorizedError, BusyError, other ServerError, ConnectError.
    """
    options = StreamOptions(
        sample_rate, encoding, channels, language, task, prompt, level_offset_db
    )
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        raise ValueError(f"url must be ws://HOST:PORT/v1/stream or wss://..., got {url!r}")
    if max_buffer_s < 0 or frame_bytes < 1024 or max_pending_events < 1:
        raise ValueError("need max_buffer_s >= 0, frame_bytes >= 1024, max_pending_events >= 1")
    policy = ReconnectPolicy() if reconnect is True else (reconnect or None)
    return Stream(
        url,
        options,
        headers={"Authorization": f"Bearer {token}"} if token else {},
        policy=policy,
        max_buffer_s=max_buffer_s,
        open_timeout_s=open_timeout_s,
        frame_bytes=frame_bytes,
        max_pending_events=max_pending_events,
    )


@dataclass(frozen=True)
class _ConnectionEnd:
    """How one websocket connection ended."""

    closed: Closed | None  # the daemon's `closed` message, if it sent one
    fatal: ServerError | None  # a fatal `error` it sent before
    lost: BaseException | None  # why the connection died, when it died


class Stream:
    """One transcription stream; build it with `connect()`.

    `session` and `last_seq` say where the stream stands (they are what a resume sends);
    `reconnects` counts the connections re-established so far; `resent_s` is the audio
    (seconds) sent again because the daemon had not heard it when a connection died, and
    `lost_s` the audio it had not heard that was too old to resend (beyond `max_buffer_s`).
    """

    def __init__(
        self,
        url: str,
        options: StreamOptions,
        *,
        headers: Mapping[str, str],
        policy: ReconnectPolicy | None,
        max_buffer_s: float,
        open_timeout_s: float,
        frame_bytes: int,
        max_pending_events: int,
    ) -> None:
        self.url = url
        self.options = options
        self._headers = dict(headers)
        self._policy = policy
        self._open_timeout_s = open_timeout_s
        self._frame_bytes = frame_bytes
        self._encoder = PcmEncoder(options.encoding, options.channels)
        self._bytes_per_s = options.sample_rate * self._encoder.frame_bytes
        self._max_buffer_bytes = int(max_buffer_s * self._bytes_per_s)
        self._events: asyncio.Queue[Event | None] = asyncio.Queue(max_pending_events)
        # Items waiting for a connection: audio frames (bytes) and control messages (str).
        self._outbox: deque[bytes | str] = deque()
        self._outbox_audio_bytes = 0
        # Audio handed to the current session's connections, newest last, at most
        # max_buffer_s of it: (position of its first byte in the session, frame). Positions
        # are bytes of the session's timeline; `_position` is where the next frame goes.
        self._sent: deque[tuple[int, bytes]] = deque()
        self._sent_bytes = 0
        self._position = 0
        # A reconnect's `ready`, for _flush to act on under the send lock (so that a send()
        # still failing on the old connection cannot slip audio in between).
        self._rejoined: Ready | None = None
        self._send_lock = asyncio.Lock()
        self._ws: ClientConnection | None = None  # where audio goes now; None while away
        self._conn: ClientConnection | None = None  # the newest connection, even mid-resume
        self._supervisor: asyncio.Task[None] | None = None
        self._session: str | None = None
        self._last_seq = 0
        self._end_called = False
        self._ending = False  # `end` is sent or queued: a reconnect must send it again
        self._finished = False  # no more events will arrive
        self._closing = False  # aclose() was called
        self._failure: BaseException | None = None
        self.reconnects = 0
        self.resent_s = 0.0
        self.lost_s = 0.0

    # -- state ------------------------------------------------------------------------------

    @property
    def session(self) -> str | None:
        """The daemon's session id (from `ready`); None before the stream is open."""
        return self._session

    @property
    def last_seq(self) -> int:
        """The highest `seq` received in this session."""
        return self._last_seq

    @property
    def connected(self) -> bool:
        """Whether audio goes straight to the daemon now (False while reconnecting)."""
        return self._ws is not None

    @property
    def connection(self) -> ClientConnection | None:
        """The current websocket connection, for diagnostics; do not send on it."""
        return self._conn

    @property
    def buffered_s(self) -> float:
        """Seconds of audio waiting for the connection to come back."""
        return self._outbox_audio_bytes / self._bytes_per_s

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> Stream:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Connect and wait for `ready` (what `async with` does)."""
        if self._supervisor is not None or self._closing:
            raise StreamClosedError("a Stream can be opened once")
        ws = await self._open()
        self._ws = ws  # nothing is buffered yet, so audio may flow at once
        self._supervisor = asyncio.create_task(self._supervise(ws), name="streamd-client")

    async def aclose(self) -> None:
        """Close the connection now. Events already received can still be iterated.

        To get every final, call `end()` and iterate until `Closed` before closing.
        """
        if self._closing:
            return
        self._closing = True
        if self._supervisor is not None and not self._supervisor.done():
            self._supervisor.cancel()
            await asyncio.wait([self._supervisor])
        if self._conn is not None:
            await self._conn.close()
        self._finish(None)

    # -- sending ----------------------------------------------------------------------------

    async def send(self, pcm: Any) -> None:
        """Send audio: bytes in the stream's encoding, or samples (see `PcmEncoder`).

        While reconnecting, audio is buffered; BufferOverflowError if that would exceed
        `max_buffer_s` (this chunk is then not accepted, earlier ones are kept).
        Waits when the network is slower than the audio (TCP flow control).
        """
        self._check_sendable()
        data = self._encoder.encode(pcm)
        step = self._frame_bytes - self._frame_bytes % self._encoder.frame_bytes
        await self._submit([data[i : i + step] for i in range(0, len(data), step)])

    async def finalize(self) -> None:
        """Ask the daemon to finalize the current utterance now (e.g. push-to-talk release)."""
        self._check_sendable()
        await self._submit([_FINALIZE_MESSAGE])

    async def end(self) -> None:
        """No more audio. The daemon flushes every final and sends `Closed(reason="end")`;
        keep iterating events until then. Repeated calls do nothing."""
        if self._end_called:
            return
        self._check_sendable()
        self._end_called = True
        await self._submit([_END_MESSAGE], ending=True)

    def _check_sendable(self) -> None:
        self._check_alive()
        if self._end_called:
            raise StreamClosedError("end() was called; the stream takes no more audio")

    def _check_alive(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._finished or self._closing:
            raise StreamClosedError("the stream has ended")
        if self._supervisor is None:
            raise StreamClosedError("the stream is not open; use `async with connect(...)`")

    async def _submit(self, items: list[bytes | str], *, ending: bool = False) -> None:
        async with self._send_lock:
            self._check_alive()  # it may have ended while this waited for the lock
            # set under the lock, so a reconnect's flush cannot add a second `end` meanwhile
            self._ending = self._ending or ending
            ws = self._ws
            if ws is not None and not self._outbox:
                for i, item in enumerate(items):
                    if isinstance(item, bytes):
                        self._keep_sent(item)
                    try:
                        await ws.send(item)
                    except ConnectionClosed:
                        # The supervisor sees the same closure and reconnects. Audio may or
                        # may not have been written: it is kept, and the resumed `ready` says
                        # whether to send it again. A control message waits for the next one.
                        self._ws = None
                        items = items[i + 1 :] if isinstance(item, bytes) else items[i:]
                        break
                else:
                    return
            self._buffer(items)

    def _buffer(self, items: list[bytes | str]) -> None:
        audio = sum(len(i) for i in items if isinstance(i, bytes))
        if self._outbox_audio_bytes + audio > self._max_buffer_bytes:
            raise BufferOverflowError(
                f"disconnected with {self.buffered_s:.1f} s of audio buffered; "
                f"{audio / self._bytes_per_s:.1f} s more would exceed max_buffer_s="
                f"{self._max_buffer_bytes / self._bytes_per_s:g}"
            )
        self._outbox.extend(items)
        self._outbox_audio_bytes += audio

    async def _flush(self, ws: ClientConnection) -> None:
        """Send what waited for this connection, then let audio flow to it directly."""
        async with self._send_lock:
            if self._rejoined is not None:
                self._rejoin(self._rejoined)
                self._rejoined = None
            # The daemon may not have seen an `end` sent on the connection that died.
            if self._ending and _END_MESSAGE not in self._outbox:
                self._outbox.append(_END_MESSAGE)
            while self._outbox:
                item = self._outbox.popleft()
                if isinstance(item, bytes):
                    self._outbox_audio_bytes -= len(item)
                    self._keep_sent(item)  # from now on a resume resends it if unheard
                try:
                    await ws.send(item)
                except ConnectionClosed:
                    if isinstance(item, str):
                        self._outbox.appendleft(item)  # for the next connection
                    raise
            self._ws = ws

    def _keep_sent(self, frame: bytes) -> None:
        """Record `frame`, about to go to the websocket, at the session's next position."""
        self._sent.append((self._position, frame))
        self._position += len(frame)
        self._sent_bytes += len(frame)
        while self._sent_bytes > self._max_buffer_bytes:
            self._sent_bytes -= len(self._sent.popleft()[1])

    def _rejoin(self, ready: Ready) -> None:
        """After a reconnect, queue first what the daemon did not hear of the audio sent.

        Positions then follow the daemon's timeline, which continues at `ready.audio_s`.
        """
        sent, self._sent, self._sent_bytes = self._sent, deque(), 0
        sent_end = self._position
        if ready.audio_s is None:  # a daemon that does not say what it heard: resend nothing
            self._position = sent_end if ready.resumed else 0
            return
        at = ready.audio_s * self._bytes_per_s  # in bytes of the session
        self._position = self._whole_samples(at)
        if not ready.resumed:
            return  # a new session: what the old one missed is not its audio
        cut = self._position
        # The daemon hears whole frames and rounds audio_s to the ms: when one of ours ended
        # within that rounding, that is where it stopped, to the byte (floor may be off by
        # up to half a ms either way).
        edges = [start for start, _ in sent] + [sent_end]
        nearest = min(edges, key=lambda edge: abs(edge - at))
        if abs(nearest - at) <= self._bytes_per_s / 2000 + 1e-6:
            cut = nearest
        unheard = [
            frame[max(0, cut - start) :] for start, frame in sent if start + len(frame) > cut
        ]
        oldest = sent[0][0] if sent else sent_end
        self.lost_s += max(0, oldest - cut) / self._bytes_per_s
        again = sum(map(len, unheard))
        self.resent_s += again / self._bytes_per_s
        self._outbox.extendleft(reversed(unheard))  # before the audio held while away
        self._outbox_audio_bytes += again

    def _whole_samples(self, at: float) -> int:
        """`at` bytes, floored to a whole frame of samples."""
        whole = math.floor(round(at, 6))  # round off float noise: 1.001 * 32000 = 32031.99...
        return whole - whole % self._encoder.frame_bytes

    # -- receiving --------------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        """The next event; stops after `Closed`, raises the error that ended the stream."""
        if self._finished and self._events.empty():
            return self._stop()
        event = await self._events.get()
        if event is None:
            self._events.put_nowait(None)  # later calls stop too
            return self._stop()
        return event

    def _stop(self) -> Event:
        if self._failure is not None:
            raise self._failure
        raise StopAsyncIteration

    def _finish(self, failure: BaseException | None) -> None:
        if self._finished:
            return
        self._finished = True
        self._failure = failure
        self._ws = None
        # nobody waits on a full queue, and __anext__ sees _finished once it drains
        with contextlib.suppress(asyncio.QueueFull):
            self._events.put_nowait(None)

    # -- connections ------------------------------------------------------------------------

    async def _open(self) -> ClientConnection:
        """A new connection that got `ready` (resuming the session if there is one)."""
        try:
            ws = await ws_connect(
                self.url,
                additional_headers=self._headers,
                open_timeout=self._open_timeout_s,
                close_timeout=CLOSE_TIMEOUT_S,
                compression=None,  # PCM barely compresses; deflate would only cost CPU
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise UnauthorizedError("unauthorized", f"HTTP {status} from {self.url}") from exc
            if status in (429, 503):
                raise BusyError("busy", f"HTTP {status} from {self.url}") from exc
            raise ConnectError(f"{self.url}: HTTP {status} instead of a websocket") from exc
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise ConnectError(
                f"cannot connect to {self.url}: {exc or type(exc).__name__}"
            ) from exc
        self._conn = ws
        try:
            await self._handshake(ws)
        except BaseException:
            await ws.close()
            raise
        return ws

    async def _handshake(self, ws: ClientConnection) -> None:
        start = self.options.start_message()
        resuming = self._session is not None
        if resuming:
            start["resume"] = {"session": self._session, "after_seq": self._last_seq}
        notices: list[Error] = []
        try:
            await ws.send(json.dumps(start))
            async with asyncio.timeout(self._open_timeout_s):
                while True:
                    message = await ws.recv()
                    if isinstance(message, bytes):
                        raise ProtocolError("the daemon sent a binary frame")
                    match parse_message(message):
                        case Ready() as ready:
                            break
                        case Error(fatal=True, code=code, message=text):
                            raise server_error(code, text)
                        case Error(code="unknown_session") as notice:
                            notices.append(notice)  # a fresh session follows
                        case Error(code="session_in_use"):
                            # the daemon has not yet noticed that the old connection died
                            raise ConnectError(f"{self.url}: the old connection still holds it")
                        case Error(code=code, message=text):
                            # the daemon refused this start (bad_message, bad_audio_format)
                            raise ServerError(code, text)
                        case Closed(reason=reason):
                            raise ConnectError(f"{self.url} closed the stream at once ({reason})")
                        case other:
                            raise ProtocolError(f"expected ready, got {type(other).__name__}")
        except ConnectionClosed as exc:
            raise _refusal(exc, self.url) from exc
        except TimeoutError as exc:
            raise ConnectError(f"{self.url}: no ready within {self._open_timeout_s:g} s") from exc
        if resuming:
            self._rejoined = ready  # for _flush: resend what the daemon did not hear
        if resuming and ready.session == self._session:
            return  # same session: the daemon now re-sends the finals after last_seq
        # A new session (the first, or a fresh one because the old one was unknown): its seq
        # numbers start over, and the caller sees the notice and the new Ready.
        self._session = ready.session
        self._last_seq = ready.seq
        for notice in notices:
            await self._events.put(notice)
        await self._events.put(ready)

    async def _supervise(self, ws: ClientConnection) -> None:
        """Own the connection until the stream ends: read events, reconnect after drops."""
        try:
            while True:
                end = await self._serve(ws)
                if end.fatal is not None:
                    raise end.fatal
                if end.closed is not None:
                    if end.closed.reason != "shutdown" or self._policy is None:
                        await self._events.put(end.closed)
                        self._finish(None)
                        return
                    cause = "the daemon shut down"
                elif self._policy is None:
                    raise ConnectionLostError(
                        f"connection to {self.url} lost ({end.lost}) and reconnect is off"
                    ) from end.lost
                else:
                    cause = f"connection lost ({end.lost})"
                ws = await self._reconnect(cause)
        except StreamdClientError as exc:
            self._finish(exc)
        except Exception as exc:  # a bug; surface it to the caller instead of a silent task
            self._finish(exc)
        finally:
            if self._conn is not None:
                await self._conn.close()

    async def _serve(self, ws: ClientConnection) -> _ConnectionEnd:
        reader = asyncio.create_task(self._read(ws), name="streamd-client-reader")
        try:
            with contextlib.suppress(ConnectionClosed):  # the reader sees the same closure
                await self._flush(ws)
            return await reader
        finally:
            self._ws = None
            if not reader.done():
                reader.cancel()
                await asyncio.wait([reader])
            await ws.close()

    async def _read(self, ws: ClientConnection) -> _ConnectionEnd:
        fatal: ServerError | None = None
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    raise ProtocolError("the daemon sent a binary frame")
                event = parse_message(message)
                match event:
                    case Closed():
                        self._last_seq = max(self._last_seq, event.seq)
                        return _ConnectionEnd(event, fatal, None)
                    case Error(fatal=True, code=code, message=text):
                        fatal = server_error(code, text)
                        continue
                    case Ready():
                        raise ProtocolError("ready in the middle of a stream")
                if isinstance(event, _CONTENT) and event.seq <= self._last_seq:
                    continue  # re-sent after a resume, and delivered before
                self._last_seq = max(self._last_seq, event.seq)
                await self._events.put(event)
        except ConnectionClosed as exc:
            return _ConnectionEnd(None, fatal, exc)
        # closed cleanly, but without `closed`: the session may still be resumable
        return _ConnectionEnd(None, fatal, ws.close_exc)

    async def _reconnect(self, cause: str) -> ClientConnection:
        assert self._policy is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._policy.give_up_after_s
        last: StreamdClientError | None = None
        for delay in self._policy.delays():
            if loop.time() + delay > deadline:
                break
            await asyncio.sleep(delay)
            try:
                ws = await self._open()
            except (BusyError, ConnectError) as exc:
                last = exc
                continue
            self.reconnects += 1
            return ws
        raise ConnectionLostError(
            f"{cause}; no connection to {self.url} within {self._policy.give_up_after_s:g} s"
            + (f" (last attempt: {last})" if last else "")
        ) from last


def _refusal(exc: ConnectionClosed, url: str) -> StreamdClientError:
    """The typed error for a connection the daemon closed before `ready`."""
    code = exc.rcvd.code if exc.rcvd is not None else None
    reason = exc.rcvd.reason if exc.rcvd is not None else ""
    if code == _CLOSE_POLICY_VIOLATION:
        return UnauthorizedError("unauthorized", reason or f"{url} refused the token")
    if code == _CLOSE_TRY_AGAIN_LATER:
        return BusyError("busy", reason or f"{url} is at capacity")
    return ConnectError(f"{url} closed the connection before ready ({exc})")
