"""Live captions on a terminal from protocol v1 messages (replay, mic)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, TextIO

from streamd.input_level import QuietInputJudge

if TYPE_CHECKING:
    from streamd.streaming.replay import Emitted


class Captions:
    """Terminal captions: the partial rewrites the current line (dimmed), finals are committed,
    one utterance per line. A pipe gets only the committed lines."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.line = ""
        self.tty = out.isatty()

    def show(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "final":
            self.line += message["text"]
            self._render("")
        elif kind == "partial":
            self._render(message["text"])
        elif kind == "speech_started":
            # not at speech_ended: the utterance's last final arrives just after it
            self.close_line()

    def close_line(self) -> None:
        if self.line.strip():
            if self.tty:
                self._render("")
                self.out.write("\n")
            else:
                self.out.write(self.line.strip() + "\n")
        self.line = ""
        self.out.flush()

    def _render(self, partial: str) -> None:
        if self.tty:
            dim = f"\x1b[2m{partial}\x1b[0m" if partial else ""
            self.out.write(f"\r\x1b[K{self.line.strip()}{dim}")
            self.out.flush()


class EventPrinter:
    """Session events as `streamd replay` / `streamd mic` print them: captions, or (jsonl) one
    protocol v1 message per line with `emitted_at`. Call with each event; `close()` at the end.

    warn: where to say (once) that the input is too quiet for the VAD, unless `level_told`
    (the user gave --level-offset-db already)."""

    def __init__(
        self, out: TextIO, jsonl: bool, warn: TextIO | None = None, level_told: bool = False
    ) -> None:
        self.out = out
        self.jsonl = jsonl
        self.captions = Captions(out)
        self.seq = 0
        self.warn = warn
        self.quiet = None if level_told or warn is None else QuietInputJudge()

    def __call__(self, item: Emitted) -> None:
        from streamd.protocol import event_message

        self.seq += 1
        message = event_message(item.event, self.seq)
        if self.quiet is not None and message["type"] == "speech_ended":
            self._judge_level(message["level_dbfs"])
        if self.jsonl:
            message["emitted_at"] = round(item.emitted_at, 3)
            self.out.write(json.dumps(message, ensure_ascii=False) + "\n")
            self.out.flush()
        else:
            self.captions.show(message)

    def _judge_level(self, level_dbfs: float | None) -> None:
        verdict = self.quiet.note(level_dbfs) if self.quiet is not None else None
        if verdict is not None and self.warn is not None:
            level, offset = verdict
            self.warn.write(
                f"streamd: the input is quiet (speech at {level} dBFS): quiet words can be "
                f"missed; if they are, raise the input volume or add --level-offset-db {offset} "
                "(docs/vad.md)\n"
            )
            self.warn.flush()

    def close(self) -> None:
        if not self.jsonl:
            self.captions.close_line()
