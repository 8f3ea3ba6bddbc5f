"""Streaming policy settings (units in the names)."""

from __future__ import annotations

from dataclasses import dataclass, field

from streamd.streaming.guards import GuardConfig
from streamd.vad import VadConfig

MAX_WINDOW_S = 30.0  # Whisper's receptive field


@dataclass(frozen=True)
class SessionConfig:
    """How a session cuts speech into windows and when it commits words.

    step_ms: decode again after this much new speech (audio time; under load, steps grow).
    min_window_ms: no decode before an utterance has this much audio.
    unstable_tail_ms: words ending this close to the window's end are never committed early.
    trim_after_s: once the window holds this much committed audio, cut it off (it moves to the
        prompt), so windows overlap only by the uncommitted tail.
    force_commit_s: a window this long commits what it has without waiting for agreement.
    prompt_tokens: committed tokens kept as `<|startofprev|>` context.
    idle_finalize_ms: wall time without audio, mid-utterance, after which it is finalized
        (a client that stops sending without `end`).
    context_gap_s: an utterance after a longer pause starts a fresh window (earlier speech
        stays in the text prompt only).
    min_commit_probability: agreement commits no word the model gives less than this; it waits
        for the utterance's final.
    hold_uncertain_ms: at an utterance's final, trailing words under `min_commit_probability`
        wait this much more audio for the talker to go on (a pause inside a word: "聞き取れ|
        ている"); if speech resumes they are decoded again with it, else committed as they are.
    probe_pauses: decode one step (the probe) 0.25 s into each pause of the talker (no voiced
        frame), whose words are the final if the VAD then ends the utterance, so the final is
        ready when the hangover runs out; and start no partial step in a pause that would still
        be decoding when the probe, or the final, is due (judged by the last step's wall time).
        False: steps every `step_ms` regardless, the final decoded after the hangover.
    cancel_steps: a partial step still being decoded when the probe or the final becomes due
        is `Session.superseded`: a driver whose engine can stop it does, and decodes the probe
        or final at once instead of after it (docs/streaming.md, "Cancelling a step").
    """

    vad: VadConfig = field(default_factory=VadConfig)
    guards: GuardConfig = field(default_factory=GuardConfig)
    step_ms: int = 500
    min_window_ms: int = 300
    unstable_tail_ms: int = 500
    trim_after_s: float = 10.0
    force_commit_s: float = 25.0
    prompt_tokens: int = 200
    idle_finalize_ms: int = 2000
    context_gap_s: float = 30.0
    min_commit_probability: float = 0.7
    hold_uncertain_ms: int = 500
    probe_pauses: bool = True
    cancel_steps: bool = True

    def __post_init__(self) -> None:
        from streamd.errors import ConfigError

        if not 0 < self.force_commit_s <= MAX_WINDOW_S - 1:
            raise ConfigError(f"force_commit_s must be in (0, {MAX_WINDOW_S - 1}]")
        if (
            self.step_ms <= 0
            or min(self.min_window_ms, self.unstable_tail_ms, self.hold_uncertain_ms) < 0
        ):
            raise ConfigError(
                "step_ms must be positive; min_window_ms, unstable_tail_ms, hold_uncertain_ms >= 0"
            )
        if not 0 < self.trim_after_s <= self.force_commit_s:
            raise ConfigError("trim_after_s must be in (0, force_commit_s]")
