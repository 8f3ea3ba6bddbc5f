"""Live captions on a terminal from transcript events.

On a TTY the partial rewrites the current line (dimmed) after the utterance's committed text;
finals are committed, one utterance per line. A pipe or file gets only committed lines, so
`streamd-client stream talk.wav > talk.txt` is a clean transcript.

Utterances are split where the VAD said speech ended, by audio time, not by arrival order: a
daemon that runs ahead of the decoder (a file sent faster than real time) reports every
`speech_ended` before the finals of those utterances arrive.
"""

from __future__ import annotations

from typing import TextIO

from streamd_client.events import Closed, Event, Final, Partial, SpeechEnded

_CLEAR_LINE = "\r\x1b[K"
_DIM, _RESET = "\x1b[2m", "\x1b[0m"


class Captions:
    def __init__(self, out: TextIO, *, tty: bool | None = None) -> None:
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self.line = ""  # committed text of the current utterance
        self._line_end = 0.0  # audio time where the line's last final ends
        self._speech_ends: list[float] = []  # utterance boundaries not yet passed

    def show(self, event: Event) -> None:
        match event:
            case Final(text=text, start=start, end=end):
                self._break_before(start)
                self.line += text
                self._line_end = end
                self._render("")
            case Partial(text=text, start=start):
                self._break_before(start)
                self._render(text)
            case SpeechEnded(t=t):
                self._speech_ends.append(t)
            case Closed():
                self.close_line()

    def close_line(self) -> None:
        """End the current utterance's line (call it once more at the end of the stream)."""
        if self.line.strip():
            if self.tty:
                self._render("")
                self.out.write("\n")
            else:
                self.out.write(self.line.strip() + "\n")
        self.line = ""
        self.out.flush()

    def _break_before(self, start: float) -> None:
        """New line if speech ended between the line's last final and text starting at `start`."""
        if any(self._line_end <= t <= start for t in self._speech_ends) and self.line.strip():
            self.close_line()
        self._speech_ends = [t for t in self._speech_ends if t > start]

    def _render(self, partial: str) -> None:
        if self.tty:
            tail = f"{_DIM}{partial}{_RESET}" if partial else ""
            self.out.write(f"{_CLEAR_LINE}{self.line.strip()}{tail}")
            self.out.flush()
