"""`infopo doctor`: what this machine offers a training run, what `infopo train` would pick on it, and what is known
to be slow or broken in this combination of hardware and libraries.

Every probe is guarded: one that fails reads "unknown (why)" and the others still run, so the command itself never
fails on a broken installation, which is when it is needed most.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import shlex
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from infopo_cli import __version__, compat
from infopo_cli.config import TrainConfig
from infopo_cli.errors import first_line
from infopo_cli.model import memory_plan as mp
from infopo_cli.model import recompute as recomputation

GIB = 2**30
NO_GPU = "no CUDA GPU: training runs on the CPU (slow for models above ~1B)"
INFOPO_ALLOC_CONF = "expandable_segments:True"  # what cli.expandable_segments_by_default sets where the user set neither


@dataclass(frozen=True)
class Finding:
    """One line of `infopo doctor`: a section, what was checked, its value, and a problem if there is one."""

    section: str
    name: str
    value: str
    problem: str = ""  # what is slow or broken here, and what to do; "" when nothing is


def _guarded(section: str, name: str, probe: Callable[[], list[Finding]]) -> list[Finding]:
    try:
        return probe()
    except Exception as err:  # a probe that fails says so; the others still run
        reason = first_line(err)
        return [Finding(section, name, f"unknown ({reason})", f"{name} could not be checked: {reason}")]


def collect(cfg: TrainConfig, preset: str | None = None) -> list[Finding]:
    """Every finding, in the order shown; `cfg`: the preset whose run is planned, `preset`: as the user gave it (a
    name or a path; default `cfg.preset`)."""
    given = preset or cfg.preset or ""
    probes = [("machine", "python", _python), ("machine", "CPU", _cpu), ("machine", "torch build", _torch),
              ("machine", "CUDA driver", _driver), ("GPU", "GPU", _gpus),
              ("kernels", "bitsandbytes kernels", _bitsandbytes), ("kernels", "flash-attention", _flash_attention),
              ("kernels", "flex attention", lambda: _flex_attention(cfg))]
    probes += [("libraries", package, lambda package=package: _version(package)) for package in compat.TESTED]
    probes += [("infopo train", "--dtype auto", _dtype), ("infopo train", "gradient checkpointing",
                                                           lambda: _checkpointing(cfg, given)),
               ("infopo train", "CUDA allocator", _allocator)]
    findings = []
    for section, name, probe in probes:
        findings += _guarded(section, name, probe)
    return findings


# --- the machine -------------------------------------------------------------------------------------------------
def _python() -> list[Finding]:
    return [Finding("machine", "python", f"{platform.python_version()} ({platform.platform()})")]


def _cpu() -> list[Finding]:
    import torch

    from infopo_cli.model.precision import cpu_flags

    name = next((line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines() if line.startswith("model name")),
                platform.machine())
    fast = sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    value = f"{name}, {os.cpu_count()} cores, " + (" and ".join(fast) if fast else "no avx512_bf16/AMX")
    problem = "" if fast or torch.cuda.is_available() else \
        "this CPU has no avx512_bf16/AMX: a CPU run computes in fp32 (bf16 would be emulated, ~25x slower)"
    return [Finding("machine", "CPU", value, problem)]


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _torch() -> list[Finding]:
    import torch

    build = (f"CUDA {torch.version.cuda} build" if torch.version.cuda else
             f"ROCm {torch.version.hip} build" if getattr(torch.version, "hip", None) else "CPU build (no CUDA)")
    return [Finding("machine", "torch build", f"{torch.__version__}, {build}")]


def _driver() -> list[Finding]:
    """The newest CUDA the NVIDIA driver supports (cudaDriverGetVersion, as torch exposes it; no nvidia-smi). Only an
    older major version is a problem: CUDA's minor-version compatibility runs a 12.8 build on a 12.4 driver."""
    import torch

    hip = getattr(torch.version, "hip", None)
    if hip:  # the same getter answers HIP's version there, which is no CUDA version
        return [Finding("machine", "CUDA driver", f"ROCm {hip} (a ROCm build of torch: no CUDA driver)")]
    getter = getattr(torch._C, "_cuda_getDriverVersion", None)
    if getter is None:
        return [Finding("machine", "CUDA driver", "not queried: this torch has no CUDA")]
    raw = int(getter())
    if raw <= 0:
        return [Finding("machine", "CUDA driver", "none found", "torch is a CUDA build but finds no NVIDIA driver: "
                        "install one (nvidia-smi should list the GPU)")]
    driver = (raw // 1000, raw % 1000 // 10)
    value = f"supports CUDA {driver[0]}.{driver[1]}"
    if not torch.version.cuda:
        return [Finding("machine", "CUDA driver", value)]
    build = tuple(int(part) for part in torch.version.cuda.split(".")[:2])
    if driver[0] < build[0]:
        return [Finding("machine", "CUDA driver", value, f"the driver supports CUDA {driver[0]}.{driver[1]}, older than "
                        f"this torch's CUDA {torch.version.cuda} build: update the NVIDIA driver")]
    if driver < build:
        value += (f" (older than this torch's CUDA {torch.version.cuda} build, which runs on it by CUDA minor-version "
                  "compatibility; if a compiled kernel fails to load, update the driver)")
    return [Finding("machine", "CUDA driver", value)]


def _gpus() -> list[Finding]:
    import torch

    from infopo_cli.model.precision import cuda_gpu

    with warnings.catch_warnings(record=True) as caught:  # torch says here why a CUDA build sees no GPU
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if not available:
        problem = NO_GPU
        if torch.version.cuda:
            why = "; ".join(first_line(w.message) for w in caught) or "check the driver and CUDA_VISIBLE_DEVICES"
            problem = f"torch is a CUDA {torch.version.cuda} build but sees no GPU ({why}): {NO_GPU}"
        return [Finding("GPU", "GPU", "none", problem)]
    findings = []
    for index in range(torch.cuda.device_count()):
        gpu = cuda_gpu(index)
        free, total = torch.cuda.mem_get_info(index)
        bf16 = "native bf16" if gpu.native_bf16 else "no native bf16 (emulated only)"
        problem = "" if gpu.native_bf16 else (f"{gpu.name} has no native bf16: --dtype auto trains in fp16 with loss "
                                              "scaling; --dtype bf16 would be emulated and slow")
        findings.append(Finding("GPU", f"GPU {index}", f"{gpu}, {bf16}, {free / GIB:.1f} of {total / GIB:.1f} GiB free",
                                problem))
    return findings


# --- kernels -----------------------------------------------------------------------------------------------------
def _bitsandbytes() -> list[Finding]:
    import torch

    from infopo_cli.model.stack import import_bitsandbytes

    quiet = logging.getLogger("bitsandbytes")  # a failed CUDA library prints a page; its first line is shown here
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        import_bitsandbytes()
        from bitsandbytes import cextension
    finally:
        quiet.setLevel(level)
    lib = cextension.lib
    if getattr(lib, "compiled_with_cuda", False):
        return [Finding("kernels", "bitsandbytes kernels", f"CUDA ({Path(lib._lib._name).name})")]
    failed = str(vars(lib).get("error_msg", "")).strip()  # set where a native library failed to load
    value = "CPU build" + (f" (its CUDA library did not load: {failed.splitlines()[0]})"
                           if failed and torch.cuda.is_available() else "")
    problem = "" if not torch.cuda.is_available() else (
        f"bitsandbytes has no CUDA kernels for this torch (CUDA {torch.version.cuda}): 4-bit loading (--4bit, every "
        "preset) fails on the GPU; pip install -U bitsandbytes")
    return [Finding("kernels", "bitsandbytes kernels", value, problem)]


def _flash_attention() -> list[Finding]:
    try:
        installed = importlib.metadata.version("flash-attn")
    except importlib.metadata.PackageNotFoundError:
        return [Finding("kernels", "flash-attention", "not installed (fine: attention runs on sdpa)")]
    from transformers.utils import is_flash_attn_2_available

    usable = is_flash_attn_2_available()
    return [Finding("kernels", "flash-attention", f"{installed}, " + (
        "usable with --attn-implementation flash_attention_2" if usable else
        "installed but not usable here (it needs a CUDA GPU and flash-attn 2.3.3+); attention runs on sdpa"))]


def _flex_attention(cfg: TrainConfig) -> list[Finding]:
    import torch

    importlib.import_module("torch.nn.attention.flex_attention")
    if not torch.cuda.is_available():
        return [Finding("kernels", "flex attention", "CUDA only: torch has no flex-attention backward on a CPU")]
    if importlib.util.find_spec("triton") is None:  # flex attention's kernels are generated by triton at first use
        problem = "" if cfg.attn_implementation != "flex_attention" else (
            "the preset uses --attn-implementation flex_attention, which needs triton: pip install triton, or use sdpa")
        return [Finding("kernels", "flex attention", "unavailable: it compiles its kernels with triton, which is not "
                        "installed", problem)]
    return [Finding("kernels", "flex attention", "available: --attn-implementation flex_attention")]


# --- library versions --------------------------------------------------------------------------------------------
def _version(package: str) -> list[Finding]:
    try:
        installed = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        if package == "unsloth":
            return [Finding("libraries", package, "not installed (optional: --backend unsloth)")]
        return [Finding("libraries", package, "not installed", f"{package} is not installed: pip install infopo's "
                        "requirements (pip install .)")]
    verdict, tested = compat.verdict(package, installed), compat.tested_range(package)
    problem = "" if verdict == compat.OK else f"{package} {installed} is {verdict} ({tested})" + (
        f": pip install -U {package}" if verdict == compat.BELOW else ": if a run fails, try a tested version")
    return [Finding("libraries", package, f"{installed} ({verdict}: {tested})", problem)]


# --- what `infopo train` would pick ------------------------------------------------------------------------------
def _dtype() -> list[Finding]:
    from infopo_cli.model.precision import choose

    precision = choose("auto")
    return [Finding("infopo train", "--dtype auto", f"{precision.dtype_name} on {precision.device}: {precision.reason}")]


def _checkpointing(cfg: TrainConfig, given: str) -> list[Finding]:
    """As `infopo train` plans it (model/recompute.py) against this machine's free GPU memory, or free RAM on a
    CPU, for micro-batches at the preset's max_length (a run plans its own longest one); `given`: the preset as the
    user gave it, for the command to run."""
    name = f"gradient checkpointing {cfg.gradient_checkpointing} ({cfg.preset or 'preset'})"
    if cfg.backend == "unsloth":
        return [Finding("infopo train", name, "Unsloth checkpoints its own way (--backend unsloth)")]
    if cfg.max_length == "auto":
        return [Finding("infopo train", name, "planned from the data (the preset's max_length is auto)")]
    from infopo_cli.model.precision import choose

    precision = choose(cfg.dtype)
    free = recomputation.free_memory(precision.device)  # measured once for both modes
    card = recomputation.card_memory() if precision.device == "cuda" and free is not None else None
    findings = []
    for mode in dict.fromkeys((cfg.gradient_checkpointing, "auto")):
        settings = replace(cfg, gradient_checkpointing=mode)
        memory = recomputation.budget(settings, precision.device, free=free, card=card)  # as `infopo train` budgets
        planned = recomputation.for_settings(settings, precision.device, precision.dtype.itemsize, memory.usable)
        value = (f"{recomputation.describe(planned.choice, mode, memory.usable, memory.where)}; micro-batches of "
                 f"{cfg.batch_size} pairs x {cfg.max_length} tokens")
        if planned.run.dequantised:
            value += (f"; the 4-bit base also held de-quantised "
                      f"({mp.gib(mp.dequantised_bytes(planned.arch, planned.run))} GiB of RAM, for speed)")
        problem = "" if planned.choice.fits or precision.device != "cuda" or mode != cfg.gradient_checkpointing else (
            f"preset {given}: the memory plan does not fit in the {memory.where}: `infopo plan --preset "
            f"{shlex.quote(given)}` shows what to change")
        findings.append(Finding("infopo train", name if mode == cfg.gradient_checkpointing
                                else "gradient checkpointing auto", value, problem))
    return findings


def _allocator() -> list[Finding]:
    """torch's allocator settings as this process sees them (PYTORCH_ALLOC_CONF is torch 2.9's name for the other):
    the user's, or infopo's default, which `infopo` sets in both where the user set neither."""
    names = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
    if all(os.environ.get(name) == INFOPO_ALLOC_CONF for name in names):
        return [Finding("infopo train", "CUDA allocator", f"{INFOPO_ALLOC_CONF}: infopo's default (set PYTORCH_ALLOC_CONF "
                        "to choose)")]
    if not any(name in os.environ for name in names):
        return [Finding("infopo train", "CUDA allocator", "torch's default (PYTORCH_ALLOC_CONF and PYTORCH_CUDA_ALLOC_CONF "
                        "unset)")]
    return [Finding("infopo train", "CUDA allocator", "; ".join(f"{n}={os.environ[n]}" if n in os.environ else f"{n} unset"
                                                              for n in names) + " (set in the environment)")]


# --- output ------------------------------------------------------------------------------------------------------
def show(console: Console, cfg: TrainConfig, as_json: bool = False, preset: str | None = None) -> None:
    """The findings as a table (or JSON); `preset`: as the user gave it (a name or a path; default `cfg.preset`)."""
    given = preset or cfg.preset or ""
    findings = collect(cfg, given)
    problems = [f.problem for f in findings if f.problem]
    if as_json:
        sys.stdout.write(json.dumps({"infopo": __version__, "preset": cfg.preset, "checks": [asdict(f) for f in findings],
                                     "problems": problems}, indent=2) + "\n")
        return
    table = Table("check", "found", title=f"infopo {__version__} doctor: this machine for `infopo train --preset "
                  f"{escape(shlex.quote(given))}`", title_justify="left")
    section = findings[0].section if findings else ""
    for finding in findings:
        if finding.section != section:
            table.add_section()
            section = finding.section
        value = escape(finding.value)
        table.add_row(escape(finding.name), f"[yellow]{value}[/]" if finding.problem else value)
    console.print(table)
    if not problems:
        console.print("[green]nothing known to be slow or broken here[/]", highlight=False)
        return
    console.print("[yellow]known to be slow or broken here:[/]", highlight=False)
    for problem in problems:
        console.print(f"  - {escape(problem)}", highlight=False, soft_wrap=True)
