"""The daemon's pieces without a model or sockets: config layering, scheduler batching,
journal state, client message parsing, PCM decoding."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from streamd.errors import ConfigError, DecodeCancelled, EngineError
from streamd.server.cli import overrides
from streamd.server.config import Config, load_config
from streamd.server.journal import Journal
from streamd.server.messages import End, Finalize, ProtocolError, Start, parse_client_message
from streamd.server.pcm import PcmDecoder
from streamd.server.scheduler import BatchReport, Scheduler
from streamd.streaming.window import WindowRequest, WindowResult

# -- config ---------------------------------------------------------------------------------------


def test_config_layers_file_then_env_then_flags(tmp_path: Path) -> None:
    toml = tmp_path / "streamd.toml"
    toml.write_text(
        'port = 9000\nmodel = "base"\nencoder_buckets_s = [20, 30]\n'
        "[session]\nstep_ms = 400\n[vad]\naggressiveness = 2\n"
        '[mqtt]\nurl = "mqtt://broker:1884"\npartials = true\n'
    )
    env = {"STREAMD_MODEL": "tiny.en", "STREAMD_SESSION_STEP_MS": "300", "STREAMD_TOKEN": "t"}
    config = load_config(toml, env, {"port": "0", "vad.aggressiveness": 1, "language": None})
    assert config.port == 0  # flag beats file
    assert config.model == "tiny.en"  # env beats file
    assert config.session.step_ms == 300  # env beats file, nested
    assert config.session.vad.aggressiveness == 1  # flag beats file, [vad] = session.vad
    assert config.encoder_buckets_s == (20, 30)
    assert config.mqtt.url == "mqtt://broker:1884" and config.mqtt.partials is True
    assert config.token == "t"
    assert config.language is None  # a flag left unset does not override


def test_config_defaults_and_env_lists() -> None:
    config = load_config(None, {"STREAMD_ENCODER_BUCKETS_S": "10,20,30", "STREAMD_CACHE_DIR": "x"})
    assert config.encoder_buckets_s == (10, 20, 30)
    assert config == Config(encoder_buckets_s=(10, 20, 30), journal_dir=config.journal_dir)


def test_first_look_buckets_default_on_and_an_empty_list_turns_them_off(tmp_path: Path) -> None:
    assert Config().first_look_buckets_s == (10, 20, 30)
    toml = tmp_path / "streamd.toml"
    toml.write_text("first_look_buckets_s = []\n")
    assert load_config(toml, {}).first_look_buckets_s == ()
    assert load_config(None, {"STREAMD_FIRST_LOOK_BUCKETS_S": ""}).first_look_buckets_s == ()


@pytest.mark.parametrize(
    ("overrides_", "needle"),
    [
        ({"prot": 1}, "unknown setting 'prot'"),
        ({"session.step_ms": "fast"}, "session.step_ms"),
        ({"vad.aggressiveness": 7}, "aggressiveness must be 0..3"),
        ({"session.hold_uncertain_ms": -1}, "hold_uncertain_ms >= 0"),
        ({"vad.level_offset_db": "-40"}, r"level_offset_db must be in \[-30, 20\]"),
        ({"port": 70000}, "port must be 0..65535"),
        ({"port.x": 1}, "port is not a section"),
        ({"mqtt.partials": "maybe"}, "not a boolean"),
        ({"engine": "tpu"}, "engine must be torch or neuron"),
        ({"encoder_precision": "fp16"}, "encoder_precision must be one of auto, fp32, bf16"),
    ],
)
def test_config_errors_name_the_setting(overrides_: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(None, {}, overrides_)


def test_config_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("port = \n")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load_config(bad, {})
    with pytest.raises(ConfigError, match="STREAMD_PORT"):
        load_config(None, {"STREAMD_PORT": "eighty"})


def test_serve_flags_become_dotted_overrides() -> None:
    from streamd.cli import build_parser

    flags = ["--port", "1234", "--step-ms", "250", "--set", "vad.hangover_ms=500"]
    args = build_parser().parse_args(["serve", *flags, "--encoder-precision", "bf16"])
    got = overrides(args)
    assert got == {
        "port": 1234,
        "session.step_ms": 250,
        "vad.hangover_ms": "500",
        "encoder_precision": "bf16",
    }
    assert load_config(None, {}, got).encoder_precision == "bf16"
    assert load_config(None, {}, got).session.vad.hangover_ms == 500
    quiet = overrides(build_parser().parse_args(["serve", "--set", "vad.level_offset_db=-6"]))
    assert load_config(None, {}, quiet).session.vad.level_offset_db == -6.0
    assert load_config(
        None, {"STREAMD_VAD_LEVEL_OFFSET_DB": "-8.5"}
    ).session.vad.level_offset_db == (-8.5)
    with pytest.raises(ConfigError, match="NAME=VALUE"):
        overrides(build_parser().parse_args(["serve", "--set", "novalue"]))


# -- scheduler ------------------------------------------------------------------------------------


def _request(i: int) -> WindowRequest:
    audio = np.zeros(1600, dtype=np.float32)
    return WindowRequest(f"s{i}", i, ((0, 0),), audio, (), (), (), "en", "transcribe", False)


def _result(r: WindowRequest) -> WindowResult:
    return WindowResult(r.request_id, (), "en", -0.1, 0.0, 1.0)


class _GatedEngine:
    """Blocks each call until released, so the test controls what piles up meanwhile."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.calls: list[list[int]] = []
        self.stopped: list[list[int]] = []  # batches cancelled while they waited at the gate
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.fail_on = fail_on

    def __call__(
        self, requests: list[WindowRequest], *, cancel: threading.Event | None = None
    ) -> list[WindowResult]:
        self.entered.set()
        deadline = time.monotonic() + 10
        while not self.gate.wait(0.01) and time.monotonic() < deadline:
            if cancel is not None and cancel.is_set():  # as the engine checks between layers
                self.stopped.append([r.request_id for r in requests])
                raise DecodeCancelled("stopped")
        self.calls.append([r.request_id for r in requests])
        if self.fail_on is not None and any(r.request_id == self.fail_on for r in requests):
            raise RuntimeError("engine broke")
        return [_result(r) for r in requests]


async def _wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def test_scheduler_batches_what_piles_up_while_busy() -> None:
    async def main() -> None:
        engine = _GatedEngine()
        reports: list[BatchReport] = []
        scheduler = Scheduler(engine, max_batch=3, batch_wait_ms=0, on_batch=reports.append)
        scheduler.start()
        first = asyncio.create_task(scheduler.submit([_request(0)]))
        await _wait_for(engine.entered.is_set)  # request 0 is in the engine
        rest = [asyncio.create_task(scheduler.submit([_request(i)])) for i in range(1, 6)]
        await _wait_for(lambda: scheduler.queued == 5)
        assert scheduler.behind_s() > 0
        engine.gate.set()
        results = [await first] + [await t for t in rest]
        assert [r[0].request_id for r in results] == list(range(6))
        assert engine.calls == [[0], [1, 2, 3], [4, 5]]  # max_batch caps, order kept
        assert [r.size for r in reports] == [1, 3, 2]
        assert scheduler.behind_s() == 0.0
        await scheduler.close()

    asyncio.run(main())


def test_scheduler_takes_finals_first() -> None:
    from dataclasses import replace

    async def main() -> None:
        engine = _GatedEngine()
        scheduler = Scheduler(engine, max_batch=2, batch_wait_ms=0)
        scheduler.start()
        first = asyncio.create_task(scheduler.submit([_request(0)]))
        await _wait_for(engine.entered.is_set)
        requests = [_request(1), _request(2), _request(3), replace(_request(4), final=True)]
        requests += [replace(_request(5), session_id="late"), _request(6)]
        requests += [replace(_request(7), probe=True)]  # may be a final: served as one
        rest = [asyncio.create_task(scheduler.submit([r])) for r in requests]
        await _wait_for(lambda: scheduler.queued == 7)
        scheduler.promote("late")  # its utterance ended: its step holds up a final
        engine.gate.set()
        await asyncio.gather(first, *rest)
        assert engine.calls == [[0], [4, 5], [7, 1], [2, 3], [6]]
        await scheduler.close()

    asyncio.run(main())


def test_scheduler_isolates_a_failing_request() -> None:
    async def main() -> None:
        engine = _GatedEngine(fail_on=2)
        engine.gate.set()
        scheduler = Scheduler(engine, max_batch=4, batch_wait_ms=50)
        scheduler.start()
        tasks = [asyncio.create_task(scheduler.submit([_request(i)])) for i in range(4)]
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(outcomes[2], EngineError) and "engine broke" in str(outcomes[2])
        assert [o[0].request_id for i, o in enumerate(outcomes) if i != 2] == [0, 1, 3]  # type: ignore[index]
        assert engine.calls[0] == [0, 1, 2, 3]  # one batch first (the bounded wait filled it)
        await scheduler.close()

    asyncio.run(main())


def test_scheduler_uses_busy_decode_only_when_contended() -> None:
    async def main() -> None:
        calm, busy = _GatedEngine(), _GatedEngine()
        calm.gate.set()
        reports: list[BatchReport] = []
        scheduler = Scheduler(calm, 4, batch_wait_ms=0, on_batch=reports.append, busy_decode=busy)
        scheduler.start()
        await scheduler.submit([_request(0)])  # alone: the calm path
        busy.gate.set()
        await asyncio.gather(*(scheduler.submit([_request(i)]) for i in range(1, 4)))
        assert calm.calls == [[0]]
        assert busy.calls == [[1, 2, 3]]
        assert [r.busy for r in reports] == [False, True]
        await scheduler.close()

    asyncio.run(main())


def test_scheduler_load_follows_engine_busy_time() -> None:
    async def main() -> None:
        engine = _GatedEngine()
        engine.gate.set()
        scheduler = Scheduler(engine, max_batch=1, batch_wait_ms=0)
        scheduler.start()
        assert scheduler.load() == 0.0
        for i in range(3):
            await scheduler.submit([_request(i)])
        # fast calls, idle in between: the load stays low
        assert scheduler.load() < 0.5
        scheduler._decay(time.monotonic() + 10.0, busy_s=10.0)  # 10 s of solid work
        assert scheduler.load() > 0.9
        await scheduler.close()

    asyncio.run(main())


def test_scheduler_cancel_withdraws_a_waiting_request_and_stops_a_lone_one() -> None:
    async def main() -> None:
        engine = _GatedEngine()
        scheduler = Scheduler(engine, max_batch=1, batch_wait_ms=0)
        scheduler.start()
        running = asyncio.create_task(scheduler.submit([_request(0)]))
        await _wait_for(engine.entered.is_set)
        waiting = asyncio.create_task(scheduler.submit([_request(1)]))
        other = asyncio.create_task(scheduler.submit([_request(2)]))
        await _wait_for(lambda: scheduler.queued == 2)
        scheduler.cancel("s1")  # waiting: it leaves the queue
        assert scheduler.queued == 1
        with pytest.raises(DecodeCancelled):
            await waiting
        scheduler.cancel("s0")  # alone in the engine: the engine stops it
        with pytest.raises(DecodeCancelled):
            await running
        assert engine.stopped == [[0]]
        engine.gate.set()
        assert (await other)[0].request_id == 2  # the others are served as before
        assert engine.calls == [[2]]
        await scheduler.close()

    asyncio.run(main())


def test_scheduler_cancel_does_not_stop_a_batch_others_still_want() -> None:
    async def main() -> None:
        engine = _GatedEngine()
        scheduler = Scheduler(engine, max_batch=2, batch_wait_ms=50)
        scheduler.start()
        tasks = [asyncio.create_task(scheduler.submit([_request(i)])) for i in range(2)]
        await _wait_for(engine.entered.is_set)  # both in one batch
        scheduler.cancel("s0")
        await asyncio.sleep(0.05)
        engine.gate.set()
        results = await asyncio.gather(*tasks)
        assert [r[0].request_id for r in results] == [0, 1]  # s0 gets its result anyway
        assert engine.stopped == [] and engine.calls == [[0, 1]]
        await scheduler.close()

    asyncio.run(main())


def test_scheduler_refuses_work_when_not_running() -> None:
    async def main() -> None:
        scheduler = Scheduler(_GatedEngine(), max_batch=2)
        with pytest.raises(EngineError, match="not running"):
            await scheduler.submit([_request(0)])
        await scheduler.close()

    asyncio.run(main())


# -- journal --------------------------------------------------------------------------------------


def _final(seq: int, segment: int, end: float) -> dict[str, object]:
    return {
        "type": "final",
        "seq": seq,
        "segment": segment,
        "start": end - 1,
        "end": end,
        "text": f" w{seq}",
        "words": [],
    }


def test_journal_state_from_closed_record_and_from_a_crash(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    writer = journal.open("abc123", "tiny.en")
    writer.append(_final(3, 0, 2.0))
    writer.append(_final(5, 1, 4.0))
    writer.close(seq=9, audio_s=6.5, next_segment=2, reason="client_gone")
    state = journal.state("abc123")
    assert [f["seq"] for f in state.finals] == [3, 5]
    assert (state.last_seq, state.audio_s, state.next_segment) == (9, 6.5, 2)

    # a second stream of the same session, then the daemon dies mid-line
    writer = journal.open("abc123", "tiny.en")
    writer.append(_final(11, 2, 8.0))
    writer.close(seq=11, audio_s=8.0, next_segment=3, reason="end")
    with journal.path("abc123").open("a") as f:
        f.write('{"type": "final", "seq": 12, "segm')
    state = journal.state("abc123")
    assert [f["seq"] for f in state.finals] == [3, 5, 11]
    assert (state.last_seq, state.next_segment) == (11, 3)
    lines = journal.path("abc123").read_text().splitlines()
    assert json.loads(lines[0])["type"] == "session" and json.loads(lines[0])["model"] == "tiny.en"
    assert sum(json.loads(line)["type"] == "session" for line in lines[:-1]) == 1


def test_journal_without_closed_record_uses_the_finals(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    writer = journal.open("feed01", "base")
    writer.append(_final(4, 7, 12.5))
    # no close(): the daemon was killed
    state = journal.state("feed01")
    assert (state.last_seq, state.audio_s, state.next_segment) == (4, 12.5, 8)
    writer.close(4, 12.5, 8, "end")


def test_journal_directory_that_cannot_be_made(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="journal directory"):
        Journal(blocker / "journal")


# -- client messages ------------------------------------------------------------------------------


def test_parse_start_defaults_and_fields() -> None:
    assert parse_client_message('{"type": "start"}') == Start()
    start = parse_client_message(
        json.dumps(
            {
                "type": "start",
                "sample_rate": 44100,
                "encoding": "pcm_f32le",
                "channels": 2,
                "language": " JA ",
                "prompt": " Okabe ",
                "resume": {"session": "abcdef12", "after_seq": 4},
                "level_offset_db": -6,
            }
        )
    )
    assert isinstance(start, Start)
    assert (start.sample_rate, start.channels, start.language, start.prompt) == (
        44100,
        2,
        "ja",
        "Okabe",
    )
    assert start.resume is not None and start.resume.after_seq == 4
    assert start.level_offset_db == -6.0
    assert parse_client_message('{"type": "finalize"}') == Finalize()
    assert parse_client_message('{"type": "end"}') == End()


@pytest.mark.parametrize(
    ("text", "code", "needle"),
    [
        ("{nope", "bad_message", "not JSON"),
        ("[1, 2]", "bad_message", "JSON object"),
        ('{"type": "dance"}', "bad_message", "unknown message type 'dance'"),
        ('{"type": "start", "sample_rte": 16000}', "bad_message", "unknown fields"),
        ('{"type": "start", "sample_rate": 4000}', "bad_audio_format", "4000 Hz"),
        ('{"type": "start", "sample_rate": "16k"}', "bad_audio_format", "integer"),
        ('{"type": "start", "encoding": "mp3"}', "bad_audio_format", "'mp3'"),
        ('{"type": "start", "channels": 6}', "bad_audio_format", "6 channels"),
        ('{"type": "start", "task": "summarize"}', "bad_message", "task"),
        ('{"type": "start", "resume": {"session": "../etc"}}', "bad_message", "session id"),
        ('{"type": "start", "prompt": 5}', "bad_message", "prompt"),
        ('{"type": "start", "level_offset_db": -40}', "bad_message", "level_offset_db"),
        ('{"type": "start", "level_offset_db": "-6"}', "bad_message", "level_offset_db"),
        ('{"type": "start", "level_offset_db": NaN}', "bad_message", "level_offset_db"),
    ],
)
def test_parse_errors_carry_a_code(text: str, code: str, needle: str) -> None:
    with pytest.raises(ProtocolError, match=needle) as info:
        parse_client_message(text)
    assert info.value.code == code and not info.value.fatal


# -- PCM ------------------------------------------------------------------------------------------


def test_pcm_s16_and_f32_stereo_resampled() -> None:
    t = np.arange(48_000) / 48_000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    s16 = PcmDecoder(Start())
    assert np.allclose(
        s16.decode((tone[:1600] * 32767).astype("<i2").tobytes()), tone[:1600], atol=1e-4
    )
    f32 = PcmDecoder(Start(sample_rate=48_000, encoding="pcm_f32le", channels=2))
    stereo = np.stack([tone, tone], axis=1).astype("<f4")
    out = np.concatenate([f32.decode(stereo[i : i + 960].tobytes()) for i in range(0, 48_000, 960)])
    out = np.concatenate([out, f32.flush()])
    assert abs(len(out) - 16_000) <= 16
    expected = (0.5 * np.sin(2 * np.pi * 440 * np.arange(len(out)) / 16_000)).astype(np.float32)
    middle = slice(200, len(out) - 200)
    assert np.corrcoef(out[middle], expected[middle])[0, 1] > 0.99


def test_pcm_rejects_partial_samples_and_garbage_floats() -> None:
    with pytest.raises(ProtocolError, match="not a whole number") as info:
        PcmDecoder(Start()).decode(b"\x00\x01\x02")
    assert info.value.code == "bad_audio"
    with pytest.raises(ProtocolError, match="4-byte"):
        PcmDecoder(Start(channels=2)).decode(b"\x00" * 6)
    f32 = PcmDecoder(Start(encoding="pcm_f32le"))
    with pytest.raises(ProtocolError, match="NaN"):
        f32.decode(np.array([0.1, np.nan], dtype="<f4").tobytes())
    with pytest.raises(ProtocolError, match="beyond"):
        f32.decode(np.array([1e6], dtype="<f4").tobytes())
    assert len(f32.decode(np.array([0.1, -0.2], dtype="<f4").tobytes())) == 2  # still usable
