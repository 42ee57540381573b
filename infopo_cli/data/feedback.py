"""KTO's mismatched completions: each unpaired row also reads another row's completion after its own prompt.

KTO's reference point z0 estimates KL(pi || pi_ref) from prompt/completion pairs that do not belong together
(arXiv 2402.01306, Sec. 4.1). Each row's partner is fixed once per dataset (a seeded permutation, skipping rows
of the same prompt), not drawn per batch, so the reference's log-probs of the mismatched completions can be
computed once and cached with the rest; a batch's z0 averages its rows' mismatches, as the paper's does.
"""

from __future__ import annotations

import random
from dataclasses import replace

from infopo_cli.data.tokenization import TokenizedPair
from infopo_cli.errors import ConfigError


def with_mismatches(rows: list[TokenizedPair], max_length: int, seed: int = 0) -> list[TokenizedPair]:
    """`rows` with each one's rejected slot holding another row's completion (of a different prompt), cut to fit
    `max_length` after this row's prompt."""
    if not rows:
        return rows
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    position = {row: i for i, row in enumerate(order)}
    out = []
    for i, row in enumerate(rows):
        partner = next((order[(position[i] + k) % len(rows)] for k in range(1, len(rows))
                        if rows[order[(position[i] + k) % len(rows)]].prompt_ids != row.prompt_ids), None)
        if partner is None:
            raise ConfigError("kto needs completions written for other prompts to estimate its reference point, "
                              "but every row has the same prompt")
        room = max(1, int(max_length) - len(row.prompt_ids))
        out.append(replace(row, rejected_ids=list(rows[partner].chosen_ids[:room])))
    return out
