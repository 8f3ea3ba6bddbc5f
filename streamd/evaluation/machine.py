"""What a benchmark ran on, so that its numbers can be compared with another machine's.

Streaming latency is bound by the encoder pass (DESIGN.md §3), and that varies sevenfold between
the 2-core machines this project runs on: base's 30 s pass takes 0.13 s on a Xeon with AMX
(bfloat16) and 0.93 s on an EPYC with AVX2 only (float32). So a report names the CPU, says
whether the encoder ran in bfloat16, and times one encoder pass of its own engine as a yardstick.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from streamd.engine.precision import CPUINFO, cpu_has_native_bf16, cpuinfo_field
from streamd.engine.protocol import Engine

ENCODER_PASSES = 3  # timed passes (after one warm-up); the median is reported


@dataclass(frozen=True)
class Machine:
    """cpu: the CPU's model name; threads: torch's intra-op threads; native_bf16: the CPU has
    bfloat16 matrix instructions (what `--encoder-precision auto` looks for); encoder_pass_s:
    the median time of one full 30 s encoder pass of the benchmark's engine."""

    cpu: str
    threads: int
    native_bf16: bool
    encoder_pass_s: float


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model name from /proc/cpuinfo, or "unknown" where there is none."""
    return cpuinfo_field("model name", cpuinfo) or "unknown"


def encoder_pass_s(engine: Engine, passes: int = ENCODER_PASSES) -> float:
    """Median seconds of one 30 s encoder pass (batch 1) on `engine`."""
    mel = torch.zeros(1, engine.n_mels, 2 * engine.n_audio_ctx)
    engine.encode(mel)  # warm-up: first-call allocations are not the steady cost
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        engine.encode(mel)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def describe_machine(engine: Engine, cpuinfo: Path = CPUINFO) -> Machine:
    return Machine(
        cpu=cpu_model(cpuinfo),
        threads=torch.get_num_threads(),
        native_bf16=cpu_has_native_bf16(cpuinfo),
        encoder_pass_s=round(encoder_pass_s(engine), 3),
    )
