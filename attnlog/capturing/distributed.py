"""Ranks agreeing on a probe pass under sharded training (FSDP, ZeRO-3).

Every rank runs the pass together. When one rank fails, the others must not wait for it in the
next collective: all ranks learn whether every rank succeeded and raise together.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["agree", "broadcast_from_rank_zero", "rank", "settle"]


def rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def settle(error: BaseException | None, sharded: bool, device: Any) -> None:
    """Raise `error`; sharded, on every rank if any rank had one."""
    if sharded:
        agree(error, device)
    elif error is not None:
        raise error


def agree(error: BaseException | None, device: Any) -> None:
    """All ranks learn whether every rank's pass succeeded; each raises if one failed."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        ok = torch.tensor([0 if error is not None else 1], device=collective_device(device))
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if error is None and int(ok.item()) == 0:
            raise RuntimeError("the probe pass failed on another rank (its error is logged there)")
    if error is not None:
        raise error


def broadcast_from_rank_zero(value: Any) -> Any:
    """Rank 0's `value` on every rank (unchanged outside torch.distributed)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=collective_device(None))
    return box[0]


def collective_device(device: Any) -> Any:
    """Where a collective's tensors live: NCCL only moves CUDA tensors (this rank's GPU)."""
    if torch.distributed.get_backend() == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device
