"""Prometheus metrics of one daemon (`GET /metrics`), on a registry of its own.

Names follow Prometheus conventions (base units, `_total` counters). What to watch:
- streamd_finalization_latency_seconds: a final's last word end -> the final sent (DESIGN.md §7);
- streamd_scheduler_behind_seconds / streamd_overloaded_steps_total: the engine falls behind
  real time (sessions then take fewer, larger steps);
- streamd_guard_dropped_words_total{guard}: the hallucination guards at work.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from streamd.server.scheduler import BatchReport

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS_S = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 10.0)
_LEVEL_BUCKETS_DBFS = (-50.0, -40.0, -35.0, -30.0, -26.0, -22.0, -18.0, -14.0, -10.0, -6.0)
_STEP_BUCKETS_S = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.active_sessions = Gauge("streamd_active_sessions", "Live sessions", registry=r)
        self.sessions = Counter("streamd_sessions", "Sessions started", registry=r)
        self.audio_in = Counter(
            "streamd_audio_in_seconds", "Audio received from clients (s)", registry=r
        )
        self.batch_size = Histogram(
            "streamd_decode_batch_size",
            "Windows per engine call",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.step_seconds = Histogram(
            "streamd_decode_step_seconds",
            "Engine time per call (s)",
            buckets=_STEP_BUCKETS_S,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "streamd_decode_queue_seconds",
            "Wait before the engine took a request (s)",
            buckets=_STEP_BUCKETS_S,
            registry=r,
        )
        self.finalization_latency = Histogram(
            "streamd_finalization_latency_seconds",
            "Last word's end in the audio -> its final sent (wall s)",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.first_partial_latency = Histogram(
            "streamd_first_partial_latency_seconds",
            "Speech start -> the utterance's first partial or final (wall s)",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.speech_level = Histogram(
            "streamd_speech_level_dbfs",
            "How loud talkers reach the microphone: each utterance's speech_ended level_dbfs "
            "(below about -26, dull speech is lost unless vad.level_offset_db says so)",
            buckets=_LEVEL_BUCKETS_DBFS,
            registry=r,
        )
        self.behind = Gauge(
            "streamd_scheduler_behind_seconds", "Age of the oldest waiting request (s)", registry=r
        )
        self.overloaded_steps = Counter(
            "streamd_overloaded_steps",
            "Steps whose result came later than overload_s after their audio",
            registry=r,
        )
        self.busy_batches = Counter(
            "streamd_busy_batches",
            "Engine calls made while contended (smaller encoder contexts)",
            registry=r,
        )
        self.engine_busy = Counter("streamd_engine_busy_seconds", "Engine time (s)", registry=r)
        self.forward_passes = Counter(
            "streamd_decoder_forward_passes", "Decoder forward passes", registry=r
        )
        self.guard_dropped = Counter(
            "streamd_guard_dropped_words", "Words dropped by a guard", ["guard"], registry=r
        )
        self.context_resets = Counter(
            "streamd_context_resets",
            "Decoding contexts dropped: the decoder looped on them or wrote nothing after them",
            registry=r,
        )
        self.probes = Counter(
            "streamd_pause_probes", "Steps decoded early in a pause of the talker", registry=r
        )
        self.probe_finals = Counter(
            "streamd_probe_finals", "Pause probes that were their utterance's final", registry=r
        )
        self.cancelled_steps = Counter(
            "streamd_cancelled_steps",
            "Partial steps withdrawn because their session's final became due",
            registry=r,
        )
        self.errors = Counter("streamd_errors", "error messages sent", ["code"], registry=r)
        self.finals = Counter("streamd_finals", "Finals sent", registry=r)
        self.mqtt_connected = Gauge("streamd_mqtt_connected", "1 when the broker is up", registry=r)
        self.mqtt_published = Gauge(
            "streamd_mqtt_published_finals", "Finals the broker acknowledged", registry=r
        )
        self.mqtt_spooled = Gauge(
            "streamd_mqtt_spooled_finals", "Finals spilled to the spool file", registry=r
        )

    def record_batch(self, report: BatchReport) -> None:
        if report.busy:
            self.busy_batches.inc()
        self.batch_size.observe(report.size)
        self.step_seconds.observe(report.engine_s)
        self.engine_busy.inc(report.engine_s)
        for wait in report.queue_wait_s:
            self.queue_seconds.observe(wait)

    def render(self) -> bytes:
        return generate_latest(self.registry)
