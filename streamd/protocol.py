"""Wire protocol v1 message shapes (DESIGN.md §5) for session events.

Used by the websocket server and by `streamd replay --jsonl`, so both speak exactly the same.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from streamd.streaming.events import Event, Final, Partial, SpeechEnded, SpeechStarted

PROTOCOL_VERSION = 1
_TIME_DECIMALS = 3


def _t(value: float) -> float:
    return round(value, _TIME_DECIMALS)


def event_message(event: Event, seq: int) -> dict[str, Any]:
    """The JSON object (as a dict) that carries `event` as message number `seq`."""
    match event:
        case SpeechStarted(t=t):
            return {"type": "speech_started", "seq": seq, "t": _t(t)}
        case SpeechEnded(t=t, level_dbfs=level):
            return {"type": "speech_ended", "seq": seq, "t": _t(t), "level_dbfs": level}
        case Partial(segment=segment, start=start, end=end, text=text):
            return {
                "type": "partial",
                "seq": seq,
                "segment": segment,
                "start": _t(start),
                "end": _t(end),
                "text": text,
            }
        case Final():
            words = [{**asdict(w), "start": _t(w.start), "end": _t(w.end)} for w in event.words]
            return {
                "type": "final",
                "seq": seq,
                "segment": event.segment,
                "start": _t(event.start),
                "end": _t(event.end),
                "text": event.text,
                "words": words,
                "language": event.language,
                "avg_logprob": round(event.avg_logprob, 4),
                "no_speech_prob": round(event.no_speech_prob, 4),
            }
