"""`infopo doctor` on this CPU machine, and on CUDA machines simulated by patching torch's CUDA queries."""

from __future__ import annotations

import json
import sys
from importlib.metadata import version

import pytest
import torch
from packaging.version import Version
from rich.console import Console
from typer.testing import CliRunner

from infopo_cli import cli, compat

GIB = 2**30


@pytest.fixture
def doctor(monkeypatch):
    """`infopo ARGS` through typer's runner, printed wide enough that no value wraps; returns (exit code, output)."""
    from infopo_cli.model.stack import import_bitsandbytes

    import_bitsandbytes()  # as this CPU machine loads it, before any test makes torch look like a CUDA build
    monkeypatch.setattr(cli, "console", Console(width=400, emoji=False))

    def run(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(cli.app, ["doctor", *args])
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        return result.exit_code, result.output
    return run


def fake_cuda(monkeypatch, name: str, capability: tuple[int, int], free_gib: float, total_gib: float) -> None:
    """A CUDA 12.8 build of torch with one GPU; is_bf16_supported() as torch's, which by default counts emulated bf16."""
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "device_count", lambda: 1)
    monkeypatch.setattr(cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or capability >= (8, 0))
    monkeypatch.setattr(cuda, "mem_get_info", lambda device=None: (int(free_gib * GIB), int(total_gib * GIB)))
    monkeypatch.setattr(cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(cuda, "get_per_process_memory_fraction", lambda device=None: 1.0)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch._C, "_cuda_getDriverVersion", lambda: 12080, raising=False)


def checks(output: str) -> dict[str, dict]:
    report = json.loads(output)
    return {check["name"]: check for check in report["checks"]}


def unset_allocator_settings(monkeypatch) -> None:
    """Neither allocator variable set, and after the test each as it was, whatever `cli.main` set meanwhile (set
    first: monkeypatch's delenv of an unset variable records nothing to restore)."""
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_on_this_cpu_machine(doctor):
    code, out = doctor()
    assert code == 0 and "Traceback" not in out and "unknown (" not in out, out
    for line in ("python", "torch build", "CPU build (no CUDA)", "bitsandbytes kernels", "flex attention",
                 "transformers", "peft", "datasets", "--dtype auto", "gradient checkpointing off (smollm2-135m)",
                 "free RAM", "CUDA allocator", "no CUDA GPU: training runs on the CPU (slow for models above ~1B)"):
        assert line in out, line
    code, out = doctor("--json")
    found = checks(out)
    assert code == 0 and found["GPU"]["value"] == "none"
    assert found["bitsandbytes kernels"]["value"] == "CPU build" and not found["bitsandbytes kernels"]["problem"]
    assert found["--dtype auto"]["value"].split(" on ")[0] in ("bf16", "fp32")
    assert found["transformers"]["value"] in (f"{version('transformers')} ({verdict}: {compat.tested_range('transformers')})"
                                              for verdict in (compat.OK, compat.NEWER))
    # every check's problem, in the checks' order; beyond the GPU's, the CPU's only where it lacks bf16, and a
    # library's only where the registry has a release newer than the tested range (CI installs the newest)
    problems = json.loads(out)["problems"]
    assert problems == [check["problem"] for check in json.loads(out)["checks"] if check["problem"]]
    assert found["GPU"]["problem"] in problems
    for problem in set(problems) - {found["GPU"]["problem"], found["CPU"]["problem"]}:
        package = problem.split()[0]
        assert problem.startswith(f"{package} {version(package)} is {compat.NEWER} ("), problem
        top = Version(compat.TESTED[package][1]).release  # past the top bound at its own precision, counted here
        assert Version(version(package)).release[:len(top)] > top, problem


@pytest.mark.parametrize("free_gib, held", [(20.0, True), ("tight", False)])
def test_the_cpu_plan_says_when_the_4bit_base_is_held_dequantised(doctor, monkeypatch, free_gib, held):
    from infopo_cli import presets
    from infopo_cli.model import memory_plan as mp
    from infopo_cli.model import recompute
    from infopo_cli.model.precision import choose

    if free_gib == "tight":  # the run fits, its de-quantised copy does not (bf16 from 2.8 GiB, float32 from 4.8)
        free_gib = 2.5 if choose("auto").dtype.itemsize == 2 else 4.2

    monkeypatch.setattr(recompute, "free_memory", lambda device: int(free_gib * GIB))
    code, out = doctor("--json")
    value = checks(out)["gradient checkpointing off (smollm2-135m)"]["value"]
    cfg = presets.load_preset("smollm2-135m")
    planned = recompute.for_settings(cfg, "cpu", choose("auto").dtype.itemsize,
                                     recompute.budget(cfg, "cpu", free=int(free_gib * GIB)).usable)
    assert code == 0 and planned.run.dequantised is held
    said = f"the 4-bit base also held de-quantised ({mp.gib(mp.dequantised_bytes(planned.arch, planned.run))} GiB"
    assert (said in value) is held, value


def test_a_turing_card_trains_in_fp16(doctor, monkeypatch):
    fake_cuda(monkeypatch, "NVIDIA GeForce RTX 2080 Ti", (7, 5), 10.6, 11.0)
    code, out = doctor("--preset", "llama3-8b-qlora")
    assert code == 0 and "Traceback" not in out
    assert "NVIDIA GeForce RTX 2080 Ti (compute capability 7.5), no native bf16 (emulated only), 10.6 of 11.0 GiB free" in out
    assert ("fp16 on cuda: NVIDIA GeForce RTX 2080 Ti (compute capability 7.5) has no native bf16: fp16 with loss "
            "scaling") in out
    found = checks(doctor("--preset", "llama3-8b-qlora", "--json")[1])
    assert found["CUDA driver"]["value"] == "supports CUDA 12.8" and not found["CUDA driver"]["problem"]
    assert "no native bf16" in found["GPU 0"]["problem"]
    assert "free GPU memory" in found["gradient checkpointing auto (llama3-8b-qlora)"]["value"]
    # this machine's bitsandbytes loaded its CPU library: on a CUDA machine 4-bit loading would fail
    assert "4-bit loading" in found["bitsandbytes kernels"]["problem"]
    assert "no CUDA GPU" not in out


def test_an_ada_card_trains_in_bf16_and_the_plan_reads_its_free_memory(doctor, monkeypatch):
    fake_cuda(monkeypatch, "NVIDIA GeForce RTX 4090", (8, 9), 23.1, 24.0)
    code, out = doctor("--preset", "llama3-8b-qlora", "--json")
    found = checks(out)
    assert code == 0
    assert found["GPU 0"]["value"] == "NVIDIA GeForce RTX 4090 (compute capability 8.9), native bf16, 23.1 of 24.0 GiB free"
    assert not found["GPU 0"]["problem"]
    assert found["--dtype auto"]["value"] == "bf16 on cuda: NVIDIA GeForce RTX 4090 (compute capability 8.9) has native bf16"
    from infopo_cli.model import memory_plan as mp

    plan = found["gradient checkpointing auto (llama3-8b-qlora)"]  # as `infopo train` budgets: free memory less a margin
    margin = mp.margin(24 * GIB)
    assert f"{mp.gib(int(23.1 * GIB) - margin)} GiB free GPU memory once a {mp.gib(margin)} GiB margin" in plan["value"]
    assert not plan["problem"]


def test_an_old_driver_is_flagged(doctor, monkeypatch):
    fake_cuda(monkeypatch, "NVIDIA GeForce RTX 4090", (8, 9), 23.1, 24.0)
    monkeypatch.setattr(torch._C, "_cuda_getDriverVersion", lambda: 11080, raising=False)
    found = checks(doctor("--json")[1])
    assert "update the NVIDIA driver" in found["CUDA driver"]["problem"]


def test_an_older_minor_driver_runs_the_build_by_minor_version_compatibility(doctor, monkeypatch):
    fake_cuda(monkeypatch, "NVIDIA GeForce RTX 4090", (8, 9), 23.1, 24.0)  # a CUDA 12.8 build
    monkeypatch.setattr(torch._C, "_cuda_getDriverVersion", lambda: 12040, raising=False)
    code, out = doctor("--json")
    driver = checks(out)["CUDA driver"]
    assert code == 0 and not driver["problem"] and driver["problem"] not in json.loads(out)["problems"]
    assert driver["value"].startswith("supports CUDA 12.4 (older than this torch's CUDA 12.8 build")
    assert "minor-version compatibility" in driver["value"]


def test_a_rocm_build_names_its_hip_version_not_a_cuda_one(doctor, monkeypatch):
    fake_cuda(monkeypatch, "AMD Radeon RX 7900 XTX", (11, 0), 23.1, 24.0)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", "6.3.42134-a9a80e791", raising=False)
    monkeypatch.setattr(torch._C, "_cuda_getDriverVersion", lambda: 60342134, raising=False)  # HIP's encoding
    driver = checks(doctor("--json")[1])["CUDA driver"]
    assert driver["value"].startswith("ROCm 6.3.42134-a9a80e791") and "60342" not in driver["value"]
    assert "CUDA 6" not in driver["value"] and not driver["problem"]


@pytest.mark.parametrize("env, says", [({}, "torch's default (PYTORCH_ALLOC_CONF and PYTORCH_CUDA_ALLOC_CONF unset)"),
                                       ({"PYTORCH_ALLOC_CONF": "expandable_segments:True",
                                         "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
                                        "expandable_segments:True: infopo's default (set PYTORCH_ALLOC_CONF to choose)"),
                                       ({"PYTORCH_ALLOC_CONF": "expandable_segments:False"},
                                        "PYTORCH_CUDA_ALLOC_CONF unset; PYTORCH_ALLOC_CONF=expandable_segments:False "
                                        "(set in the environment)")])
def test_the_allocator_row_says_whose_setting_it_is(doctor, monkeypatch, env, says):
    unset_allocator_settings(monkeypatch)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert checks(doctor("--json")[1])["CUDA allocator"]["value"] == says


def test_infopo_s_own_allocator_default_is_labelled_as_such(monkeypatch, capsys):
    unset_allocator_settings(monkeypatch)  # the user set neither: `infopo` sets its default (Linux)
    monkeypatch.setattr(sys, "argv", ["infopo", "doctor", "--json"])
    monkeypatch.setattr(sys, "platform", "linux")
    cli.main()
    assert checks(capsys.readouterr().out)["CUDA allocator"]["value"].endswith("infopo's default (set "
                                                                               "PYTORCH_ALLOC_CONF to choose)")


def test_a_preset_given_as_a_path_is_shown_as_given(doctor, monkeypatch, tmp_path):
    preset = tmp_path / "my 8b.toml"
    preset.write_text('extends = "llama3-8b-qlora"\n')
    code, out = doctor("--preset", str(preset))
    assert code == 0 and f"for `infopo train --preset '{preset}'`" in out
    fake_cuda(monkeypatch, "NVIDIA GeForce RTX 2080 Ti", (7, 5), 2.0, 11.0)  # an 8B does not fit in 2 GiB
    found = checks(doctor("--preset", str(preset), "--json")[1])
    assert f"`infopo plan --preset '{preset}'` shows what to change" in found["gradient checkpointing auto (my-8b)"]["problem"]


@pytest.mark.parametrize("triton", [False, True])
def test_flex_attention_on_cuda_needs_triton(doctor, monkeypatch, tmp_path, triton):
    import importlib.machinery
    import importlib.util

    assert checks(doctor("--json")[1])["flex attention"]["value"].startswith("CUDA only")  # this CPU machine
    fake_cuda(monkeypatch, "NVIDIA GeForce RTX 4090", (8, 9), 23.1, 24.0)
    real = importlib.util.find_spec
    spec = importlib.machinery.ModuleSpec("triton", None) if triton else None
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: spec if name == "triton" else real(name, *a, **k))
    flex = checks(doctor("--json")[1])["flex attention"]
    assert flex["value"].startswith("available" if triton else "unavailable: it compiles its kernels with triton")
    assert not flex["problem"]  # the preset does not use it
    preset = tmp_path / "flex.toml"
    preset.write_text('extends = "smollm2-135m"\nattn_implementation = "flex_attention"\n')
    flex = checks(doctor("--preset", str(preset), "--json")[1])["flex attention"]
    assert bool(flex["problem"]) != triton and ("pip install triton" in flex["problem"] or triton)


def test_versions_outside_the_tested_range_are_flagged(doctor, monkeypatch):
    monkeypatch.setitem(compat.TESTED, "transformers", ("5.0", "5.1"))
    monkeypatch.setitem(compat.TESTED, "peft", ("99.0", "99.1"))
    code, out = doctor("--json")
    found, problems = checks(out), json.loads(out)["problems"]
    assert code == 0
    assert compat.NEWER in found["transformers"]["value"] and compat.BELOW in found["peft"]["value"]
    assert any(p.startswith(f"transformers {version('transformers')} is newer than tested (5.0 to 5.1)") for p in problems), problems
    assert any(p.startswith("peft") and "pip install -U peft" in p for p in problems), problems
    code, out = doctor()
    assert "newer than tested" in out and "below the tested range" in out


def test_a_failing_probe_says_unknown_and_the_others_still_run(doctor, monkeypatch):
    fake_cuda(monkeypatch, "NVIDIA GeForce RTX 4090", (8, 9), 23.1, 24.0)

    def broken(device=None):
        raise RuntimeError("CUDA error: unspecified launch failure\nCUDA kernel errors might be asynchronously reported")
    monkeypatch.setattr(torch.cuda, "mem_get_info", broken)
    code, out = doctor()
    assert code == 0 and "Traceback" not in out and "RuntimeError" not in out
    assert "unknown (CUDA error: unspecified launch failure)" in out and "asynchronously" not in out
    assert "GPU could not be checked: CUDA error: unspecified launch failure" in out  # listed, not "nothing known"
    assert "bf16 on cuda" in out and "transformers" in out


@pytest.mark.parametrize("installed, verdict", [("5.25.0", compat.OK), ("5.25.3", compat.OK), ("5.0.0rc1", compat.OK),
                                                ("4.57.1", compat.BELOW), ("5.26.0", compat.NEWER)])
def test_a_bound_is_compared_at_its_own_precision(monkeypatch, installed, verdict):
    monkeypatch.setitem(compat.TESTED, "transformers", ("5.0", "5.25"))
    assert compat.verdict("transformers", installed) == verdict
    monkeypatch.setitem(compat.TESTED, "torch", ("2.4", "2.13.0"))
    assert compat.verdict("torch", "2.13.0+cpu") == compat.OK and compat.verdict("torch", "2.13.1") == compat.NEWER


def test_an_unknown_preset_is_one_line(monkeypatch, capsys):
    unset_allocator_settings(monkeypatch)  # what `main` sets there does not leak into the other tests
    monkeypatch.setattr(sys, "argv", ["infopo", "doctor", "--preset", "no-such-preset"])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "unknown preset 'no-such-preset'" in err and "Traceback" not in err
