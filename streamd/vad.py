"""VAD gate: passes speech (with pre-roll and hangover) and nothing else, so Whisper never sees
silence, noise or background murmur, where it hallucinates.

Sans-I/O: `VadGate` is a pure function of the samples fed to it (no clocks, threads or I/O), and
the events it returns are the same whatever the chunk sizes. Two stages decide what is speech
(docs/vad.md has the measurements behind the defaults):

1. webrtcvad marks each frame voiced or not. It is built to catch all speech, so it also fires
   on babble: people talking in the next room are speech to it (and to silero-vad).
2. A level rule confirms that the speech is *foreground*: speech starts only when the start
   window holds a voiced frame at least `min_peak_dbfs` loud and `snr_db` above the background,
   and an utterance ends once no such frame has come for `confirm_hold_ms`, so murmur after a
   talker stops is not passed on for as long as it lasts.

Audio time is the sample index since the first sample fed (16 kHz), exact and integer.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import webrtcvad

from streamd.errors import ConfigError

SAMPLE_RATE = 16_000  # webrtcvad also takes 8/32/48 kHz, but the pipeline resamples to 16 kHz first
FRAME_MS_CHOICES = (10, 20, 30)  # the only frame lengths webrtcvad accepts
_SILENT_DBFS = -100.0  # level given to digital silence, so arithmetic on levels stays finite
_BACKGROUND_TAU_MS = 2_000  # the background level follows non-speech audio over about this long
_INT16_MAX = 32_767


@dataclass(frozen=True)
class VadConfig:
    """How the gate decides what is speech. Times in ms, levels in dBFS (RMS, 0 = full scale)."""

    frame_ms: int = 30  # 10, 20 or 30: webrtcvad's frame lengths
    aggressiveness: int = 3  # webrtcvad's mode, 0 (most speech kept) .. 3 (fewest false alarms)
    # Speech starts when `start_frames` of the frames in the last `start_window_ms` are voiced and
    # one of them is loud enough (below): a lone voiced frame (a click, a cough) starts nothing.
    start_frames: int = 3
    start_window_ms: int = 300
    preroll_ms: int = 300  # audio kept before the first voiced frame, so onsets are not clipped
    hangover_ms: int = 600  # unvoiced audio after the last voiced frame before speech ends
    # Frames quieter than this, or less than snr_db above the background (the running level of
    # what webrtcvad calls unvoiced outside speech: the noise floor), are never voiced.
    min_voiced_dbfs: float = -55.0
    snr_db: float = 10.0
    # Second stage: speech must be *foreground* to start, and an utterance ends when no
    # foreground frame has come for confirm_hold_ms. A voiced frame is foreground when it is at
    # least min_foreground_dbfs and either loud (loud_dbfs) or bright: the voiced frames of the
    # start window carry energy in 2-4 kHz at least min_presence_db relative to 0.1-1 kHz.
    # Talkers in the next room are neither: walls and distance take the highs. A near talker's
    # consonants and upper formants are bright even when the microphone gain is low.
    min_foreground_dbfs: float = -45.0
    loud_dbfs: float = -25.0
    min_presence_db: float = -15.0
    confirm_hold_ms: int = 2_000

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.frame_ms not in FRAME_MS_CHOICES:
            problems.append(f"frame_ms must be one of {FRAME_MS_CHOICES}, got {self.frame_ms}")
        if not 0 <= self.aggressiveness <= 3:
            problems.append(f"aggressiveness must be 0..3, got {self.aggressiveness}")
        for name in ("preroll_ms", "hangover_ms"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.start_window_ms < self.frame_ms:
            problems.append(f"start_window_ms must be >= frame_ms, got {self.start_window_ms}")
        elif not 1 <= self.start_frames <= self.start_window_ms // max(self.frame_ms, 1):
            problems.append(
                f"start_frames must be 1..{self.start_window_ms // max(self.frame_ms, 1)} "
                f"(frames in start_window_ms), got {self.start_frames}"
            )
        if self.confirm_hold_ms < self.hangover_ms:
            problems.append(
                f"confirm_hold_ms ({self.confirm_hold_ms}) must be >= hangover_ms "
                f"({self.hangover_ms})"
            )
        if self.snr_db < 0:
            problems.append(f"snr_db must be >= 0, got {self.snr_db}")
        if problems:
            raise ConfigError("invalid VAD config: " + "; ".join(problems))


@dataclass(frozen=True)
class SpeechStarted:
    """Speech begins at `sample` (pre-roll included): the first SpeechAudio starts here."""

    sample: int


@dataclass(frozen=True)
class SpeechAudio:
    """Gated audio, float32 16 kHz, covering [start_sample, start_sample + len(samples)).

    Within an utterance, each SpeechAudio starts where the previous one ended.
    """

    start_sample: int
    samples: np.ndarray


@dataclass(frozen=True)
class SpeechEnded:
    """The utterance's audio ends at `sample` (hangover included); voice last heard at
    `last_voiced_sample` (the end of the last voiced frame), which is where its words end."""

    sample: int
    last_voiced_sample: int


VadEvent = SpeechStarted | SpeechAudio | SpeechEnded


@dataclass(frozen=True)
class _Frame:
    start: int
    samples: np.ndarray
    voiced: bool
    loud: bool


class VadGate:
    """Feed 16 kHz mono float32 audio in any chunk sizes; get speech events back.

    Each sample from an utterance's pre-roll to the end of its hangover comes out in exactly one
    SpeechAudio, in order, between a SpeechStarted and a SpeechEnded. Audio that is not speech
    produces no events at all. Call `flush` at the end of the stream to close an utterance.
    """

    def __init__(self, config: VadConfig | None = None, sample_rate: int = SAMPLE_RATE) -> None:
        if sample_rate != SAMPLE_RATE:
            raise ConfigError(f"VadGate takes {SAMPLE_RATE} Hz audio only, got {sample_rate} Hz")
        self.config = config = config or VadConfig()
        self._vad = webrtcvad.Vad(config.aggressiveness)
        self._frame_len = SAMPLE_RATE * config.frame_ms // 1000
        self._preroll = SAMPLE_RATE * config.preroll_ms // 1000
        self._hangover = SAMPLE_RATE * config.hangover_ms // 1000
        self._confirm_hold = SAMPLE_RATE * config.confirm_hold_ms // 1000
        window_frames = config.start_window_ms // config.frame_ms
        # Outside speech: the start window, plus enough older frames to supply the pre-roll.
        self._recent: deque[_Frame] = deque(
            maxlen=window_frames + -(-self._preroll // self._frame_len)
        )
        self._window_frames = window_frames
        self._background_alpha = config.frame_ms / _BACKGROUND_TAU_MS
        self._background_dbfs: float | None = None  # None until the first frame
        self._pending = np.zeros(0, dtype=np.float32)  # a partial frame, waiting for more
        self._seen = 0
        self._grid = 0  # where the next frame starts; frames tile the stream from here
        self._in_speech = False
        self._emitted_until = 0  # end of the last utterance: pre-roll never reaches before it
        self._last_voiced_end = 0
        self._last_loud_end = 0

    @property
    def samples_seen(self) -> int:
        """Samples fed so far (audio time of the next sample fed)."""
        return self._seen

    @property
    def in_speech(self) -> bool:
        """True between a SpeechStarted and its SpeechEnded."""
        return self._in_speech

    def feed(self, samples: np.ndarray) -> list[VadEvent]:
        """Process `samples` (1-D float in [-1, 1]); return the events they complete, in order.

        A trailing partial frame is kept for the next call, so audio is emitted one frame late
        at most (plus the start window while speech is being confirmed).
        """
        samples = np.asarray(samples, dtype=np.float32)
        if samples.ndim != 1:
            raise ValueError(f"VadGate.feed takes mono 1-D samples, got shape {samples.shape}")
        self._seen += samples.size
        audio = np.concatenate([self._pending, samples]) if self._pending.size else samples
        n_frames = audio.size // self._frame_len
        frames = audio[: n_frames * self._frame_len].reshape(n_frames, self._frame_len)
        self._pending = audio[n_frames * self._frame_len :].copy()
        out = _EventBuilder()
        for index, level in enumerate(_frame_dbfs(frames)):
            self._step(self._classify(frames[index], float(level)), out)
        return out.events()

    def flush(self) -> list[VadEvent]:
        """End of stream: emit the rest of an open utterance and its SpeechEnded.

        Feeding more audio afterwards is allowed and starts detection afresh (as if after a
        pause), so this also serves to force the end of an utterance.
        """
        out = _EventBuilder()
        if self._in_speech:
            if self._pending.size:
                out.audio(self._grid, self._pending)
            self._end(self._seen, out)
        self._pending = np.zeros(0, dtype=np.float32)
        self._grid = self._seen
        self._recent.clear()
        return out.events()

    def _classify(self, samples: np.ndarray, level: float) -> _Frame:
        start = self._grid
        self._grid += samples.size
        voiced = level >= self.config.min_voiced_dbfs and self._vad.is_speech(
            _to_pcm16(samples), SAMPLE_RATE
        )
        background = level if self._background_dbfs is None else self._background_dbfs
        loud = (
            voiced
            and level >= self.config.min_peak_dbfs
            and (self._background_dbfs is None or level >= background + self.config.snr_db)
        )
        if not self._in_speech:
            # Background = what plays when nobody near is talking: noise, murmur. Tracked in dB
            # (a geometric mean), so a few loud frames of a speech onset barely move it.
            self._background_dbfs = background + self._background_alpha * (level - background)
        return _Frame(start, samples, voiced, loud)

    def _step(self, frame: _Frame, out: _EventBuilder) -> None:
        end = frame.start + frame.samples.size
        if self._in_speech:
            out.audio(frame.start, frame.samples)
            if frame.voiced:
                self._last_voiced_end = end
            if frame.loud:
                self._last_loud_end = end
            quiet_for = end - self._last_voiced_end
            unconfirmed_for = end - self._last_loud_end
            if (not frame.voiced and quiet_for >= self._hangover) or (
                not frame.loud and unconfirmed_for >= self._confirm_hold
            ):
                self._end(end, out)
            return
        self._recent.append(frame)
        window = list(self._recent)[-self._window_frames :]
        voiced = [f for f in window if f.voiced]
        if len(voiced) < self.config.start_frames or not any(f.loud for f in voiced):
            return
        retained = self._recent[0].start
        start = max(voiced[0].start - self._preroll, self._emitted_until, retained)
        out.start(start)
        for old in self._recent:
            if old.start + old.samples.size > start:
                out.audio(max(old.start, start), old.samples[max(start - old.start, 0) :])
        self._in_speech = True
        self._last_voiced_end = voiced[-1].start + voiced[-1].samples.size
        self._last_loud_end = max(f.start + f.samples.size for f in voiced if f.loud)
        self._recent.clear()

    def _end(self, at: int, out: _EventBuilder) -> None:
        out.end(SpeechEnded(at, self._last_voiced_end))
        self._in_speech = False
        self._emitted_until = at


class _EventBuilder:
    """Collects one feed's events, merging consecutive audio into one SpeechAudio."""

    def __init__(self) -> None:
        self._events: list[VadEvent] = []
        self._chunks: list[np.ndarray] = []
        self._chunks_start = 0

    def start(self, sample: int) -> None:
        self._close_audio()
        self._events.append(SpeechStarted(sample))

    def audio(self, start: int, samples: np.ndarray) -> None:
        self._chunks_start = start if not self._chunks else self._chunks_start
        self._chunks.append(samples)

    def end(self, event: SpeechEnded) -> None:
        self._close_audio()
        self._events.append(event)

    def events(self) -> list[VadEvent]:
        self._close_audio()
        return self._events

    def _close_audio(self) -> None:
        if self._chunks:
            samples = np.concatenate(self._chunks).astype(np.float32, copy=False)
            self._events.append(SpeechAudio(self._chunks_start, samples))
            self._chunks = []


def _frame_dbfs(frames: np.ndarray) -> np.ndarray:
    """RMS level of each row of `frames` in dBFS; digital silence gives _SILENT_DBFS."""
    mean_square = np.mean(np.square(frames, dtype=np.float64), axis=1)
    floor = 10.0 ** (_SILENT_DBFS / 10.0)
    return 10.0 * np.log10(np.maximum(mean_square, floor))


def _to_pcm16(samples: np.ndarray) -> bytes:
    """webrtcvad's input format: 16-bit little-endian PCM (clipped, not wrapped)."""
    return (
        np.clip(np.round(samples * _INT16_MAX), -_INT16_MAX - 1, _INT16_MAX).astype("<i2").tobytes()
    )
