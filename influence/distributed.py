"""Sharded builds under torchrun: which whole row chunks a rank writes, and how ranks agree and fail together.

The row chunk is a build's unit of resume and of batching (batches never straddle chunks), so ranks that own whole
chunks write files no other rank touches and produce the bytes one process would. Rank 0 creates the store and,
after every rank has written its chunks, finishes it (method preparation, indexes, completion).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import torch

import influence.errors as errors
from influence.errors import BadSpecError, InfluenceError

T = TypeVar("T")


@dataclass(frozen=True)
class ShardPlan:
    """This process's part of a build: its rank among ``world_size`` and the row chunks it writes.

    ``rows`` (start, stop) names this rank's rows explicitly; by default the store's chunks are split into
    ``world_size`` contiguous runs of whole chunks. Rows that do not start and end on chunk boundaries are refused
    before anything is written: two writers of one chunk file would lose rows.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    rows: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        for name in ("rank", "world_size", "local_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise BadSpecError(f"shard plan {name} must be a non-negative integer, got {value!r}")
        if not 0 <= self.rank < self.world_size:
            raise BadSpecError(f"shard plan rank {self.rank} is outside world size {self.world_size}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ShardPlan":
        """The plan torchrun describes in RANK, WORLD_SIZE and LOCAL_RANK; one process when they are absent."""
        env = os.environ if env is None else env
        if "WORLD_SIZE" not in env:
            return cls()
        try:
            world = int(env["WORLD_SIZE"])
            rank = int(env.get("RANK", "0"))
            local = int(env.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise BadSpecError(
                f"torchrun environment is malformed: RANK={env.get('RANK')!r} WORLD_SIZE={env.get('WORLD_SIZE')!r} "
                f"LOCAL_RANK={env.get('LOCAL_RANK')!r}") from None
        return cls(rank=rank, world_size=world, local_rank=local)

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    def chunks(self, n: int, rows_per_chunk: int) -> list[int]:
        """The chunks (indices of ``rows_per_chunk`` rows over ``n``) this rank writes; refuses unaligned rows."""
        n_chunks = -(-n // rows_per_chunk)
        if self.rows is None:
            return list(range(self.rank * n_chunks // self.world_size, (self.rank + 1) * n_chunks // self.world_size))
        start, stop = self.rows
        if not 0 <= start <= stop <= n:
            raise BadSpecError(f"rank {self.rank}: rows {start}..{stop} lie outside the data's {n} rows")
        if start % rows_per_chunk or (stop % rows_per_chunk and stop != n):
            raise BadSpecError(
                f"rank {self.rank}: rows {start}..{stop} do not start and end on the store's {rows_per_chunk}-row chunk "
                f"boundaries (or the last row, {n}); give each rank whole chunks, or leave rows unset to split them evenly")
        return list(range(start // rows_per_chunk, -(-stop // rows_per_chunk)))


def check_partition(owned: Sequence[Sequence[int]], n_chunks: int) -> None:
    """Every chunk is owned by exactly one rank (``owned[r]`` lists rank r's chunks)."""
    count = [0] * n_chunks
    for chunks in owned:
        for c in chunks:
            count[c] += 1
    twice = [c for c, k in enumerate(count) if k > 1]
    missing = [c for c, k in enumerate(count) if k == 0]
    if twice or missing:
        raise BadSpecError(f"the ranks' shard plans do not cover the {n_chunks} chunks once each "
                           f"(owned twice: {twice[:10]}, owned by none: {missing[:10]}); fix the plans' rows")


class Ranks:
    """The ranks of one build, doing each step together: a step that fails on any rank fails on all of them.

    With one process nothing is exchanged. Every rank must call :meth:`together` and :meth:`gather` the same
    number of times, in the same order (each is a collective, and so a barrier).
    """

    def __init__(self, plan: ShardPlan) -> None:
        self.plan = plan

    def gather(self, value: Any) -> list[Any]:
        """``value`` from every rank, in rank order (picklable values)."""
        if not self.plan.sharded:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.plan.world_size
        dist.all_gather_object(out, value)
        return out

    def together(self, step: Callable[[], T]) -> T:
        """Run ``step`` here, then wait for every rank's; raise this rank's error, else the first other rank's."""
        try:
            result, failure = step(), None
        except Exception as e:  # exchanged, then re-raised below: no rank is left waiting for a dead one
            if not self.plan.sharded:
                raise
            result, failure = None, e
        reports = self.gather(None if failure is None else (type(failure).__name__, str(failure)))
        if failure is not None:
            raise failure
        for rank, report in enumerate(reports):
            if report is not None:
                name, message = report
                cls = getattr(errors, name, None)
                kind = cls if isinstance(cls, type) and issubclass(cls, InfluenceError) else InfluenceError
                raise kind(f"rank {rank} failed: {message}" if kind is not InfluenceError else f"rank {rank} failed: {name}: {message}")
        return result  # type: ignore[return-value]


def backend_for(device: torch.device) -> str:
    """nccl for CUDA devices, gloo otherwise (CPU)."""
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: str | torch.device, plan: ShardPlan) -> torch.device:
    """``cuda`` without an index means this rank's GPU (LOCAL_RANK) in a sharded build."""
    d = torch.device(device)
    if plan.sharded and d.type == "cuda" and d.index is None:
        return torch.device("cuda", plan.local_rank)
    return d


@contextlib.contextmanager
def ranks(plan: ShardPlan, device: torch.device) -> Iterator[Ranks]:
    """The build's ranks; starts torch.distributed's process group when sharded and none is running (and ends it).

    torchrun's environment (MASTER_ADDR, MASTER_PORT) says where rank 0 listens. A group the caller started is
    used as it is, and left running.
    """
    if not plan.sharded:
        yield Ranks(plan)
        return
    import torch.distributed as dist

    started = not dist.is_initialized()
    if started:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend_for(device), rank=plan.rank, world_size=plan.world_size)
    try:
        if dist.get_world_size() != plan.world_size or dist.get_rank() != plan.rank:
            raise BadSpecError(f"shard plan rank {plan.rank} of {plan.world_size} does not match the process group's "
                               f"rank {dist.get_rank()} of {dist.get_world_size()}")
        yield Ranks(plan)
    finally:
        if started:
            dist.destroy_process_group()


__all__ = ["Ranks", "ShardPlan", "backend_for", "check_partition", "rank_device", "ranks"]
