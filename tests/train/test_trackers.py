"""--report-to: the metrics of metrics.jsonl, also in tensorboard / wandb / trackio, under the same names and steps."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from conftest import tiny_cfg, write_pairs
from infopo_cli.config import TrainConfig
from infopo_cli.errors import ConfigError
from infopo_cli.train import recipe, trackers
from infopo_cli.train.metrics import MetricsLog


@pytest.fixture
def pairs(tmp_path) -> Path:
    return write_pairs(tmp_path / "pairs.jsonl", 16)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def event_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def jsonl_scalars(run_dir: Path, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records(run_dir) if r.get(key) is not None]


@pytest.mark.run
def test_tensorboard_logs_the_metrics_of_metrics_jsonl_at_their_steps(tiny_model, pairs, tmp_path):
    import tensorboard  # noqa: F401  (the test extra installs it: missing, this test must fail, not skip)
    run_dir = tmp_path / "run"
    summary = recipe.train(tiny_cfg(tiny_model, pairs, run_dir, max_steps=2, report_to="tensorboard"))
    assert summary.status == "completed"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    logged = event_scalars(run_dir / "tensorboard")
    assert {"loss", "rewards/chosen", "eval/logps/chosen", "grad_norm", "lr"} <= set(logged)
    assert not {"kind", "step", "skipped"} & set(logged)  # not scalars: the record's kind, step and flags
    assert [s for s, _ in logged["loss"]] == [1, 2] and [s for s, _ in logged["eval/logps/chosen"]] == [0, 2]
    for key in ("loss", "rewards/chosen", "eval/logps/chosen", "eval/loss", "lr"):
        assert logged[key] == [(s, pytest.approx(v, rel=1e-6)) for s, v in jsonl_scalars(run_dir, key)], key


@pytest.mark.run
def test_a_resumed_run_continues_the_same_tensorboard_folder(tiny_model, pairs, tmp_path):
    """Killed after step 2 was logged but before its checkpoint: the resume from checkpoint-1 hides the first
    step 2 (as metrics.jsonl cuts it back) and writes on in RUN/tensorboard."""
    import tensorboard  # noqa: F401  (the test extra installs it: missing, this test must fail, not skip)
    import shutil

    run_dir = tmp_path / "run"
    cfg = tiny_cfg(tiny_model, pairs, run_dir, max_steps=2, eval_data="", save_every=1, keep_checkpoints=5,
                   report_to="tensorboard")
    assert recipe.train(cfg).steps == 2
    shutil.rmtree(run_dir / "checkpoint-2")  # as if killed before step 2's checkpoint: step 2 runs again
    assert recipe.train(cfg, resume=run_dir).status == "completed"
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one folder, a file per part
    logged = event_scalars(run_dir / "tensorboard")
    assert [s for s, _ in logged["loss"]] == [1, 2]  # not 1, 2, 2
    assert logged["loss"] == [(s, pytest.approx(v, rel=1e-6)) for s, v in jsonl_scalars(run_dir, "loss")]


def test_a_missing_library_is_one_line_naming_the_extra_before_the_model_loads(tiny_model, pairs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now fails

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(recipe.stack, "load_base", no_model)
    with pytest.raises(ConfigError) as err:
        recipe.train(tiny_cfg(tiny_model, pairs, tmp_path / "run", report_to="none,tensorboard"))
    assert "pip install 'infopo[tensorboard]'" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()  # nothing written either


def test_an_unknown_tracker_is_one_line():
    with pytest.raises(ConfigError) as err:
        TrainConfig(report_to="tensorboard,tensorbord").validate()
    assert "report_to" in str(err.value) and "tensorboard, wandb, trackio" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="unknown tracker 'mlflow'"):
        trackers.parse("mlflow")
    assert trackers.parse(" TensorBoard , none,tensorboard") == ["tensorboard"] and trackers.parse("none") == []


def test_an_unknown_tracker_on_the_command_line(tmp_path):
    import subprocess

    out = subprocess.run([sys.executable, "-m", "infopo_cli", "train", "--report-to", "wandb,neptune", "--output",
                          str(tmp_path / "run")], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: command line: report_to must be a comma list of tensorboard, wandb, trackio, or none (got "
        "'wandb,neptune')"]
    assert not (tmp_path / "run").exists()


@pytest.mark.run
def test_none_writes_only_metrics_jsonl(tiny_model, pairs, tmp_path):
    run_dir = tmp_path / "run"
    recipe.train(tiny_cfg(tiny_model, pairs, run_dir, max_steps=1, eval_data=""))  # report_to defaults to none
    assert (run_dir / "metrics.jsonl").is_file()
    assert not {"tensorboard", "wandb", "trackio.json"} & {p.name for p in run_dir.iterdir()}


def test_sinks_get_each_record_and_only_finite_numbers_are_scalars(tmp_path):
    got = []

    class Sink:
        def log(self, record):
            got.append(record)

    log = MetricsLog(tmp_path / "metrics.jsonl", sinks=[Sink()])
    log.write({"kind": "train", "step": 3, "loss": float("nan"), "lr": 0.1, "tokens": 7, "skipped": True, "note": "x"})
    assert got == log.records and got[0]["loss"] is None  # the record as metrics.jsonl has it
    assert trackers.scalars(got[0]) == {"lr": 0.1, "tokens": 7.0}
    assert trackers.scalars({"step": 1, "a": math.inf, "b": -1}) == {"b": -1.0}


class FakeRun:
    """What wandb.init / trackio.init return, recording what infopo sends (the libraries themselves are optional
    extras CI does not install: their API is what these fakes stand for)."""

    def __init__(self, **kwargs) -> None:
        self.kwargs, self.logged, self.finished = kwargs, [], False
        self.id, self.name = kwargs.get("id"), kwargs.get("name")
        self.config = self

    def update(self, values: dict, allow_val_change: bool = False) -> None:
        self.kwargs["config"] = values

    def log(self, values: dict, step: int) -> None:
        self.logged.append((step, values))

    def finish(self) -> None:
        self.finished = True


@pytest.fixture
def fake_libraries(tmp_path, monkeypatch):
    """Stand-ins for wandb and trackio in sys.modules; returns the runs each init opened."""
    import types

    opened: dict[str, list[FakeRun]] = {"wandb": [], "trackio": []}
    for name in ("wandb", "trackio"):
        module = types.ModuleType(name)

        def init(_name=name, project=None, name=None, config=None, resume=None, **kw):
            run = FakeRun(project=project, name=name, config=config, resume=resume, **kw)
            opened[_name].append(run)
            return run

        module.init = init
        monkeypatch.setitem(sys.modules, name, module)
    utils = types.ModuleType("trackio.utils")
    utils.TRACKIO_DIR = tmp_path / "trackio-store"
    monkeypatch.setitem(sys.modules, "trackio.utils", utils)
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    return opened


@pytest.mark.run
def test_wandb_and_trackio_get_every_metric_offline_and_a_resume_reopens_the_same_run(tiny_model, pairs, tmp_path,
                                                                                      fake_libraries):
    run_dir = tmp_path / "run"
    assert recipe.train(tiny_cfg(tiny_model, pairs, run_dir, max_steps=2, report_to="wandb,trackio")).steps == 2
    (wandb_run,), (trackio_run,) = fake_libraries["wandb"], fake_libraries["trackio"]
    assert wandb_run.kwargs["mode"] == "offline" and wandb_run.kwargs["dir"] == str(run_dir)  # no network by default
    assert wandb_run.id == (run_dir / "wandb" / "infopo-run-id").read_text().strip() and wandb_run.kwargs["project"] == "infopo"
    assert trackio_run.kwargs["resume"] == "never" and trackio_run.name.startswith("run-")
    assert json.loads((run_dir / "trackio.json").read_text())["name"] == trackio_run.name
    for run in (wandb_run, trackio_run):
        assert run.finished and run.kwargs["config"]["report_to"] == "wandb,trackio"
        for key in ("loss", "rewards/chosen", "eval/logps/chosen"):
            want = jsonl_scalars(run_dir, key)
            assert [(step, values[key]) for step, values in run.logged if key in values] == want, key
        assert not any({"kind", "step", "skipped"} & set(values) for _, values in run.logged)
    again = trackers.open_trackers(["wandb", "trackio"], run_dir, {"lr": 0.1}, resume=1)  # what a resumed run opens
    for tracker in again:
        tracker.close()
    assert fake_libraries["wandb"][1].id == wandb_run.id and fake_libraries["wandb"][1].kwargs["resume"] == "allow"
    assert fake_libraries["trackio"][1].name == trackio_run.name and fake_libraries["trackio"][1].kwargs["resume"] == "allow"
