"""Prompt sets split over processes with ``torchrun`` (torch.distributed).

cfgen's noise is keyed by (seed, step, token id), never by rank or batch, so a
prompt set can be split over processes and the union of their results is the
single-process result. To make it *byte*-identical, the unit of work is the
batch the single-process run would form: batch ``b`` (prompts ``b * batch_size``
to ``(b + 1) * batch_size - 1``) runs on rank ``b % world_size`` with exactly
the same rows, padding and arithmetic, and rank 0 collects the batches back in
input order.

torch.distributed does the process management (``torchrun`` starts the ranks
and sets ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR``), Gloo carries the results
on CPUs and NCCL on GPUs; cfgen adds only the batch-to-rank assignment.

Example (``torchrun --nproc_per_node 2 script.py``; run as a plain
``python script.py`` it is one process and gives the same file)::

    import cfgen
    from cfgen import distributed

    model, tok = cfgen.load_default_model()
    steer = cfgen.catalogue.load("steering_dark", model)
    prompts = [f"Story {i}:" for i in range(32)]

    def run(batch):                      # batch: list of (index, prompt)
        r = cfgen.generate(steer, tok, [p for _, p in batch], max_new_tokens=16, seed=0)
        return r.to_records()

    with distributed.ranks() as ctx:
        batches = ctx.map_batches(run, prompts, batch_size=8)
        if ctx.rank == 0:                # the records of every batch, in input order
            print(sum(len(b) for b in batches))
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional, TypeVar

__all__ = ["RankContext", "RankFailure", "ranks", "batches_of", "assign"]

T = TypeVar("T")


class RankFailure(RuntimeError):
    """A rank died or failed: the results of the others are incomplete."""


def batches_of(n_items: int, batch_size: int) -> list[range]:
    """The batches a single-process run forms: consecutive index ranges of ``batch_size``.

    >>> batches_of(5, 2)
    [range(0, 2), range(2, 4), range(4, 5)]
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return [range(s, min(s + batch_size, n_items)) for s in range(0, n_items, batch_size)]


def assign(n_batches: int, rank: int, world_size: int) -> list[int]:
    """The batches rank ``rank`` runs: ``b`` with ``b % world_size == rank``.

    >>> assign(5, 1, 2)
    [1, 3]
    """
    if n_batches < world_size:
        raise ValueError(
            f"{world_size} ranks for {n_batches} batches: rank {n_batches} and above would have nothing to do. "
            f"Start at most {n_batches} ranks (torchrun --nproc_per_node {max(n_batches, 1)}) or use a smaller "
            "batch size"
        )
    return list(range(rank, n_batches, world_size))


@dataclass
class RankContext:
    """This process's place in the job: ``rank`` of ``world_size`` (0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def map_batches(self, fn: Callable[[list[tuple[int, T]]], Any], items: Sequence[T], *,
                    batch_size: int) -> Optional[list[Any]]:
        """Run ``fn`` on this rank's batches; rank 0 gets every batch's output in input order.

        ``fn`` receives one batch as a list of ``(index, item)`` pairs and returns
        something picklable (e.g. JSON records). On ranks other than 0 the
        return value is ``None``. A rank that raises makes every rank raise
        :class:`RankFailure` naming it, so no partial result is taken as complete.
        """
        batches = batches_of(len(items), batch_size)
        mine = assign(len(batches), self.rank, self.world_size)
        outputs: dict[int, Any] = {}
        error: Optional[str] = None
        b = -1
        try:
            for b in mine:
                outputs[b] = fn([(i, items[i]) for i in batches[b]])
        except Exception as err:  # reported to every rank below, then re-raised here
            error = f"rank {self.rank} failed on batch {b}: {type(err).__name__}: {err}"
            if not self.distributed:
                raise
        if not self.distributed:
            return [outputs[b] for b in range(len(batches))]
        gathered = self._gather((error, outputs))
        errors = [e for e, _ in gathered] if gathered is not None else []
        failed = self._broadcast_failure([e for e in errors if e])
        if failed:
            raise RankFailure(failed + " — no result was written; fix it and rerun")
        if self.rank != 0:
            return None
        merged: dict[int, Any] = {}
        for _, out in gathered:
            merged.update(out)
        return [merged[b] for b in range(len(batches))]

    def _gather(self, obj):
        import torch.distributed as dist

        bucket = [None] * self.world_size if self.rank == 0 else None
        try:
            dist.gather_object(obj, bucket, dst=0)
        except Exception as err:  # a peer died: gloo / nccl report a closed connection or a timeout
            raise RankFailure(
                f"rank {self.rank}: another rank stopped answering while results were collected ({err}). "
                "Look at that rank's output for its error; no result was written"
            ) from None
        return bucket

    def _broadcast_failure(self, errors: list[str]) -> str:
        import torch.distributed as dist

        box = ["; ".join(errors)] if self.rank == 0 else [None]
        dist.broadcast_object_list(box, src=0)
        return box[0] or ""


@contextlib.contextmanager
def ranks(*, backend: Optional[str] = None, timeout_s: float = 1800.0) -> Iterator[RankContext]:
    """This process's :class:`RankContext`, set up from torchrun's environment.

    Without torchrun (no ``WORLD_SIZE`` in the environment, or 1) it is rank 0
    of 1 and nothing is initialised. Under torchrun it initialises the default
    process group (Gloo on CPU, NCCL when CUDA is available, unless ``backend``
    says otherwise) and tears it down on exit; a group the caller already
    initialised is used as is and left alone.

    >>> with ranks() as ctx:
    ...     (ctx.rank, ctx.world_size)
    (0, 1)
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield RankContext()
        return
    import torch
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":  # one GPU per rank, as torchrun numbers them on each node
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield RankContext(dist.get_rank(), dist.get_world_size())
    finally:
        if owned:
            dist.destroy_process_group()
