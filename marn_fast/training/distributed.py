"""torchrun / DistributedDataParallel glue: rank-0 logging and checkpoints, gathering results, and
failing fast when a worker is lost.

Launch with `torchrun --nproc-per-node N -m marn_fast train ...`; gloo on the CPU, nccl on CUDA.

A worker that dies or hangs must not leave the others waiting forever: the process group is
created with a timeout (MARN_FAST_DIST_TIMEOUT seconds, default 600), so a collective that a lost
peer never joins fails after it (a dead gloo peer fails it at once), and `worker_failures` turns
that failure into a `WorkerLostError`, which the CLI prints as one line (exit code 1).
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Iterator

import torch
import torch.distributed as dist

TIMEOUT_ENV = "MARN_FAST_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0


class WorkerLostError(OSError):
    """A collective failed or timed out: another worker died, hung or lost its connection."""


def collective_timeout() -> datetime.timedelta:
    """The process group's timeout: MARN_FAST_DIST_TIMEOUT seconds (default 600)."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}: expected seconds > 0, got {raw!r}") from None
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV}: expected seconds > 0, got {raw!r}")
    return datetime.timedelta(seconds=seconds)


def init_from_environment() -> bool:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=collective_timeout())
    return True


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return world()[0] == 0


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (a one-element list when not distributed)."""
    rank, size = world()
    if size == 1:
        return [obj]
    out = [None] * size
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def _first_line(exc: BaseException) -> str:
    line = next((s.strip() for s in str(exc).splitlines() if s.strip()), type(exc).__name__)
    return line if len(line) <= 200 else line[:197] + "..."


@contextlib.contextmanager
def worker_failures() -> Iterator[None]:
    """In a distributed run, turn the error of a collective that failed or timed out (a lost
    worker) into a one-line WorkerLostError; outside one, change nothing."""
    try:
        yield
    except (RuntimeError, dist.DistError) as exc:
        rank, size = world()
        if size == 1 or not _is_collective_failure(exc):
            raise
        raise WorkerLostError(f"distributed: rank {rank} of {size} stopped: a collective failed (another worker "
                              f"died, or hung past the {collective_timeout().total_seconds():g} s timeout): "
                              f"{_first_line(exc)}; continue the run with --resume") from exc


def _is_collective_failure(exc: BaseException) -> bool:
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return any(s in text for s in ("gloo", "nccl", "connection", "timed out", "timeout", "socket", "peer"))
