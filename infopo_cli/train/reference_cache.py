"""Reference log-probs computed once and cached on disk (`--reference precompute`, the default).

The reference is frozen, so its sequence log-probs of the training pairs never change during a run:
one no-grad pass with the adapter disabled (or the frozen init adapter) before the first step replaces a
reference forward in every step of every epoch, and later runs on the same base and data (a beta sweep,
another loss, `infopo compare`, a resume) read them from `$INFOPO_HOME/cache/reference/`. Only the batches holding a
pair the run reads are computed (a 2-step try on a large set pays for its 2 steps' pairs); an entry keeps which rows
it holds, and a longer run computes the rest. The batches are fixed by the pairs and the batch size alone, so a pair's
log-probs are the same bits whichever run computed them.

The key is everything the numbers depend on: the base model's files, the init adapter's weights, 4-bit or not,
the compute dtype, the attention kernel, the batch size (padding moves the last bits), and the token ids of every pair (so the data, tokenizer, chat template,
max_length and truncation are all in it). A loss that needs the reference's full-vocabulary KL (TDPO's priors)
stays online. A local folder's files are keyed by size, mtime, inode, ctime and a hash of a few sampled blocks (a
16 GB base in milliseconds, not a minute of reading); a hub snapshot's by the sha256 of each file, remembered by
path, size and mtime so a file is hashed once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from infopo_cli import files
from infopo_cli.data.batching import collate
from infopo_cli.data.tokenization import TokenizedPair
from infopo_cli.losses.types import Needs
from infopo_cli.model import stack
from infopo_cli.train.checkpoint import capture_rng, restore_rng
from infopo_cli.train.logps import batch_logps

VERSION = 2  # bump when the way log-probs are computed changes, so old entries are not reused
MODES = ("precompute", "online")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".json", ".model")
SAMPLES, SAMPLE_BYTES = 8, 1 << 16  # a local file's fingerprint reads at most 512 KiB of it


def applies(mode: str, needs: Needs) -> bool:
    """Whether this run's reference can come from the cache: it needs one, and only its sequence log-probs."""
    return mode == "precompute" and needs.reference and not needs.kl


def file_digest(path: Path) -> str:
    """sha256 of a file, remembered by (path, size, mtime) in the cache so a large base is hashed once."""
    stat = path.stat()
    memo_path = files.infopo_home() / "cache" / "file-hashes.json"
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memo = {}
    tag = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    if tag not in memo:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                digest.update(block)
        memo[tag] = digest.hexdigest()
        try:
            files.write_text(memo_path, json.dumps(memo))
        except Exception:  # noqa: BLE001  (a memo that cannot be written only costs a re-hash next time)
            pass
    return memo[tag]


def file_fingerprint(path: Path) -> str:
    """A local file's identity without reading it whole: its size, mtime, inode and ctime, and the sha256 of SAMPLES
    blocks of SAMPLE_BYTES spread over it, the first and the last among them (a smaller file is read whole). A tool
    can put back a rewritten file's mtime (`os.utime`, `cp -p`, rsync) but not its ctime, which any write or
    metadata change sets: so a file changed in place is never taken for the one keyed before, and a copy or a
    `touch` only costs a recomputed reference."""
    stat = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        if stat.st_size <= SAMPLES * SAMPLE_BYTES:
            digest.update(fh.read())
        else:
            for i in range(SAMPLES):
                fh.seek(i * (stat.st_size - SAMPLE_BYTES) // (SAMPLES - 1))
                digest.update(fh.read(SAMPLE_BYTES))
    return f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}:{stat.st_ctime_ns}:{digest.hexdigest()[:32]}"


def is_hub_snapshot(folder: Path) -> bool:
    """A snapshot folder of the hub cache (`models--ORG--NAME/snapshots/COMMIT`): its files never change in place."""
    return folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--")


def model_identity(source: str) -> list[str] | None:
    """The base's files and their identities (a hub id: its cached snapshot's files); None where they cannot be
    found (then nothing is cached: a key without the weights could serve another model's numbers)."""
    folder = Path(source)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source, local_files_only=True))
        except Exception:  # noqa: BLE001  (not in the local hub cache, or no hub library)
            return None
    identify = file_digest if is_hub_snapshot(folder) else file_fingerprint
    return [f"{p.relative_to(folder)}={identify(p)}" for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix in WEIGHT_SUFFIXES and not p.name.startswith(".")]


def cache_key(identity: Sequence[str], settings: dict, pairs: Sequence[TokenizedPair]) -> str:
    """The cache file's key: the model's identity, the settings the numbers depend on, and every pair's token ids."""
    digest = hashlib.sha256(json.dumps([VERSION, list(identity), settings], sort_keys=True, default=str).encode())
    for pair in pairs:
        digest.update(repr((pair.prompt_ids, pair.chosen_ids, pair.rejected_ids)).encode())
    return digest.hexdigest()[:32]


def cache_path(key: str) -> Path:
    """Where the reference log-probs of `key` are kept."""
    return files.infopo_home() / "cache" / "reference" / f"{key}.pt"


def reference_batches(pairs: Sequence[TokenizedPair], batch_size: int) -> list[list[int]]:
    """The batches the reference pass runs, as indices into `pairs`: length-sorted (little padding) and always the
    same for the same pairs and batch size, so a pair's log-probs are the same bits whichever pairs a run reads."""
    ordered = sorted(range(len(pairs)), key=lambda i: pairs[i].length)
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]


@torch.no_grad()
def compute_batches(model: torch.nn.Module, pairs: Sequence[TokenizedPair], batches: Sequence[Sequence[int]], pad_id: int,
                    share_prompt: bool, device: str, advance: Callable[[int], None] = lambda n: None,
                    counted: int | None = None, should_stop: Callable[[], bool] = lambda: False) -> torch.Tensor:
    """(N, 2) float32: the reference's summed log-probs of the chosen and rejected response of each pair in `batches`
    (one forward each, the model in eval mode with its adapter disabled), zeros in every other row. `counted`: only
    the first so many batches are written (the others keep a rank of a sharded run in step). Asked before each batch,
    `should_stop()` ends the pass early: `advance` has then been called once for each batch written, in order."""
    counted = len(batches) if counted is None else counted
    table = torch.zeros((len(pairs), 2), dtype=torch.float32)
    was_training, rng = model.training, capture_rng()
    model.eval()
    try:
        with stack.reference_mode(model):
            for n, batch in enumerate(batches):
                if should_stop():
                    break
                group = [pairs[i] for i in batch]
                sums = batch_logps(model, collate(group, pad_id, share_prompt).to(device)).sums.float().cpu()
                if n >= counted:
                    continue
                index = torch.tensor(list(batch))
                table[index, 0], table[index, 1] = sums[:len(group)], sums[len(group):]
                advance(len(group))
    finally:
        restore_rng(rng)  # nothing here draws, but the run's exact resume must not depend on that
        model.train(was_training)
    return table


def compute(model: torch.nn.Module, pairs: Sequence[TokenizedPair], batch_size: int, pad_id: int, share_prompt: bool,
            device: str, advance: Callable[[int], None] = lambda n: None) -> torch.Tensor:
    """(N, 2) float32: the reference's log-probs of every pair (`reference_batches` of `batch_size`)."""
    return compute_batches(model, pairs, reference_batches(pairs, batch_size), pad_id, share_prompt, device, advance)


def load_cached(key: str | None, n_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (n_pairs, 2) table cached under `key` and which of its rows are computed (a run computes only the
    batches holding the pairs it reads); nothing computed where there is no key, no entry, or a damaged one."""
    empty = torch.zeros((n_pairs, 2), dtype=torch.float32), torch.zeros(n_pairs, dtype=torch.bool)
    if key is None or not cache_path(key).is_file():
        return empty
    try:
        entry = torch.load(cache_path(key), weights_only=True)
    except Exception:  # noqa: BLE001  (any unreadable entry: compute it again)
        return empty
    table, filled = (entry.get("logps"), entry.get("filled")) if isinstance(entry, dict) else (None, None)
    fits = (isinstance(table, torch.Tensor) and isinstance(filled, torch.Tensor) and table.shape == (n_pairs, 2)
            and table.dtype == torch.float32 and filled.shape == (n_pairs,) and filled.dtype == torch.bool)
    return (table, filled) if fits else empty


def store(key: str | None, table: torch.Tensor, filled: torch.Tensor) -> None:
    """Save `table` and which rows are computed under `key` atomically; a cache that cannot be written is skipped."""
    if key is None:
        return
    try:
        with files.replacing(cache_path(key)) as tmp:
            torch.save({"logps": table, "filled": filled}, tmp)
    except Exception:  # noqa: BLE001  (a cache that cannot be written costs speed next time, never the run)
        pass


class ReferenceTable:
    """Looks up the cached reference log-probs of a micro-batch, laid out as `pair_logps` takes them."""

    def __init__(self, pairs: Sequence[TokenizedPair], table: torch.Tensor, filled: torch.Tensor | None = None) -> None:
        self.row, self.table = {id(pair): i for i, pair in enumerate(pairs)}, table
        self.filled = filled

    def __call__(self, group: list[TokenizedPair]) -> torch.Tensor:
        index = torch.tensor([self.row[id(p)] for p in group])
        if self.filled is not None and not bool(self.filled[index].all()):
            raise RuntimeError("a batch holds a pair whose reference log-probs were not computed")  # a bug, not input
        return torch.cat([self.table[index, 0], self.table[index, 1]])
