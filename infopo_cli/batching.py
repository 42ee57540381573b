"""Group tokenised pairs into batches: chosen rows first, then rejected rows, right-padded."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from infopo_cli.logps import IGNORE
from infopo_cli.tokenization import TokenizedPair


@dataclass
class PreferenceBatch:
    input_ids: Tensor       # (2B, T): rows 0..B-1 chosen, B..2B-1 rejected
    attention_mask: Tensor  # (2B, T)
    labels: Tensor          # (2B, T): response tokens, IGNORE on prompt and padding
    n_pairs: int

    def to(self, device: str) -> PreferenceBatch:
        return PreferenceBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device), self.n_pairs)

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(pairs: list[TokenizedPair], pad_id: int) -> PreferenceBatch:
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    width = max(len(prompt) + len(response) for prompt, response in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, response) in enumerate(rows):
        n = len(prompt) + len(response)
        input_ids[i, :n] = torch.tensor(prompt + response)
        labels[i, len(prompt):n] = torch.tensor(response)
        attention_mask[i, :n] = 1
    return PreferenceBatch(input_ids, attention_mask, labels, len(pairs))


def response_only(batch: PreferenceBatch) -> PreferenceBatch:
    """The responses of a batch without their prompts, right-padded (for RMiPO's marginal log-probs)."""
    responses = [row[labels != IGNORE] for row, labels in zip(batch.input_ids, batch.labels)]
    width = max(1, max(len(r) for r in responses))
    input_ids = torch.zeros((len(responses), width), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE)
    for i, response in enumerate(responses):
        input_ids[i, :len(response)] = response
        labels[i, :len(response)] = response
        attention_mask[i, :len(response)] = 1
    return PreferenceBatch(input_ids.to(batch.input_ids.device), attention_mask.to(batch.input_ids.device),
                           labels.to(batch.input_ids.device), batch.n_pairs)


def shuffled_batches(pairs: list[TokenizedPair], batch_size: int, seed: int, group: int = 32) -> Iterator[list[TokenizedPair]]:
    """Endless stream of batches of similar length; each epoch a new order (seed + epoch).

    Each epoch is shuffled, cut into windows of `group` batches, and each window sorted by length before
    it is cut into batches, whose order is then shuffled: batches carry little padding while the data
    order stays random at the scale of a window (as `group_by_length` in other trainers).
    """
    epoch = 0
    while True:
        rng = random.Random(seed + epoch)
        yield from epoch_batches(pairs, batch_size, rng, group)
        epoch += 1


def epoch_batches(pairs: list[TokenizedPair], batch_size: int, rng: random.Random, group: int = 32) -> list[list[TokenizedPair]]:
    order = list(range(len(pairs)))
    rng.shuffle(order)
    window = batch_size * group
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: pairs[i].length, reverse=True)
        batches += [[pairs[i] for i in chunk[j:j + batch_size]] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def padding_fraction(batches: list[list[TokenizedPair]]) -> float:
    """Share of the token slots in collated batches that are padding."""
    real = padded = 0
    for batch in batches:
        lengths = [len(p.prompt_ids) + len(r) for p in batch for r in (p.chosen_ids, p.rejected_ids)]
        real += sum(lengths)
        padded += max(lengths) * len(lengths)
    return 1 - real / padded if padded else 0.0


def eval_batches(pairs: list[TokenizedPair], batch_size: int) -> list[list[TokenizedPair]]:
    """Sorted by length so evaluation batches carry little padding (order does not matter there)."""
    ordered = sorted(pairs, key=lambda p: p.length)
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
