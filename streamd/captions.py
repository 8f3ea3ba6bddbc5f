"""Live captions on a terminal from protocol v1 messages (replay, mic)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, TextIO

from streamd.input_level import QuietInputJudge, quiet_advice

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
        self.quiet = None if level_told else QuietInputJudge()

    def __call__(self, item: Emitted) -> None:
        from streamd.protocol import event_message

        self.seq += 1
        message = event_message(item.event, self.seq)
        if self.warn is not None and self.quiet is not None and message["type"] == "speech_ended":
            self._judge_level(self.warn, self.quiet, message["level_dbfs"])
        if self.jsonl:
            message["emitted_at"] = round(item.emitted_at, 3)
            self.out.write(json.dumps(message, ensure_ascii=False) + "\n")
            self.out.flush()
        else:
            self.captions.show(message)

    @staticmethod
    def _judge_level(warn: TextIO, judge: QuietInputJudge, level_dbfs: float | None) -> None:
        verdict = judge.note(level_dbfs)
        if verdict is not None:
            level, offset = verdict
            remedy = f"add --level-offset-db {offset} (docs/vad.md)"
            warn.write(f"streamd: {quiet_advice(level, remedy)}\n")
            warn.flush()

    def close(self) -> None:
        if not self.jsonl:
            self.captions.close_line()
