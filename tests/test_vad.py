"""VadGate: non-speech never produces events, real speech is passed whole, sample accounting is
exact whatever the chunking. Audio: synthetic silence/noise/murmur and the real shared clips."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pytest

from streamd.errors import AudioError, ConfigError
from streamd.vad import SpeechAudio, SpeechEnded, SpeechStarted, VadConfig, VadEvent, VadGate
from tests import synth

SR = 16_000
DEFAULT = VadConfig()
PREROLL = SR * DEFAULT.preroll_ms // 1000
HANGOVER = SR * DEFAULT.hangover_ms // 1000
START_WINDOW = SR * DEFAULT.start_window_ms // 1000
CONFIRM_HOLD = SR * DEFAULT.confirm_hold_ms // 1000
FRAME = SR * DEFAULT.frame_ms // 1000
CLIPS = [entry["file"] for entry in synth.manifest()]


@dataclass(frozen=True)
class Utt:
    start: int
    end: int
    last_voiced: int
    audio: np.ndarray


def feed_chunked(
    gate: VadGate, audio: np.ndarray, rng: np.random.Generator, low: int, high: int
) -> list[VadEvent]:
    """Feed `audio` in chunks of `low`..`high` samples (inclusive), then flush."""
    events: list[VadEvent] = []
    at = 0
    while at < audio.size:
        size = int(rng.integers(low, high + 1))
        events += gate.feed(audio[at : at + size])
        at += size
    assert gate.samples_seen == audio.size
    return events + gate.flush()


def realtime_chunks(gate: VadGate, audio: np.ndarray, seed: int = 0) -> list[VadEvent]:
    """Feed as a live source would: 20-100 ms chunks."""
    return feed_chunked(gate, audio, np.random.default_rng(seed), SR * 20 // 1000, SR // 10)


def utterances(events: list[VadEvent], audio: np.ndarray) -> list[Utt]:
    """Check the event grammar (Started, Audio+, Ended)* and that every emitted sample is the
    input's sample at that index, each once, in order; return the utterances."""
    utts: list[Utt] = []
    open_at: int | None = None
    chunks: list[np.ndarray] = []
    cursor = 0  # where the next SpeechAudio must start
    for event in events:
        match event:
            case SpeechStarted(sample=sample):
                assert open_at is None, "SpeechStarted inside an utterance"
                assert sample >= (utts[-1].end if utts else 0), "utterances overlap"
                open_at, cursor, chunks = sample, sample, []
            case SpeechAudio(start_sample=start, samples=samples):
                assert open_at is not None, "SpeechAudio outside an utterance"
                assert start == cursor, f"gap or overlap at sample {cursor}: audio at {start}"
                assert samples.dtype == np.float32 and samples.size > 0
                np.testing.assert_array_equal(samples, audio[start : start + samples.size])
                chunks.append(samples)
                cursor = start + samples.size
            case SpeechEnded(sample=sample, last_voiced_sample=last_voiced):
                assert open_at is not None, "SpeechEnded outside an utterance"
                assert sample == cursor, "SpeechEnded is not where the audio ends"
                assert open_at < last_voiced <= sample
                utts.append(Utt(open_at, sample, last_voiced, np.concatenate(chunks)))
                open_at = None
    assert open_at is None, "flush left an utterance open"
    return utts


def summary(utts: list[Utt]) -> list[tuple[int, int, int]]:
    return [(u.start, u.end, u.last_voiced) for u in utts]


def coverage(utts: list[Utt], size: int) -> np.ndarray:
    covered = np.zeros(size, dtype=bool)
    for u in utts:
        covered[u.start : u.end] = True
    return covered


def padded_clip(file: str, pad_s: float = 1.0) -> tuple[np.ndarray, int]:
    """A real clip between `pad_s` of digital silence, so the clip's own edges cut neither the
    pre-roll nor the hangover; returns (audio, sample where the clip begins)."""
    pad = synth.silence(pad_s)
    return np.concatenate([pad, synth.clip(file), pad]), pad.size


def ten_minutes_of_noise(seed: int = 0) -> np.ndarray:
    """Silence, -50 dBFS white and pink noise in blocks of 5-30 s, 10 minutes in all."""
    rng = np.random.default_rng(seed)
    kinds: tuple[synth.GapKind, ...] = ("silence", "white", "pink")
    blocks: list[np.ndarray] = []
    total = 0
    while total < 600 * SR:
        kind = kinds[len(blocks) % len(kinds)]
        blocks.append(synth.gap_audio(kind, float(rng.uniform(5.0, 30.0)), seed=len(blocks)))
        total += blocks[-1].size
    return np.concatenate(blocks)[: 600 * SR]


def test_ten_minutes_of_silence_and_noise_give_no_events() -> None:
    audio = ten_minutes_of_noise()
    gate = VadGate()
    assert realtime_chunks(gate, audio) == []
    assert gate.samples_seen == 600 * SR


@pytest.mark.parametrize(("seconds", "voices", "seed"), [(300, 4, 0), (120, 6, 1), (120, 3, 2)])
def test_murmur_alone_gives_no_events(seconds: float, voices: int, seed: int) -> None:
    audio = synth.murmur(seconds, dbfs=synth.MURMUR_DBFS, voices=voices, seed=seed)
    assert realtime_chunks(VadGate(), audio, seed) == []


@pytest.mark.parametrize("file", CLIPS)
def test_real_clip_is_passed_whole(file: str) -> None:
    audio, offset = padded_clip(file)
    clip = synth.clip(file)
    utts = utterances(realtime_chunks(VadGate(), audio), audio)
    duration_s = clip.size / SR
    assert 1 <= len(utts) <= 1 + duration_s / 2, "speech chopped into too many utterances"

    reference = synth.voiced_mask(clip)  # 10 ms frames
    covered = coverage(utts, audio.size)[offset : offset + reference.size * 160]
    frame_covered = np.asarray(covered.reshape(-1, 160).all(axis=1))
    # ja_1 is the worst (0.95): a 90 ms click before the first word and two quiet syllable
    # tails are below webrtcvad's mode 3 (docs/vad.md).
    assert frame_covered[reference].mean() >= 0.94

    # Pre-roll: speech starts 0.3 s before the first voiced frame, which may come up to a start
    # window before the reference's first 100 ms of continuous voice.
    runs = np.convolve(reference.astype(int), np.ones(10, dtype=int), mode="valid")
    first_voice = offset + int(np.flatnonzero(runs == 10)[0]) * 160
    lead = first_voice - utts[0].start
    assert 0.25 * SR <= lead <= PREROLL + START_WINDOW, f"lead {lead / SR:.2f} s"
    # Hangover: the end is one hangover after the last voiced frame, and nothing the reference
    # calls voice is cut (the reference's last frames may be a quiet tail the hangover covers).
    last_voice = offset + (int(np.flatnonzero(reference)[-1]) + 1) * 160
    assert utts[-1].last_voiced <= last_voice + SR // 10
    assert last_voice <= utts[-1].end <= utts[-1].last_voiced + HANGOVER


def test_speech_audio_says_where_voice_was_last_heard() -> None:
    # what the session times its probe from (a pause while the hangover still runs)
    audio, _ = padded_clip("en/librispeech_mister_quilter.flac")
    events = realtime_chunks(VadGate(), audio)
    utts = utterances(events, audio)
    voiced = [
        (e.start_sample + e.samples.size, e.last_voiced_sample)
        for e in events
        if isinstance(e, SpeechAudio)
    ]
    assert all(0 < last <= end for end, last in voiced)
    assert [last for _, last in voiced] == sorted(last for _, last in voiced)
    # during the final hangover voice is no longer heard: the last audio says where it stopped
    assert voiced[-1] == (utts[-1].end, utts[-1].last_voiced)
    assert utts[-1].end - voiced[-1][1] == HANGOVER


def test_hangover_joins_short_pauses_and_splits_long_ones() -> None:
    clip = synth.clip("en/librispeech_mister_quilter.flac")
    voiced = np.flatnonzero(synth.voiced_mask(clip))
    words = clip[voiced[0] * 160 : (voiced[-1] + 1) * 160]  # trimmed to the voice
    lead = synth.silence(1.0)

    def run(pause_s: float) -> list[Utt]:
        audio = np.concatenate([lead, words, synth.silence(pause_s), words, lead])
        return utterances(realtime_chunks(VadGate(), audio), audio)

    joined = run(0.4)  # shorter than the 600 ms hangover: the same utterance
    assert len(joined) == 1
    assert joined[0].end - joined[0].start >= 2 * words.size
    apart = run(1.5)  # longer: two utterances, the second with its own pre-roll
    assert len(apart) == 2
    assert apart[0].end == apart[0].last_voiced + HANGOVER
    assert apart[1].start < lead.size + words.size + round(1.5 * SR)


def test_sample_accounting_does_not_depend_on_chunking() -> None:
    """Property: for any chunking (empty chunks and single samples included), the events
    describe the same utterances, and their audio is the input's, every sample once, in order."""
    audio, _, _ = synth.build_stream(
        ["en/librispeech_a_man_said.flac", "en/jfk.flac"], ["murmur", "white", "silence"], seed=3
    )
    whole = VadGate()
    expected = summary(utterances(whole.feed(audio) + whole.flush(), audio))
    assert len(expected) >= 2
    for seed in range(12):
        rng = np.random.default_rng(seed)
        high = int(rng.choice([37, 480, 481, 2_000, 8_000]))
        events = feed_chunked(VadGate(), audio, rng, 0, high)
        assert summary(utterances(events, audio)) == expected, f"seed {seed}, chunks <= {high}"
    # One sample per call is slow in Python: the first 6 s (cut mid-utterance) only.
    head = audio[: 6 * SR]
    one_by_one = summary(utterances(feed_chunked(VadGate(), head, rng, 1, 1), head))
    whole = VadGate()
    assert one_by_one == summary(utterances(whole.feed(head) + whole.flush(), head))
    assert one_by_one[0][0] == expected[0][0]


def test_no_utterance_starts_in_a_gap_and_gaps_leak_only_next_to_speech() -> None:
    """Between real clips, silence, noise and murmur gaps pass audio only as the hangover after
    a clip (cut by confirm_hold_ms when murmur keeps webrtcvad busy) or as pre-roll before one."""
    kinds: list[synth.GapKind] = ["murmur", "white", "murmur", "pink", "silence", "murmur"]
    clips = CLIPS[:5]
    audio, refs, gaps = synth.build_stream(clips, kinds, seed=1)
    utts = utterances(realtime_chunks(VadGate(), audio, seed=1), audio)
    clip_spans = [(round(r.start_s * SR), round(r.end_s * SR)) for r in refs]
    for u in utts:
        voice = u.start + PREROLL  # where voice was first heard, unless the pre-roll was cut
        assert any(a - START_WINDOW <= voice < b for a, b in clip_spans) or any(
            u.start == other.end for other in utts
        ), f"utterance at {u.start / SR:.2f} s starts in a gap"
    covered = coverage(utts, audio.size)
    for gap in gaps:
        a, b = round(gap.start_s * SR), round(gap.end_s * SR)
        allowed = np.zeros(b - a, dtype=bool)
        allowed[: CONFIRM_HOLD + FRAME if a > 0 else 0] = True  # after a clip
        if b < audio.size:
            allowed[max(0, b - a - PREROLL - START_WINDOW) :] = True  # before a clip
        leaked = covered[a:b] & ~allowed
        assert not leaked.any(), f"{gap.kind} gap at {gap.start_s:.2f} s passed {leaked.sum()}"


def test_flush_closes_an_open_utterance_and_feeding_may_go_on() -> None:
    clip = synth.clip("en/librispeech_a_man_said.flac")
    cut = clip[: 2 * SR + 123]  # ends mid-word, mid-frame
    audio = np.concatenate([synth.silence(1.0), cut])
    gate = VadGate()
    events = gate.feed(audio)
    assert gate.in_speech
    tail = gate.flush()
    assert isinstance(tail[-1], SpeechEnded) and tail[-1].sample == audio.size
    (utt,) = utterances(events + tail, audio)
    assert utt.end == audio.size
    assert not gate.in_speech
    assert gate.flush() == []  # nothing open: nothing to say
    more = gate.feed(synth.silence(2.0)) + gate.flush()
    assert more == [] and gate.samples_seen == audio.size + 2 * SR


def test_idle_flush_drops_a_partial_frame_silently() -> None:
    gate = VadGate()
    assert gate.feed(synth.white_noise(1.0)[:161]) == []  # a third of a frame
    assert gate.flush() == []
    assert gate.samples_seen == 161


@pytest.mark.parametrize(
    "changes",
    [
        {"frame_ms": 25},
        {"aggressiveness": 4},
        {"aggressiveness": -1},
        {"start_frames": 0},
        {"start_frames": 11},  # more than the 10 frames of a 300 ms window
        {"start_window_ms": 20},
        {"preroll_ms": -1},
        {"hangover_ms": -30},
        {"confirm_hold_ms": 500},  # shorter than the hangover
        {"snr_db": -3.0},
        {"level_offset_db": -31.0},
        {"level_offset_db": 21.0},
    ],
)
def test_invalid_config_raises_config_error(changes: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="invalid VAD config"):
        replace(DEFAULT, **changes)  # type: ignore[arg-type]


def test_only_16khz_input_is_accepted() -> None:
    with pytest.raises(ConfigError, match="16000 Hz"):
        VadGate(sample_rate=8_000)


def test_bad_samples_are_refused() -> None:
    gate = VadGate()
    with pytest.raises(AudioError, match="NaN"):
        gate.feed(np.array([0.0, np.nan], dtype=np.float32))
    with pytest.raises(ValueError, match="mono"):
        gate.feed(np.zeros((2, 480), dtype=np.float32))


@pytest.mark.parametrize("frame_ms", [10, 20])
def test_shorter_frames_also_gate_murmur_and_pass_speech(frame_ms: int) -> None:
    config = VadConfig(frame_ms=frame_ms)
    assert realtime_chunks(VadGate(config), synth.murmur(60, seed=4)) == []
    file = "en/librispeech_1089-134686-0001.wav"
    audio, offset = padded_clip(file)
    (utt,) = utterances(realtime_chunks(VadGate(config), audio), audio)
    first_voice = offset + int(np.flatnonzero(synth.voiced_mask(synth.clip(file)))[0]) * 160
    assert first_voice - PREROLL - START_WINDOW <= utt.start <= first_voice - PREROLL // 2


def voiced_coverage(file: str, gain: float, config: VadConfig) -> float:
    """Share of the clip's voiced 10 ms frames (the reference) passed, the clip scaled by
    `gain` (a microphone that much quieter)."""
    audio, offset = padded_clip(file)
    audio = (audio * gain).astype(np.float32)
    reference = synth.voiced_mask(synth.clip(file))
    utts = utterances(realtime_chunks(VadGate(config), audio), audio)
    covered = coverage(utts, audio.size)[offset : offset + reference.size * 160]
    frame_covered = np.asarray(covered.reshape(-1, 160).all(axis=1))
    return float(frame_covered[reference].mean())


def test_a_quiet_microphone_is_heard_whole_with_its_level_offset() -> None:
    """The Harvard clip is telephone speech, loud but dull: at 6 dB less gain its quieter
    sentences are neither loud nor bright, and are lost. Saying the input is 6 dB down moves
    every level threshold with it, and murmur at that lower gain still stays out."""
    file = "en/osr_harvard_list72_8khz.wav"
    quiet = VadConfig(level_offset_db=-6.0)
    assert voiced_coverage(file, 1.0, DEFAULT) == 1.0
    assert voiced_coverage(file, 0.5, DEFAULT) < 0.9  # 0.872 measured
    assert voiced_coverage(file, 0.5, quiet) == 1.0
    murmur = synth.murmur(120, dbfs=synth.MURMUR_DBFS - 6.0, seed=5)
    assert realtime_chunks(VadGate(quiet), murmur) == []


def test_speech_ended_says_how_loud_the_talker_was() -> None:
    """With the offset that matches the gain, the gate cuts the same utterances at 6 dB less,
    and reports each 6 dB quieter (the level of its voiced frames; webrtcvad, not quite
    level-free, can make a frame or two more or less voiced)."""
    audio, _ = padded_clip("en/osr_harvard_list72_8khz.wav")

    def ends(gain: float, config: VadConfig) -> list[SpeechEnded]:
        scaled = (audio * gain).astype(np.float32)
        return [e for e in realtime_chunks(VadGate(config), scaled) if isinstance(e, SpeechEnded)]

    full = ends(1.0, DEFAULT)
    quiet = ends(0.5, VadConfig(level_offset_db=-6.0))
    assert [e.sample for e in quiet] == [e.sample for e in full]
    differences = []
    for loud, soft in zip(full, quiet, strict=True):
        assert loud.level_dbfs is not None and soft.level_dbfs is not None
        differences.append(loud.level_dbfs - soft.level_dbfs)
    assert all(5.0 <= d <= 7.0 for d in differences), differences
    assert float(np.median(differences)) == pytest.approx(6.0, abs=0.15)
    assert all(-26.0 <= e.level_dbfs <= -15.0 for e in full if e.level_dbfs is not None)
