"""benchmarks/vs_trl.py's yardstick and profiling tools, without TRL and without training: the CPU line from
/proc/cpuinfo's text, the counted FLOPs against a hand computation, the matmul probe, the profile summary and the
step profiler's window."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import benchmark_module

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8 avx512vl

processor\t: 1
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8 avx512vl
"""
TINY = {"num_hidden_layers": 2, "hidden_size": 4, "intermediate_size": 8, "num_attention_heads": 2,
        "num_key_value_heads": 1, "vocab_size": 10}


@pytest.fixture(scope="module")
def vs_trl():
    with benchmark_module("vs_trl.py") as module:
        yield module


def test_cpu_line_names_the_model_and_its_bf16_features_in_a_fixed_order(vs_trl):
    assert (vs_trl.cpu_description(CPUINFO)
            == "Intel(R) Xeon(R) Processor (avx512_bf16, amx_bf16, amx_tile, amx_int8, avx512f)")
    epyc = "model name\t: AMD EPYC 9R14\nflags\t\t: fpu avx512f avx512_bf16 avx2\n"
    assert vs_trl.cpu_description(epyc) == "AMD EPYC 9R14 (avx512_bf16, avx512f)"
    assert vs_trl.cpu_description("model name\t: Old CPU\nflags\t\t: fpu sse avx2\n") == "Old CPU (none)"
    assert vs_trl.cpu_description("").endswith("(none)")  # no /proc/cpuinfo: the platform's name, no features


def test_model_dims_from_config(vs_trl):
    dims = vs_trl.ModelDims.from_config(TINY)
    assert (dims.head_dim, dims.kv_heads) == (2, 1)  # head_dim from hidden / heads where the config has none
    assert dims.projections() == [(4, 4), (4, 2), (4, 2), (4, 4), (4, 8), (4, 8), (8, 4)]
    assert vs_trl.ModelDims.from_config({**TINY, "head_dim": 3}).projections()[0] == (4, 6)


def test_counted_flops_per_token_match_a_hand_computation(vs_trl):
    dims = vs_trl.ModelDims.from_config(TINY)
    # linears per layer: 16 + 8 + 8 + 16 + 32 + 32 + 32 = 144, x2 layers + output 4 x 10 -> W = 2 x 328 = 656
    # attention A = 4 x 2 layers x 2 heads x 2 dims x (3 + 1) / 2 = 64; LoRA r=1: R = 2 x 1 x 2 layers x 64 = 256
    policy, backward, reference = 656 + 64 + 256, 656 + 2 * 64 + 2 * 256, 656 + 64
    recompute = 656 - 2 * 4 * 10 + 64 + 256
    assert vs_trl.flops_per_token(dims, False, row_tokens=3, lora_r=1) == policy + backward + reference == 2992
    assert vs_trl.flops_per_token(dims, True, row_tokens=3, lora_r=1) == 2992 + recompute == 3888


def test_smollm2_counts_about_six_times_its_linear_weights_per_token(vs_trl):
    """At the benchmark's own dims: 3 forward-sized passes of ~135M weights (x2 FLOPs each), plus a few % for
    attention and LoRA."""
    dims = vs_trl.ModelDims(30, 576, 1536, 9, 64, 3, 49152)
    weights = 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536) + 576 * 49152
    assert weights == 134_479_872
    ratio = vs_trl.flops_per_token(dims, False) / (6 * weights)
    assert 1.0 < ratio < 1.1


def test_probe_covers_every_shape_and_returns_positive_rates(vs_trl):
    dims = vs_trl.ModelDims.from_config(TINY)
    shapes = vs_trl.probe_shapes(dims)
    assert shapes[("forward", 4, 8)] == 4 and shapes[("backward", 8, 4)] == 4  # gate and up, per layer
    assert shapes[("forward", 8, 4)] == 2 and shapes[("backward", 4, 8)] == 2  # down
    assert shapes[("forward", 4, 10)] == shapes[("backward", 10, 4)] == 1  # the output layer
    assert shapes[("forward", 4, 2)] == 4  # k and v
    probe = vs_trl.probe_matmul(dims, 16, torch.float32, seconds_per_shape=0.0, min_reps=2)
    assert {(r.kind, r.k, r.n): r.per_step for r in probe} == dict(shapes)
    assert all(r.rows == 16 and r.gflops > 0 and math.isfinite(r.gflops) for r in probe)
    weighted = vs_trl.weighted_gflops(probe)
    assert min(r.gflops for r in probe) <= weighted <= max(r.gflops for r in probe)


def test_weighted_rate_is_total_flops_over_total_time(vs_trl):
    row = vs_trl.ProbeRow
    probe = [row("forward", 10, 10, 10, 3, 2.0), row("forward", 10, 10, 30, 1, 6.0)]  # 2000 and 6000 FLOPs a call
    # 3 x 2000 FLOPs at 2 GFLOP/s + 6000 at 6 GFLOP/s: 12000 FLOPs in 4000 ns -> 3 GFLOP/s
    assert vs_trl.weighted_gflops(probe) == pytest.approx(3.0)


def test_matmul_class_ops(vs_trl):
    for op in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear",
               "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention",
               "aten::mkldnn_linear", "aten::_mkldnn_reshape"):
        assert vs_trl.is_matmul_class(op), op
    for op in ("aten::mul", "aten::copy_", "aten::softmax", "Optimizer.step#AdamW.step", "aten::bitwise_and"):
        assert not vs_trl.is_matmul_class(op), op


def test_profile_summary_from_key_averages_like_events(vs_trl):
    event = lambda key, us, n: SimpleNamespace(key=key, self_cpu_time_total=us, count=n)  # noqa: E731
    events = [event("aten::copy_", 150_000, 40), event("aten::mm", 500_000, 120), event("aten::mul", 100_000, 80),
              event("aten::_scaled_dot_product_flash_attention_for_cpu", 100_000, 30), event("aten::add_", 50_000, 10),
              event("aten::to", 50_000, 9), event("aten::neg", 25_000, 3), event("aten::cat", 25_000, 2)]
    top, line = vs_trl.summarise_profile(events, top=3)
    assert len(top) == 3 and top[0].split() == ["50.0%", "500.0", "ms", "120", "calls", "aten::mm"]
    assert "aten::copy_" in top[1] and "15.0%" in top[1]
    assert line == ("matmul-class ops 60.0% of self CPU time; top non-matmul: aten::copy_ 15.0%, aten::mul 10.0%, "
                    "aten::add_ 5.0%, aten::to 5.0%")
    assert vs_trl.summarise_profile([])[1] == "matmul-class ops 0.0% of self CPU time; top non-matmul: none"


def test_step_profiler_records_steps_two_to_four_only(vs_trl, tmp_path):
    path = tmp_path / vs_trl.profile_file_name("TRL DPO, precomputed ref, checkpointing off")
    assert path.name == "profile-trl-dpo-precomputed-ref-checkpointing-off.txt"
    profiler = vs_trl.StepProfiler(path, "a run")
    x = torch.randn(8, 8)
    for step in range(1, 7):
        profiler.begin()
        (x.cos() if step in (1, 5) else x @ x).sum()  # cos only outside the window: it must not show
        profiler.end()
    summary = profiler.finish()
    text = path.read_text()
    assert summary["steps"] == "steps 2-4" and summary["file"] == str(path)
    assert "aten::mm" in text and "aten::cos" not in text
    assert "by op and input shape" in text and "[8, 8]" in text  # the second table groups by input shape
    assert text.rstrip().endswith(summary["line"]) and summary["line"].startswith("matmul-class ops ")
    assert any("aten::mm" in line for line in summary["top"])


def test_step_profiler_of_a_short_run_stops_at_its_end(vs_trl, tmp_path):
    profiler = vs_trl.StepProfiler(tmp_path / "p.txt", "a run")
    for _ in range(3):
        profiler.begin()
        torch.randn(4, 4).sum()
        profiler.end()
    assert profiler.finish()["steps"] == "steps 2-3"
    assert vs_trl.StepProfiler(tmp_path / "q.txt", "one step").finish() is None  # nothing recorded, nothing written


def test_table_shows_the_achieved_rate_and_its_share_of_the_measured_peak(vs_trl, capsys):
    result = vs_trl.Result("infopo dpo", "infopo", "dpo", "bf16", 10.0, 20.0, 2.0, 0.5, 1.0, flops_per_token=1e9)
    vs_trl.print_table([result], 1000, peak_gflops=400.0)  # 100 tokens/s x 1 GFLOP per token = 100 GFLOP/s
    header, _, row = capsys.readouterr().out.splitlines()
    assert "achieved GFLOP/s" in header and "of measured peak %" in header
    assert "   100.0 " in row and "   25.0 " in row
    args = vs_trl.parse_args(["--profile"])
    assert args.profile == "." and not args.probe and vs_trl.parse_args(["--probe"]).probe
    assert vs_trl.parse_args([]).profile is None


def test_the_peak_is_the_faster_of_a_probe_before_and_one_after_the_runs(vs_trl, tmp_path, monkeypatch, capsys):
    """A shared VM slow for the seconds of the first probe (it once read half the rate, and a run then 113% of it)."""
    import importlib.util

    from infopo_cli.model import embedded

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"num_hidden_layers": 2, "hidden_size": 4, "intermediate_size": 8, '
                                       '"num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 10}')
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "trl" else real_find_spec(name, *a))
    import importlib.metadata

    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda d: "1.16.0" if d == "trl" else real_version(d))
    monkeypatch.setattr(embedded, "ensure_converted", lambda log=print: model)
    monkeypatch.setattr(vs_trl, "plain_text_model", lambda source, target: model)
    monkeypatch.setattr(vs_trl, "synthetic_pairs", lambda tokenizer, n: [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    monkeypatch.setattr("infopo_cli.model.stack.load_tokenizer", lambda path: None)
    peaks = iter([50.0, 100.0])
    monkeypatch.setattr(vs_trl, "measured_peak", lambda *a: (vs_trl.ModelDims.from_config(TINY), next(peaks)))

    def run_child(spec, work, i, threads):
        tool, loss = spec["variant"]["tool"], spec["variant"]["loss"]
        return vs_trl.Result(f"{tool} {loss} {i}", tool, loss, "fp32", 10.0, 20.0, None, 1.0, 1.0)

    monkeypatch.setattr(vs_trl, "run_child", run_child)
    monkeypatch.setattr(vs_trl, "flops_per_token", lambda dims, checkpointing: 1e9)
    assert vs_trl.main(["--quick", "--skip-trl-variants"]) == 0
    out = capsys.readouterr().out
    assert "the probe again, after the runs:" in out
    tokens = vs_trl.yardstick_tokens(vs_trl.QUICK_PAIRS)
    share = 100 * (tokens / 10.0) / 100.0  # tokens/s x 1 GFLOP per token against the faster probe's 100 GFLOP/s
    row = next(line for line in out.splitlines() if line.startswith("trl dpo 0"))
    assert f"{share:.1f}" in row.split() and f"{2 * share:.1f}" not in row.split()
