"""Training on unpaired feedback rows end to end on a tiny random Llama: kto and unpaired infopo from a thumbs
up/down file, pairs split by --unpair (and automatically for kto), pair losses refused, resume."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from conftest import tiny_cfg, write_pairs
from infopo_cli.data.batching import collate
from infopo_cli.data.feedback import with_mismatches
from infopo_cli.data.tokenization import TokenizedPair
from infopo_cli.errors import ConfigError
from infopo_cli.train import recipe


def write_feedback(path: Path, n: int, seed: int = 0) -> Path:
    """Thumbs up/down rows: a right sum is 👍, a wrong one 👎 (about 2 to 1)."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            good = i % 3 != 2
            fh.write(json.dumps({"prompt": f"What is {a} + {b}?",
                                 "completion": f"{a} + {b} = {a + b if good else a + b + 1}.",
                                 "label": "👍" if good else "👎"}) + "\n")
    return path


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss", ["kto", "infopo"])
def test_unpaired_rows_train_and_evaluate(tiny_model, tmp_path, loss):
    data = write_feedback(tmp_path / "feedback.jsonl", 18)
    summary = recipe.train(tiny_cfg(tiny_model, data, tmp_path / "out", loss=loss))
    records = _records(tmp_path / "out")
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in train)  # finite (not NaN)
    first_eval = next(r for r in records if r["kind"] == "eval")
    assert "eval/logps/accuracies" not in first_eval and first_eval["eval/rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    # at initialisation: kto's loss is lambda/2 per row; infopo's mean is w_U * (undesirable share) = 1
    assert first_eval["eval/loss"] == pytest.approx(0.5 if loss == "kto" else 1.0, abs=1e-4)
    assert ("eval/kl" in first_eval) == (loss == "kto")
    settings = (tmp_path / "out" / "config.toml").read_text()
    assert "desirable_weight = 1.5" in settings if loss == "infopo" else "desirable_weight = 1.0" in settings
    assert summary.exit_code == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "trained on unpaired feedback rows" in card and "18 unpaired rows from 18 rows" in card


def test_kto_on_pairs_splits_them_and_pair_losses_refuse_feedback(tiny_model, tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl", 8)
    recipe.train(tiny_cfg(tiny_model, pairs, tmp_path / "kto", loss="kto", max_steps=1))
    assert _records(tmp_path / "kto")[0]["eval/loss"] == pytest.approx(0.5, abs=1e-4)
    feedback = write_feedback(tmp_path / "feedback.jsonl", 6)
    with pytest.raises(ConfigError, match="loss 'dpo' cannot train on unpaired"):
        recipe.train(tiny_cfg(tiny_model, feedback, tmp_path / "dpo", loss="dpo", eval_data=""))
    assert not (tmp_path / "dpo").exists()
    with pytest.raises(ConfigError, match="unpaired rows only"):
        recipe.train(tiny_cfg(tiny_model, pairs, tmp_path / "w", loss="infopo", desirable_weight=2.0))


def test_unpair_gives_infopo_the_pair_loss_at_initialisation(tiny_model, tmp_path):
    """--unpair on balanced pairs: weights 2 and 2, so the held-out loss at step 0 is the pair loss's 1."""
    pairs = write_pairs(tmp_path / "pairs.jsonl", 8)
    recipe.train(tiny_cfg(tiny_model, pairs, tmp_path / "out", unpair=True, max_steps=1))
    assert _records(tmp_path / "out")[0]["eval/loss"] == pytest.approx(1.0, abs=1e-4)
    assert "desirable_weight = 2.0" in (tmp_path / "out" / "config.toml").read_text()


def test_mismatches_pair_each_row_with_another_prompts_completion():
    rows = [TokenizedPair([1, 2], [10 + i], [], label=i % 2 == 0) for i in range(3)] + \
           [TokenizedPair([3, 4, 5, 6], [20, 21, 22], [], label=True)]
    mixed = with_mismatches(rows, max_length=6)
    for row in mixed[:3]:
        assert row.rejected_ids == [20, 21, 22]  # the only completion of another prompt
    assert mixed[3].rejected_ids in ([10], [11], [12])
    assert with_mismatches(rows, max_length=5)[0].rejected_ids == [20, 21, 22]
    assert with_mismatches(rows, max_length=6)[3].label is True and with_mismatches([], 5) == []
    assert len(with_mismatches(rows, max_length=4)[:3][0].rejected_ids) == 2  # cut to fit after the prompt
    with pytest.raises(ConfigError, match="same prompt"):
        with_mismatches(rows[:3], max_length=8)


@pytest.mark.parametrize("share_prompt", [False, True])
def test_an_empty_rejected_slot_costs_nothing_and_scores_nothing(share_prompt):
    rows = [TokenizedPair([1, 2, 3], [4, 5], [], label=True), TokenizedPair([1, 7], [8], [], label=False)]
    batch = collate(rows, pad_id=0, share_prompt=share_prompt)
    assert batch.input_ids.shape[0] == 2  # no row for an empty slot
    assert batch.targets.counts().tolist() == [2, 1, 0, 0]
    assert batch.desirable.tolist() == [True, False]
    assert torch.equal(batch.targets.tokens, torch.tensor([4, 5, 8]))


def test_a_rank_without_held_out_rows_gets_the_same_metric_keys(monkeypatch):
    """Two processes, one with every held-out row and one with none: both must compute the same means (a rank that
    had no batch has no keys of its own, and step-0 rewards are all exactly 0)."""
    from infopo_cli.losses import registry
    from infopo_cli.losses.types import PairLogps
    from infopo_cli.train.distributed import World
    from infopo_cli.train.metrics import PairMetrics

    spec, params = registry.resolve("kto", {})
    zeros = torch.zeros(3, dtype=torch.float64)
    logps = PairLogps(zeros - 5, zeros - 6, torch.full((3,), 2), torch.full((3,), 2), zeros - 5, zeros - 6,
                      desirable=torch.tensor([True, False, True]))
    full, empty = PairMetrics(), PairMetrics()
    full.add(registry.compute(spec, logps, params), logps)
    world = World(rank=1, size=2)
    other = [full.sums.get(k, 0.0) for k in PairMetrics.KEYS] + [float(k in full.sums) for k in PairMetrics.KEYS] + [3]
    monkeypatch.setattr(World, "sum_floats", lambda self, values: [a + b for a, b in zip(values, other)])
    summed = world.sum_metrics(empty).means("eval/")
    assert summed == pytest.approx(full.means("eval/"), nan_ok=True)
    assert summed["eval/loss"] == pytest.approx(0.5) and "eval/logps/accuracies" not in summed


def test_a_held_out_set_of_one_prompt_borrows_mismatches_from_training():
    from infopo_cli.data.feedback import mismatched

    train = [TokenizedPair([1, i], [10 + i], [], label=True) for i in range(4)]
    held_out = [TokenizedPair([7, 7], [20 + i], [], label=i % 2 == 0) for i in range(3)]
    train_out, held_out_out = mismatched(train, held_out, 16)
    assert all(row.rejected_ids and row.rejected_ids[0] in (10, 11, 12, 13) for row in held_out_out)
    assert len({tuple(row.rejected_ids) for row in held_out_out}) > 1  # not one partner for every row
    assert all(row.rejected_ids != row.chosen_ids for row in train_out)


def test_many_rows_of_one_prompt_are_matched_in_linear_time():
    rows = [TokenizedPair([1], [5], [], label=True) for _ in range(20000)] + [TokenizedPair([2], [6], [], label=False)]
    out = with_mismatches(rows, 8)
    assert [row.rejected_ids for row in out[:3]] == [[6]] * 3 and out[-1].rejected_ids == [5]


def test_dry_runs_refuse_what_a_run_would_refuse_midway(tmp_path):
    import subprocess
    import sys

    feedback = write_feedback(tmp_path / "feedback.jsonl", 6)
    run = lambda *args: subprocess.run([sys.executable, "-m", "infopo_cli", *args, "--eval-data", "", "--dry-run"],  # noqa: E731
                                       capture_output=True, text=True, cwd=tmp_path)
    out = run("compare", "--loss", "kto,dpo", "--data", str(feedback), "--output", str(tmp_path / "cmp"))
    assert out.returncode == 2 and "loss 'dpo' cannot train on unpaired" in out.stderr
    same = tmp_path / "same.jsonl"
    same.write_text("".join(json.dumps({"prompt": "Hi?", "completion": f"Hello {i}.", "label": i % 2 == 0}) + "\n"
                            for i in range(4)))
    out = run("train", "--loss", "kto", "--data", str(same))
    assert out.returncode == 2 and "every training row has the same prompt" in out.stderr
    assert run("train", "--loss", "infopo", "--data", str(same)).returncode == 0  # infopo needs no mismatches


def test_a_row_of_both_shapes_is_read_as_a_pair_with_a_warning(tmp_path):
    from infopo_cli.data.loading import load_pairs

    path = tmp_path / "both.jsonl"
    path.write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away.", "completion": "Hey.",
                                "label": True}) + "\n")
    loaded = load_pairs(str(path))
    assert not loaded.pairs[0].unpaired and any("1 rows have chosen/rejected and also completion/label" in n
                                                for n in loaded.notes)


@pytest.mark.parametrize("loss", ["kto", "infopo"])
def test_cached_reference_shared_prompts_and_online_reference_agree(tiny_model, tmp_path, loss):
    """The mismatched completions ride in the reference cache and both layouts: the same losses step by step."""
    data = write_feedback(tmp_path / "feedback.jsonl", 12)
    losses = {}
    for name, settings in {"cached": {}, "online": {"reference": "online"},
                           "plain": {"share_prompt": False, "reference": "online"}}.items():
        recipe.train(tiny_cfg(tiny_model, data, tmp_path / name, loss=loss, eval_data="", **settings))
        losses[name] = [r["loss"] for r in _records(tmp_path / name) if r["kind"] == "train"]
    assert losses["cached"] == pytest.approx(losses["online"], abs=1e-5)
    assert losses["plain"] == pytest.approx(losses["online"], abs=1e-5)
