"""--reference precompute: the reference's log-probs computed once, cached on disk, equal to the online ones."""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model, tiny_cfg, write_pairs
from rich.console import Console

from infopo_cli.data.batching import collate
from infopo_cli.data.loading import read_pairs
from infopo_cli.data.tokenization import encode_pair
from infopo_cli.losses.types import Needs
from infopo_cli.model import stack
from infopo_cli.model.precision import Precision
from infopo_cli.config import TrainConfig
from infopo_cli.train import recipe, reference_cache
from infopo_cli.train.logps import pair_logps
from infopo_cli.train.progress import Reporter


def test_cached_reference_equals_the_online_reference_pass(tiny_model, pairs_file):
    cfg = TrainConfig(dtype="fp32", load_in_4bit=False, lora_r=4, lora_alpha=8)
    model = stack.attach_lora(stack.load_base(str(tiny_model), cfg, Precision("cpu", torch.float32, "test")), cfg)
    tokenizer = stack.load_tokenizer(str(tiny_model))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # a trained adapter: policy != reference, so a mix-up would show
    pairs = [encode_pair(tokenizer, p, 128, 64) for p in read_pairs(str(pairs_file))]
    for share_prompt in (False, True):
        table = reference_cache.compute(model, pairs, 5, tokenizer.pad_token_id, share_prompt, "cpu")
        lookup = reference_cache.ReferenceTable(pairs, table)
        for group in (pairs[:4], pairs[4:11], pairs[20:]):  # training micro-batches, padded differently
            online = pair_logps(model, collate(group, tokenizer.pad_token_id, share_prompt), Needs(reference=True))
            torch.testing.assert_close(lookup(group), torch.cat([online.ref_chosen, online.ref_rejected]).detach(),
                                       atol=2e-5, rtol=1e-5)
            assert not torch.allclose(online.policy_chosen, online.ref_chosen)


def run(tiny_model, data, out, **kw):
    text = io.StringIO()
    summary = recipe.train(tiny_cfg(tiny_model, data, out, eval_data="", max_steps=2, **kw),
                           Reporter(Console(file=text, width=300)))
    return summary, text.getvalue()


def losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


@pytest.mark.run
def test_a_second_run_reads_the_cache_and_trains_as_the_online_reference_does(tiny_model, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 16)
    _, first = run(tiny_model, data, tmp_path / "a", loss="dpo")
    assert "reference log-probs of 16 pairs computed once" in first
    _, second = run(tiny_model, data, tmp_path / "b", loss="dpo", beta=0.3)  # a beta sweep: same reference
    assert "reference log-probs of 16 pairs read from the cache" in second
    _, online = run(tiny_model, data, tmp_path / "c", loss="dpo", reference="online")
    assert "reference log-probs" not in online
    assert losses(tmp_path / "a") == losses(tmp_path / "c") or all(
        abs(x - y) < 1e-4 for x, y in zip(losses(tmp_path / "a"), losses(tmp_path / "c")))


@pytest.mark.run
def test_each_change_the_reference_depends_on_misses_the_cache(tiny_model, tmp_path, monkeypatch):
    data = write_pairs(tmp_path / "pairs.jsonl", 8)
    keys = []
    real = reference_cache.cache_key
    monkeypatch.setattr(reference_cache, "cache_key", lambda *a: keys.append(real(*a)) or keys[-1])
    other_base = build_tiny_model(tmp_path / "other-base", seed=1)                      # other weights
    other_template = build_tiny_model(tmp_path / "other-template", chat_template=None)  # same weights, other tokens
    for i, (model, kw) in enumerate([(tiny_model, {}), (tiny_model, {"beta": 0.5}), (other_base, {}),
                                     (other_template, {}), (tiny_model, {"max_length": 96}),
                                     (tiny_model, {"dtype": "bf16"}), (tiny_model, {"load_in_4bit": True})]):
        run(model, data, tmp_path / f"run{i}", loss="dpo", **kw)
    assert keys[0] == keys[1]  # a loss setting is not part of the reference
    assert len(set(keys[1:])) == 6, keys


def test_a_base_whose_files_cannot_be_found_is_computed_but_never_cached(tmp_path, monkeypatch):
    assert reference_cache.model_identity(str(tmp_path / "no-such-model")) is None  # not a folder, not in the hub cache
    calls = []
    table, cached = reference_cache.load_or_compute(None, lambda: calls.append(1) or torch.zeros((2, 2)), 2)
    assert calls == [1] and not cached and not (reference_cache.cache_path("x").parent).exists()


def _local_key(folder) -> str:
    return reference_cache.cache_key(reference_cache.model_identity(str(folder)), {}, [])


def test_a_local_base_is_keyed_by_its_stat_and_samples_without_being_read_whole(tmp_path, monkeypatch):
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    weights = folder / "model.safetensors"
    size = 1 << 30
    with open(weights, "wb") as fh:
        fh.truncate(size)  # a sparse GiB: no disk, but reading it whole would show in the count below
    read: list[int] = []
    real_open = Path.open

    class Counted:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def read(self, n=-1):
            data = self.fh.read(n)
            read.append(len(data))
            return data

        def seek(self, *args):
            return self.fh.seek(*args)

    monkeypatch.setattr(Path, "open", lambda self, *a, **k: Counted(real_open(self, *a, **k)))
    monkeypatch.setattr(reference_cache, "file_digest", lambda path: pytest.fail(f"{path} hashed whole"))
    first = _local_key(folder)
    assert 0 < sum(read) <= reference_cache.SAMPLES * reference_cache.SAMPLE_BYTES + 1024  # the samples and config.json
    assert _local_key(folder) == first  # nothing changed: the same key (the cache is hit)

    def samples() -> str:  # the sampled blocks' part of the fingerprint
        return reference_cache.file_fingerprint(weights).rsplit(":", 1)[1]

    sampled, stat = samples(), weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: another key, the same samples
    assert _local_key(folder) != first and samples() == sampled
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    before = _local_key(folder)

    time.sleep(0.05)  # past the filesystem's timestamp tick, so that the write below sets a ctime of its own
    with open(weights, "r+b") as fh:  # rewritten in place between two sampled blocks, size and mtime put back
        fh.seek((size - reference_cache.SAMPLE_BYTES) // (2 * (reference_cache.SAMPLES - 1)))
        fh.write(b"other data")
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    rewritten = _local_key(folder)
    assert samples() == sampled and rewritten != before  # only its ctime tells it apart

    with open(weights, "r+b") as fh:  # the last sampled block changed
        fh.seek(size - 10)
        fh.write(b"other data")
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert samples() != sampled and _local_key(folder) not in (first, before, rewritten)

    with open(weights, "r+b") as fh:  # another size, mtime put back
        fh.truncate(size + 4096)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert _local_key(folder) not in (first, before, rewritten)
    assert max(read) <= reference_cache.SAMPLE_BYTES  # never more than one block at a time


def test_a_hub_snapshot_keeps_its_files_sha256_as_the_key(tmp_path):
    snapshot = tmp_path / "hub" / "models--org--name" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    files = {"config.json": b'{"model_type": "llama"}', "model.safetensors": bytes(range(256)) * 4096}
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    assert reference_cache.is_hub_snapshot(snapshot) and not reference_cache.is_hub_snapshot(tmp_path / "hub")
    assert reference_cache.model_identity(str(snapshot)) == [f"{name}={hashlib.sha256(data).hexdigest()}"
                                                             for name, data in sorted(files.items())]
