"""Pick the device and the compute dtype from what the hardware does fast, and say why."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from infopo_cli.config import DTYPES

NAMES = {name: getattr(torch, attr) for name, attr in DTYPES.items()}


@dataclass(frozen=True)
class Precision:
    device: str
    dtype: torch.dtype
    reason: str

    @property
    def dtype_name(self) -> str:
        return {v: k for k, v in NAMES.items()}[self.dtype]


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def choose(requested: str = "auto", cuda: bool | None = None, flags: set[str] | None = None,
           cuda_bf16: bool | None = None) -> Precision:
    """bf16 where it is fast (CUDA with bf16; CPUs with avx512_bf16 or AMX), else fp32.

    On a CPU without native bf16, bf16 matmuls are emulated and run ~25x slower than fp32 (measured
    on this project's CI machines), so fp32 is the safe fallback there.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    device = "cuda" if cuda else "cpu"
    if requested != "auto":
        return Precision(device, NAMES[requested], f"--dtype {requested} requested")
    if cuda:
        bf16 = torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16
        if bf16:
            return Precision(device, torch.bfloat16, "CUDA GPU with native bf16")
        return Precision(device, torch.float16, "CUDA GPU without bf16 support: fp16")
    flags = cpu_flags() if flags is None else flags
    fast = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if fast:
        return Precision(device, torch.bfloat16, f"CPU has {' and '.join(fast)}: bf16 is fastest")
    return Precision(device, torch.float32, "CPU has no avx512_bf16/AMX (bf16 would be emulated, ~25x slower): fp32")
