"""Typed server messages of protocol v1: a closed union of frozen dataclasses.

Every message the daemon sends becomes one of these; `match` on them:

    match event:
        case Partial(text=text): ...   # tentative; replaces the earlier partial of `segment`
        case Final(text=text): ...     # committed; never changes
        case Closed(reason=reason): ...

Times are seconds of stream audio since the stream's first sample. `seq` increases within a
session. A message `type` this SDK does not know becomes `Unknown` (a newer daemon may add types
without breaking older clients); a known type with missing or mistyped fields is a
`ProtocolError`, because code that matched on it could not trust its fields.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from streamd_client.errors import ProtocolError

PROTOCOL_VERSION = 1


@dataclass(frozen=True)
class Word:
    word: str  # as Whisper spells it, usually with its leading space
    start: float
    end: float
    probability: float


@dataclass(frozen=True)
class Ready:
    """The daemon accepted the stream. Keep `session` to resume it (the SDK does)."""

    seq: int
    session: str
    protocol: int
    model: str
    sample_rate: int
    resumed: bool = False  # True when a dropped session continues
    # Seconds of the session's audio the daemon has heard (ms precision): where this
    # connection's audio joins the session's timeline; 0 in a new session. The SDK resends
    # what it sent after this point. None from daemons that predate the field: nothing is
    # resent (an old daemon would hear it twice).
    audio_s: float | None = None


@dataclass(frozen=True)
class SpeechStarted:
    seq: int
    t: float


@dataclass(frozen=True)
class SpeechEnded:
    seq: int
    t: float
    # how loud the talker reached the microphone (dBFS); None from daemons that do not say
    level_dbfs: float | None = None


@dataclass(frozen=True)
class Partial:
    """Tentative text of `segment`; replaces any earlier partial of that segment."""

    seq: int
    segment: int
    start: float
    end: float
    text: str


@dataclass(frozen=True)
class Final:
    """Committed text of `segment`: it never changes and is delivered exactly once."""

    seq: int
    segment: int
    start: float
    end: float
    text: str
    words: tuple[Word, ...]
    language: str | None
    avg_logprob: float
    no_speech_prob: float


@dataclass(frozen=True)
class Error:
    """A non-fatal problem (e.g. `unknown_session`: a resume failed and a fresh session began).

    Fatal errors are raised as `ServerError` subclasses instead of being yielded.
    """

    seq: int
    code: str
    message: str
    fatal: bool


@dataclass(frozen=True)
class Closed:
    """The daemon ended the stream: `reason` is "end", "shutdown" or "error"."""

    seq: int
    reason: str


@dataclass(frozen=True)
class Unknown:
    """A message type this SDK version does not know; `data` is the whole message."""

    seq: int
    type: str
    data: Mapping[str, Any]


Event = Ready | SpeechStarted | SpeechEnded | Partial | Final | Error | Closed | Unknown


def parse_message(text: str | bytes) -> Event:
    """The event in one text frame. Raises ProtocolError if it is not a protocol v1 message."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"message is not JSON: {str(text)[:200]!r}") from exc
    return parse_event(data)


def parse_event(data: Any) -> Event:
    """The typed event for one decoded JSON message (a dict with a `type`).

    Raises ProtocolError naming the field when a known type is malformed.
    """
    if not isinstance(data, dict):
        raise ProtocolError(f"message is not a JSON object: {data!r:.200}")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(f"message has no string 'type': {data!r:.200}")
    f = _Fields(kind, data)
    match kind:
        case "ready":
            return Ready(
                seq=f.integer("seq"),
                session=f.text("session"),
                protocol=f.integer("protocol"),
                model=f.text("model"),
                sample_rate=f.integer("sample_rate"),
                resumed=f.flag("resumed", False),
                audio_s=f.number("audio_s") if "audio_s" in f.data else None,
            )
        case "speech_started":
            return SpeechStarted(f.integer("seq"), f.number("t"))
        case "speech_ended":
            level = f.data.get("level_dbfs")
            return SpeechEnded(
                f.integer("seq"), f.number("t"), None if level is None else f.number("level_dbfs")
            )
        case "partial":
            return Partial(
                f.integer("seq"),
                f.integer("segment"),
                f.number("start"),
                f.number("end"),
                f.text("text"),
            )
        case "final":
            return Final(
                seq=f.integer("seq"),
                segment=f.integer("segment"),
                start=f.number("start"),
                end=f.number("end"),
                text=f.text("text"),
                words=tuple(_word(kind, w) for w in f.items("words")),
                language=f.optional_text("language"),
                avg_logprob=f.number("avg_logprob"),
                no_speech_prob=f.number("no_speech_prob"),
            )
        case "error":
            # an error can precede any session (a refused token), so seq may be absent
            return Error(
                f.integer("seq", 0), f.text("code"), f.text("message", ""), f.flag("fatal")
            )
        case "closed":
            return Closed(f.integer("seq", 0), f.text("reason"))
        case _:
            return Unknown(f.integer("seq", 0), kind, dict(data))


def event_to_dict(event: Event) -> dict[str, Any]:
    """The wire form of `event` (what `streamd-client --jsonl` prints)."""
    if isinstance(event, Unknown):
        return dict(event.data)
    data = {"type": _TYPES[type(event)], **asdict(event)}
    if isinstance(event, Final):
        data["words"] = [asdict(w) for w in event.words]  # JSON has lists, not tuples
    return data


_TYPES: dict[type, str] = {
    Ready: "ready",
    SpeechStarted: "speech_started",
    SpeechEnded: "speech_ended",
    Partial: "partial",
    Final: "final",
    Error: "error",
    Closed: "closed",
}
_MISSING = object()


def _word(kind: str, data: Any) -> Word:
    if not isinstance(data, dict):
        raise ProtocolError(f"{kind}: a word is not an object: {data!r:.200}")
    f = _Fields(f"{kind} word", data)
    return Word(f.text("word"), f.number("start"), f.number("end"), f.number("probability"))


class _Fields:
    """Typed field access that names the message and field in its ProtocolError."""

    def __init__(self, kind: str, data: dict[str, Any]) -> None:
        self.kind = kind
        self.data = data

    def _get(self, name: str, default: Any) -> Any:
        value = self.data.get(name, default)
        if value is _MISSING:
            raise ProtocolError(f"{self.kind}: missing field {name!r}")
        return value

    def _bad(self, name: str, value: Any, want: str) -> ProtocolError:
        return ProtocolError(f"{self.kind}: field {name!r} should be {want}, got {value!r:.100}")

    def integer(self, name: str, default: Any = _MISSING) -> int:
        value = self._get(name, default)
        # bool is an int subclass, and `true` is never a valid seq or segment
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._bad(name, value, "an integer")
        return value

    def number(self, name: str, default: Any = _MISSING) -> float:
        value = self._get(name, default)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self._bad(name, value, "a number")
        return float(value)

    def text(self, name: str, default: Any = _MISSING) -> str:
        value = self._get(name, default)
        if not isinstance(value, str):
            raise self._bad(name, value, "a string")
        return value

    def optional_text(self, name: str) -> str | None:
        value = self._get(name, None)
        if value is not None and not isinstance(value, str):
            raise self._bad(name, value, "a string or null")
        return value

    def flag(self, name: str, default: Any = _MISSING) -> bool:
        value = self._get(name, default)
        if not isinstance(value, bool):
            raise self._bad(name, value, "true or false")
        return value

    def items(self, name: str) -> list[Any]:
        value = self._get(name, _MISSING)
        if not isinstance(value, list):
            raise self._bad(name, value, "a list")
        return value
