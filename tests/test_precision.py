"""Compute dtype by capability: bf16 only where the hardware makes it fast, fp32 otherwise."""

import torch

from infopo_cli.model.precision import choose


def test_cpu_with_native_bf16_gets_bf16():
    p = choose(cuda=False, flags={"avx2", "avx512_bf16"})
    assert p.dtype == torch.bfloat16 and p.device == "cpu" and "avx512_bf16" in p.reason
    assert choose(cuda=False, flags={"amx_bf16"}).dtype == torch.bfloat16


def test_cpu_without_bf16_falls_back_to_fp32_and_says_why():
    p = choose(cuda=False, flags={"avx2", "avx512f"})
    assert p.dtype == torch.float32 and "no avx512_bf16" in p.reason


def test_cuda():
    assert choose(cuda=True, cuda_bf16=True).dtype == torch.bfloat16
    assert choose(cuda=True, cuda_bf16=False).dtype == torch.float16


def test_explicit_request_wins():
    p = choose("fp32", cuda=False, flags={"avx512_bf16"})
    assert p.dtype == torch.float32 and p.dtype_name == "fp32" and "requested" in p.reason
