"""`infopo train --init-adapter DIR`: the policy starts from an existing LoRA, the reference is a frozen copy of it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import at_forward, ctrl_c, tiny_cfg
from infopo_cli.data.batching import collate
from infopo_cli.data.loading import read_pairs
from infopo_cli.data.tokenization import encode_pair
from infopo_cli.errors import CheckpointError, ConfigError
from infopo_cli.losses.registry import resolve
from infopo_cli.losses.types import Needs
from infopo_cli.model import stack
from infopo_cli.model.precision import Precision
from infopo_cli.presets import load_preset
from infopo_cli.train import recipe
from infopo_cli.train.logps import batch_logps, pair_logps
from infopo_cli.train.resume import resumed_config

CPU = Precision("cpu", torch.float32, "test")
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def sft(tiny_model, tmp_path_factory) -> Path:
    """An 'SFT' adapter: 2 steps of the recipe (r=4, alpha=8, dropout 0.1, all linear layers); lora_B is non-zero."""
    from conftest import write_pairs

    folder = tmp_path_factory.mktemp("sft")
    pairs = write_pairs(folder / "pairs.jsonl", 24)
    recipe.train(tiny_cfg(tiny_model, pairs, folder / "adapter", max_steps=2, lr=5e-2, lora_dropout=0.1, eval_data="",
                           load_in_4bit=True))
    return folder / "adapter"


def init_cfg(tiny_model, pairs_file, output, adapter, **kw):
    """On the 4-bit base: the init adapter and its frozen reference copy sit on the quantised layers."""
    return tiny_cfg(tiny_model, pairs_file, output, init_adapter=str(adapter), **{"eval_data": "", "load_in_4bit": True, **kw})


def policy_and_reference(tiny_model, pairs_file, adapter):
    cfg = stack.adopt_init_adapter(init_cfg(tiny_model, pairs_file, "unused", adapter))
    model, _ = stack.load_init_adapter(stack.load_base(str(tiny_model), cfg, CPU), cfg, with_reference=True)
    tokenizer = stack.load_tokenizer(str(tiny_model))
    pairs = [encode_pair(tokenizer, p, 128, 64) for p in read_pairs(str(pairs_file))[:4]]
    return model, pairs, tokenizer.pad_token_id


def adapter_tensors(model, name: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{name}." in n}


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return sum(float((a[k] - b[k]).abs().sum()) for k in a)


@pytest.mark.run
def test_at_step_0_policy_and_reference_are_the_init_adapter_not_the_base(tiny_model, pairs_file, sft):
    model, pairs, pad = policy_and_reference(tiny_model, pairs_file, sft)
    model.eval()  # the policy's dropout is off: the two adapters compute the same function
    batch = collate(pairs, pad)
    out = pair_logps(model, batch, Needs(reference=True))
    assert torch.equal(out.policy_chosen, out.ref_chosen) and torch.equal(out.policy_rejected, out.ref_rejected)
    with model.disable_adapter(), torch.no_grad():
        bare = batch_logps(model, batch).sums
    assert (bare[:4] - out.policy_chosen).abs().min() > 1e-4 and (bare[4:] - out.ref_rejected).abs().min() > 1e-4
    assert model.active_adapter == stack.POLICY
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(adapter_tensors(model, stack.POLICY))


@pytest.mark.run
def test_a_step_trains_the_policy_adapter_only(tiny_model, pairs_file, sft):
    model, pairs, pad = policy_and_reference(tiny_model, pairs_file, sft)
    batch = collate(pairs, pad)
    with torch.no_grad():
        start = pair_logps(model.eval(), batch, Needs(reference=True))
    policy, reference = adapter_tensors(model, stack.POLICY), adapter_tensors(model, stack.REFERENCE)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == len(policy) == len(reference) > 0
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)

    model.train()
    recipe.accumulate_gradients(model, [pairs], *resolve("dpo", {}), pad, "cpu")  # reference pass, then policy
    named = dict(model.named_parameters())
    assert all(named[n].grad is None and not named[n].requires_grad for n in reference)
    assert all(named[n].grad is not None and named[n].requires_grad for n in policy)
    assert all(torch.equal(named[n], policy[n]) for n in policy)  # the reference pass changed nothing
    optimizer.step()

    assert all(torch.equal(named[n], reference[n]) for n in reference)
    assert any(not torch.equal(named[n], policy[n]) for n in policy)
    after = pair_logps(model.eval(), batch, Needs(reference=True))
    # the reference is still the init adapter (the step-0 policy), not the bare base
    assert torch.equal(after.ref_chosen, start.policy_chosen) and torch.equal(after.ref_rejected, start.policy_rejected)
    assert not torch.equal(after.policy_chosen, start.policy_chosen)


@pytest.mark.run
def test_a_run_starts_from_the_init_adapter_and_saves_only_the_policy(tiny_model, pairs_file, sft, tmp_path, monkeypatch):
    from infopo_cli.export.merged import from_run, merged_model

    loaded = []
    real = stack.load_init_adapter
    monkeypatch.setattr(stack, "load_init_adapter", lambda *a, **k: loaded.append(real(*a, **k)) or loaded[-1])
    recipe.train(init_cfg(tiny_model, pairs_file, tmp_path / "init", sft, loss="dpo", max_steps=2, lr=1e-3))
    recipe.train(tiny_cfg(tiny_model, pairs_file, tmp_path / "fresh", loss="dpo", max_steps=2, lr=1e-3, eval_data=""))
    assert stack.REFERENCE in loaded[0][0].peft_config  # dpo has a reference

    start, ours, fresh = (load_file(str(folder / WEIGHTS)) for folder in (sft, tmp_path / "init", tmp_path / "fresh"))
    assert 0 < distance(ours, start) < distance(fresh, start) / 10
    assert not [p for p in (tmp_path / "init").rglob("*") if stack.REFERENCE in p.name]  # peft would write reference/
    assert sorted(p.parent.name for p in (tmp_path / "init").rglob("adapter_config.json")) == ["checkpoint-2", "init"]
    adapter = json.loads((tmp_path / "init" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_dropout"] == 0.1  # the init adapter's, which the run adopted
    saved = load_preset(str(tmp_path / "init" / "config.toml"))
    assert saved.init_adapter == str(sft.resolve()) and saved.lora_dropout == 0.1

    merged, _ = merged_model(from_run(tmp_path / "init"))  # export: the run folder is a normal single LoRA
    base = merged_model(from_run(tmp_path / "fresh"))[0]
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)


@pytest.mark.run
def test_resume_reloads_both_adapters_and_continues_exactly(tiny_model, pairs_file, sft, tmp_path, monkeypatch):
    adapter = shutil.copytree(sft, tmp_path / "sft")
    cfg = init_cfg(tiny_model, pairs_file, tmp_path / "stopped", adapter, max_steps=4, eval_data=str(pairs_file))
    at_forward(monkeypatch, 2, ctrl_c)
    assert recipe.train(cfg).steps == 2
    monkeypatch.undo()
    run = tmp_path / "stopped"
    again = resumed_config(load_preset(str(run / "config.toml")), {"init_adapter": str(adapter)}, run)

    original = (adapter / WEIGHTS).read_bytes()
    tensors = load_file(str(adapter / WEIGHTS))
    save_file({k: v + 1e-3 for k, v in tensors.items()}, str(adapter / WEIGHTS))
    with pytest.raises(CheckpointError, match="init adapter changed") as changed:
        recipe.train(again, resume=run)
    (adapter / WEIGHTS).write_bytes(original)

    resumed = recipe.train(again, resume=run)
    whole = recipe.train(init_cfg(tiny_model, pairs_file, tmp_path / "whole", adapter, max_steps=4, eval_data=str(pairs_file)))
    assert resumed.status == whole.status == "completed" and resumed.steps == 4
    a, b = load_file(str(run / WEIGHTS)), load_file(str(tmp_path / "whole" / WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.eval_after == whole.eval_after
    assert "\n" not in str(changed.value)

    shutil.rmtree(adapter)
    with pytest.raises(ConfigError, match=f"--init-adapter {adapter}: no such folder"):
        recipe.train(again, resume=run)


def _edited(sft: Path, folder: Path, **changes) -> Path:
    shutil.copytree(sft, folder)
    settings = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**settings, **changes}))
    return folder


@pytest.mark.parametrize("given, says", [({"lora_r": 8}, "--lora-r 8 (the adapter's is 4)"),
                                         ({"target_modules": ["q_proj"]}, "--target-modules q_proj (the adapter's is")])
@pytest.mark.run
def test_run_settings_that_differ_from_the_adapter_are_one_line(tiny_model, pairs_file, sft, tmp_path, given, says):
    with pytest.raises(ConfigError, match=r"^--init-adapter .*: its LoRA settings are fixed") as err:
        recipe.train(tiny_cfg(tiny_model, pairs_file, tmp_path / "out", init_adapter=str(sft), **given))
    assert says in str(err.value) and str(sft) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.run
def test_an_adapter_for_other_layers_or_another_model_is_one_line(tiny_model, pairs_file, sft, tmp_path):
    cfg = stack.adopt_init_adapter(init_cfg(tiny_model, pairs_file, "unused",
                                            _edited(sft, tmp_path / "other-layers", target_modules=["w1", "w2"])))
    assert cfg.target_modules == ["w1", "w2"]
    with pytest.raises(ConfigError, match=r"other-layers: its target modules w1,w2 do not match this model's layers"):
        stack.load_init_adapter(stack.load_base(str(tiny_model), cfg, CPU), cfg, with_reference=True)
    other = _edited(sft, tmp_path / "other-model", base_model_name_or_path="meta-llama/Llama-3.1-8B")
    with pytest.raises(ConfigError, match="it was trained on 'meta-llama/Llama-3.1-8B', not on this run's model"):
        stack.adopt_init_adapter(init_cfg(tiny_model, pairs_file, "unused", other))
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        stack.adopt_init_adapter(init_cfg(tiny_model, pairs_file, "unused", tmp_path))
    for key, value, says in (("r", "x", "expected a whole number of at least 1, got 'x'"),
                             ("lora_alpha", "big", "expected a number above 0, got 'big'"),
                             ("lora_dropout", 1.5, "expected a number from 0 to below 1, got 1.5"),
                             ("target_modules", 5, "expected a name, a pattern or a list of names, got 5")):
        broken = _edited(sft, tmp_path / f"bad-{key}", **{key: value})  # peft would fail with a TypeError after loading
        with pytest.raises(ConfigError, match=re.escape(f"--init-adapter {broken}/adapter_config.json: field '{key}': {says}")):
            stack.adopt_init_adapter(init_cfg(tiny_model, pairs_file, "unused", broken))
    listed = _edited(sft, tmp_path / "a-list")
    (listed / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="adapter_config.json: expected an object of settings, got list"):
        stack.adopt_init_adapter(init_cfg(tiny_model, pairs_file, "unused", listed))
    torn = _edited(sft, tmp_path / "torn")
    (torn / WEIGHTS).write_bytes((torn / WEIGHTS).read_bytes()[:100])
    cfg = stack.adopt_init_adapter(init_cfg(tiny_model, pairs_file, "unused", torn))
    with pytest.raises(ConfigError, match=f"--init-adapter {torn}: cannot read {WEIGHTS}"):
        stack.load_init_adapter(stack.load_base(str(tiny_model), cfg, CPU), cfg, with_reference=False)


@pytest.mark.run
def test_cli_mismatch_is_one_red_line(tiny_model, pairs_file, sft, tmp_path, monkeypatch, capsys):
    from infopo_cli import cli

    monkeypatch.setattr("sys.argv", ["infopo", "train", "--model", str(tiny_model), "--data", str(pairs_file),
                                     "--init-adapter", str(sft), "--lora-r", "8", "--output", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and err.startswith("error: --init-adapter") and "--lora-r 8" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.run
def test_a_reference_free_loss_loads_no_reference_adapter(tiny_model, pairs_file, sft, tmp_path, monkeypatch):
    loaded = []
    real = stack.load_init_adapter
    monkeypatch.setattr(stack, "load_init_adapter", lambda *a, **k: loaded.append(real(*a, **k)) or loaded[-1])
    summary = recipe.train(init_cfg(tiny_model, pairs_file, tmp_path / "out", sft, loss="simpo", max_steps=1))
    assert summary.status == "completed"
    assert list(loaded[0][0].peft_config) == [stack.POLICY]
