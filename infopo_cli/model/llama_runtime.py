"""llama.cpp (llama-cpp-python) loading a GGUF file the way infopo runs it everywhere: with its weight repacking off.

llama.cpp repacks weights into "extra buffer types" for the CPU it runs on. On this project's Intel Xeons with AMX,
llama-cpp-python 0.3.36's repacked kernels stop the process: a SIGSEGV in decode on any Q8_0 tensor, and an illegal
instruction (`tilezero` in `ggml_backend_amx_mul_mat`) on K-quants. Without repacking the same files run. Users of
llama.cpp itself on such CPUs can pass `--no-repack`; llama-cpp-python does not expose the switch, so its default
model parameters are wrapped for the duration of the load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_llama(path: Path | str, **options: Any) -> Any:
    """`llama_cpp.Llama(model_path=path, **options)` without weight repacking. The caller imports llama_cpp first (and
    says which extra installs it); errors are the caller's to word."""
    import llama_cpp
    import llama_cpp.llama as high_level

    default = llama_cpp.llama_model_default_params

    def without_repacking() -> Any:
        params = default()
        params.use_extra_bufts = False
        return params

    high_level.llama_cpp.llama_model_default_params = without_repacking
    try:
        return llama_cpp.Llama(model_path=str(path), **options)
    finally:
        high_level.llama_cpp.llama_model_default_params = default
