"""Data-parallel training on torch.distributed: one LoRA policy, several processes (torchrun, accelerate launch).

Every rank loads the frozen base on its own device and holds the same adapter and optimizer. A step's
global batch (`batch_size x grad_accum x world size` pairs) is drawn identically on every rank from the
same seeded order, and each rank trains on its own stride of it (`shard`): no pair is read twice and none
is left out. Each rank's loss is its pairs' sum divided by the pairs of the *global* batch, so summing the
adapter's gradients over ranks (one flat all-reduce per step, not per micro-batch) gives exactly the
single-process gradient of that global batch, however it is split; the optimizer step is then identical
on every rank and the adapters never drift apart.

Decisions that end a step (a stop request, out of memory on any rank) are agreed on by all ranks at the
step boundary, so no rank waits in a collective that the others have left. Only rank 0 writes (the run
folder, metrics, checkpoints, the adapter, the report) and prints.

A single process is a `World` of size 1, where every collective is the identity: the recipe has one path.

With `--fsdp` the frozen base is sharded over the processes instead (model/sharding.py): every forward pass is then a
collective (each layer's weights are gathered from every rank), so every rank must run the same passes in the same
order. A `sharded` world pads each rank's share of a step, a held-out evaluation, the reference pass and the answers
to the longest rank's with passes whose results are discarded (`lacking`), and agrees on stops at every batch.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from infopo_cli.train.metrics import PairMetrics

T = TypeVar("T")
# A rank waits this long in a collective for the others (evaluation with generation runs between steps).
TIMEOUT = datetime.timedelta(minutes=float(os.environ.get("INFOPO_DIST_TIMEOUT_MIN", "60")))


@dataclass(frozen=True)
class World:
    """This process's place among a run's processes: its rank, how many there are, its GPU on this host."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    sharded: bool = False  # the base is sharded over the ranks: they run every forward pass together

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    # --- who does what -----------------------------------------------------------------------
    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of `items`: every size-th item from its rank, so shares are disjoint, cover
        everything, and differ in size by at most one (a short last batch of an epoch still splits)."""
        return list(items[self.rank::self.size])

    def longest_share(self, total: int) -> int:
        """The size of the largest of the shares `shard` makes of `total` items."""
        return -(-total // self.size)

    def lacking(self, own: int, most: int) -> int:
        """How many passes this rank runs beyond its `own` to keep in step with the rank that runs `most` (sharded
        weights; otherwise none: each rank runs only its own)."""
        return most - own if self.sharded else 0

    def agreed(self, flag: Callable[[], bool]) -> Callable[[], bool]:
        """`flag`, asked between batches: with sharded weights true on every rank as soon as on any (a rank that left
        a loop early would leave the others waiting in the next layer's gather); otherwise each rank's own."""
        return (lambda: self.any(flag())) if self.sharded else flag

    @contextlib.contextmanager
    def one_at_a_time(self) -> Iterator[None]:
        """The ranks run the block in turn, rank 0 first (loading a model each: one copy in host memory at a time)."""
        for _ in range(self.rank):
            self.barrier()
        yield
        for _ in range(self.size - self.rank):
            self.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (filling the token cache, converting the embedded model), the
        others after it, reading what it wrote instead of writing the same files at the same time."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    # --- collectives (identity for one process) -----------------------------------------------
    def barrier(self) -> None:
        """Wait until every process gets here (nothing to wait for in a one-process run)."""
        if self.active:
            torch.distributed.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any rank."""
        if not self.active:
            return flag
        value = _on_wire(torch.tensor([float(flag)]))
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        """`values` summed element by element over every process (unchanged in a one-process run)."""
        if not self.active:
            return list(values)
        tensor = _on_wire(torch.tensor(list(values), dtype=torch.float64))
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def sum_metrics(self, metrics: PairMetrics) -> PairMetrics:
        """The global batch's (or the whole held-out set's) metrics from each rank's sums over its pairs."""
        if not self.active:
            return metrics
        keys = PairMetrics.KEYS  # with how many ranks have each: a rank without held-out rows has no keys of its own
        *sums, pairs = self.sum_floats([metrics.sums.get(k, 0.0) for k in keys] + [float(k in metrics.sums) for k in keys]
                                       + [metrics.pairs])
        total = PairMetrics()
        total.sums.update((k, v) for k, v, held in zip(keys, sums[:len(keys)], sums[len(keys):]) if held)
        total.pairs = int(pairs)
        return total

    def mean_over_ranks(self, means: dict[str, float], n: int, keys: Sequence[str]) -> dict[str, float]:
        """Means over every rank's items from each rank's means over its `n` items (a rank may have none)."""
        *sums, total = self.sum_floats([means.get(k, 0.0) * n for k in keys] + [n])
        return {k: s / total for k, s in zip(keys, sums)} if total else {}

    def gather(self, items: list[T]) -> list[list[T]]:
        """Every rank's `items`, by rank, on every rank (small picklable values; [items] in a one-process run)."""
        if not self.active:
            return [items]
        out: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(out, items)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (small picklable values: a path, a flag)."""
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum the trainable parameters' gradients over ranks in one flat buffer (a LoRA adapter is a few
        million values: one all-reduce per step costs less than the bucketing DDP would do per micro-batch)."""
        if not self.active:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]  # a rank with no pairs
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        torch.distributed.all_reduce(flat)  # on the parameters' device: the GPU under NCCL, the CPU under gloo
        offset = 0
        for param, grad in zip(params, grads):
            n = grad.numel()
            param.grad = flat[offset:offset + n].view_as(grad).to(grad.dtype)
            offset += n

    def sum_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed element by element over every process, on the CPU (rows each process filled alone, zeros
        elsewhere, add up to the whole table exactly)."""
        if not self.active:
            return tensor
        out = _on_wire(tensor.clone())
        torch.distributed.all_reduce(out)
        return out.cpu()

    def broadcast_tensor(self, tensor: torch.Tensor | None, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """Rank 0's tensor (None elsewhere) on every rank."""
        if not self.active:
            assert tensor is not None
            return tensor
        out = _on_wire(tensor.contiguous() if self.is_main and tensor is not None else torch.empty(tuple(shape), dtype=dtype))
        torch.distributed.broadcast(out, src=0)
        return out.cpu()


def _on_wire(tensor: torch.Tensor) -> torch.Tensor:
    """NCCL moves only CUDA tensors, gloo CPU ones."""
    return tensor.cuda() if torch.distributed.get_backend() == "nccl" else tensor


def from_environment() -> World:
    """The world torchrun or `accelerate launch` set up in the environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def start(world: World, device: str) -> None:
    """Join the process group: NCCL between GPUs, gloo on CPU; each rank on the GPU its LOCAL_RANK names."""
    if not world.active or torch.distributed.is_initialized():
        return
    if device == "cuda":
        torch.cuda.set_device(world.local_rank)
    torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo", timeout=TIMEOUT)


def stop(world: World, finished: bool) -> None:
    """Leave the process group, if this run started one. A process that `finished` its part first waits for the
    others (rank 0 still writes the outputs), so that no process tears its connections down under one still
    working: torchrun counts a process that dies in that teardown as a failed run. After an error nobody waits
    (torchrun stops the others when one fails)."""
    if world.active and torch.distributed.is_initialized():
        # the run's model and FSDP2's state (collective handles holding tensors) go now, while the interpreter is whole:
        # freed only at its exit, a gloo worker's last tensor could abort the process after a completed run
        gc.collect()
        if finished:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def global_batch(batch_size: int, grad_accum: int, world_size: int) -> int:
    """Pairs per optimizer step over every process."""
    return batch_size * grad_accum * world_size

