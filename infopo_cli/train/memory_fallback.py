"""An `--gradient-checkpointing auto` run that runs out of memory in a training step runs that step again, once, with
more recomputation, before it gives up.

The memory plan that chose how many layers recompute (model/memory_plan.py) is arithmetic: a card shared with other
processes, or fragmentation it does not foresee, can still end a step out of memory. Then the step's partial
gradients are dropped, the RNG goes back to the step's start and the same micro-batches run again with every layer
recomputed, or where every one was already, with their saved inputs in pinned CPU memory (CUDA,
model/recompute.py `recompute_more`). Recomputation changes no gradient, so the step, the data order and the
run are those of a run that never ran out. The new setting holds for the rest of the run and is written to its
config.toml, so a resume keeps it. A second out-of-memory in the step, or one with nothing more to recompute, is
the recipe's out-of-memory stop (exit 3, the state before the step saved, the command that continues).

In a run of several processes only the one that ran out runs its step again. After every step they agree (`agree`):
the others recompute as much from then on, with no rerun, since their step's gradients are those either way, so
every process goes on with the one setting that rank 0 writes to config.toml and tells the user.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import TypeVar

import torch

from infopo_cli.model import recompute as recomputation
from infopo_cli.model.recompute import Recompute
from infopo_cli.train.checkpoint import restore_rng
from infopo_cli.train.distributed import World

# CUDA's allocator raises torch.OutOfMemoryError; torch < 2.5 only has the cuda alias.
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
T = TypeVar("T")


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's own error, or the CPU allocator's (a RuntimeError that says so)."""
    return (isinstance(err, (OUT_OF_MEMORY, MemoryError)) or "can't allocate memory" in str(err)
            or "out of memory" in str(err).lower())


def free_accelerator_memory() -> None:
    """Collect garbage and hand the CUDA cache back, so a retried step starts from what is really held."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Fallback:
    """How a run's steps meet an out-of-memory: `recompute` is what the auto plan chose (None: the setting was given,
    or Unsloth checkpoints its own way, and nothing is retried). `note` tells the user; `record` is called with the
    `--gradient-checkpointing` value the run goes on with (on or offload), to write it where a resume reads it."""

    def __init__(self, model: torch.nn.Module, params: list[torch.nn.Parameter], recompute: Recompute | None,
                 note: Callable[[str], None], record: Callable[[str], None]) -> None:
        self.model, self.params, self.recompute, self.note, self.record = model, params, recompute, note, record
        self.mode: str | None = None  # the setting after a fallback
        self.ran_again = False  # in the step now ending (`agree`)

    def run(self, step: Callable[[], T], rng: dict, number: int) -> T:
        """`step()`, and after an out-of-memory once more with more recomputation, from the same RNG state `rng`
        (the step's start) and no gradients. Raises the out-of-memory when there is nothing more to do."""
        try:
            return step()
        except (RuntimeError, MemoryError) as err:
            more = recomputation.recompute_more(self.model, self.recompute) \
                if self.recompute is not None and is_out_of_memory(err) else None
            if more is None:
                raise
        # out of the except block: the error's frames, and the tensors they hold, are gone
        for param in self.params:
            param.grad = None
        free_accelerator_memory()
        restore_rng(rng)
        self.recompute, self.mode, self.ran_again = more, "offload" if more.offload else "on", True
        self.record(self.mode)
        self.note(f"out of memory at step {number}: running the step again with {more.message} "
                  f"(--gradient-checkpointing {self.mode} from now on; config.toml says so for --resume)")
        return step()

    def agree(self, world: World, number: int) -> None:
        """At the end of step `number`, on every process (collectives; nothing where there is one process or nothing
        is retried): where another process ran its step again, this one recomputes as much from now on, so that all
        run one setting; rank 0 records and tells it when it changes there."""
        ran_again, self.ran_again = self.ran_again, False
        if self.recompute is None or not world.active or not world.any(ran_again):
            return
        mode = "offload" if world.any(self.mode == "offload") else "on"
        if self.mode in (mode, "offload"):  # this process went as far itself
            return
        self.recompute, self.mode = recomputation.recompute_as(self.model, self.recompute, mode), mode
        self.record(mode)
        self.note(f"out of memory at step {number} in another process, which ran the step again: "
                  f"{self.recompute.message} on every process from now on (--gradient-checkpointing {mode}; "
                  "config.toml says so for --resume)")
