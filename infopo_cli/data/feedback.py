"""KTO's mismatched completions: each unpaired row also reads another row's completion after its own prompt.

KTO's reference point z0 estimates KL(pi || pi_ref) from prompt/completion pairs that do not belong together
(arXiv 2402.01306, Sec. 4.1). Each row's partner is fixed once per dataset (a seeded permutation, skipping rows
of the same prompt), not drawn per batch, so the reference's log-probs of the mismatched completions can be
computed once and cached with the rest; a batch's z0 averages its rows' mismatches, as the paper's does.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace

from infopo_cli.data.tokenization import TokenizedPair
from infopo_cli.errors import ConfigError


def with_mismatches(rows: list[TokenizedPair], max_length: int, pool: Sequence[TokenizedPair] | None = None,
                    seed: int = 0) -> list[TokenizedPair]:
    """`rows` with each one's rejected slot holding a completion of another prompt, from `pool` (default: `rows`
    themselves; a held-out set of one prompt borrows the training rows'), cut to fit `max_length` after the row's
    prompt. Partners follow a seeded shuffle of the pool: the first of a different prompt after the row's place."""
    if not rows:
        return rows
    pool = list(rows if pool is None else pool)
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    # where each run of one prompt in the shuffled order ends, circularly: the next position holds another prompt
    prompts = [tuple(pool[i].prompt_ids) for i in order]
    if len(set(prompts)) < 2:
        raise ConfigError("kto needs completions written for other prompts to estimate its reference point, but every "
                          "row has the same prompt")
    after = [0] * len(order)  # after[k]: the first position after k whose prompt differs from position k's
    for k in range(2 * len(order) - 1, -1, -1):
        here, following = k % len(order), (k + 1) % len(order)
        after[here] = following if prompts[following] != prompts[here] else after[following]
    place = {id(pool[i]): k for k, i in enumerate(order)}
    out = []
    for index, row in enumerate(rows):
        k = place.get(id(row), index % len(order))
        partner = pool[order[after[k]]]
        if partner.prompt_ids == row.prompt_ids:  # a row from outside the pool: walk on to another prompt
            partner = next(pool[order[(k + j) % len(order)]] for j in range(len(order))
                           if pool[order[(k + j) % len(order)]].prompt_ids != row.prompt_ids)
        room = max(1, int(max_length) - len(row.prompt_ids))
        out.append(replace(row, rejected_ids=list(partner.chosen_ids[:room])))
    return out


def mismatched(train: list[TokenizedPair], held_out: list[TokenizedPair], max_length: int
               ) -> tuple[list[TokenizedPair], list[TokenizedPair]]:
    """Both sets with their mismatched completions; a held-out set of one prompt (many completions of one question
    are a common feedback set) takes its partners from the training rows."""
    own = len({tuple(row.prompt_ids) for row in held_out}) > 1
    return with_mismatches(train, max_length), with_mismatches(held_out, max_length, None if own else train)
