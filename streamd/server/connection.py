"""`StreamConnection`: one websocket client of `/v1/stream`, driving one `Session`.

Two tasks per connection: the receiver (frames -> `Session.feed_audio`, commands) and the
driver (the session's decode requests -> the shared `Scheduler`, events -> the client). The
driver owns the end: it runs until every utterance is finalized, journals each final before it
is sent, and keeps going when the client has vanished, so finished words are never lost.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from streamd.audio import SAMPLE_RATE
from streamd.errors import ConfigError, DecodeCancelled, EngineError
from streamd.input_level import QuietInputJudge, quiet_advice
from streamd.protocol import PROTOCOL_VERSION, event_message
from streamd.server.config import Config
from streamd.server.journal import Journal, SessionJournal
from streamd.server.messages import (
    ClientMessage,
    End,
    Finalize,
    ProtocolError,
    Start,
    parse_client_message,
)
from streamd.server.metrics import Metrics
from streamd.server.pcm import PcmDecoder
from streamd.server.scheduler import Scheduler
from streamd.streaming.events import Event, Final, Partial, SpeechEnded, SpeechStarted
from streamd.streaming.session import Session

log = logging.getLogger("streamd.server")

START_TIMEOUT_S = 30.0  # a client that connects and never says `start` is let go
# messages waiting for a client that does not read them; beyond this it is treated as gone
# (its session still finishes into the journal)
MAX_OUTBOX = 2_000
MAX_PROMPT_TOKENS = 100
OVERLOAD_S = 2.0  # a step result later than this after its newest audio: the engine is behind
# Engine load (0..1) -> how many times `step_ms` a session waits between partial steps. Under
# load, partial steps are what can give: fewer, larger ones leave the engine free to run each
# utterance's final at once, which is what finalization latency waits on.
STEP_STRETCH = ((0.95, 3), (0.8, 2))


@dataclass
class Services:
    """What the daemon shares with every connection."""

    config: Config
    model_name: str
    multilingual: bool
    encode_prompt: Callable[[str | None, str], tuple[int, ...]]  # (language, text) -> tokens
    scheduler: Scheduler
    journal: Journal
    metrics: Metrics
    live: dict[str, StreamConnection]  # session id -> connection still finishing its stream
    connections: set[StreamConnection]  # every accepted client (max_sessions applies)
    on_final: Callable[[str, dict[str, Any]], None] | None = None  # MQTT
    on_partial: Callable[[str, dict[str, Any]], None] | None = None


def client_token(ws: ServerConnection) -> str | None:
    """The token the client presented: `Authorization: Bearer T` or `?token=T`."""
    header = ws.request.headers.get("Authorization", "") if ws.request else ""
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    query = parse_qs(urlsplit(ws.request.path if ws.request else "").query)
    return query.get("token", [None])[0]


def token_ok(expected: str | None, given: str | None) -> bool:
    if expected is None:
        return True
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


class StreamConnection:
    def __init__(self, services: Services, ws: ServerConnection) -> None:
        self.s = services
        self.ws = ws
        self.session: Session | None = None
        self.session_id = ""
        self._pcm: PcmDecoder | None = None
        self._journal: SessionJournal | None = None
        self._seq = 0
        self._time_offset_s = 0.0  # a resumed stream continues the old one's audio time
        self._segment_offset = 0
        self._audio_s = 0.0  # 16 kHz audio fed so far (this connection)
        self._arrivals: deque[tuple[float, float]] = deque()  # (audio end s, wall) per frame
        self._speech_started_at: float | None = None  # wall time, until the first text
        self._quiet: QuietInputJudge | None = None  # None once the input's level was said
        self._wake = asyncio.Event()
        self._client_gone = False
        self._close_reason = "end"
        self._guards_seen: dict[str, int] = {}
        self._resets_seen = 0
        self._probes_seen = (0, 0)  # probes, probe finals already counted
        self.done = asyncio.Event()  # the stream is over and its finals are journaled
        # after `ready`, one writer task sends everything, in seq order, so that events go out
        # as soon as they happen (the receiver's too) without two tasks interleaving sends
        self._outbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._closing: asyncio.Future[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    async def run(self) -> None:
        if not token_ok(self.s.config.token, client_token(self.ws)):
            await self._error("unauthorized", "missing or wrong token", fatal=True)
            return
        if len(self.s.connections) >= self.s.config.max_sessions:
            await self._error(
                "busy",
                f"the server is full ({self.s.config.max_sessions} sessions); try again later",
                fatal=True,
                close_code=CloseCode.TRY_AGAIN_LATER,
            )
            return
        self.s.connections.add(self)
        try:
            start = await self._await_start()
            if start is None:
                return
            await self._open(start)
            receiver = asyncio.create_task(self._receive(), name=f"recv-{self.session_id}")
            try:
                await self._drive()
            finally:
                receiver.cancel()
                await asyncio.gather(receiver, return_exceptions=True)
            await self._close()
        finally:
            if self._writer is not None:
                self._writer.cancel()
                await asyncio.gather(self._writer, return_exceptions=True)
            self.s.connections.discard(self)
            self._finish()

    def shutdown(self) -> None:
        """Daemon shutdown: finalize what was heard, send it, then close."""
        self._close_reason = "shutdown"
        if self.session is None:  # not started yet: nothing to finalize, do not wait for it
            self._closing = asyncio.ensure_future(self.ws.close(CloseCode.GOING_AWAY, "shutdown"))
            return
        self._end_stream()

    def _release_slot(self) -> None:
        """A client that has heard `closed` may connect again at once: free its place under
        max_sessions now, not after the closing handshake (which takes a round trip or more)."""
        self.s.connections.discard(self)

    def _finish(self) -> None:
        self._close_journal(self._seq)
        if self.session is not None:
            self.s.metrics.active_sessions.dec()
        if self.s.live.get(self.session_id) is self:
            del self.s.live[self.session_id]
        self.done.set()

    def _close_journal(self, seq: int) -> None:
        if self._journal is not None:
            audio_s = self._time_offset_s + self._audio_s
            self._journal.close(seq, audio_s, self._next_segment(), self._reason())
            self._journal = None
            log.info(
                "session %s: closed (%s), %.3f s of audio heard",
                self.session_id,
                self._reason(),
                audio_s,
            )

    def _reason(self) -> str:
        return (
            "client_gone"
            if self._client_gone and self._close_reason == "end"
            else (self._close_reason)
        )

    def _next_segment(self) -> int:
        if self.session is None:
            return self._segment_offset
        return self._segment_offset + self.session.next_segment

    # -- before the session ------------------------------------------------------------------------

    async def _await_start(self) -> Start | None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                async with asyncio.timeout_at(_loop_time(deadline)):
                    frame = await self.ws.recv()
            except TimeoutError:
                await self._error(
                    "timeout", f"no start message within {START_TIMEOUT_S:.0f} s", True
                )
                return None
            except ConnectionClosed:
                return None
            if isinstance(frame, bytes):
                await self._error("not_started", "audio before the start message was dropped")
                continue
            message = await self._parse(frame)
            match message:
                case Start():
                    try:
                        self._check_start(message)
                    except ProtocolError as exc:
                        await self._error(exc.code, str(exc))
                        continue
                    return message
                case End():
                    await self._send({"type": "closed", "seq": self._next_seq(), "reason": "end"})
                    self._release_slot()
                    await self.ws.close()
                    return None
                case Finalize():
                    await self._error("not_started", "finalize before start: nothing to finalize")

    def _check_start(self, start: Start) -> None:
        from streamd.transcribe import language_code

        try:
            language_code(start.language)
        except ConfigError as exc:
            raise ProtocolError("bad_message", f"start: {exc}") from exc
        if not self.s.multilingual and start.language not in (None, "en"):
            raise ProtocolError(
                "bad_message", f"model {self.s.model_name} is English-only; language must be en"
            )
        if not self.s.multilingual and start.task == "translate":
            raise ProtocolError("bad_message", f"model {self.s.model_name} cannot translate")
        if start.resume is not None and start.resume.session in self.s.live:
            other = self.s.live[start.resume.session]
            if not other.done.is_set() and not other._client_gone:
                raise ProtocolError("session_in_use", "that session is still connected")

    async def _open(self, start: Start) -> None:
        from streamd.transcribe import language_code

        cfg = self.s.config
        language = language_code(start.language or cfg.language)
        resumed: tuple[dict[str, Any], ...] = ()
        resumed_from = False
        if start.resume is not None:
            old = self.s.live.get(start.resume.session)
            if old is not None:
                await old.done.wait()  # its last finals are still being decoded
            if self.s.journal.exists(start.resume.session):
                self.session_id = start.resume.session
                state = self.s.journal.state(self.session_id)
                self._seq = max(state.last_seq, start.resume.after_seq)
                self._time_offset_s = state.audio_s
                self._segment_offset = state.next_segment
                resumed = tuple(f for f in state.finals if f["seq"] > start.resume.after_seq)
                resumed_from = True
            else:
                await self._error(
                    "unknown_session",
                    f"no session {start.resume.session} to resume; starting a new one",
                )
        if not self.session_id:
            self.session_id = uuid.uuid4().hex[:16]
        vocabulary = self.s.encode_prompt(language, start.prompt) if start.prompt else ()
        if len(vocabulary) > MAX_PROMPT_TOKENS:
            vocabulary = vocabulary[-MAX_PROMPT_TOKENS:]  # the latest words matter most
        session_config = cfg.session
        if start.level_offset_db is not None:  # the client knows its microphone
            vad = replace(session_config.vad, level_offset_db=start.level_offset_db)
            session_config = replace(session_config, vad=vad)
        elif session_config.vad.level_offset_db == 0.0:
            self._quiet = QuietInputJudge()  # nobody said the level: tell the client if low
        self.session = Session(
            session_config,
            self.session_id,
            language=language,
            task=start.task,
            vocabulary=vocabulary,
        )
        self._pcm = PcmDecoder(start)
        self._journal = self.s.journal.open(self.session_id, self.s.model_name)
        self.s.live[self.session_id] = self
        self.s.metrics.active_sessions.inc()
        self.s.metrics.sessions.inc()
        self._writer = asyncio.create_task(self._write_loop(), name=f"send-{self.session_id}")
        ready = {
            "type": "ready",
            # a resumed session's re-sent finals follow with their own seq (> after_seq)
            "seq": start.resume.after_seq if start.resume and resumed_from else self._next_seq(),
            "session": self.session_id,
            "protocol": PROTOCOL_VERSION,
            "model": self.s.model_name,
            "sample_rate": start.sample_rate,
            "resumed": resumed_from,
            # where this connection's audio joins the session's timeline: a resuming client
            # resends what it sent after this point (lost in flight when the connection died)
            "audio_s": round(self._time_offset_s, 3),
        }
        await self._send(ready)
        for final in resumed:
            await self._send(final)
        log.info(
            "session %s: %s, audio from %.3f s, %d final(s) re-sent",
            self.session_id,
            "resumed" if resumed_from else "started",
            self._time_offset_s,
            len(resumed),
        )

    # -- receiving -------------------------------------------------------------------------------

    async def _receive(self) -> None:
        assert self.session is not None and self._pcm is not None
        ended = False
        try:
            async for frame in self.ws:
                if isinstance(frame, bytes):
                    if ended:
                        await self._error("bad_message", "audio after end was dropped")
                        continue
                    if self.session.ended:
                        continue  # shutting down: what was heard is being finalized
                    await self._audio(frame)
                    continue
                message = await self._parse(frame)
                match message:
                    case Start():
                        await self._error("bad_message", "already started; start is sent once")
                    case Finalize():
                        if not ended:
                            self.session.finalize(self._now())
                            self._cancel_if_superseded()
                            self._flush_events()
                            self._wake.set()
                    case End():
                        ended = True
                        self._end_stream()
                        self._flush_events()
        except ConnectionClosed:
            pass
        if not ended and not self.session.finished:
            self._client_gone = True
            log.info("session %s: client went away; finalizing what it sent", self.session_id)
            self._end_stream()

    async def _parse(self, text: str) -> ClientMessage | None:
        """The command in a text frame, or None once the client was told why not (the
        connection goes on: a bad message is never fatal)."""
        try:
            return parse_client_message(text)
        except ProtocolError as exc:
            await self._error(exc.code, str(exc))
            return None

    async def _audio(self, frame: bytes) -> None:
        assert self.session is not None and self._pcm is not None
        limit = self.s.config.max_frame_bytes
        if len(frame) > limit:
            await self._error(
                "frame_too_large", f"binary frame of {len(frame)} bytes dropped (max {limit})"
            )
            return
        try:
            samples = self._pcm.decode(frame)
        except ProtocolError as exc:
            await self._error(exc.code, str(exc))
            return
        self._feed(samples)

    def _feed(self, samples: Any) -> None:
        assert self.session is not None
        if not len(samples):
            return
        now = self._now()
        self._audio_s += len(samples) / SAMPLE_RATE
        self._arrivals.append((self._audio_s, now))
        self.s.metrics.audio_in.inc(len(samples) / SAMPLE_RATE)
        self.session.feed_audio(samples, now)
        self._flush_events()  # speech_started/ended now, not after the step in flight
        self._cancel_if_superseded()
        self._wake.set()

    def _end_stream(self) -> None:
        if self.session is None or self.session.ended:
            return
        if self._pcm is not None:
            self._feed(self._pcm.flush())
        self.session.end_stream(self._now())
        self._cancel_if_superseded()
        self._wake.set()

    def _cancel_if_superseded(self) -> None:
        """Withdraw the step in flight if it only delays the final now (`Session.superseded`);
        `_drive` hears of it as `DecodeCancelled`."""
        if self.session is not None and self.session.superseded():
            self.s.scheduler.cancel(self.session_id)

    # -- driving ---------------------------------------------------------------------------------

    async def _drive(self) -> None:
        session = self.session
        assert session is not None
        while not session.finished:
            self._flush_events()
            requests = session.decode_requests(self._step_ms())
            if not requests:
                if session.finished:  # that call retired the last (too short) utterance
                    break
                timer = session.get_timer()
                timeout = None if timer is None else max(timer - self._now(), 0.0)
                try:
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
                except TimeoutError:
                    session.handle_timer(self._now())
                self._wake.clear()
                continue
            newest_audio_at = self._now()
            try:
                results = await self.s.scheduler.submit(requests)
            except DecodeCancelled:
                for request in requests:
                    session.decode_cancelled(request, self._now())
                self.s.metrics.cancelled_steps.inc(len(requests))
                continue
            except EngineError as exc:
                log.error("session %s: %s", self.session_id, exc)
                self._close_reason = "error"
                await self._error("engine_error", f"the engine failed: {exc}", fatal=True)
                return
            now = self._now()
            if now - newest_audio_at > OVERLOAD_S:
                self.s.metrics.overloaded_steps.inc()
            for request, result in zip(requests, results, strict=True):
                session.decode_done(request, result, now)
                self.s.metrics.forward_passes.inc(result.forward_passes)
            self._count_session_stats()
        self._flush_events()

    def _step_ms(self) -> int:
        load = self.s.scheduler.load()
        stretch = next((factor for level, factor in STEP_STRETCH if load >= level), 1)
        return self.s.config.session.step_ms * stretch

    def _count_session_stats(self) -> None:
        assert self.session is not None
        for guard, words in self.session.stats.guards.dropped_words.items():
            new = words - self._guards_seen.get(guard, 0)
            if new:
                self.s.metrics.guard_dropped.labels(guard).inc(new)
                self._guards_seen[guard] = words
        stats = self.session.stats
        self.s.metrics.context_resets.inc(stats.context_resets - self._resets_seen)
        self._resets_seen = stats.context_resets
        self.s.metrics.probes.inc(stats.probes - self._probes_seen[0])
        self.s.metrics.probe_finals.inc(stats.probe_finals - self._probes_seen[1])
        self._probes_seen = (stats.probes, stats.probe_finals)

    def _flush_events(self) -> None:
        assert self.session is not None
        for event in self.session.events():
            self._emit(event)

    def _emit(self, event: Event) -> None:
        message = self._shifted(event_message(event, self._next_seq()))
        now = self._now()
        match event:
            case SpeechStarted():
                self._speech_started_at = self._arrival(event.t)
            case SpeechEnded():
                self.s.scheduler.promote(self.session_id)
                if event.level_dbfs is not None:
                    self.s.metrics.speech_level.observe(event.level_dbfs)
            case Partial() | Final() if self._speech_started_at is not None:
                self.s.metrics.first_partial_latency.observe(now - self._speech_started_at)
                self._speech_started_at = None
        if isinstance(event, Final):
            assert self._journal is not None
            self._journal.append(message)  # on disk before anyone is told
            self.s.metrics.finals.inc()
            self.s.metrics.finalization_latency.observe(now - self._arrival(event.words[-1].end))
            self._forget_arrivals(event.end)
            if self.s.on_final is not None:
                self.s.on_final(self.session_id, message)
        elif isinstance(event, Partial) and self.s.on_partial is not None:
            self.s.on_partial(self.session_id, message)
        self._post(message)
        if isinstance(event, SpeechEnded) and self._quiet is not None:
            self._tell_if_quiet(self._quiet, event.level_dbfs)  # after the speech_ended it is about

    def _tell_if_quiet(self, judge: QuietInputJudge, level_dbfs: float | None) -> None:
        """A non-fatal `quiet_input` error, once, when the talker is too quiet for the VAD's
        level thresholds and the client never said its level (docs/vad.md, "Input level")."""
        verdict = judge.note(level_dbfs)
        if verdict is not None:
            level, offset = verdict
            remedy = (
                f"send level_offset_db {offset} in start (streamd-client: --level-offset-db "
                f"{offset}; the captions page: add level_offset_db={offset} to its address)"
            )
            self._post(self._error_message("quiet_input", quiet_advice(level, remedy), False))

    def _shifted(self, message: dict[str, Any]) -> dict[str, Any]:
        """Session times and segments -> the resumed stream's (no-op for a fresh session)."""
        if not self._time_offset_s and not self._segment_offset:
            return message
        out = dict(message)
        for key in ("t", "start", "end"):
            if key in out:
                out[key] = round(out[key] + self._time_offset_s, 3)
        if "segment" in out:
            out["segment"] += self._segment_offset
        if "words" in out:
            out["words"] = [
                {
                    **w,
                    "start": round(w["start"] + self._time_offset_s, 3),
                    "end": round(w["end"] + self._time_offset_s, 3),
                }
                for w in out["words"]
            ]
        return out

    def _arrival(self, audio_s: float) -> float:
        """Wall time at which audio time `audio_s` (this connection's) had been received."""
        for end_s, wall in self._arrivals:
            if end_s >= audio_s:
                return wall
        return self._now()

    def _forget_arrivals(self, until_s: float) -> None:
        while len(self._arrivals) > 1 and self._arrivals[1][0] < until_s:
            self._arrivals.popleft()

    # -- sending ---------------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _post(self, message: dict[str, Any]) -> None:
        """Queue `message` for the writer (after `ready`)."""
        if self._client_gone:
            return
        if self._outbox.qsize() >= MAX_OUTBOX:
            log.warning("session %s: client does not read; treating it as gone", self.session_id)
            self._client_gone = True
            self._closing = asyncio.ensure_future(self.ws.close(CloseCode.POLICY_VIOLATION))
            return
        self._outbox.put_nowait(message)

    async def _send(self, message: dict[str, Any]) -> None:
        if self._writer is not None:
            self._post(message)
        else:
            await self._write(message)

    async def _flush_outbox(self) -> None:
        if self._writer is not None and not self._writer.done():
            await self._outbox.join()

    async def _write_loop(self) -> None:
        while True:
            message = await self._outbox.get()
            try:
                if message is not None:
                    await self._write(message)
            finally:
                self._outbox.task_done()

    async def _write(self, message: dict[str, Any]) -> None:
        if self._client_gone:
            return
        try:
            await self.ws.send(json.dumps(message, ensure_ascii=False))
        except ConnectionClosed:
            self._client_gone = True

    async def _error(
        self,
        code: str,
        text: str,
        fatal: bool = False,
        close_code: CloseCode = CloseCode.POLICY_VIOLATION,
    ) -> None:
        await self._send(self._error_message(code, text, fatal))
        if fatal:
            await self._flush_outbox()
            await self.ws.close(close_code, code)

    def _error_message(self, code: str, text: str, fatal: bool) -> dict[str, Any]:
        """An `error` message with the next seq, counted in /metrics."""
        self.s.metrics.errors.labels(code).inc()
        message = {"type": "error", "seq": self._next_seq(), "code": code, "message": text}
        return {**message, "fatal": fatal}

    async def _close(self) -> None:
        reason = self._reason()
        seq = self._next_seq()
        self._close_journal(seq)  # on disk before the client hears `closed` (resume reads it)
        await self._send({"type": "closed", "seq": seq, "reason": reason})
        await self._flush_outbox()
        self._release_slot()
        code = CloseCode.GOING_AWAY if reason == "shutdown" else CloseCode.NORMAL_CLOSURE
        await self.ws.close(code, reason)

    def _now(self) -> float:
        return time.monotonic()


def _loop_time(monotonic_deadline: float) -> float:
    """asyncio.timeout_at wants loop time; ours is time.monotonic (the same clock on Linux,
    converted anyway so the code does not depend on it)."""
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic_deadline - time.monotonic())
