"""Hostile and careless inputs found by trying the hardened main as a stranger would: each is one line on stderr,
exit 2, before anything slow, and nothing is misread or left behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import infopo, write_pairs
from infopo_cli.data.loading import load_pairs
from infopo_cli.errors import ConfigError, DataError, ModelError


def refused(out: subprocess.CompletedProcess, *words: str) -> str:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert all(word in lines[0] for word in words), lines[0]
    return lines[0]


def model_with_config(tiny_model: Path, folder: Path, **changes) -> Path:
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def test_an_empty_data_source_is_not_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_pairs(tmp_path / "pairs.jsonl", 4)  # Path("") is ".": it used to read this folder's files
    with pytest.raises(ConfigError, match="an empty data source"):
        load_pairs("")


def test_a_csv_header_repeated_inside_the_file_is_not_a_pair(tmp_path):
    joined = tmp_path / "joined.csv"
    joined.write_text("prompt,chosen,rejected\nq1,a,b\nprompt,chosen,rejected\nq2,c,d\n")
    with pytest.raises(DataError, match=r"joined\.csv:3: the header again"):
        load_pairs(str(joined))


def test_a_file_name_with_colons_prints_as_itself(tmp_path):
    bad = tmp_path / "a:cat:b.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b", "chosen": "c"}\n')
    refused(infopo("data", "check", str(bad), "--no-tokenizer"), "a:cat:b.jsonl:1: key 'chosen' given twice")


@pytest.mark.parametrize("changes, says", [({"vocab_size": "many"}, "cannot load model"),
                                           ({"hidden_size": -64}, "cannot load model")])
def test_a_model_config_with_wrong_values_is_one_line(tiny_model, tmp_path, pairs_file, changes, says):
    model = model_with_config(tiny_model, tmp_path / "m", **changes)
    out = infopo("train", "--data", str(pairs_file), "--eval-data", "", "--model", str(model), "--max-steps", "1",
                 "--output", str(tmp_path / "o"))
    refused(out, says)
    assert not (tmp_path / "o").exists()


def test_a_truncated_weights_file_is_one_line(tiny_model, tmp_path, pairs_file):
    model = model_with_config(tiny_model, tmp_path / "m")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    out = infopo("train", "--data", str(pairs_file), "--eval-data", "", "--model", str(model), "--max-steps", "1",
                 "--output", str(tmp_path / "o"))
    refused(out, "cannot load model", str(model))


def test_plan_of_a_config_of_the_wrong_shape_is_one_line(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("[1, 2, 3]")
    refused(infopo("plan", "--model", str(tmp_path / "m")), "cannot plan")


def test_dry_run_checks_the_model_folder_and_the_output_place(tiny_model, tmp_path, pairs_file):
    (tmp_path / "empty").mkdir()
    refused(infopo("train", "--data", str(pairs_file), "--model", str(tmp_path / "empty"), "--dry-run"),
            "no config.json in that folder")
    coded = model_with_config(tiny_model, tmp_path / "coded", model_type="evil", auto_map={"AutoConfig": "x.Y"})
    refused(infopo("train", "--data", str(pairs_file), "--model", str(coded), "--dry-run"), "own Python code")
    (tmp_path / "a-file").write_text("x")
    refused(infopo("train", "--data", str(pairs_file), "--model", str(tiny_model), "--output",
                   str(tmp_path / "a-file" / "run"), "--dry-run"), "a-file is a file, not a folder")
    # a typo in one layer name (peft would train the others and drop it): the dry run names it, nothing loaded
    refused(infopo("train", "--data", str(pairs_file), "--model", str(tiny_model), "--target-modules",
                   "q_proj,v_projj", "--dry-run"), "target_modules v_projj: no such layer in this model", "q_proj")


def test_compare_output_that_is_a_file_or_a_broken_plan(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("mine")
    for dry in ([], ["--dry-run"]):
        refused(infopo("compare", "--loss", "infopo,dpo", "--output", str(precious), *dry), "a file is there")
    assert precious.read_text() == "mine"
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / "compare.json").write_text("garbage{")
    refused(infopo("compare", "--loss", "infopo,dpo", "--output", str(tmp_path / "cmp"), "--dry-run"),
            "not a comparison plan infopo can read")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.md").write_text("mine")
    refused(infopo("compare", "--loss", "infopo,dpo", "--output", str(tmp_path / "other"), "--dry-run"),
            "already exists and is not a comparison")


def test_gguf_export_names_a_gguf_file(tmp_path):
    from infopo_cli.export.outputs import claim_gguf

    for name in ("adapter_model.safetensors", "config.toml", "model"):
        with pytest.raises(ConfigError, match="name the file NAME.gguf"):
            claim_gguf(tmp_path / name, overwrite=True)


def test_a_gguf_that_does_not_parse_is_refused_by_the_dry_run(tmp_path, pairs_file):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(ModelError, match="not a readable GGUF file"):
        from infopo_cli.model.source import check_source

        check_source(str(fake))


def test_a_file_of_only_bad_rows_is_not_taken_for_prompts(tmp_path):
    """`eval --data F` said 'F holds prompts without chosen/rejected replies' for a file whose every row was invalid."""
    from infopo_cli.inference.prompts import is_prompt_only

    bad = tmp_path / "dup.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b", "chosen": "c"}\n')
    with pytest.raises(DataError, match=r"dup\.jsonl:1: key 'chosen' given twice"):
        is_prompt_only(str(bad))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is 1 + 1?"}\n')
    assert is_prompt_only(str(prompts))


def test_plan_of_a_missing_path_or_impossible_sizes_is_one_line(tiny_model, tmp_path):
    refused(infopo("plan", "--model", "./nope"), "no such model folder or file: ./nope")
    negative = model_with_config(tiny_model, tmp_path / "neg", hidden_size=-64)
    refused(infopo("plan", "--model", str(negative)), "hidden_size -64 is not a size")


def test_a_preset_that_is_not_a_file_and_a_relative_extends(tmp_path, monkeypatch):
    from infopo_cli import presets

    os.mkfifo(tmp_path / "fifo.toml")
    with pytest.raises(ConfigError, match="not a regular file"):
        presets.load_preset(str(tmp_path / "fifo.toml"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "base.toml").write_text("lr = 1e-5\n")
    (tmp_path / "mine" / "child.toml").write_text('extends = "base.toml"\nbeta = 0.3\n')
    monkeypatch.chdir(tmp_path)  # not the presets' folder: `extends` is read beside the preset, as written
    cfg = presets.load_preset("mine/child.toml")
    assert cfg.lr == 1e-5 and cfg.beta == 0.3
