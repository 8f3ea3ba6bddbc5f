"""VAD gate: passes speech (with pre-roll and hangover) and nothing else, so Whisper never sees
silence, noise or background murmur, where it hallucinates.

Sans-I/O: `VadGate` is a pure function of the samples fed to it (no clocks, threads or I/O), and
its events are the same whatever the chunk sizes. Audio time is the sample index since the first
sample fed (16 kHz), exact and integer. Two stages decide what is speech; docs/vad.md has the
measurements behind the defaults.

1. Voiced frames: webrtcvad says speech, and the frame stands `snr_db` above the noise floor
   (the quietest frame of the last 1.5 s). webrtcvad alone fires on loud steady noise.
2. Foreground: webrtcvad (like silero-vad) also calls babble speech, because it is. Speech starts
   only when the start window holds a voiced frame that is loud, or bright (energy in 2-4 kHz):
   talkers in the next room are neither, since walls and distance take the highs, while a near
   talker's consonants and upper formants are bright even at low microphone gain. An utterance
   ends after `hangover_ms` without a voiced frame, or `confirm_hold_ms` without a foreground one,
   so murmur after the talker stops is cut off instead of passed on for as long as it lasts.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import webrtcvad

from streamd.errors import AudioError, ConfigError

SAMPLE_RATE = 16_000  # webrtcvad also takes 8/32/48 kHz, but the pipeline resamples to 16 kHz first
FRAME_MS_CHOICES = (10, 20, 30)  # the only frame lengths webrtcvad accepts
_SILENT_DBFS = -100.0  # level given to digital silence, so arithmetic on levels stays finite
# The noise floor is the quietest frame of the last this-many ms (minimum statistics): long
# enough to span the pauses between words, short enough to follow a fan that starts.
_NOISE_FLOOR_WINDOW_MS = 1_500
_INT16_MAX = 32_767
# level_offset_db range: beyond -30 dB a "quiet microphone" is noise at normal gain
LEVEL_OFFSET_DB = (-30.0, 20.0)


@dataclass(frozen=True)
class VadConfig:
    """How the gate decides what is speech. Times in ms, levels in dBFS (RMS, 0 = full scale)."""

    frame_ms: int = 30  # 10, 20 or 30: webrtcvad's frame lengths
    aggressiveness: int = 3  # webrtcvad's mode, 0 (most speech kept) .. 3 (fewest false alarms)
    # Speech starts when `start_frames` of the frames in the last `start_window_ms` are voiced and
    # one of them is foreground: a lone voiced frame (a click, a cough) starts nothing.
    start_frames: int = 3
    start_window_ms: int = 300
    preroll_ms: int = 300  # audio kept before the first voiced frame, so onsets are not clipped
    hangover_ms: int = (
        600  # audio kept after the last voiced frame; speech resuming in it continues
    )
    # Stage 1, besides webrtcvad: a voiced frame is at least min_voiced_dbfs, and snr_db above
    # the noise floor (so that steady noise, which webrtcvad calls speech when loud, is not).
    min_voiced_dbfs: float = -55.0
    snr_db: float = 10.0
    # Stage 2: a voiced frame is foreground when it is at least min_foreground_dbfs and either
    # loud (loud_dbfs) or bright: the voiced frames of the start window carry energy in 2-4 kHz
    # at least min_presence_db relative to 0.1-1 kHz. Speech needs a foreground frame to start,
    # and ends when none has come for confirm_hold_ms.
    min_foreground_dbfs: float = -45.0
    loud_dbfs: float = -23.0
    min_presence_db: float = -15.0
    confirm_hold_ms: int = 1_000
    # The input's level against a close microphone at normal gain, in dB: added to the three
    # absolute levels above (min_voiced_dbfs, min_foreground_dbfs, loud_dbfs). A microphone 6 dB
    # quieter needs -6. Set by hand: following the talker's level automatically lets murmur in
    # next to a quiet talker (docs/vad.md, "Input level").
    level_offset_db: float = 0.0

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
        if not LEVEL_OFFSET_DB[0] <= self.level_offset_db <= LEVEL_OFFSET_DB[1]:
            problems.append(
                f"level_offset_db must be in [{LEVEL_OFFSET_DB[0]:g}, {LEVEL_OFFSET_DB[1]:g}], "
                f"got {self.level_offset_db:g}"
            )
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
    `last_voiced_sample`: where voice was last heard (the end of the last voiced frame) up to
    the end of this audio, so a listener can tell a pause while the hangover still runs (-1
    from a gate that does not say).
    """

    start_sample: int
    samples: np.ndarray
    last_voiced_sample: int = -1


@dataclass(frozen=True)
class SpeechEnded:
    """The utterance's audio ends at `sample` (hangover included); voice last heard at
    `last_voiced_sample` (the end of the last voiced frame), which is where its words end, and
    last confirmed as foreground speech at `last_foreground_sample` (no later than that).
    `level_dbfs`: how loud the talker reached the microphone, the 90th percentile of the RMS
    levels of the utterance's voiced frames (None from a gate that does not measure it)."""

    sample: int
    last_voiced_sample: int
    last_foreground_sample: int = -1
    level_dbfs: float | None = None


VadEvent = SpeechStarted | SpeechAudio | SpeechEnded


@dataclass(frozen=True)
class _Frame:
    start: int
    samples: np.ndarray
    level: float  # dBFS
    voiced: bool
    foreground: bool

    @property
    def end(self) -> int:
        return self.start + self.samples.size


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
        offset = config.level_offset_db
        self._min_voiced_dbfs = config.min_voiced_dbfs + offset
        self._min_foreground_dbfs = config.min_foreground_dbfs + offset
        self._loud_dbfs = config.loud_dbfs + offset
        self._window_frames = config.start_window_ms // config.frame_ms
        # Outside speech: the start window, plus enough older frames to supply the pre-roll.
        preroll_frames = -(-self._preroll // self._frame_len)
        self._recent: deque[_Frame] = deque(maxlen=self._window_frames + preroll_frames)
        # Band energies (2-4 kHz, 0.1-1 kHz) of the voiced frames in the start window.
        self._bands: deque[tuple[float, float]] = deque(maxlen=self._window_frames)
        # (frame number, level) of the frames that can still be the window's minimum, ascending
        self._floor: deque[tuple[int, float]] = deque()
        self._floor_frames = max(_NOISE_FLOOR_WINDOW_MS // config.frame_ms, 1)
        self._frame_number = 0
        self._pending = np.zeros(0, dtype=np.float32)  # a partial frame, waiting for more
        self._seen = 0
        self._grid = 0  # where the next frame starts; frames tile the stream from here
        self._in_speech = False
        self._emitted_until = 0  # end of the last utterance: pre-roll never reaches before it
        self._last_voiced_end = 0
        self._last_foreground_end = 0
        self._voiced_levels: list[float] = []  # of the open utterance's voiced frames

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

        Raises AudioError (a client error) for NaN or infinite samples.

        A trailing partial frame is kept for the next call. In speech, audio comes out one frame
        late at most; at a speech start, the pre-roll and start window come out at once.
        """
        samples = np.array(samples, dtype=np.float32)  # a copy: events outlive the caller's buffer
        if samples.ndim != 1:
            raise ValueError(f"VadGate.feed takes mono 1-D samples, got shape {samples.shape}")
        if not np.isfinite(samples).all():
            raise AudioError("audio contains NaN or infinite samples")
        self._seen += samples.size
        audio = np.concatenate([self._pending, samples]) if self._pending.size else samples
        n_frames = audio.size // self._frame_len
        frames = audio[: n_frames * self._frame_len].reshape(n_frames, self._frame_len)
        self._pending = audio[n_frames * self._frame_len :].copy()
        out = _EventBuilder()
        if n_frames:
            levels = _frame_dbfs(frames)
            high, low = _band_energies(frames)
            for i in range(n_frames):
                frame = self._classify(frames[i], float(levels[i]), float(high[i]), float(low[i]))
                self._step(frame, out)
        return out.events()

    def flush(self) -> list[VadEvent]:
        """End of stream: emit the rest of an open utterance and its SpeechEnded.

        Feeding more audio afterwards is allowed and starts detection afresh (as after a pause),
        so this also serves to force the end of an utterance.
        """
        out = _EventBuilder()
        if self._in_speech:
            if self._pending.size:
                out.audio(self._grid, self._pending, self._last_voiced_end)
            self._end(self._seen, out)
        self._pending = np.zeros(0, dtype=np.float32)
        self._grid = self._seen
        self._recent.clear()
        self._bands.clear()
        return out.events()

    def _classify(self, samples: np.ndarray, level: float, high: float, low: float) -> _Frame:
        config = self.config
        start = self._grid
        self._grid += samples.size
        floor = self._noise_floor_dbfs(level)
        voiced = level >= max(self._min_voiced_dbfs, floor + config.snr_db) and self._vad.is_speech(
            _to_pcm16(samples), SAMPLE_RATE
        )
        self._bands.append((high, low) if voiced else (0.0, 0.0))
        foreground = voiced and level >= self._min_foreground_dbfs
        if foreground and level < self._loud_dbfs:
            high_sum = sum(band[0] for band in self._bands)
            low_sum = sum(band[1] for band in self._bands)
            foreground = high_sum >= low_sum * 10.0 ** (config.min_presence_db / 10.0)
        return _Frame(start, samples, level, voiced, foreground)

    def _noise_floor_dbfs(self, level: float) -> float:
        """Add this frame's level to the window and return the window's minimum."""
        number = self._frame_number
        self._frame_number += 1
        while self._floor and self._floor[-1][1] >= level:
            self._floor.pop()
        self._floor.append((number, level))
        while self._floor[0][0] <= number - self._floor_frames:
            self._floor.popleft()
        return self._floor[0][1]

    def _step(self, frame: _Frame, out: _EventBuilder) -> None:
        if self._in_speech:
            if frame.voiced:
                self._last_voiced_end = frame.end
                self._voiced_levels.append(frame.level)
            if frame.foreground:
                self._last_foreground_end = frame.end
            out.audio(frame.start, frame.samples, self._last_voiced_end)
            quiet_for = frame.end - self._last_voiced_end
            unconfirmed_for = frame.end - self._last_foreground_end
            if (not frame.voiced and quiet_for >= self._hangover) or (
                not frame.foreground and unconfirmed_for >= self._confirm_hold
            ):
                self._end(frame.end, out)
            return
        self._recent.append(frame)
        window = list(self._recent)[-self._window_frames :]
        voiced = [f for f in window if f.voiced]
        if len(voiced) < self.config.start_frames or not any(f.foreground for f in voiced):
            return
        # Voice began at the window's first voiced frame; the pre-roll reaches back from there
        # (never into the previous utterance, whose audio is already out).
        start = max(voiced[0].start - self._preroll, self._emitted_until, self._recent[0].start)
        self._in_speech = True
        self._voiced_levels = [f.level for f in voiced]
        self._last_voiced_end = voiced[-1].end
        self._last_foreground_end = max(f.end for f in voiced if f.foreground)
        out.start(start)
        for old in self._recent:
            if old.end > start:
                out.audio(
                    max(old.start, start),
                    old.samples[max(start - old.start, 0) :],
                    self._last_voiced_end,
                )
        self._recent.clear()

    def _end(self, at: int, out: _EventBuilder) -> None:
        level = round(float(np.percentile(self._voiced_levels, 90)), 1)
        out.end(SpeechEnded(at, self._last_voiced_end, self._last_foreground_end, level))
        self._in_speech = False
        self._emitted_until = at


class _EventBuilder:
    """Collects one feed's events, merging consecutive audio into one SpeechAudio."""

    def __init__(self) -> None:
        self._events: list[VadEvent] = []
        self._chunks: list[np.ndarray] = []
        self._chunks_start = 0
        self._voiced = -1

    def start(self, sample: int) -> None:
        self._close_audio()
        self._events.append(SpeechStarted(sample))

    def audio(self, start: int, samples: np.ndarray, last_voiced: int) -> None:
        self._chunks_start = start if not self._chunks else self._chunks_start
        self._chunks.append(samples)
        self._voiced = last_voiced

    def end(self, event: SpeechEnded) -> None:
        self._close_audio()
        self._events.append(event)

    def events(self) -> list[VadEvent]:
        self._close_audio()
        return self._events

    def _close_audio(self) -> None:
        if self._chunks:
            samples = np.concatenate(self._chunks).astype(np.float32, copy=False)
            self._events.append(SpeechAudio(self._chunks_start, samples, self._voiced))
            self._chunks = []


def _frame_dbfs(frames: np.ndarray) -> np.ndarray:
    """RMS level of each row of `frames` in dBFS; digital silence gives _SILENT_DBFS."""
    mean_square = np.mean(np.square(frames, dtype=np.float64), axis=1)
    floor = 10.0 ** (_SILENT_DBFS / 10.0)
    return 10.0 * np.log10(np.maximum(mean_square, floor))


def _band_energies(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Energy of each row of `frames` in 2-4 kHz and in 0.1-1 kHz (Hann-windowed spectrum).

    2-4 kHz, not higher: telephone-band speech (8 kHz sampled, as in many recordings) stops at
    about 3.4 kHz and must still count as bright.
    """
    n_fft = 1 << (frames.shape[1] - 1).bit_length()
    window = np.hanning(frames.shape[1])
    power = np.abs(np.fft.rfft(frames * window, n=n_fft, axis=1)) ** 2
    freqs_hz = np.fft.rfftfreq(n_fft, d=1.0 / SAMPLE_RATE)
    high = power[:, (freqs_hz >= 2_000) & (freqs_hz < 4_000)].sum(axis=1)
    low = power[:, (freqs_hz >= 100) & (freqs_hz < 1_000)].sum(axis=1)
    return high, low


def _to_pcm16(samples: np.ndarray) -> bytes:
    """webrtcvad's input format: 16-bit little-endian PCM (clipped, not wrapped)."""
    scaled = np.clip(np.round(samples * _INT16_MAX), -_INT16_MAX - 1, _INT16_MAX)
    return scaled.astype("<i2").tobytes()
