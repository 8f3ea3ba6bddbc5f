"""Per-session transcript journal: every final is appended (JSONL, flushed) before it is sent.

One file per session, `<journal_dir>/<session>.jsonl`:

    {"type": "session", "session": ..., "model": ..., "created": <unix time>}
    {"type": "final", "seq": 7, ...}        # the protocol v1 message exactly as sent
    {"type": "closed", "seq": 12, "audio_s": 31.5, "next_segment": 4, "reason": "end"}

A stream resumed after a reconnect appends to the same file; `JournalState` tells the server
where the session left off (the last seq used, how much audio it had, the next segment id) —
read from the last `closed` record, or from the finals if the daemon died before writing one.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from streamd.errors import ConfigError


@dataclass(frozen=True)
class JournalState:
    finals: tuple[dict[str, Any], ...]
    last_seq: int
    audio_s: float
    next_segment: int


class Journal:
    """The journal directory; `open(session)` gives the writer of one session."""

    def __init__(self, directory: Path) -> None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"journal directory {directory}: {exc}") from exc
        self.directory = directory

    def path(self, session: str) -> Path:
        return self.directory / f"{session}.jsonl"

    def exists(self, session: str) -> bool:
        return self.path(session).is_file()

    def open(self, session: str, model: str) -> SessionJournal:
        path = self.path(session)
        new = not path.exists()
        writer = SessionJournal(path)
        if new:
            writer.append(
                {
                    "type": "session",
                    "session": session,
                    "model": model,
                    "created": round(time.time(), 3),
                }
            )
        return writer

    def state(self, session: str) -> JournalState:
        """Where `session` left off; a torn last line (crash mid-write) is ignored."""
        finals: list[dict[str, Any]] = []
        closed: dict[str, Any] | None = None
        with self.path(session).open(encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("type") == "final":
                    finals.append(record)
                    closed = None  # a later stream of the same session reopened it
                elif record.get("type") == "closed":
                    closed = record
        last_seq = max((int(r["seq"]) for r in finals), default=0)
        audio_s = max((float(r["end"]) for r in finals), default=0.0)
        next_segment = max((int(r["segment"]) + 1 for r in finals), default=0)
        if closed is not None:
            last_seq = max(last_seq, int(closed["seq"]))
            audio_s = max(audio_s, float(closed["audio_s"]))
            next_segment = max(next_segment, int(closed["next_segment"]))
        return JournalState(tuple(finals), last_seq, audio_s, next_segment)


class SessionJournal:
    """Appends records of one session; each is on disk (flushed) when `append` returns."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = path.open("a", encoding="utf-8")

    def append(self, record: dict[str, Any]) -> None:
        if self._file is None:
            raise ValueError(f"journal {self.path} is closed")
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self, seq: int, audio_s: float, next_segment: int, reason: str) -> None:
        if self._file is None:
            return
        self.append(
            {
                "type": "closed",
                "seq": seq,
                "audio_s": round(audio_s, 3),
                "next_segment": next_segment,
                "reason": reason,
            }
        )
        self._file.close()
        self._file = None
