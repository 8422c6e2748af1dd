"""What machine a figure was measured on (for benchmark and study records)."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_bf16_units() -> bool | None:
    """Whether this x86 CPU has bfloat16 instructions (AVX512-BF16 or AMX), as torch sees them;
    ``None`` on other architectures or a torch that cannot tell.

    Without them torch emulates bf16 on the CPU, an order of magnitude slower than fp32
    (docs/results.md).
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return None
    try:
        import torch

        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return None
