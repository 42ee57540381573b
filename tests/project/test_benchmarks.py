"""benchmarks/vs_trl.py without TRL and without training: its pairs are exactly the lengths the yardstick counts,
its plan of runs, and the one-line hint when TRL is missing; benchmarks/gpu.sh's dry run end to end on a CPU (the
smoke phase first, the phase caps within the budget, every row measured); benchmarks/read_memory.py runs."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, benchmark_module, build_tokenizer

SCRIPT = ROOT / "benchmarks" / "vs_trl.py"
GPU_SH = SCRIPT.parent / "gpu.sh"


@pytest.fixture(scope="module")
def vs_trl():
    with benchmark_module("vs_trl.py") as module:
        yield module


def word_tokenizer():
    """A byte-level word tokenizer with GPT-2's space marker, as SmolLM2's: ' alpha' is one token, no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [a + b for a in ("bar", "cor", "dun", "fel", "gim", "hol", "jap", "kes", "lum", "mor", "nep")
             for b in ("ab", "ed", "ix", "on", "ut", "ys", "el", "ar", "om", "in", "us")]
    vocab = {"<unk>": 0, "<|im_end|>": 1, **{"Ġ" + w: i + 2 for i, w in enumerate(words)}, "Ġx": len(words) + 2}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<unk>")


def test_synthetic_pairs_have_exact_lengths_as_infopo_reads_them(vs_trl):
    from infopo_cli.data.formats import PreferencePair
    from infopo_cli.data.tokenization import encode_pair

    tok = word_tokenizer()
    pairs = vs_trl.synthetic_pairs(tok, 6, prompt_tokens=5, response_tokens=9)
    assert pairs == vs_trl.synthetic_pairs(tok, 6, prompt_tokens=5, response_tokens=9)  # seeded: the same pairs every run
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    for p in pairs:
        encoded = encode_pair(tok, PreferencePair(p["prompt"], p["chosen"], p["rejected"]), 512, 256)
        # plain text: the prompt as built, each response as built plus EOS (what TRL reads too)
        assert (len(encoded.prompt_ids), len(encoded.chosen_ids), len(encoded.rejected_ids)) == (5, 10, 10)
        assert encoded.chosen_ids[-1] == tok.eos_token_id
    assert vs_trl.yardstick_tokens(64) == 64 * 2 * (64 + 192) == 32768  # the yardstick


def test_too_few_single_token_words_is_an_error(vs_trl):
    with pytest.raises(ValueError, match="single-token words"):  # a byte-level tokenizer has no whole words
        vs_trl.synthetic_pairs(build_tokenizer(chat_template=None), 2)


def test_plan(vs_trl):
    names = [v.name for v in vs_trl.variants(skip_trl_variants=False)]
    assert len(set(names)) == 7 and sum(n.startswith("TRL") for n in names) == 4  # precompute x checkpointing
    assert [v.tool for v in vs_trl.variants(skip_trl_variants=True)] == ["trl", "infopo", "infopo", "infopo"]
    assert vs_trl.parse_args(["--quick", "--skip-trl-variants"]).quick and not vs_trl.parse_args([]).quick


@pytest.mark.parametrize("loss", ["dpo", "infopo"])
def test_infopo_flags_are_the_cli_s_and_give_the_benchmark_settings(vs_trl, loss, tmp_path, monkeypatch):
    """The flags go through `infopo train` itself; training is replaced by capturing the settings it would run."""
    from typer.testing import CliRunner

    from infopo_cli import cli
    from infopo_cli.train import recipe

    class Parsed(Exception):
        pass

    captured = {}

    def capture(cfg, report):
        captured["cfg"] = cfg
        raise Parsed

    monkeypatch.setattr(recipe, "train", capture)
    variant = vs_trl.Variant("infopo", loss, checkpointing=False)
    flags = vs_trl.infopo_flags(variant, tmp_path / "model", tmp_path / "pairs.jsonl", 64, tmp_path / "run")
    result = CliRunner().invoke(cli.app, ["train", *flags])
    assert isinstance(result.exception, Parsed), result.output
    cfg = captured["cfg"]
    assert (cfg.loss, cfg.max_steps * cfg.batch_size, cfg.batch_size, cfg.grad_accum) == (loss, 64, 4, 1)  # one epoch
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules) == (16, 16, 0.0, "all-linear")
    assert (cfg.reference, cfg.gradient_checkpointing, cfg.eval_data, cfg.dtype, cfg.lr) == ("precompute", "off", "", "auto", 5e-5)
    assert cfg.beta == (0.1 if loss == "dpo" else 0.25)  # InfoPO keeps the preset's own beta
    assert cfg.max_length >= 64 + 192 + 1 and cfg.load_in_4bit  # nothing truncated; NF4


def test_without_trl_one_line_says_how_to_install(vs_trl, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(vs_trl.importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))
    assert vs_trl.main([]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "pip install '.[bench]'" in out[0]


def test_child_result_line_round_trips(vs_trl):
    result = vs_trl.Result("x", "trl", "dpo", "bf16", 10.0, 20.0, None, 1.0, 2.0)
    assert vs_trl.Result(**json.loads(json.dumps(vars(result)))) == result


def test_read_memory_benchmark_reads_every_row_both_ways():
    """benchmarks/read_memory.py runs (its figures are its output, not asserted): each format's row count agrees."""
    script = ROOT / "benchmarks" / "read_memory.py"
    out = subprocess.run([sys.executable, str(script), "--rows", "50"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [line.split()[0] for line in out.stdout.splitlines()[1:]] == ["pairs.jsonl", "pairs.json", "pairs.csv"]


def gpu_dry_run(tmp_path: Path, tokenizer: Path, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PY": sys.executable, "TOK": str(tokenizer), "WORK": str(tmp_path / "work"),
           "OUT": str(tmp_path / "out"), "COLUMNS": "200", **env}
    return subprocess.run(["bash", str(GPU_SH), "--dry-run"], capture_output=True, text=True, env=env, timeout=1200)


def caps_line(text: str, prefix: str) -> tuple[dict[str, int], int, int | None]:
    """'phase caps...: setup 30 + smoke 60 + ... = 455 s <= budget 480 s' -> ({phase: seconds}, total, budget)."""
    line = next(line for line in text.splitlines() if line.startswith(prefix))
    parts, total = line.split(": ", 1)[1].split(" = ")
    caps = {name.strip(): int(seconds) for name, seconds in (p.strip().rsplit(" ", 1) for p in parts.split(" + "))}
    budget = re.search(r"<= budget (\d+) s", total)
    return caps, int(total.split()[0]), int(budget.group(1)) if budget else None


def test_gpu_dry_run_smokes_first_and_measures_every_row_within_the_budget(tmp_path):
    """The GPU benchmark's whole script on a CPU: the phase caps (the GPU run's, with and without the Unsloth row)
    add up within the budget, the smoke phase runs first, then the infopo rows on one model load, the table last."""
    tokenizer = tmp_path / "tokenizer"
    word_tokenizer().save_pretrained(tokenizer)
    run = gpu_dry_run(tmp_path, tokenizer)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    caps, total, budget = caps_line(run.stdout, "phase caps: ")
    other, other_total, _ = caps_line(run.stdout, "phase caps with")
    assert sum(caps.values()) == total <= budget <= 600 - 60  # a device call runs 600 s at most: room for the report
    assert sum(other.values()) == other_total <= budget and other["unsloth"] > 0 == caps["unsloth"]
    assert caps["smoke"] <= 60
    started = [line.split()[1].rstrip(":") for line in run.stdout.splitlines() if re.match(r"== \S+: at most", line)]
    assert started[:3] == ["smoke", "prep", "infopo"], started
    assert ("trl" in started) == (importlib.util.find_spec("trl") is not None)  # TRL's phase where TRL is installed

    work = tmp_path / "work"
    smoke = json.loads((work / "smoke.json").read_text())
    assert smoke["status"] == "ok" and len(smoke["infopo"]["losses"]) == 2
    assert smoke["flex"] == {"status": "skipped (CUDA only)"}  # no flex-attention backward on a CPU: said, not run
    assert "smoke: flex attention skipped: CUDA only" in run.stdout
    assert smoke["infopo"]["checkpointing"].startswith("gradient checkpointing offload")
    infopo = json.loads((work / "infopo.json").read_text())
    rows = {row["tag"]: row for row in infopo["rows"]}
    assert set(rows) == {"on", "auto"} and all(r["status"] == "completed" and r["step_s"] > 0 for r in rows.values())
    assert rows["on"]["recomputed_layers"] == infopo["layers"] == 2  # the main row recomputes every layer, as TRL's
    assert infopo["reference_pass_s"] > 0 and infopo["reference_key_s"] < 1 and infopo["share_prompt"]
    # the length search: 1024 and 896 "run out of memory" (FAKE_OOM_ABOVE=768), 768 trains for real
    assert infopo["fit"]["longest"] == 768 and infopo["fit"]["first_failing"] == 896
    assert [t["length"] for t in infopo["fit"]["tries"] if t["fits"]] == [768]
    table = (tmp_path / "out" / "results.md").read_text()
    assert table in run.stdout and "DRY RUN on CPU" in table
    on = next(line for line in table.splitlines() if "(main row)" in line).split(" | ")
    assert on[1] == "on: every layer recomputes" and math.isclose(float(on[2]), rows["on"]["step_s"], abs_tol=1e-3)
    assert float(on[4].replace(",", "")) < float(on[3].replace(",", ""))  # the reference pre-pass costs tokens/s
    assert "one model load" in table


def test_gpu_dry_run_stops_after_a_failed_smoke_and_refuses_caps_over_the_budget(tmp_path):
    broken = tmp_path / "tokenizer"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{}")  # no tokenizer: the smoke phase fails at once
    run = gpu_dry_run(tmp_path, broken)
    assert run.returncode == 1
    assert "SMOKE FAILED" in run.stdout and "STOPPED: the smoke phase failed" in run.stdout
    assert "== prep" not in run.stdout and "== infopo" not in run.stdout
    assert run.stdout.rstrip().splitlines()[-1].startswith("phases (rc, seconds)")  # the report still comes
    over = gpu_dry_run(tmp_path, broken, BUDGET_S="300")
    assert over.returncode == 2 and "add up to more than the 300 s budget" in over.stdout
    assert "== smoke" not in over.stdout  # nothing ran


def test_gpu_sh_help_is_usage_on_stdout_and_an_unknown_argument_is_an_error():
    shown = subprocess.run(["bash", str(GPU_SH), "--help"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and not shown.stderr
    assert shown.stdout.startswith("usage: bash benchmarks/gpu.sh [--dry-run]") and "Phases, in order: smoke" in shown.stdout
    assert subprocess.run(["bash", str(GPU_SH), "-h"], capture_output=True, text=True, timeout=60).stdout == shown.stdout
    wrong = subprocess.run(["bash", str(GPU_SH), "--dryrun"], capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and not wrong.stdout and wrong.stderr.startswith("usage: ")


@pytest.fixture
def gpu_bench():
    with benchmark_module("gpu_bench.py") as module:
        yield module


def test_the_smoke_s_flex_run_reports_a_failure_or_a_timeout_without_stopping_the_smoke(gpu_bench, tmp_path, monkeypatch,
                                                                                       capsys):
    """The CUDA-only flex-attention run of the smoke phase, with stand-ins for `infopo train`: a failed or late run is
    a warning in smoke.json (the 8B rows run on sdpa), never an exception that would stop the benchmark."""
    assert gpu_bench.start_flex(tmp_path, tmp_path / "ckpt", cuda=False) is None
    assert gpu_bench.finish_flex(tmp_path, None, cuda=False) == {"status": "skipped (CUDA only)"}

    def stand_in(code: str):
        with (tmp_path / "flex.log").open("w") as log:
            return subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT)
    failed = gpu_bench.finish_flex(tmp_path, stand_in("print('error: no triton'); raise SystemExit(2)"), cuda=True)
    assert failed == {"status": "failed", "error": "infopo train with flex attention: exit 2, status None: error: no triton"}
    monkeypatch.setenv("PHASE_DEADLINE", str(time.time() + 9))  # the phase ends in 1 s (its 8 s margin kept)
    late = gpu_bench.finish_flex(tmp_path, stand_in("import time; time.sleep(60)"), cuda=True)
    assert late["status"] == "failed" and "did not finish within the smoke phase" in late["error"]
    assert capsys.readouterr().out.count("smoke warning: infopo train with flex attention") == 2
