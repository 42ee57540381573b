"""Pick the device and the compute dtype from what the hardware does fast, and say why."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from infopo_cli.config import DTYPES

NAMES = {name: getattr(torch, attr) for name, attr in DTYPES.items()}


@dataclass(frozen=True)
class Precision:
    """The device and compute dtype of a run, and the reason they were picked."""

    device: str
    dtype: torch.dtype
    reason: str

    @property
    def dtype_name(self) -> str:
        return {v: k for k, v in NAMES.items()}[self.dtype]


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo; empty where it cannot be read (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@dataclass(frozen=True)
class Gpu:
    """A CUDA device as the compute dtype depends on it."""

    name: str
    capability: tuple[int, int]

    @property
    def native_bf16(self) -> bool:
        """bf16 tensor cores: compute capability 8.0 (Ampere) and newer. Older cards (Pascal, Volta, Turing) run bf16
        only emulated, which torch.cuda.is_bf16_supported() counts unless told including_emulation=False."""
        return self.capability >= (8, 0)

    def __str__(self) -> str:
        return f"{self.name} (compute capability {self.capability[0]}.{self.capability[1]})"


def cuda_gpu(index: int | None = None) -> Gpu:
    """The current CUDA device (or device `index`)."""
    major, minor = torch.cuda.get_device_capability(index)
    return Gpu(torch.cuda.get_device_name(index), (major, minor))


def choose(requested: str = "auto", cuda: bool | None = None, flags: set[str] | None = None,
           gpu: Gpu | None = None) -> Precision:
    """bf16 where it is native (CUDA compute capability 8.0+; CPUs with avx512_bf16 or AMX); else fp16 with loss scaling
    on a GPU, fp32 on a CPU. `gpu`: the CUDA device (default: the current one).

    On a CPU without native bf16, bf16 matmuls are emulated and run ~25x slower than fp32,
    so fp32 is the safe fallback there. An explicit `--dtype bf16` where bf16 is
    emulated is kept, with a warning in the reason.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    device = "cuda" if cuda else "cpu"
    if cuda:
        gpu = cuda_gpu() if gpu is None else gpu
        native = gpu.native_bf16
        slow = f"{gpu} has no native bf16"
    else:
        fast = sorted((cpu_flags() if flags is None else flags) & {"avx512_bf16", "amx_bf16"})
        native = bool(fast)
        slow = "this CPU has no avx512_bf16/AMX"
    if requested != "auto":
        reason = f"--dtype {requested} requested"
        if requested == "bf16" and not native:
            reason += f"; warning: {slow}, so bf16 is emulated and slow (--dtype auto picks {'fp16' if cuda else 'fp32'})"
        elif requested == "fp16" and not cuda:  # CPUs have no fp16 matmul units worth the name
            reason += f"; warning: fp16 on a CPU is emulated and slow (--dtype auto picks {'bf16' if native else 'fp32'})"
        return Precision(device, NAMES[requested], reason)
    if cuda:
        if native:
            return Precision(device, torch.bfloat16, f"{gpu} has native bf16")
        return Precision(device, torch.float16, f"{slow}: fp16 with loss scaling")
    if native:
        return Precision(device, torch.bfloat16, f"CPU has {' and '.join(fast)}: bf16 is fastest")
    return Precision(device, torch.float32, "CPU has no avx512_bf16/AMX (bf16 would be emulated, ~25x slower): fp32")
