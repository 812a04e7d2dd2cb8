"""Rank, world size, process group and rank-aware logging, in one place.

Everything else in ``tvlt_core`` receives ``rank`` and ``world_size`` as arguments (so it can be tested without a
process group); only this module asks ``torch.distributed`` or the environment who we are.

Under Ray Train the process group already exists when the training function starts (Ray's ``TorchTrainer`` sets it
up, gloo on CPU, nccl on GPU); ``init_process_group`` then does nothing. Started by hand (a test, a single-process
debug run) it creates one from the usual ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE`` variables, or a
one-process group on a free loopback port.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current() -> RankInfo:
    """Who this process is: from the process group when there is one, else the launcher's environment."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return RankInfo(dist.get_rank(), dist.get_world_size(), local_rank)
    return RankInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), local_rank)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(backend: str | None = None, timeout_s: float = 600.0) -> RankInfo:
    """Join (or create) the default process group; a no-op when one exists (Ray Train made it)."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        info = current()
        os.environ.setdefault("LOCAL_RANK", str(info.local_rank))  # DeepSpeed reads it, as torchrun sets it
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(
            backend, rank=info.rank, world_size=info.world_size, timeout=timedelta(seconds=timeout_s)
        )
        log.info("process group %s: rank %d of %d", backend, info.rank, info.world_size)
    return current()


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def device() -> torch.device:
    """This rank's accelerator (``cuda:LOCAL_RANK``) or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", current().local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _reduce(value: torch.Tensor, op) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        # gloo reduces CPU tensors; nccl needs them on the GPU
        on = value.to(device()) if dist.get_backend() == "nccl" else value.cpu()
        dist.all_reduce(on, op=op)
        return on.to(value.device)
    return value


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (identity without a process group)."""
    return _reduce(values.detach().clone(), dist.ReduceOp.SUM)


def all_gather_object(value):
    """``value`` of every rank, in rank order (a collective; ``[value]`` without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, value)
        return out
    return [value]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# --- rank-aware logging ---------------------------------------------------------------------------------------------
class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def setup_logging(rank: int, level: int = logging.INFO, *, all_ranks: bool = False) -> None:
    """Prefix every record with its rank; ranks other than 0 log warnings and errors only (unless ``all_ranks``).

    Training logs are read as one stream that Ray merges from every worker: without the prefix lines cannot be told
    apart, and with every rank at INFO the progress lines would be printed world-size times.
    """
    root = logging.getLogger()
    for other in [h for h in root.handlers if type(h).__name__ == "PlainRayHandler"]:
        root.removeHandler(other)  # Ray Train's plain console handler: every line would be printed twice
    handler = next((h for h in root.handlers if getattr(h, "_tvlt_rank_handler", False)), None)
    if handler is None:
        handler = logging.StreamHandler()
        handler._tvlt_rank_handler = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    handler.filters.clear()
    handler.addFilter(_RankFilter(rank))
    handler.setFormatter(logging.Formatter("%(asctime)s [rank %(rank)d] %(levelname)s %(name)s: %(message)s"))
    root.setLevel(level if (rank == 0 or all_ranks) else max(level, logging.WARNING))
