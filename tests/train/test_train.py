"""The recipe end to end on a tiny random Llama: outputs, invariants, reload, interruption."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from conftest import make_home, tiny_cfg, write_pairs
from infopo_cli.model import stack
from infopo_cli.train import recipe, reference_cache
from infopo_cli.data.batching import collate, eval_batches
from infopo_cli.config import TrainConfig
from infopo_cli.data.loading import read_pairs
from infopo_cli.errors import OutputError
from infopo_cli.train.evaluate import Evaluator
from infopo_cli.losses.registry import LOSSES, PRIORS, resolve
from infopo_cli.model.precision import Precision
from infopo_cli.presets import load_preset
from infopo_cli.data.tokenization import encode_pair


CPU = Precision("cpu", torch.float32, "test")


def count_reference_passes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per `reference_mode` block entered (a forward with the adapter off), counted from now on."""
    real, calls = stack.reference_mode, []
    monkeypatch.setattr(stack, "reference_mode", lambda model: calls.append(1) or real(model))
    return calls


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory, shared_home):
    """InfoPO on the 4-bit base, 3 steps, evaluated before and after; and how many reference passes the whole run made
    (in a home of its own: another module's run on the same model and pairs would have filled the reference cache)."""
    folder = tmp_path_factory.mktemp("run")
    pairs = write_pairs(folder / "pairs.jsonl", 24)
    cfg = tiny_cfg(tiny_model, pairs, folder / "out", load_in_4bit=True)  # the adapter reloads onto a 4-bit base
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INFOPO_HOME", str(make_home(tmp_path_factory, shared_home)))
        passes = count_reference_passes(mp)
        summary = recipe.train(cfg)
    return cfg, summary, len(passes)


@pytest.mark.run
def test_run_folder_contents(run):
    cfg, summary, reference_passes = run
    out = summary.output
    names = {p.name for p in __import__("pathlib").Path(out).iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "config.toml",
            "metrics.jsonl", "summary.json", "plot.png"} <= names
    records = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 3]
    for key in ("loss", "rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert all(key in r for r in records if r["kind"] == "train")
    assert summary.status == "completed" and summary.steps == 3 and summary.tokens_per_s > 0
    assert summary.eval_before["eval/loss"] == pytest.approx(1.0)  # InfoPO is exactly 1 at init
    # --reference precompute: one pass over the training pairs before the first step, none in the steps; the
    # evaluation at step 0 reads the untrained policy as the reference and keeps it for the last one
    assert reference_passes == 1


def test_held_out_evaluation_builds_no_autograd_graph(tiny_model, monkeypatch):
    """Both ways in (the recipe calls `totals`): a graph per held-out batch once took a CPU run to 17 GiB."""
    from infopo_cli.train import evaluate

    from infopo_cli.data.tokenization import TokenizedPair

    cfg = TrainConfig(dtype="fp32", lora_r=4, lora_alpha=8)
    model = stack.attach_lora(stack.load_base(str(tiny_model), cfg, CPU), cfg)
    batch = collate([TokenizedPair([5, 6, 7], [8, 9], [10, 11, 12])], 0)
    grad_enabled, real = [], evaluate.pair_logps
    monkeypatch.setattr(evaluate, "pair_logps", lambda *a, **k: grad_enabled.append(torch.is_grad_enabled()) or real(*a, **k))
    evaluator = Evaluator([batch], *resolve("infopo", {}), "cpu")
    evaluator(model)
    totals = evaluator.totals(model)
    assert grad_enabled == [False, False] and totals is not None and model.training


@pytest.mark.run
def test_saved_config_reloads_as_a_preset(run):
    cfg, summary, _ = run
    again = load_preset(f"{summary.output}/config.toml")
    assert again.model == cfg.model and again.lora_r == 4 and again.beta == 1.0 and again.max_steps == 3


@pytest.mark.run
def test_only_lora_changed_and_reload_reproduces_training_logps(run, tiny_model):
    """PeftModel.from_pretrained on the run folder gives back the log-probs the run logged at its end."""
    cfg, summary, _ = run
    saved = load_file(f"{summary.output}/adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    assert any(float(v.abs().max()) > 0 for k, v in saved.items() if "lora_B" in k)  # B starts at zero

    base = stack.load_base(str(tiny_model), cfg, CPU)
    reloaded = PeftModel.from_pretrained(base, summary.output)
    tokenizer = stack.load_tokenizer(summary.output)
    pairs = [encode_pair(tokenizer, p, cfg.max_length, cfg.max_prompt_length) for p in read_pairs(cfg.eval_data)]
    batches = [collate(b, tokenizer.pad_token_id) for b in eval_batches(pairs, cfg.eval_batch_size)]
    metrics = Evaluator(batches, *resolve("infopo", {}), "cpu")(reloaded)
    for key in ("eval/logps/chosen", "eval/logps/rejected", "eval/loss", "eval/rewards/margins"):
        assert metrics[key] == pytest.approx(summary.eval_after[key], abs=1e-4), key
    assert metrics["eval/logps/chosen"] != pytest.approx(summary.eval_before["eval/logps/chosen"], abs=1e-3)


@pytest.mark.run
def test_refuses_to_overwrite_an_existing_folder(run, tiny_model, pairs_file):
    _, summary, _ = run
    before = sorted(p.name for p in __import__("pathlib").Path(summary.output).iterdir())
    with pytest.raises(OutputError, match="already exists"):
        recipe.train(tiny_cfg(tiny_model, pairs_file, summary.output))
    assert sorted(p.name for p in __import__("pathlib").Path(summary.output).iterdir()) == before


def test_bad_data_stops_before_the_model_loads(tmp_path, pairs_file):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "c"}\n')
    cfg = tiny_cfg(tmp_path / "no-such-model", bad, tmp_path / "out")
    with pytest.raises(Exception, match=r"bad.jsonl:1: field 'rejected': missing"):
        recipe.train(cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("loss", ["infopo", "dpo", "rmipo", "orpo", "mi"])
def test_split_of_the_global_batch_does_not_change_loss_or_gradient(tiny_model, pairs_file, loss):
    """8 pairs as 1 x 8 or as 4 x 2 micro-batches, prompts read once or twice: same loss, same gradient (on the 4-bit
    base, as a QLoRA run reads it)."""
    cfg = tiny_cfg(tiny_model, pairs_file, "unused", load_in_4bit=True)
    model = stack.attach_lora(stack.load_base(str(tiny_model), cfg, CPU), cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    tokenizer = stack.load_tokenizer(str(tiny_model))
    pairs = [encode_pair(tokenizer, p, 128, 64) for p in read_pairs(str(pairs_file))[:8]]
    results = []
    tokens = []
    for split, share in (([pairs], False), ([pairs[i:i + 2] for i in range(0, 8, 2)], False), ([pairs], True)):
        model.zero_grad()
        metrics, n = recipe.accumulate_gradients(model, split, *resolve(loss, {}), tokenizer.pad_token_id, "cpu", share)
        results.append((metrics.means()["loss"], [p.grad.clone() for p in model.parameters() if p.requires_grad]))
        tokens.append(n)
    for other in results[1:]:
        assert results[0][0] == pytest.approx(other[0], rel=1e-5)
        for a, b in zip(results[0][1], other[1]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert tokens[2] == tokens[0] - sum(len(p.prompt_ids) for p in pairs)  # each prompt read once


@pytest.mark.run
def test_ctrl_c_stops_at_the_step_boundary_with_a_checkpoint_and_the_adapter(tiny_model, pairs_file, tmp_path, monkeypatch):
    """SIGINT during step 3 (of 5) lets that step finish, then saves checkpoint-3 and the adapter."""
    from conftest import at_forward, ctrl_c

    at_forward(monkeypatch, 3, ctrl_c)
    summary = recipe.train(tiny_cfg(tiny_model, pairs_file, tmp_path / "out", max_steps=5, eval_data=""))
    assert summary.status == "stopped" and summary.steps == 3 and summary.exit_code == 130
    assert f"infopo train --resume {tmp_path / 'out'}" in summary.message
    assert (tmp_path / "out" / "checkpoint-3" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "checkpoint-3" / "training_state.pt").is_file()
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


@pytest.mark.run
def test_resuming_a_finished_run_changes_nothing_and_loads_no_model(tiny_model, pairs_file, tmp_path, monkeypatch):
    """It wrote the outputs again from a fresh process: summary.json's peak memory became the idle resume's."""
    import io

    from rich.console import Console

    from infopo_cli.train.progress import Reporter

    cfg = tiny_cfg(tiny_model, pairs_file, tmp_path / "out", max_steps=2, eval_data="", save_every=1)
    first = recipe.train(cfg)
    outputs = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "out").iterdir() if p.is_file()}
    monkeypatch.setattr(recipe, "_load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    said = io.StringIO()
    again = recipe.train(cfg, Reporter(Console(file=said, width=200)), resume=tmp_path / "out")
    assert again == first and "finished its 2 steps already: nothing to do" in said.getvalue()
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "out").iterdir() if p.is_file()} == outputs


@pytest.mark.run
@pytest.mark.parametrize("dtype, kernel", [("bf16", "matmul"), ("fp32", "sdpa")])
def test_a_run_names_the_attention_kernel_auto_chose(tiny_model, pairs_file, tmp_path, dtype, kernel):
    """16-bit compute on a CPU runs `matmul` (its forward by sdpa where the CPU has AMX, and the line says so)."""
    import io

    from rich.console import Console

    from infopo_cli.model import attention
    from infopo_cli.train.progress import Reporter

    said = io.StringIO()
    recipe.train(tiny_cfg(tiny_model, pairs_file, tmp_path / "out", max_steps=1, eval_data="", dtype=dtype),
                 Reporter(Console(file=said, width=300)))
    assert f"attention kernel: {attention.describe(kernel)}\n" in said.getvalue()


@pytest.mark.run
def test_dpo_run_and_eval_every(tiny_model, pairs_file, tmp_path):
    summary = recipe.train(tiny_cfg(tiny_model, pairs_file, tmp_path / "out", loss="dpo", max_steps=4, eval_every=2))
    records = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 2, 4]
    assert summary.eval_before["eval/loss"] == pytest.approx(0.693147, abs=1e-5)  # ln 2 at init


# every pair loss (kto trains on unpaired rows: tests/train/test_unpaired_training.py), and the MI loss once per prior
EVERY_LOSS = [(name, prior) for name in LOSSES if "pairs" in LOSSES[name].data for prior in (PRIORS if name == "mi" else [None])]


@pytest.fixture(scope="module")
def policy(tiny_model, tmp_path_factory):
    """A LoRA policy on the tiny model (the adapter still zero, as at step 1) and 4 training pairs."""
    cfg = TrainConfig(dtype="fp32", load_in_4bit=False, lora_r=4, lora_alpha=8)
    model = stack.attach_lora(stack.load_base(str(tiny_model), cfg, CPU), cfg)
    tokenizer = stack.load_tokenizer(str(tiny_model))
    data = write_pairs(tmp_path_factory.mktemp("policy") / "pairs.jsonl", 4)
    return model, [encode_pair(tokenizer, p, 128, 64) for p in read_pairs(str(data))], tokenizer.pad_token_id


@pytest.mark.parametrize("name, prior", EVERY_LOSS, ids=[f"{n}-{p}" if p else n for n, p in EVERY_LOSS])
def test_every_loss_takes_a_step_with_only_the_reference_passes_it_declares(policy, monkeypatch, name, prior):
    """A training step of each loss as the recipe runs it (--reference precompute, two micro-batches): a finite loss,
    finite LoRA gradients that are not all zero, and reference passes exactly as the registry declares: none for a
    reference-free loss, one before training for a cacheable reference, one per micro-batch for the TDPO KL."""
    model, pairs, pad_id = policy
    spec, params = resolve(name, {"prior": prior} if prior else {})
    needs = spec.needs(params)
    passes = count_reference_passes(monkeypatch)
    reference = None
    if reference_cache.applies("precompute", needs):
        reference = reference_cache.ReferenceTable(pairs, reference_cache.compute(model, pairs, 8, pad_id, False, "cpu"))
        assert len(passes) == 1
        passes.clear()
    model.zero_grad()
    metrics, _ = recipe.accumulate_gradients(model, [pairs[:2], pairs[2:]], spec, params, pad_id, "cpu",
                                             reference=reference)
    assert math.isfinite(metrics.means()["loss"])
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(bool(g.any()) for g in grads)
    assert len(passes) == (2 if needs.kl else 0)
    assert (reference is not None) == (needs.reference and not needs.kl)  # a KL needs the reference's logits
    # held-out evaluation of the same loss, at step 0 (the policy is the reference) and later (KL losses included)
    evaluator = Evaluator([collate(pairs, pad_id, False)], spec, params, "cpu")
    for at_start in (True, False):
        figures = evaluator(model, policy_is_reference=at_start)
        assert figures and all(math.isfinite(v) for v in figures.values()), figures


@pytest.mark.run
def test_a_reference_free_loss_trains_end_to_end_without_a_reference_pass(tiny_model, pairs_file, tmp_path, monkeypatch):
    """The recipe's side of it: no reference pass before, during or after training (evaluation included)."""
    passes = count_reference_passes(monkeypatch)
    summary = recipe.train(tiny_cfg(tiny_model, pairs_file, tmp_path / "out", loss="simpo", max_steps=2))
    assert summary.steps == 2 and all(math.isfinite(v) for v in summary.last_step.values() if isinstance(v, float))
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file() and passes == []


def test_progress_shows_the_metrics_trl_users_know(tmp_path):
    from io import StringIO

    from rich.console import Console

    from infopo_cli.train.progress import TrainProgress

    out = StringIO()
    with TrainProgress(Console(file=out, width=200), total=3) as bar:  # not a terminal: one line per step
        bar.step(1, {"loss": 0.69, "rewards/chosen": 0.1, "rewards/margins": 0.2, "logps/chosen": -50.0,
                     "logps/rejected": -55.0, "rewards/accuracies": 0.75, "grad_norm": 3.0})
    line = out.getvalue().strip()
    assert line.startswith("step 1/3") and "grad_norm" not in line
    for text in ("loss 0.69", "rewards/chosen 0.1", "margins 0.2", "logps/chosen -50", "logps/rejected -55", "acc 0.75"):
        assert text in line, text


def test_the_optimizer_is_torchs_fused_adamw_with_the_plain_loops_updates():
    """On a CPU torch's default AdamW is a loop of small ops per tensor; the fused kernel takes the same steps."""
    torch.manual_seed(0)
    shapes = [(16, 24), (24, 16), (8, 24), (24, 8)]
    fused_params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    plain_params = [torch.nn.Parameter(p.detach().clone()) for p in fused_params]
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    fused = recipe.make_optimizer(cfg, fused_params, "cpu")
    plain = torch.optim.AdamW(plain_params, lr=1e-2, weight_decay=0.1, foreach=False)
    assert fused.param_groups[0]["fused"] is True
    for step in range(5):
        grads = [torch.randn(s) for s in shapes]
        for params, opt in ((fused_params, fused), (plain_params, plain)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(fused_params, plain_params):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        assert not torch.equal(a, torch.zeros_like(a))
    half = [torch.nn.Parameter(torch.randn(4, 4, dtype=torch.bfloat16))]  # not float32: torch's own default
    assert not recipe.make_optimizer(cfg, half, "cpu").param_groups[0]["fused"]
