"""What a benchmark report says about its machine (`streamd.evaluation.machine`)."""

from __future__ import annotations

from pathlib import Path

import torch

from streamd.evaluation.machine import cpu_model, describe_machine, encoder_pass_s


class _TimedEngine:
    """The part of the Engine interface the yardstick uses; records each mel it is given."""

    n_mels = 80
    n_audio_ctx = 1500

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        assert mel.dtype == torch.float32
        self.shapes.append(tuple(mel.shape))
        return torch.zeros(mel.shape[0], mel.shape[2] // 2, 384)


def test_cpu_model_is_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx2\n\n")
    assert cpu_model(info) == "AMD EPYC 9R14"
    info.write_text("processor\t: 0\nflags\t\t: fpu\n")  # e.g. some ARM kernels
    assert cpu_model(info) == "unknown"
    assert cpu_model(tmp_path / "no-such-file") == "unknown"


def test_the_yardstick_is_full_window_encoder_passes_after_a_warm_up() -> None:
    engine = _TimedEngine()
    assert encoder_pass_s(engine, passes=3) >= 0.0  # type: ignore[arg-type]
    assert engine.shapes == [(1, 80, 3000)] * 4  # one warm-up, then the three timed passes


def test_a_report_names_the_machine(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("model name\t: Intel Xeon\nflags\t\t: avx512f amx_bf16\n")
    machine = describe_machine(_TimedEngine(), info)  # type: ignore[arg-type]
    assert (machine.cpu, machine.native_bf16) == ("Intel Xeon", True)
    assert machine.threads == torch.get_num_threads()
