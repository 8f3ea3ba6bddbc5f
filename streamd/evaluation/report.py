"""What `streamd bench` hands back: a terminal table, results.json, and a latency plot.

The plot needs matplotlib (the `bench` extra); it is drawn with the Agg backend on a bare
`Figure`, so no display and no pyplot global state are involved.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamd.errors import ConfigError
from streamd.evaluation.load import HOLD_P90_S, RunReport
from streamd.evaluation.scoring import BENCH_EXTRA_HINT

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from streamd.evaluation.machine import Machine

RESULTS_VERSION = 1


@dataclass(frozen=True)
class PeerRow:
    """A peer system on the same stream (one client), scored at segment level (bench.peers)."""

    peer: str
    language: str
    model: str
    audio_s: float
    utterances_scored: int
    error_streaming: float
    latency_median_s: float
    latency_p90_s: float
    latency_max_s: float
    first_partial_median_s: float
    gap_words: int
    wall_s: float


@dataclass(frozen=True)
class BenchResults:
    """Everything one `streamd bench` invocation measured."""

    language: str
    model: str
    seed: int
    clips: list[str]
    streams: list[str]  # stream names (files under streams/), client i uses the i-th
    runs: list[RunReport]
    peers: list[PeerRow] = field(default_factory=list)
    daemon_args: list[str] = field(default_factory=list)
    machine: Machine | None = None  # what it ran on: latency scales with its encoder pass

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data: NaN (no sample) becomes null, so strict parsers read it."""
        return {"version": RESULTS_VERSION, **_finite(asdict(self))}


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def write_json(results: BenchResults, path: Path) -> None:
    path.write_text(json.dumps(results.to_json(), indent=1, ensure_ascii=False) + "\n")


_RUN_COLUMNS = (
    ("run", "{run}"),
    ("err", "{error_streaming:.3f}"),
    ("offline", "{offline}"),
    ("lat med", "{latency_median_s:.2f}"),
    ("p90", "{latency_p90_s:.2f}"),
    ("max", "{latency_max_s:.2f}"),
    ("VAD wait", "{vad_wait_median_s:.2f}"),
    ("1st part", "{first_partial_median_s:.2f}"),
    ("gap w", "{gap_words}"),
    ("pass/s", "{passes_per_audio_s:.2f}"),
    ("RTF", "{engine_rtf:.3f}"),
    ("batch", "{mean_batch_size:.2f}"),
    ("CPU s", "{daemon_cpu_s:.1f}"),
    ("RSS MB", "{daemon_peak_rss_mb:.0f}"),
    ("holds", "{holds_text}"),
)


def format_table(results: BenchResults) -> str:
    """One row per run (N clients) and one per peer (one client), columns aligned; `err` is
    WER for English and CER otherwise, `holds` is p90 < 2 s; peers lack the daemon's figures
    ("-"). Runs whose clients got `error` messages (e.g. busy) are named below the table."""
    rows: list[list[str]] = []
    for run in results.runs:
        values = {
            **asdict(run),
            "run": f"N={run.clients}",
            "offline": "-" if run.error_offline is None else f"{run.error_offline:.3f}",
            "holds_text": "yes" if run.holds else "NO",
        }
        rows.append([template.format(**values) for _, template in _RUN_COLUMNS])
    for peer in results.peers:
        values = {
            **asdict(peer),
            "run": peer.peer,
            "holds_text": "yes" if peer.latency_p90_s < HOLD_P90_S else "NO",
        }
        row = []
        for _, template in _RUN_COLUMNS:
            try:
                row.append(template.format(**values))
            except KeyError:
                row.append("-")
        rows.append(row)
    header = [name for name, _ in _RUN_COLUMNS]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    metric = "WER" if results.language == "en" else "CER"
    title = (
        f"streamd bench: {results.language}, model {results.model}, seed {results.seed}, "
        f"{len(results.clips)} clips; err = {metric}, latencies in s"
    )
    lines = [title, _row(header, widths), *(_row(r, widths) for r in rows)]
    lines += [
        f"N={run.clients}: the clients got {run.error_messages} error message(s); see messages/"
        for run in results.runs
        if run.error_messages
    ]
    if results.machine is not None:
        m = results.machine
        lines.append(
            f"machine: {m.cpu}, {m.threads} threads, native bf16 {'yes' if m.native_bf16 else 'no'}"
            f", one 30 s encoder pass {m.encoder_pass_s:.2f} s"
        )
    return "\n".join(lines)


def _row(cells: list[str], widths: list[int]) -> str:
    """The first column (what ran) left-aligned, the numbers right-aligned."""
    first = cells[0].ljust(widths[0])
    return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))])


def latency_figure(results: BenchResults) -> Figure:
    """Finalization latency (median and p90) vs concurrent streams, the 2 s line, and peers as
    points at N=1. Raises ConfigError if matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ConfigError(f"the latency plot needs matplotlib: {BENCH_EXTRA_HINT}") from exc
    figure = Figure(figsize=(6.4, 4.2), dpi=100)
    axes = figure.add_subplot()
    runs = sorted(results.runs, key=lambda r: r.clients)
    clients = [r.clients for r in runs]
    axes.plot(clients, [r.latency_median_s for r in runs], "o-", label="streamd median")
    axes.plot(clients, [r.latency_p90_s for r in runs], "s--", label="streamd p90")
    axes.axhline(
        HOLD_P90_S, color="red", linestyle=":", label=f"{HOLD_P90_S:g} s (holds if p90 below)"
    )
    markers = "^vD<>ph*"
    for index, peer in enumerate(results.peers):
        axes.plot(
            [1, 1],
            [peer.latency_median_s, peer.latency_p90_s],
            markers[index % len(markers)],
            linestyle="none",
            label=f"{peer.peer} median, p90",
        )
    if clients:
        axes.set_xscale("log", base=2)
        axes.set_xticks(clients, [str(c) for c in clients])
    axes.set_xlabel("concurrent real-time streams")
    axes.set_ylabel("finalization latency (s)")
    axes.set_ylim(bottom=0)
    axes.set_title(f"streamd {results.model}, {results.language}: latency vs load")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    return figure


def write_plot(results: BenchResults, path: Path) -> None:
    """latency_figure as a PNG at `path` (Agg backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure = latency_figure(results)
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png")
