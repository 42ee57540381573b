"""`infopo data check`: what a preference dataset looks like to the model, before any training."""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, field, replace

from infopo_cli.data.batching import epoch_batches, padding_fraction
from infopo_cli.data.formats import PreferencePair
from infopo_cli.data.loading import DataOptions, balance, feedback_counts, load_pairs, no_pairs
from infopo_cli.data.tokenization import auto_max_length, control_token_note, encode_pairs, same_once_truncated, truncate


@dataclass
class DataReport:
    """What `infopo data check` found in one source: rows, pairs, what was dropped, duplicates, token lengths."""

    source: str
    format: str
    rows: int
    pairs: int
    skipped: list[str]
    duplicates: int
    notes: list[str] = field(default_factory=list)
    info: list[str] = field(default_factory=list)
    lengths: dict[str, list[int]] = field(default_factory=dict)  # prompt / chosen / rejected (or completion) tokens
    truncated: int = 0
    max_length: int = 0
    auto_length: int = 0          # what --max-length auto would pick: keeps 99% of the pairs whole
    padding_grouped: float = 0.0
    padding_random: float = 0.0
    desirable: int = 0            # unpaired rows (thumbs up/down feedback): how many of each label
    undesirable: int = 0
    valid: list[PreferencePair] = field(default_factory=list, repr=False)  # the pairs themselves, for a mix's checks

    @property
    def unpaired(self) -> bool:
        """Whether the source holds unpaired feedback rows rather than preference pairs."""
        return self.desirable + self.undesirable > 0

    @property
    def unit(self) -> str:
        """What a valid item of the source is called: "pairs" or "rows"."""
        return "rows" if self.unpaired else "pairs"

    @property
    def balance(self) -> str:
        """'412 desirable, 188 undesirable (2.19 : 1)' for unpaired rows, else ''."""
        return balance(self.desirable, self.undesirable) if self.unpaired else ""

    def percentiles(self, name: str) -> dict[str, float]:
        """min, p50, p90, p99, max and mean of one length series ("prompt", "chosen", ...)."""
        values = sorted(self.lengths[name])
        pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
        return {"min": values[0], "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": values[-1],
                "mean": statistics.fmean(values)}


def check(spec: str, options: DataOptions, tokenizer, max_length: int | str, max_prompt_length: int,
          batch_size: int) -> DataReport:
    """Load and (with a tokenizer) tokenise `spec` as a run would, and report its shape: lengths, truncation,
    duplicates."""
    loaded = load_pairs(spec, options)
    pairs, skipped, full = loaded.pairs, list(loaded.skipped), []
    if tokenizer is not None:  # a pair that cannot be tokenised is an invalid row like any other
        full, failed = encode_pairs(tokenizer, pairs, 10**9, 10**9, options.skip_invalid)  # untruncated lengths
        pairs = [p for i, p in enumerate(pairs) if i not in failed]
        skipped += [str(err) for err in failed.values()]
        if not pairs:
            raise no_pairs(spec, skipped)
    seen, duplicates = set(), 0
    for pair in pairs:
        duplicates += pair in seen
        seen.add(pair)
    report = DataReport(spec, loaded.format, loaded.rows, len(pairs), skipped, duplicates, loaded.notes,
                        loaded.info, max_length=max_length)
    report.desirable, report.undesirable = feedback_counts(pairs)
    report.valid = list(pairs)
    if tokenizer is None:
        return report
    if note := control_token_note(tokenizer, pairs, report.unit):
        report.notes.append(note)
    report.lengths = {"prompt": [len(t.prompt_ids) for t in full], "chosen": [len(t.chosen_ids) for t in full],
                      "rejected": [len(t.rejected_ids) for t in full]}
    if report.unpaired:  # an unpaired row's one reply is its completion; its rejected is empty
        report.lengths = {"prompt": report.lengths["prompt"], "completion": report.lengths.pop("chosen")}
    report.auto_length = auto_max_length([t.length for t in full])
    if max_length == "auto":
        max_length, max_prompt_length = report.auto_length, min(max_prompt_length, report.auto_length // 2)
    report.max_length = max_length
    report.truncated = sum(t.length > max_length for t in full)
    kept = [truncate(t.prompt_ids, t.chosen_ids, t.rejected_ids, max_length, max_prompt_length, t.label) for t in full]
    if same := same_once_truncated(kept):
        report.notes.append(f"{len(same)} pairs are the same once truncated to max_length {max_length} (their replies "
                            "differ only past it): a run leaves them out; raise --max-length to keep them")
    if report.unpaired:  # the completion rows' padding: a copy in the (empty) rejected slot keeps the share as it is
        kept = [replace(t, rejected_ids=t.chosen_ids) for t in kept]
    report.padding_grouped = padding_fraction(epoch_batches(kept, batch_size, random.Random(0)))
    report.padding_random = padding_fraction(epoch_batches(kept, batch_size, random.Random(0), group=1))
    return report
