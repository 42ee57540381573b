"""`infopo data check`: what a preference dataset looks like to the model, before any training."""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, field

from infopo_cli.data.batching import epoch_batches, padding_fraction
from infopo_cli.data.loading import DataOptions, load_pairs, no_pairs
from infopo_cli.data.tokenization import auto_max_length, encode_pairs, truncate


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
    lengths: dict[str, list[int]] = field(default_factory=dict)  # prompt / chosen / rejected token counts
    truncated: int = 0
    max_length: int = 0
    auto_length: int = 0          # what --max-length auto would pick: keeps 99% of the pairs whole
    padding_grouped: float = 0.0
    padding_random: float = 0.0

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
    if tokenizer is None:
        return report
    report.lengths = {"prompt": [len(t.prompt_ids) for t in full], "chosen": [len(t.chosen_ids) for t in full],
                      "rejected": [len(t.rejected_ids) for t in full]}
    report.auto_length = auto_max_length([t.length for t in full])
    if max_length == "auto":
        max_length, max_prompt_length = report.auto_length, min(max_prompt_length, report.auto_length // 2)
    report.max_length = max_length
    report.truncated = sum(t.length > max_length for t in full)
    kept = [truncate(t.prompt_ids, t.chosen_ids, t.rejected_ids, max_length, max_prompt_length) for t in full]
    report.padding_grouped = padding_fraction(epoch_batches(kept, batch_size, random.Random(0)))
    report.padding_random = padding_fraction(epoch_batches(kept, batch_size, random.Random(0), group=1))
    return report
