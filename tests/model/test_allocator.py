"""model/allocator.py: after keep_freed_memory, glibc serves a tensor of up to 32 MiB from its heap (no mapping of
fresh pages per tensor), and still maps larger ones."""

from __future__ import annotations

import ctypes
import sys

import pytest
import torch

from infopo_cli.model import allocator


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mapped_bytes() -> int:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2().hblkhd


def _glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not _glibc(), reason="mallopt and mallinfo2 are glibc's (2.33+); elsewhere the call returns False")
def test_tensors_up_to_32_mib_come_from_the_heap_and_larger_ones_are_mapped():
    """In a fresh process: in the test session's own, a large free chunk left in the heap by earlier tests serves a
    64 MiB request without mmap (glibc maps only what its free lists cannot hold)."""
    import inspect
    import subprocess

    code = "\n".join([inspect.getsource(_MallInfo2), inspect.getsource(_mapped_bytes), """
import torch
from infopo_cli.model import allocator
assert allocator.keep_freed_memory() and allocator.keep_freed_memory()  # idempotent
before = _mapped_bytes()
small = torch.empty(16 << 20, dtype=torch.uint8)
assert _mapped_bytes() - before < 1 << 20, "16 MiB was mapped"
large = torch.empty(64 << 20, dtype=torch.uint8)
assert _mapped_bytes() - before >= 64 << 20, "64 MiB came from the heap"
"""])
    out = subprocess.run([sys.executable, "-c", "import ctypes\n" + code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-800:]


def test_the_cpu_model_stack_applies_it(tiny_model, monkeypatch):
    from infopo_cli.config import TrainConfig
    from infopo_cli.model import stack
    from infopo_cli.model.precision import Precision

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    stack.load_base(str(tiny_model), TrainConfig(dtype="fp32"), Precision("cpu", torch.float32, "test"))
    assert calls == [1]
