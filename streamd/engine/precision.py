"""The encoder's arithmetic: float32 (the reference), or bfloat16 where the CPU has it natively.

The encoder is the CPU budget of a streaming step (DESIGN.md §3): base's 30 s encoder costs
0.37 s in float32 on 2 Xeon cores and 0.13 s in bfloat16 with AMX, while the decoder stays in
float32 (its logits decide what is committed). Measured on the evaluation streams (docs/
benchmarks.md): offline text identical, streaming error within the run-to-run spread, Japanese
finals 0.5 s sooner. On a CPU without bfloat16 instructions torch emulates it, slower than
float32, so "auto" picks it only where the CPU flags say it is native.
"""

from __future__ import annotations

from pathlib import Path

from streamd.errors import ConfigError

ENCODER_PRECISIONS = ("auto", "fp32", "bf16")
# Linux /proc/cpuinfo flags of native bfloat16 matrix arithmetic (Intel AMX, AVX-512 BF16)
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
CPUINFO = Path("/proc/cpuinfo")


def cpuinfo_field(field: str, cpuinfo: Path = CPUINFO) -> str | None:
    """The first value of `field` ("flags", "model name") in a /proc/cpuinfo file, or None."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == field:
            return value.strip()
    return None


def cpu_has_native_bf16(cpuinfo: Path = CPUINFO) -> bool:
    """True if the CPU's flags list a native bfloat16 matrix unit (False where unknown)."""
    flags = cpuinfo_field("flags", cpuinfo)
    return flags is not None and not NATIVE_BF16_FLAGS.isdisjoint(flags.split())


def resolve_encoder_precision(name: str, device: str, cpuinfo: Path = CPUINFO) -> str:
    """The precision to run, "fp32" or "bf16", for the setting `name` (auto, fp32, bf16).

    auto: bf16 on a CPU with native bfloat16, else fp32 (GPUs keep fp32: not measured yet).
    """
    if name not in ENCODER_PRECISIONS:
        raise ConfigError(
            f"encoder precision must be one of {', '.join(ENCODER_PRECISIONS)}, got {name!r}"
        )
    if name != "auto":
        return name
    on_cpu = device.split(":")[0] == "cpu"
    return "bf16" if on_cpu and cpu_has_native_bf16(cpuinfo) else "fp32"
