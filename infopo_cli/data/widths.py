"""The widths batches are padded to (data/batching.py collates them; model/memory_plan.py plans them). Torch-free, so
`infopo plan` imports no torch.

Widths are a multiple of PAD_MULTIPLE: torch's memory-efficient sdpa kernel copies a mask whose last dimension is not a
multiple of 8 in every layer, and fewer distinct widths mean fewer kernel variants.
"""

from __future__ import annotations

PAD_MULTIPLE = 16  # every collated width is a multiple of this (`padded_width`)


def padded_width(length: int) -> int:
    """A batch's width for its longest row of `length` tokens: the next multiple of PAD_MULTIPLE (at least one)."""
    return max(1, -(-length // PAD_MULTIPLE)) * PAD_MULTIPLE
