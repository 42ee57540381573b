"""Compute dtype by capability: bf16 only where the hardware computes it natively; else fp16 on a GPU, fp32 on a CPU."""

import pytest
import torch

from infopo_cli.model.precision import Gpu, choose

TURING = Gpu("NVIDIA GeForce RTX 2080 Ti", (7, 5))
ADA = Gpu("NVIDIA GeForce RTX 4090", (8, 9))


def test_cpu_with_native_bf16_gets_bf16():
    p = choose(cuda=False, flags={"avx2", "avx512_bf16"})
    assert p.dtype == torch.bfloat16 and p.device == "cpu" and "avx512_bf16" in p.reason
    assert choose(cuda=False, flags={"amx_bf16"}).dtype == torch.bfloat16


def test_cpu_without_bf16_falls_back_to_fp32_and_says_why():
    p = choose(cuda=False, flags={"avx2", "avx512f"})
    assert p.dtype == torch.float32 and "no avx512_bf16" in p.reason


def test_cuda():
    assert choose(cuda=True, gpu=ADA).dtype == torch.bfloat16
    assert choose(cuda=True, gpu=Gpu("NVIDIA A100-SXM4-80GB", (8, 0))).dtype == torch.bfloat16
    assert choose(cuda=True, gpu=TURING).dtype == torch.float16
    assert choose(cuda=True, gpu=Gpu("Tesla V100-SXM2-32GB", (7, 0))).dtype == torch.float16


def fake_gpu(monkeypatch, name: str, capability: tuple[int, int]) -> None:
    """torch.cuda as a CUDA build sees the card; is_bf16_supported() as torch's, which by default counts emulated bf16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or capability >= (8, 0))


def test_auto_on_a_gpu_that_only_emulates_bf16_is_fp16_and_says_why(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA GeForce RTX 2080 Ti", (7, 5))
    p = choose()
    assert p.device == "cuda" and p.dtype == torch.float16 and p.dtype_name == "fp16"
    assert p.reason == "NVIDIA GeForce RTX 2080 Ti (compute capability 7.5) has no native bf16: fp16 with loss scaling"


def test_auto_on_an_ampere_or_newer_gpu_is_bf16(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA GeForce RTX 4090", (8, 9))
    p = choose()
    assert p.dtype == torch.bfloat16 and p.reason == "NVIDIA GeForce RTX 4090 (compute capability 8.9) has native bf16"


@pytest.mark.parametrize("cuda, flags, gpu, auto", [(True, None, TURING, "fp16"), (False, {"avx2"}, None, "fp32")])
def test_explicit_bf16_where_it_is_emulated_is_kept_with_a_warning(cuda, flags, gpu, auto):
    p = choose("bf16", cuda=cuda, flags=flags, gpu=gpu)
    assert p.dtype == torch.bfloat16 and p.reason.startswith("--dtype bf16 requested; warning: ")
    assert "emulated" in p.reason and f"--dtype auto picks {auto}" in p.reason and "\n" not in p.reason


@pytest.mark.parametrize("flags, auto", [({"avx2"}, "fp32"), ({"amx_bf16"}, "bf16")])
def test_explicit_fp16_on_a_cpu_is_kept_with_a_warning(flags, auto):
    p = choose("fp16", cuda=False, flags=flags)
    assert p.dtype == torch.float16 and p.reason == ("--dtype fp16 requested; warning: fp16 on a CPU is emulated and slow "
                                                     f"(--dtype auto picks {auto})")
    assert choose("fp16", cuda=True, gpu=TURING).reason == "--dtype fp16 requested"


def test_explicit_bf16_where_it_is_native_has_no_warning():
    assert choose("bf16", cuda=True, gpu=ADA).reason == "--dtype bf16 requested"
    assert choose("bf16", cuda=False, flags={"amx_bf16"}).reason == "--dtype bf16 requested"
    assert choose("fp16", cuda=True, gpu=TURING).reason == "--dtype fp16 requested"


def test_explicit_request_wins():
    p = choose("fp32", cuda=False, flags={"avx512_bf16"})
    assert p.dtype == torch.float32 and p.dtype_name == "fp32" and "requested" in p.reason
