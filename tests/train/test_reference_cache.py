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
from conftest import tiny_cfg, write_pairs
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
    summary = recipe.train(tiny_cfg(tiny_model, data, out, **{"eval_data": "", "max_steps": 2, **kw}),
                           Reporter(Console(file=text, width=300)))
    return summary, text.getvalue()


def losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


@pytest.mark.run
def test_a_second_run_reads_the_cache_and_trains_as_the_online_reference_does(tiny_model, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 16)
    _, first = run(tiny_model, data, tmp_path / "a", loss="dpo", max_steps=4)  # 4 steps of 4: every pair
    assert "reference log-probs of 16 pairs computed once" in first
    _, second = run(tiny_model, data, tmp_path / "b", loss="dpo", beta=0.3, max_steps=4)  # a beta sweep: same reference
    assert "reference log-probs of 16 pairs read from the cache" in second
    _, online = run(tiny_model, data, tmp_path / "c", loss="dpo", reference="online", max_steps=4)
    assert "reference log-probs" not in online
    assert losses(tmp_path / "a") == losses(tmp_path / "c") or all(
        abs(x - y) < 1e-4 for x, y in zip(losses(tmp_path / "a"), losses(tmp_path / "c")))


@pytest.mark.run
def test_a_short_run_computes_only_the_batches_it_reads_and_a_longer_one_the_rest(tiny_model, tmp_path, monkeypatch):
    """2 steps of 4 read 8 of 24 pairs: only the reference batches (of 2) holding them are computed and cached; a
    6-step run computes the rest and trains as a run that computed every pair at once does."""
    data = write_pairs(tmp_path / "pairs.jsonl", 24)
    computed: list[int] = []
    real = reference_cache.compute_batches
    monkeypatch.setattr(reference_cache, "compute_batches",
                        lambda model, pairs, batches, *a, **kw: computed.append(sum(map(len, batches))) or real(model, pairs, batches, *a, **kw))
    _, short = run(tiny_model, data, tmp_path / "short", loss="dpo", eval_batch_size=2)
    assert "reference log-probs of the 8 of 24 pairs in 2 steps computed once" in short
    assert 8 <= computed[0] <= 16, computed  # each pair read, with its one batch-mate at most
    _, again = run(tiny_model, data, tmp_path / "again", loss="dpo", eval_batch_size=2, beta=0.2)
    assert "reference log-probs of the 8 of 24 pairs in 2 steps read from the cache" in again and len(computed) == 1
    _, longer = run(tiny_model, data, tmp_path / "longer", loss="dpo", eval_batch_size=2, max_steps=6)
    assert "reference log-probs of 24 pairs computed once" in longer and computed[1] == 24 - computed[0]
    monkeypatch.setenv("INFOPO_HOME", str(tmp_path / "another-home"))  # an empty cache: every pair at once
    _, whole = run(tiny_model, data, tmp_path / "whole", loss="dpo", eval_batch_size=2, max_steps=6)
    assert computed[2] == 24
    assert losses(tmp_path / "longer") == losses(tmp_path / "whole")  # the same bits, however they were computed


def test_a_pairs_log_probs_are_the_same_bits_whichever_batches_are_computed(tiny_model, pairs_file):
    cfg = TrainConfig(dtype="fp32", load_in_4bit=False, lora_r=4, lora_alpha=8)
    model = stack.attach_lora(stack.load_base(str(tiny_model), cfg, Precision("cpu", torch.float32, "test")), cfg)
    tokenizer = stack.load_tokenizer(str(tiny_model))
    pairs = [encode_pair(tokenizer, p, 128, 64) for p in read_pairs(str(pairs_file))]
    whole = reference_cache.compute(model, pairs, 3, tokenizer.pad_token_id, False, "cpu")
    batches = reference_cache.reference_batches(pairs, 3)
    assert sorted(i for b in batches for i in b) == list(range(len(pairs))) and all(len(b) <= 3 for b in batches)
    some = batches[1::3]
    part = reference_cache.compute_batches(model, pairs, some, tokenizer.pad_token_id, False, "cpu")
    rows = torch.tensor([i for b in some for i in b])
    assert torch.equal(part[rows], whole[rows]) and not part[[i for i in range(len(pairs)) if i not in rows]].any()
    filled = torch.zeros(len(pairs), dtype=torch.bool)
    filled[rows] = True
    lookup = reference_cache.ReferenceTable(pairs, part, filled)
    assert torch.equal(lookup([pairs[i] for i in some[0]]), torch.cat([whole[some[0], 0], whole[some[0], 1]]))
    with pytest.raises(RuntimeError, match="not computed"):  # a run never reads a row it did not compute
        lookup([pairs[i] for i in batches[0]])


def test_the_pairs_a_run_reads_are_those_of_its_first_batches(pairs_file, tiny_model):
    from infopo_cli.data.batching import pairs_read, shuffled_batches

    tokenizer = stack.load_tokenizer(str(tiny_model))
    pairs = [encode_pair(tokenizer, p, 128, 64) for p in read_pairs(str(pairs_file))]
    batches = shuffled_batches(pairs, 4, seed=3)
    first = [next(batches) for _ in range(3)]
    assert pairs_read(pairs, 4, 3, 3) == {pairs.index(p) for batch in first for p in batch}
    assert pairs_read(pairs, 4, 3, 10_000) == set(range(len(pairs)))  # many epochs: every pair, found in the first
    assert pairs_read(pairs, 4, 3, 0) == set()


def test_a_base_whose_files_cannot_be_found_is_computed_but_never_cached(tmp_path):
    assert reference_cache.model_identity(str(tmp_path / "no-such-model")) is None  # not a folder, not in the hub cache
    table, filled = reference_cache.load_cached(None, 2)
    assert not filled.any() and table.shape == (2, 2)
    reference_cache.store(None, table, filled)
    assert not reference_cache.cache_path("x").parent.exists()


def test_a_damaged_or_mismatched_cache_entry_is_computed_again(tmp_path):
    path = reference_cache.cache_path("k")
    path.parent.mkdir(parents=True, exist_ok=True)
    for entry in (b"not a torch file", {"logps": torch.zeros((3, 2)), "filled": torch.ones(3, dtype=torch.bool)},
                  torch.zeros((2, 2))):  # damaged; another number of pairs; the format before rows were tracked
        path.write_bytes(entry) if isinstance(entry, bytes) else torch.save(entry, path)
        assert not reference_cache.load_cached("k", 2)[1].any()
    table, filled = torch.ones((2, 2)), torch.tensor([True, False])
    reference_cache.store("k", table, filled)
    assert [torch.equal(a, b) for a, b in zip(reference_cache.load_cached("k", 2), (table, filled))] == [True, True]


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


def test_a_cache_entry_with_a_batch_only_partly_filled_computes_that_batch_again(tiny_model, pairs_file):
    """An entry that passes the shape checks but holds half a batch (damaged, or written by another release) is not
    trusted for that batch: the run computes it whole instead of failing on a missing row mid-run."""
    cfg = TrainConfig(dtype="fp32", load_in_4bit=False, lora_r=4, lora_alpha=8, eval_batch_size=4)
    precision = Precision("cpu", torch.float32, "test")
    model = stack.attach_lora(stack.load_base(str(tiny_model), cfg, precision), cfg)
    tokenizer = stack.load_tokenizer(str(tiny_model))
    pairs = [encode_pair(tokenizer, p, 128, 64) for p in read_pairs(str(pairs_file))]
    full = recipe.precomputed_reference(model, pairs, cfg, str(tiny_model), precision, tokenizer.pad_token_id, False,
                                        None, Reporter(Console(file=io.StringIO())))
    key = next(reference_cache.cache_path("x").parent.glob("*.pt")).stem
    table, filled = reference_cache.load_cached(key, len(pairs))
    first = reference_cache.reference_batches(pairs, 4)[0]
    filled[first[1:]] = False
    table[first[1:]] = 0.0
    reference_cache.store(key, table, filled)
    text = io.StringIO()
    again = recipe.precomputed_reference(model, pairs, cfg, str(tiny_model), precision, tokenizer.pad_token_id, False,
                                         None, Reporter(Console(file=text, width=300)))
    # the batch's one row still marked computed is counted as cached, and the whole batch is computed again
    assert f"{len(pairs) - 3} of them from the cache; 4 computed with their batch-mates" in text.getvalue()
    group = [pairs[i] for i in first]
    assert torch.equal(again(group), full(group))
