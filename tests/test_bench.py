"""`streamd bench`: evaluation streams and their reference files, scoring, the table / JSON /
plot writers on made-up runs, and one short end-to-end run against the real daemon."""

from __future__ import annotations

import itertools
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bench.streaming import Report as StreamingReport
from bench.streaming import pool as pool_reports
from streamd import cli
from streamd.audio import SAMPLE_RATE, load_audio
from streamd.decoding.result import Word
from streamd.evaluation.load import RunReport, protocol_events
from streamd.evaluation.machine import Machine
from streamd.evaluation.report import (
    BenchResults,
    PeerRow,
    format_table,
    latency_figure,
    write_json,
    write_plot,
)
from streamd.evaluation.scoring import GAP_MARGIN_S, normalize, score_events, voiced_bounds
from streamd.evaluation.sounds import MURMUR_DBFS, NOISE_DBFS, rms_dbfs
from streamd.evaluation.streams import (
    GAP_S,
    STREAM_GAP_ORDER,
    EvaluationStream,
    clip,
    evaluation_stream,
    manifest,
    write_stream,
)
from streamd.streaming.events import Final, Partial, SpeechEnded
from streamd.streaming.replay import Emitted

PCM_STEP = 1 / 32767  # one 16-bit step: the WAV's quantization
BENCH_HINT = "pip install 'streamd[bench]'"


def _read_stream_files(directory: Path, stream: EvaluationStream) -> tuple[np.ndarray, list, list]:
    audio = load_audio(directory / f"{stream.name}.wav")
    refs = json.loads((directory / f"{stream.name}.reference.json").read_text())
    gaps = json.loads((directory / f"{stream.name}.gaps.json").read_text())
    return audio, refs, gaps


# --- streams and reference files -----------------------------------------------------------


def test_reference_file_matches_the_placed_clips(tmp_path: Path) -> None:
    stream = evaluation_stream("en", seed=3, clips=2)
    write_stream(stream, tmp_path)
    audio, refs, _ = _read_stream_files(tmp_path, stream)
    entries = {e["file"]: e for e in manifest()}
    english = [e["file"] for e in manifest() if e["language"] == "en"][:2]
    assert [u.file for u in stream.utterances] == english  # the first N clips, manifest order
    assert len(audio) == len(stream.audio)
    assert [r["text"] for r in refs] == [entries[f]["reference"] for f in english]
    for ref, file in zip(refs, english, strict=True):
        assert set(ref) == {"start", "end", "text"}
        clip_audio = clip(file)
        start = round(ref["start"] * SAMPLE_RATE)
        assert round(ref["end"] * SAMPLE_RATE) - start == len(clip_audio)
        placed = audio[start : start + len(clip_audio)]
        # the WAV holds exactly this clip there, not a shifted copy: to 16-bit precision (the
        # writer truncates x * 32767, the reader divides by 32768: two steps at most)
        assert np.max(np.abs(placed - clip_audio)) <= 2 * PCM_STEP
        shifted = audio[start + 160 : start + 160 + len(clip_audio) - 160]
        assert np.max(np.abs(shifted - clip_audio[: len(shifted)])) > 100 * PCM_STEP


def test_gaps_file_covers_the_rest_with_the_right_kinds(tmp_path: Path) -> None:
    stream = evaluation_stream("en", seed=5, clips=2)
    write_stream(stream, tmp_path)
    audio, refs, gaps = _read_stream_files(tmp_path, stream)
    assert [g["kind"] for g in gaps] == list(STREAM_GAP_ORDER[:3])  # silence, white, murmur
    # gap, clip, gap, clip, gap: back to back from 0 to the end of the audio
    edges = [gaps[0], refs[0], gaps[1], refs[1], gaps[2]]
    assert edges[0]["start"] == 0
    for before, after in itertools.pairwise(edges):
        assert before["end"] == pytest.approx(after["start"], abs=1e-4)
    assert gaps[-1]["end"] == pytest.approx(len(audio) / SAMPLE_RATE, abs=1e-4)
    for gap in gaps:
        assert GAP_S[0] - 1e-3 <= gap["end"] - gap["start"] <= GAP_S[1] + 1e-3
        part = audio[round(gap["start"] * SAMPLE_RATE) : round(gap["end"] * SAMPLE_RATE)]
        level = rms_dbfs(part)
        match gap["kind"]:
            case "silence":
                assert not part.any()
            case "white":
                assert level == pytest.approx(NOISE_DBFS, abs=1.0)
            case "murmur":
                assert level == pytest.approx(MURMUR_DBFS, abs=1.0)


def test_streams_are_deterministic_for_a_seed(tmp_path: Path) -> None:
    one, again, other = (evaluation_stream("en", seed=s, clips=2) for s in (7, 7, 8))
    for name, stream in (("a", one), ("b", again), ("c", other)):
        write_stream(stream, tmp_path / name)
    for suffix in (".wav", ".reference.json", ".gaps.json"):
        a = (tmp_path / "a" / f"{one.name}{suffix}").read_bytes()
        assert a == (tmp_path / "b" / f"{again.name}{suffix}").read_bytes()
        assert a != (tmp_path / "c" / f"{other.name}{suffix}").read_bytes()


# --- scoring -------------------------------------------------------------------------------


def test_scoring_latency_first_partial_and_gap_words() -> None:
    stream = evaluation_stream("en", seed=0, clips=2)
    emitted: list[Emitted] = []
    expected_latency, expected_first, expected_wait = [], [], []
    for index, u in enumerate(stream.utterances):
        first, last = voiced_bounds(u.file)
        partial_at = u.start_s + first + 0.4
        final_at = u.start_s + last + 0.7 + index
        emitted.append(Emitted(Partial(index, u.start_s, u.end_s, " x"), partial_at))
        words = tuple(
            Word(" " + w, u.start_s + k * 0.1, u.start_s + k * 0.1 + 0.1, 0.9)
            for k, w in enumerate(u.text.split())
        )
        text = " " + u.text
        emitted.append(Emitted(Final(index, u.start_s, u.end_s, text, words, "en", 0, 0), final_at))
        if index != 1:  # the VAD's end of the second utterance never came (a cut stream)
            ended_at_s = u.start_s + last + 0.6 - 0.01 * index
            emitted.append(Emitted(SpeechEnded(ended_at_s), ended_at_s))
            expected_wait.append(0.6 - 0.01 * index)
        expected_latency.append(0.7 + index)
        expected_first.append(0.4)
    gap = stream.gaps[1]
    middle = (gap.start_s + gap.end_s) / 2
    # " you" ends inside the next clip: its middle is within GAP_MARGIN_S of the gap's end, too
    # close to speech to call it hallucinated (word times are approximate)
    edge = gap.end_s - GAP_MARGIN_S * 0.75
    ghost = (
        Word(" thank", middle - 0.1, middle + 0.1, 0.5),
        Word(" you", edge - 0.35, edge + 0.35, 0.5),
    )
    emitted.append(Emitted(Final(9, middle, middle, " thank you", ghost, "en", 0, 0), 99.0))
    score = score_events("en", emitted, stream.utterances, stream.gaps)
    assert score.latencies_s == pytest.approx(expected_latency)
    assert score.vad_waits_s == pytest.approx(expected_wait)
    assert score.first_partials_s == pytest.approx(expected_first)
    assert score.gap_words == [" thank"]
    ref_words = len(normalize(stream.reference_text, "en").split())
    assert score.error == pytest.approx(2 / ref_words)  # two inserted words


def test_protocol_messages_become_scored_events() -> None:
    word = {"word": " hi", "start": 1.0, "end": 1.2, "probability": 0.9}
    final = {"type": "final", "segment": 0, "start": 1.0, "end": 1.2, "text": " hi"}
    final |= {"words": [word], "language": "en", "avg_logprob": -0.1, "no_speech_prob": 0.0}
    partial = {"type": "partial", "segment": 0, "start": 1.0, "end": 1.1, "text": " h"}
    ready = {"type": "ready", "session": "s"}
    ended = {"type": "speech_ended", "seq": 4, "t": 1.9}
    events = protocol_events([(ready, 0.1), (partial, 1.5), (ended, 1.9), (final, 2.0)])
    assert [type(e.event) for e in events] == [Partial, SpeechEnded, Final]
    assert events[1].event == SpeechEnded(1.9)
    assert events[2].emitted_at == 2.0
    assert events[2].event == Final(
        0, 1.0, 1.2, " hi", (Word(" hi", 1.0, 1.2, 0.9),), "en", -0.1, 0.0
    )


# --- table, JSON, plot ---------------------------------------------------------------------


def _run(clients: int, median_s: float, p90_s: float) -> RunReport:
    return RunReport(
        clients=clients,
        language="en",
        model="tiny.en",
        audio_s_per_client=91.1,
        utterances_total=6 * clients,
        utterances_scored=6 * clients,
        error_streaming=0.02,
        error_offline=0.02,
        latency_median_s=median_s,
        latency_p90_s=p90_s,
        latency_max_s=p90_s + 0.3,
        vad_wait_median_s=0.7,
        first_partial_median_s=1.1,
        gap_words=0,
        gap_word_list=[],
        error_messages=0,
        passes_per_audio_s=5.2,
        engine_rtf=0.3 * clients,
        mean_batch_size=1.0 + clients / 4,
        overloaded_steps=0,
        cancelled_steps=0,
        daemon_cpu_s=60.0 * clients,
        daemon_peak_rss_mb=900.0,
        wall_s=95.0,
        holds=p90_s < 2.0,
    )


def _results() -> BenchResults:
    runs = [_run(1, 0.9, 1.4), _run(2, 1.2, 1.9), _run(4, 2.5, 4.1)]
    peer = PeerRow("whisper_streaming", "en", "tiny.en", 91.1, 6, 0.15, 1.2, 3.3, 4.0, 1.6, 2, 97)
    return BenchResults("en", "tiny.en", 0, ["en/jfk.flac"], ["en-seed0"], runs, [peer])


def test_table_has_a_row_per_run_and_peer() -> None:
    lines = format_table(_results()).splitlines()
    assert "WER" in lines[0]
    header, rows = lines[1].split(), lines[2:]
    assert header[:2] == ["run", "err"] and header[-1] == "holds"
    assert [r.split()[0] for r in rows] == ["N=1", "N=2", "N=4", "whisper_streaming"]
    assert [r.split()[-1] for r in rows] == ["yes", "yes", "NO", "NO"]
    assert "2.50" in rows[2] and "4.10" in rows[2]
    assert " - " in rows[3]  # a peer has no daemon figures
    assert len({len(line) for line in lines[1:]}) == 1  # aligned columns


def test_table_and_json_name_the_machine(tmp_path: Path) -> None:
    machine = Machine("AMD EPYC", 2, False, 0.93)
    results = replace(_results(), machine=machine)
    assert format_table(results).splitlines()[-1] == (
        "machine: AMD EPYC, 2 threads, native bf16 no, one 30 s encoder pass 0.93 s"
    )
    write_json(results, tmp_path / "results.json")
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["machine"] == {
        "cpu": "AMD EPYC",
        "threads": 2,
        "native_bf16": False,
        "encoder_pass_s": 0.93,
    }


def test_json_is_strict_and_complete(tmp_path: Path) -> None:
    results = _results()
    runs = [replace(results.runs[0], latency_max_s=math.nan, error_offline=None)]
    write_json(replace(results, runs=runs), tmp_path / "results.json")
    data = json.loads(
        (tmp_path / "results.json").read_text(),
        parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"),
    )
    assert data["version"] == 1 and data["model"] == "tiny.en"
    assert data["runs"][0]["latency_max_s"] is None and data["runs"][0]["error_offline"] is None
    assert data["runs"][0]["latency_p90_s"] == 1.4
    assert data["peers"][0]["peer"] == "whisper_streaming"


def _data(values: object) -> list[float]:
    return [float(v) for v in np.asarray(values)]


def test_plot_latency_vs_streams(tmp_path: Path) -> None:
    results = _results()
    axes = latency_figure(results).axes[0]
    series = {str(line.get_label()): line for line in axes.get_lines()}
    median, p90 = series["streamd median"], series["streamd p90"]
    assert _data(median.get_xdata()) == [1, 2, 4]
    assert _data(median.get_ydata()) == [0.9, 1.2, 2.5]
    assert _data(p90.get_ydata()) == [1.4, 1.9, 4.1]
    two_s = next(line for label, line in series.items() if label.startswith("2 s"))
    assert _data(two_s.get_ydata()) == [2.0, 2.0]
    peer = series["whisper_streaming median, p90"]
    assert _data(peer.get_xdata()) == [1, 1] and _data(peer.get_ydata()) == [1.2, 3.3]

    write_plot(results, tmp_path / "latency.png")
    png = (tmp_path / "latency.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    from matplotlib.image import imread

    pixels = imread(tmp_path / "latency.png")
    assert pixels.shape[:2] == (420, 640)
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 50  # drawn, not blank


# --- the command ---------------------------------------------------------------------------


def test_missing_extra_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails, find_spec says None
    rc = cli.main(["bench", "--clients", "1", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_ERROR
    assert err.strip().startswith("streamd: error: ") and "matplotlib" in err and BENCH_HINT in err
    assert not (tmp_path / "out").exists()  # checked before any work


@pytest.mark.parametrize("clients", ["0", "1,x", ""])
def test_bad_client_counts_are_usage_errors(
    clients: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--clients", clients])
    assert exit_info.value.code == cli.EXIT_USAGE
    assert "positive counts" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_end_to_end_one_client(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    argv = ["bench", "--clients", "1", "--no-offline", "--clips", "2", "--out", str(out)]
    assert cli.main(argv) == cli.EXIT_OK
    stdout = capsys.readouterr().out
    assert "N=1" in stdout
    data = json.loads((out / "results.json").read_text())
    assert data["clips"] == [e["file"] for e in manifest() if e["language"] == "en"][:2]
    (run,) = data["runs"]
    assert run["clients"] == 1 and run["model"] == "tiny.en"
    assert run["error_streaming"] < 0.2
    assert run["error_offline"] is None
    assert run["gap_words"] == 0
    assert run["utterances_scored"] == 2
    assert 0 < run["latency_median_s"] <= run["latency_p90_s"] <= run["latency_max_s"] < 10
    assert run["passes_per_audio_s"] > 0 and run["engine_rtf"] > 0  # /metrics was read
    assert run["daemon_cpu_s"] > 0 and run["daemon_peak_rss_mb"] > 100  # /proc was read
    assert (out / "latency.png").stat().st_size > 10_000
    assert (out / "streams" / "en-seed0.wav").is_file()
    assert len(json.loads((out / "streams" / "en-seed0.reference.json").read_text())) == 2
    assert (out / "messages" / "n1-client0.json").is_file()
    assert data["machine"]["encoder_pass_s"] > 0 and data["machine"]["cpu"]
    assert stdout.splitlines()[-1].startswith("machine: ")


def test_right_context_windows_join_the_vad_utterances() -> None:
    """bench.right_context: the utterances the VAD finds in the Japanese stream, joined end to
    end (each piece mapped back to where it was in the stream) or with the pauses kept."""
    from bench.right_context import utterance_spans, window

    stream = evaluation_stream("ja", 0)
    spans = utterance_spans(stream.audio)
    ja_1 = stream.utterances[0]
    inside = [s for s in spans if ja_1.start_s * SAMPLE_RATE <= s[0] < ja_1.end_s * SAMPLE_RATE]
    assert len(inside) >= 3  # the talker pauses between the three phrases
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    p1, p2, p3 = inside[:3]

    abrupt = window(stream.audio, [p1, p2, p3], abrupt=True, request_id=0)
    lengths = [end - start for start, end in (p1, p2, p3)]
    assert abrupt.audio.size == sum(lengths)
    assert abrupt.pieces == ((0, p1[0]), (lengths[0], p2[0]), (lengths[0] + lengths[1], p3[0]))
    np.testing.assert_array_equal(
        abrupt.audio[lengths[0] :][: lengths[1]], stream.audio[p2[0] : p2[1]]
    )
    assert abrupt.to_stream_s(lengths[0] / SAMPLE_RATE) == p2[0] / SAMPLE_RATE

    real = window(stream.audio, [p1, p2], abrupt=False, request_id=1)
    assert real.pieces == ((0, p1[0]),)
    np.testing.assert_array_equal(real.audio, stream.audio[p1[0] : p2[1]])
    assert real.final and real.language == "ja" and not real.forced


def test_voiced_bounds_start_at_the_talker_not_at_a_click() -> None:
    # ja_1: a click about 30 dB under the peak at 0.16-0.2 s, then the talker from 1.56 s
    first, last = voiced_bounds("ja/reazonspeech_test_ja_1.wav")
    assert 1.5 <= first <= 1.6
    assert last == 12.89  # the end is the last loud frame, as every latency so far took it
    audio = clip("ja/reazonspeech_test_ja_1.wav")
    click = audio[int(0.15 * SAMPLE_RATE) : int(0.25 * SAMPLE_RATE)]
    assert rms_dbfs(click) > rms_dbfs(audio[SAMPLE_RATE // 2 : SAMPLE_RATE])  # it is there
    # a clip that opens with speech keeps its start: jfk.flac's first word at 0.32 s
    assert voiced_bounds("en/jfk.flac") == (0.32, 11.0)


def _report(seed_latencies: tuple[float, ...], error: float, **kw: object) -> StreamingReport:
    fields: dict[str, object] = dict(
        language="ja",
        model="base",
        mode="realtime",
        encoder_buckets_s=(30,),
        encoder_precision="bf16",
        cpu="test",
        encoder_pass_s=0.4,
        audio_s=30.0,
        utterances=len(seed_latencies),
        error_streaming=error,
        error_offline=0.2,
        latency_median_s=sorted(seed_latencies)[len(seed_latencies) // 2],
        latency_p90_s=0.0,
        latency_max_s=max(seed_latencies),
        vad_wait_median_s=0.0,
        first_partial_median_s=0.0,
        gap_words=0,
        gap_word_list=[],
        passes_per_audio_s=0.0,
        passes_per_audio_s_no_draft=0.0,
        requests=10,
        cancelled_steps=2,
        wall_s=30.0,
        latencies_s=seed_latencies,
    )
    fields.update(kw)
    return StreamingReport(**fields)  # type: ignore[arg-type]


def test_pooled_seeds_put_every_latency_in_one_median() -> None:
    # two latencies a seed: the per-seed medians hide that most utterances are under 1 s
    reports = [_report((0.8, 1.4), 0.230), _report((0.9, 1.5), 0.241), _report((0.7, 0.95), 0.2)]
    pooled = pool_reports([0, 1, 2], reports)
    assert pooled.utterances == 6
    assert pooled.latency_median_s == pytest.approx(0.925)  # of 0.7 0.8 0.9 0.95 1.4 1.5
    assert pooled.latency_max_s == pytest.approx(1.5)
    assert pooled.error_streaming_mean == pytest.approx((0.230 + 0.241 + 0.2) / 3, abs=1e-4)
    assert pooled.seed_medians_s == (1.4, 1.5, 0.95)
    assert pooled.cancelled_steps == 6 and pooled.seeds == (0, 1, 2)


def test_pooling_refuses_mixed_runs() -> None:
    with pytest.raises(ValueError, match="share language"):
        pool_reports([0, 1], [_report((1.0,), 0.2), _report((1.0,), 0.2, mode="virtual")])
    with pytest.raises(ValueError, match="reports for seeds"):
        pool_reports([0, 1], [_report((1.0,), 0.2)])
