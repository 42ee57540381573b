"""Group tokenised pairs into batches: the rows the model reads and which positions predict which tokens.

Two layouts. Plain: chosen rows first, then rejected rows, each `prompt + response`, right-padded.
Shared prompt: one row per pair, `prompt + chosen + rejected`, where the rejected tokens take the
positions right after the prompt and see only the prompt and themselves, so the prompt is read once
instead of twice; the log-probs are those of the plain layout. A batch carries each row's segment
lengths, not its mask: the mask is built where the model runs, from those lengths (`shared_allowed`).

Widths are padded to a multiple of 16 (data/widths.py says why). Padding is masked out and never
scored, so it changes no log-prob.

Unpaired feedback rows travel in the same layouts: the chosen slot holds the row's completion, the rejected slot
another row's completion after this prompt (KTO's mismatched pairs) or nothing; an empty rejected slot costs no
row and no position.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from infopo_cli.data.tokenization import TokenizedPair
from infopo_cli.data.widths import padded_width

IGNORE = -100


@dataclass
class Targets:
    """The scored tokens of a batch: where each is predicted from and which sequence it belongs to.

    Sequences are numbered chosen 0..B-1, then rejected B..2B-1, in both layouts. Tokens of one
    sequence are listed in order.
    """

    rows: Tensor    # (K,) row of the position whose output predicts the token
    cols: Tensor    # (K,) column of that position
    tokens: Tensor  # (K,) the token
    seq: Tensor     # (K,) its sequence
    n_seqs: int

    def to(self, device: str) -> Targets:
        return Targets(self.rows.to(device), self.cols.to(device), self.tokens.to(device), self.seq.to(device), self.n_seqs)

    def counts(self) -> Tensor:
        """The number of scored tokens of each sequence (length n_seqs)."""
        return torch.bincount(self.seq, minlength=self.n_seqs)


def targets_from_labels(labels: Tensor) -> Targets:
    """Plain rows: position t predicts token t+1 where labels[t+1] != IGNORE; row i is sequence i."""
    rows, cols = (labels[:, 1:] != IGNORE).nonzero(as_tuple=True)
    return Targets(rows, cols, labels[rows, cols + 1], rows, labels.shape[0])


@dataclass
class PreferenceBatch:
    """One micro-batch as the model reads it: chosen and rejected rows (plain) or one row per pair (shared prompt), and
    which positions are scored."""

    input_ids: Tensor              # (R, T)
    attention_mask: Tensor         # (R, T): 1 on real tokens
    targets: Targets
    n_pairs: int
    labels: Tensor | None = None   # plain layout: (2B, T) response tokens, IGNORE on prompt and padding
    position_ids: Tensor | None = None  # shared prompt: (R, T)
    segments: Tensor | None = None      # shared prompt: (R, 3) long, each row's prompt, chosen, rejected lengths
    desirable: Tensor | None = None     # unpaired rows: (B,) bool labels; None for pairs

    def to(self, device: str) -> PreferenceBatch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PreferenceBatch(self.input_ids.to(device), self.attention_mask.to(device), self.targets.to(device),
                               self.n_pairs, move(self.labels), move(self.position_ids), move(self.segments),
                               move(self.desirable))

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(pairs: list[TokenizedPair], pad_id: int, share_prompt: bool = False) -> PreferenceBatch:
    """Pad `pairs` into one batch: the chosen rows, then the rejected rows (or one row per pair with `share_prompt`)."""
    batch = collate_shared(pairs, pad_id) if share_prompt else collate_plain(pairs, pad_id)
    if pairs[0].label is not None:
        batch.desirable = torch.tensor([bool(p.label) for p in pairs])
    return batch


def collate_plain(pairs: list[TokenizedPair], pad_id: int) -> PreferenceBatch:
    """Chosen rows, then rejected rows, each prompt + response; an empty response (an unpaired row's unused rejected
    slot) gets no row, its sequence no tokens."""
    b = len(pairs)
    rows = [(p.prompt_ids, p.chosen_ids, i) for i, p in enumerate(pairs)] + \
           [(p.prompt_ids, p.rejected_ids, b + i) for i, p in enumerate(pairs) if p.rejected_ids]
    width = padded_width(max(len(prompt) + len(response) for prompt, response, _ in rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, response, _) in enumerate(rows):
        n = len(prompt) + len(response)
        input_ids[i, :n] = torch.tensor(prompt + response)
        labels[i, len(prompt):n] = torch.tensor(response)
        attention_mask[i, :n] = 1
    targets = targets_from_labels(labels)
    if len(rows) < 2 * b:  # rows no longer number the sequences
        targets.seq, targets.n_seqs = torch.tensor([s for _, _, s in rows], dtype=torch.long)[targets.seq], 2 * b
    return PreferenceBatch(input_ids, attention_mask, targets, b, labels=labels)


def collate_shared(pairs: list[TokenizedPair], pad_id: int) -> PreferenceBatch:
    """One row per pair: prompt, chosen, rejected; the rejected part restarts right after the prompt."""
    b = len(pairs)
    lengths = [(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    width = padded_width(max(sum(n) for n in lengths))
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    position_ids = torch.zeros((b, width), dtype=torch.long)
    rows, cols, tokens, seq = [], [], [], []
    for i, (p, (n_p, n_c, n_r)) in enumerate(zip(pairs, lengths)):
        end = n_p + n_c + n_r
        input_ids[i, :end] = torch.tensor(p.prompt_ids + p.chosen_ids + p.rejected_ids)
        attention_mask[i, :end] = 1
        position_ids[i, :end] = torch.cat([torch.arange(n_p + n_c), torch.arange(n_p, n_p + n_r)])
        # chosen token k is predicted at position n_p + k - 1; rejected token k at the position of
        # rejected token k - 1, and its first token at the prompt's last position, as in the plain layout
        chosen_from = list(range(n_p - 1, n_p + n_c - 1))
        rejected_from = ([n_p - 1] + list(range(n_p + n_c, end - 1))) if n_r else []
        for predictors, response, s in ((chosen_from, p.chosen_ids, i), (rejected_from, p.rejected_ids, b + i)):
            rows += [i] * len(response)
            cols += predictors
            tokens += response
            seq += [s] * len(response)
    targets = Targets(torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long),
                      torch.tensor(tokens, dtype=torch.long), torch.tensor(seq, dtype=torch.long), 2 * b)
    segments = torch.tensor(lengths, dtype=torch.long)
    return PreferenceBatch(input_ids, attention_mask, targets, b, position_ids=position_ids, segments=segments)


def segment_bounds(segments: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(R, 3) prompt, chosen, rejected lengths -> (R,) each: where the chosen answer starts, where the rejected one
    starts, where the row's tokens end."""
    chosen_start = segments[:, 0]
    rejected_start = chosen_start + segments[:, 1]
    return chosen_start, rejected_start, rejected_start + segments[:, 2]


def shared_allowed(chosen_start: Tensor, rejected_start: Tensor, end: Tensor, query: Tensor, key: Tensor) -> Tensor:
    """Whether `query` may attend to `key` in a shared-prompt row with these `segment_bounds` (any broadcastable
    shapes: whole (R, T, T) masks, or flex-attention's per-element `mask_mod`). Causal over the row's tokens, the
    rejected answer never sees the chosen one, and every position sees itself, so no row of a padded mask is
    all-masked (an all-masked softmax row is NaN)."""
    not_across = (query < rejected_start) | (key < chosen_start) | (key >= rejected_start)
    return (query == key) | ((key <= query) & (query < end) & not_across)


def response_only(batch: PreferenceBatch) -> PreferenceBatch:
    """The responses of a batch without their prompts, right-padded (for RMiPO's marginal log-probs)."""
    t = batch.targets.to("cpu")
    responses = [t.tokens[t.seq == s] for s in range(t.n_seqs)]
    width = padded_width(max(len(r) for r in responses))
    input_ids = torch.zeros((len(responses), width), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE)
    for i, response in enumerate(responses):
        input_ids[i, :len(response)] = response
        labels[i, :len(response)] = response
        attention_mask[i, :len(response)] = 1
    device = batch.input_ids.device
    return PreferenceBatch(input_ids, attention_mask, targets_from_labels(labels), batch.n_pairs, labels=labels).to(device)


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


def pairs_read(pairs: list[TokenizedPair], batch_size: int, seed: int, steps: int, start: int = 0) -> set[int]:
    """Indices of the pairs that batches `start`..`steps` (from 0) of `shuffled_batches(pairs, batch_size, seed)` hold."""
    row, read = {id(pair): i for i, pair in enumerate(pairs)}, set()
    batches = shuffled_batches(pairs, batch_size, seed)
    for _ in range(start):
        next(batches)
    for _ in range(steps - start):
        read.update(row[id(pair)] for pair in next(batches))
        if len(read) == len(pairs):
            break
    return read


def epoch_batches(pairs: list[TokenizedPair], batch_size: int, rng: random.Random, group: int = 32) -> list[list[TokenizedPair]]:
    """One epoch's batches: shuffled, then sorted by length inside windows of `group` batches (little padding), the
    batches shuffled again."""
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
        padded += padded_width(max(lengths)) * len(lengths)
    return 1 - real / padded if padded else 0.0


def eval_batches(pairs: list[TokenizedPair], batch_size: int) -> list[list[TokenizedPair]]:
    """Sorted by length so evaluation batches carry little padding (order does not matter there)."""
    ordered = sorted(pairs, key=lambda p: p.length)
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
