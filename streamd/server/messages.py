"""Client -> server messages of protocol v1 (DESIGN.md §5), parsed and checked, no I/O.

`parse_client_message(text)` turns a text frame into a typed command or raises `ProtocolError`
carrying the `error` message's code; the connection decides what to do with it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from streamd.errors import ClientError
from streamd.vad import LEVEL_OFFSET_DB

ENCODINGS = ("pcm_s16le", "pcm_f32le")
MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 48_000
MAX_CHANNELS = 2
MAX_PROMPT_CHARS = 1_000
SESSION_ID = re.compile(r"^[0-9a-f]{6,32}$")  # ours are uuid4 hex; also safe as a file name
TASKS = ("transcribe", "translate")


class ProtocolError(ClientError):
    """A message the server cannot act on. `code` goes into the `error` message."""

    def __init__(self, code: str, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.fatal = fatal


@dataclass(frozen=True)
class Resume:
    session: str
    after_seq: int


@dataclass(frozen=True)
class Start:
    sample_rate: int = 16_000
    encoding: str = "pcm_s16le"
    channels: int = 1
    language: str | None = None
    task: str = "transcribe"
    prompt: str | None = None
    resume: Resume | None = None
    level_offset_db: float | None = None  # None: the daemon's vad.level_offset_db


@dataclass(frozen=True)
class Finalize:
    pass


@dataclass(frozen=True)
class End:
    pass


ClientMessage = Start | Finalize | End


def parse_client_message(text: str) -> ClientMessage:
    """The command in a text frame; ProtocolError(bad_message | bad_audio_format) if unusable."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError("bad_message", f"not JSON: {exc.msg} at offset {exc.pos}") from exc
    if not isinstance(data, dict):
        raise ProtocolError("bad_message", "a message must be a JSON object with a 'type'")
    kind = data.get("type")
    if kind == "start":
        return _start(data)
    if kind == "finalize":
        return Finalize()
    if kind == "end":
        return End()
    raise ProtocolError(
        "bad_message", f"unknown message type {kind!r} (expected start, finalize or end)"
    )


def _start(data: dict[str, Any]) -> Start:
    known = {
        "type",
        "sample_rate",
        "encoding",
        "channels",
        "language",
        "task",
        "prompt",
        "resume",
        "level_offset_db",
    }
    unknown = sorted(set(data) - known)
    if unknown:
        raise ProtocolError("bad_message", f"start: unknown fields {unknown}")
    rate = data.get("sample_rate", 16_000)
    if isinstance(rate, bool) or not isinstance(rate, int):
        raise ProtocolError("bad_audio_format", f"start: sample_rate must be an integer: {rate!r}")
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise ProtocolError(
            "bad_audio_format",
            f"start: sample_rate {rate} Hz not supported ({MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE})",
        )
    encoding = data.get("encoding", "pcm_s16le")
    if encoding not in ENCODINGS:
        raise ProtocolError(
            "bad_audio_format",
            f"start: encoding {encoding!r} not supported ({', '.join(ENCODINGS)})",
        )
    channels = data.get("channels", 1)
    if isinstance(channels, bool) or not isinstance(channels, int):
        raise ProtocolError("bad_audio_format", f"start: channels must be an integer: {channels!r}")
    if not 1 <= channels <= MAX_CHANNELS:
        raise ProtocolError(
            "bad_audio_format", f"start: {channels} channels not supported (1..{MAX_CHANNELS})"
        )
    language = data.get("language")
    if language is not None and (not isinstance(language, str) or not language.strip()):
        raise ProtocolError("bad_message", f"start: language must be a code or null: {language!r}")
    task = data.get("task", "transcribe")
    if task not in TASKS:
        raise ProtocolError("bad_message", f"start: task must be one of {TASKS}: {task!r}")
    prompt = data.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ProtocolError("bad_message", "start: prompt must be a string")
    if prompt is not None and len(prompt) > MAX_PROMPT_CHARS:
        raise ProtocolError("bad_message", f"start: prompt longer than {MAX_PROMPT_CHARS} chars")
    return Start(
        sample_rate=rate,
        encoding=encoding,
        channels=channels,
        language=language.strip().lower() if language else None,
        task=task,
        prompt=prompt.strip() or None if prompt else None,
        resume=_resume(data.get("resume")),
        level_offset_db=_level_offset(data.get("level_offset_db")),
    )


def _level_offset(value: Any) -> float | None:
    """The client's input level against a close microphone (dB), within VadConfig's range."""
    if value is None:
        return None
    low, high = LEVEL_OFFSET_DB
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ProtocolError(
            "bad_message", f"start: level_offset_db must be a number of dB in [{low:g}, {high:g}]"
        )
    return float(value)


def _resume(value: Any) -> Resume | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError("bad_message", "start: resume must be {session, after_seq}")
    session, after = value.get("session"), value.get("after_seq", 0)
    if not isinstance(session, str) or not SESSION_ID.match(session):
        raise ProtocolError(
            "bad_message", f"start: resume.session is not a session id: {session!r}"
        )
    if isinstance(after, bool) or not isinstance(after, int) or after < 0:
        raise ProtocolError("bad_message", f"start: resume.after_seq must be >= 0: {after!r}")
    return Resume(session, after)
