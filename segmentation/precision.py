"""What ``precision="fast"`` computes in, on each kind of device.

``fast`` means the quickest arithmetic whose labels stay close to fp32's: fp16
autocast on CUDA, and bf16 autocast on a CPU that multiplies bf16 in hardware
(Intel AMX or AVX-512 BF16, Arm's BF16 extension).  A CPU without those has
oneDNN emulate bf16 by converting every operand, which measured *slower* than
fp32: 1.9x for a 2-D U-Net and 2.7x for a 3-D one on an Intel Xeon with
AVX-512 but neither extension (``benchmarks/predict_vs_monai.py``,
docs/performance.md).  There ``fast`` computes in fp32 and keeps only its other
shortcuts (labels from the undivided sums).

The choice is made once, where a run is planned, and travels with the
predictor: workers on other CPUs compute as the plan says, so the result never
depends on which worker ran a window.  ``SEGFLOW_CPU_BF16=1`` (or ``0``)
overrides the detection, for a CPU it misjudges and for testing both paths.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache

import torch

from storage.errors import ConfigError

ENV = "SEGFLOW_CPU_BF16"


@lru_cache(maxsize=1)
def _detected() -> bool:
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(cpu, probe, None)
        try:
            if check is not None and check():
                return True
        except RuntimeError:  # a torch built without the probe's backend
            pass
    if platform.machine().lower() in ("aarch64", "arm64"):
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
                return any(line.startswith("Features") and " bf16" in line for line in f)
        except OSError:
            return False
    return False


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (or ``SEGFLOW_CPU_BF16`` says so)."""
    forced = os.environ.get(ENV, "").strip()
    if forced in ("1", "0"):
        return forced == "1"
    if forced:
        raise ConfigError(None, f"{ENV}={forced!r}: use 1 (bf16 on the CPU), 0 (fp32) or leave it unset (detect)")
    return _detected()


def fast_cpu_dtype() -> torch.dtype | None:
    """The autocast dtype ``fast`` uses on this CPU: bf16 where it is hardware, else None (fp32)."""
    return torch.bfloat16 if cpu_has_bf16() else None


def autocast_dtype(precision: str, device_type: str, cpu_dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype inference autocasts to (None: plain fp32), given the CPU's choice made when the run was planned."""
    if precision != "fast":
        return None
    return torch.float16 if device_type == "cuda" else cpu_dtype


def describe(precision: str, device_type: str, cpu_dtype: torch.dtype | None) -> str:
    """What a run computes in, as provenance records it: a ``fast`` run on a CPU without bf16 says why it is fp32."""
    dtype = autocast_dtype(precision, device_type, cpu_dtype)
    if dtype is not None:
        return f"{str(dtype).removeprefix('torch.')} autocast"
    return "float32 (this CPU has no bf16 instructions)" if precision == "fast" else "float32"
