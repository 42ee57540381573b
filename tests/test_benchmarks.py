"""benchmarks/vs_trl.py without TRL and without training: its pairs are exactly the lengths the yardstick counts,
its plan of runs, and the one-line hint when TRL is missing."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import build_tokenizer

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "vs_trl.py"


@pytest.fixture(scope="module")
def vs_trl():
    spec = importlib.util.spec_from_file_location("vs_trl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["vs_trl"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("vs_trl", None)


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
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "read_memory.py"
    out = subprocess.run([sys.executable, str(script), "--rows", "50"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [line.split()[0] for line in out.stdout.splitlines()[1:]] == ["pairs.jsonl", "pairs.json", "pairs.csv"]
