"""Where preference rows come from: a file (JSONL, JSON, CSV, Parquet), a folder of such files, a `save_to_disk`
folder, or the hub. The entry points are `open_source` and `read_rows`. JSON and CSV are parsed in json_rows and
csv_rows; Parquet, save_to_disk folders and the hub are read here, through pyarrow and datasets.

Each source yields `(where, row)`: `where` names the place of the row for error messages (`FILE:LINE`
for line-based files, `FILE:row N` for JSON arrays and columnar ones) and `row` is the parsed value. A row that
cannot be taken as it reads (bad JSON, a key given twice, text that is not valid Unicode, ...) is yielded as a
`DataError` in place of the row, so the caller decides whether to stop or skip it; a problem that spoils the
rest of a file is raised. Nothing here knows what a preference pair is.

Only regular files are opened (a FIFO would block, /dev/zero never ends), and a name that looks like a path
never goes to the hub.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

from infopo_cli import hub
from infopo_cli.data.csv_rows import read_csv
from infopo_cli.data.json_rows import read_json_array, read_jsonl
from infopo_cli.data.streams import Row, cannot_read
from infopo_cli.errors import ConfigError, InfopoError, first_line

BUNDLED_DIR = Path(__file__).parent.parent / "bundled"
PARQUET_BATCH_ROWS = 1024
SAVED_DATASET_MARKS = ("dataset_info.json", "dataset_dict.json", "state.json")
# split names in file names, as `datasets` reads them: "data/train-00000-of-00001.parquet" is train
SPLIT_WORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
               "test": ("test", "testing", "eval", "evaluation")}


@dataclass
class Opened:
    """A source ready to read: its rows file by file (one file, unless the source is a folder of data files)."""

    files: list[tuple[str, Iterator[Row]]]
    folder: Path | None = None                          # a folder of data files: the one given
    split: str | None = None                            # the split its files were picked for, if they name splits
    unread: list[str] = field(default_factory=list)     # the folder's files left out, each with the reason

    def rows(self) -> Iterator[Row]:
        """The rows of every file in turn."""
        return chain.from_iterable(rows for _, rows in self.files)


def resolve(spec: str) -> Path:
    """'bundled:NAME' is a file shipped in the package; anything else is a path ('' is none: Path('') is the current
    folder, which a blank --data must not read)."""
    if not spec.strip():
        raise ConfigError("an empty data source ('' names no file); give a file, a folder, bundled:NAME or a hub id")
    if spec.startswith("bundled:"):
        name = spec.split(":", 1)[1]
        path = BUNDLED_DIR / f"{name}.jsonl"
        if not path.is_file():
            known = ", ".join(f"bundled:{p.stem}" for p in sorted(BUNDLED_DIR.glob("*.jsonl")))
            raise InfopoError(f"unknown bundled data '{spec}'; available: {known}")
        return path
    return Path(spec).expanduser()


def read_rows(spec: str, split: str = "train") -> Iterator[Row]:
    """Every row of `spec` as (where, row); `split` picks the split of a hub or save_to_disk dataset."""
    return open_source(spec, split).rows()


def open_source(spec: str, split: str = "train") -> Opened:
    """Checks what can be checked before any row is read (the file exists, is a regular file, has a known type)."""
    path = resolve(spec)
    mode = _mode(path)
    if mode is None:
        # a hub dataset is named org/name; anything else that is not here is a missing file
        if hub.looks_like_path(spec) or path.suffix.lower() in DATA_SUFFIXES or "/" not in spec:
            raise InfopoError(f"{path}: no such file")
        return Opened([(spec, _hub(spec, split))])
    if stat.S_ISDIR(mode):
        if any((path / mark).is_file() for mark in SAVED_DATASET_MARKS):
            return Opened([(str(path), _saved_dataset(path, split))])
        return _folder(path, split)
    return Opened([(str(path), _file_rows(path))])


def folder_info(opened: Opened, rows: list[int]) -> list[str]:
    """For `data check` and `train`: which files of a folder were read, with their rows, and which were not."""
    if opened.folder is None:
        return []
    split = f" (split {opened.split})" if opened.split else ""
    read = ", ".join(f"{name} {n} row{'s' * (n != 1)}" for (name, _), n in zip(opened.files, rows))
    unread = f"; not read: {_listed(opened.unread)}" if opened.unread else ""
    return [f"read {len(opened.files)} files of {opened.folder}{split}: {read}{unread}"]


# --- one file: refused unopened unless regular, read by its type -------------------------------------------------

def _mode(path: Path) -> int | None:
    """The file type bits of what `path` names (links followed), or None if nothing is there."""
    try:
        return path.stat().st_mode
    except FileNotFoundError:
        return None
    except OSError as err:
        raise cannot_read(path, err) from None


def _file_rows(path: Path) -> Iterator[Row]:
    mode = _mode(path)
    if mode is None:
        raise InfopoError(f"{path}: no such file")
    if not stat.S_ISREG(mode):  # refused before any open: opening a FIFO blocks until someone writes to it
        raise InfopoError(f"{path}: not a regular file ({_kind_of(mode)})")
    suffix = path.suffix.lower()
    if suffix not in READERS:
        raise InfopoError(f"{path}: unknown file type '{suffix}' (use .jsonl, .json, .csv, .tsv or .parquet)")
    return READERS[suffix](path)


def _kind_of(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))
    return next((name for test, name in kinds if test(mode)), "not a file")


def _parquet(path: Path) -> Iterator[Row]:
    def rows() -> Iterator[Any]:
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
            yield from batch.to_pylist()

    return _guarded(str(path), "Parquet file", rows())


READERS: dict[str, Callable[[Path], Iterator[Row]]] = {
    ".jsonl": read_jsonl, ".ndjson": read_jsonl, ".json": read_json_array, ".csv": read_csv, ".tsv": read_csv,
    ".parquet": _parquet}
DATA_SUFFIXES = tuple(READERS)


# --- read through pyarrow / datasets: Parquet (above), save_to_disk folders and the hub --------------------------

def _guarded(name: str, what: str, rows: Iterable[Any]) -> Iterator[Row]:
    """A library's rows as `NAME:row N`, with its errors (of many types, some multi-line) as one line naming it."""
    numbered = enumerate(rows, start=1)
    while True:
        try:
            index, row = next(numbered)
        except StopIteration:
            return
        except InfopoError:
            raise
        except Exception as err:  # pyarrow / datasets raise OSError, ArrowInvalid, FileNotFoundError, ValueError, ...
            raise InfopoError(f"{name}: not a readable {what} ({first_line(err)})") from None
        yield f"{name}:row {index}", row


def _pick_split(dataset: Any, split: str, name: str) -> Any:
    from datasets import DatasetDict

    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise InfopoError(f"{name}: no split '{split}'; available: {', '.join(dataset)} (use --split)")
        return dataset[split]
    return dataset


def _saved_dataset(path: Path, split: str) -> Iterator[Row]:
    def rows() -> Iterator[Any]:
        from datasets import load_from_disk

        yield from _pick_split(load_from_disk(str(path)), split, str(path))

    return _guarded(str(path), "save_to_disk folder", rows())


def _hub(name: str, split: str) -> Iterator[Row]:
    """A hub dataset through `datasets.load_dataset`. With HF_HUB_OFFLINE, or a hub that does not answer within
    seconds (datasets would retry for half a minute), only the local cache is tried."""
    from datasets import config, load_dataset

    problem = hub.hub_problem()  # None: the hub can be asked
    try:
        with _offline() if problem else nullcontext():
            dataset = load_dataset(name, split=split)
    except Exception as err:  # connection, missing repo, gated, missing split: all one line for the user
        head = f"cannot load dataset '{name}' split '{split}'"
        if (problem or config.HF_HUB_OFFLINE) and isinstance(err, (ConnectionError, FileNotFoundError)):  # not cached
            raise InfopoError(f"{head}: {problem or 'HF_DATASETS_OFFLINE is set'}, and it is not in the local cache "
                              "(nor is there a local file or folder of that name)") from None
        raise InfopoError(f"{head} (offline or not found?): {first_line(err)}") from None
    return _guarded(f"{name}[{split}]", "hub dataset", dataset)


@contextmanager
def _offline() -> Iterator[None]:
    """datasets and huggingface_hub in offline mode (the cache only), as HF_HUB_OFFLINE=1 would set them at import."""
    from datasets import config
    from huggingface_hub import constants

    saved = config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


# --- a folder of data files ---------------------------------------------------------------------------------------

def _folder(folder: Path, split: str) -> Opened:
    """Every data file in the folder and below (hidden ones skipped), by name. Where file names name splits
    (train.jsonl, test.jsonl), only the asked-for split's files."""
    data, others = _listing(folder)
    if not data:
        raise InfopoError(f"{folder}: a folder with no data files ({', '.join(DATA_SUFFIXES)}) and no save_to_disk dataset")
    splits = {relative: _split_of(relative) for relative in data}
    unread = [f"{relative} (not a data file)" for relative in others]
    named = sorted({s for s in splits.values() if s})
    if named:
        if unnamed := [str(r) for r, s in splits.items() if s is None]:
            raise InfopoError(f"{folder}: {_listed(unnamed)} name no split while the other files do "
                              f"({', '.join(named)}): rename them, or give one file as the source")
        wanted = _canonical_split(split)
        if wanted not in named:
            raise InfopoError(f"{folder}: no split '{split}'; available: {', '.join(named)} (use --split)")
        data, unread = ([r for r in data if splits[r] == wanted],
                        [f"{r} (split {splits[r]})" for r in data if splits[r] != wanted] + unread)
    elif split != "train":
        raise InfopoError(f"{folder}: no split '{split}': no file name names a split (like train.jsonl, test.jsonl), "
                          "so all the files are the train split")
    files = [(str(relative), _file_rows(folder / relative)) for relative in data]
    return Opened(files, folder, split if named else None, unread)


def _listing(folder: Path) -> tuple[list[Path], list[Path]]:
    """The folder's data files and its other files, relative to it and sorted; hidden files and folders skipped."""
    data, others = [], []
    for root, dirs, names in os.walk(folder, onerror=_raise_walk_error):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if not name.startswith("."):
                relative = Path(root, name).relative_to(folder)
                (data if relative.suffix.lower() in DATA_SUFFIXES else others).append(relative)
    return sorted(data, key=lambda p: p.parts), sorted(others, key=lambda p: p.parts)


def _raise_walk_error(err: OSError) -> None:
    raise cannot_read(err.filename, err)


def _split_of(relative: Path) -> str | None:
    words = re.split(r"[-._ 0-9/\\]+", str(relative.with_suffix("")).lower())
    return next((split for word in words for split, names in SPLIT_WORDS.items() if word in names), None)


def _canonical_split(name: str) -> str:
    return next((split for split, words in SPLIT_WORDS.items() if name.lower() in words), name)


def _listed(names: list[str], most: int = 5) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")
