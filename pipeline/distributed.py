"""torch.distributed helpers for data-parallel training under `torchrun`.

Without torchrun's env (WORLD_SIZE unset or 1) every helper is a no-op: rank 0 of a world
of 1, nothing is initialised, and callers run exactly their single-process code path.

Under `torchrun --nproc-per-node N -m pipeline train-vqa ...` (RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT set by torchrun) `session()` initialises the
default process group (nccl when the training device is CUDA, gloo on CPU), yields the
rank's device, and tears the group down again. `shard()` is DistributedSampler's
deterministic split: the same permutation on every rank, padded by wrapping around to a
multiple of the world size (so every rank runs the same number of steps), then strided
by rank.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from pipeline.errors import UserError
from pipeline.training import pick_device


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name} must be an integer, got {value!r}") from None


def world_size() -> int:
    """The world size: the live process group's, else torchrun's WORLD_SIZE, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return max(_env_int("WORLD_SIZE", 1), 1)


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0) if world_size() > 1 else 0


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0) if world_size() > 1 else 0


def is_distributed() -> bool:
    return world_size() > 1


def is_main() -> bool:
    """True on rank 0 (and always without torchrun): the process that writes outputs."""
    return rank() == 0


def device_for(name: str = "auto") -> torch.device:
    """The device of this rank: `pick_device(name)`; under torchrun a CUDA device is
    cuda:LOCAL_RANK (an explicit `cuda:N` would put every rank on one GPU: an error), made
    the current device so that CUDA contexts (pin-memory threads, NCCL) open there too."""
    device = pick_device(name)
    if device.type == "cuda" and is_distributed():
        if device.index is not None:
            raise UserError(f"device {name!r} under torchrun would put every rank on one GPU: "
                            "use device cuda (or auto); rank r takes cuda:LOCAL_RANK")  # fmt: skip
        device = pick_device(f"cuda:{local_rank()}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


@contextlib.contextmanager
def session(device_name: str = "auto") -> Iterator[torch.device]:
    """Yield this rank's device; under torchrun, inside an initialised process group.

    A group that already exists (set up by the caller) is used and left alone.
    """
    device = device_for(device_name)
    if not is_distributed() or dist.is_initialized():
        yield device
        return
    if not dist.is_available():
        raise UserError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    r, w = rank(), world_size()
    if not 0 <= r < w:
        raise UserError(f"bad RANK {r} for WORLD_SIZE {w}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=r, world_size=w)
    try:
        yield device
        dist.barrier()
    finally:
        cleanup()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(order: Sequence[int] | np.ndarray, r: int | None = None, w: int | None = None):
    """This rank's slice of `order` (DistributedSampler, drop_last=False).

    World of 1: `order` itself, unchanged. Otherwise `order` padded by wrapping around to a
    multiple of `w`, then every `w`-th item from `r`: disjoint, equal-length slices that
    together cover every index.
    """
    r = rank() if r is None else r
    w = world_size() if w is None else w
    if w <= 1:
        return order
    order = np.asarray(order)
    n = len(order)
    total = -(-n // w) * w
    if total > n > 0:
        order = np.concatenate([order, np.resize(order, total - n)])
    return order[r:total:w]


def _device_of_group() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum over ranks (float64); the values themselves without a group."""
    if not (is_distributed() and dist.is_initialized()):
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_device_of_group())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.cpu()]


def all_reduce_mean(value: float) -> float:
    """Mean of a scalar over ranks (for logging); the value itself without a group."""
    return all_reduce_sum([value])[0] / world_size()


def broadcast_params(*modules: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (no-op without a group)."""
    if not (is_distributed() and dist.is_initialized()):
        return
    with torch.no_grad():
        for module in modules:
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.data, src=0)


def all_reduce_grads(*modules: torch.nn.Module) -> None:
    """Average the gradients of `modules` over ranks, in one flat all-reduce.

    For models that are not called through a single `forward` (so DistributedDataParallel
    does not fit). Parameters without a gradient are skipped; that set must be the same on
    every rank. No-op without a group.
    """
    if not (is_distributed() and dist.is_initialized()):
        return
    grads = [p.grad for m in modules for p in m.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over the state dict (names + raw bytes): equal on ranks that stayed in sync."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
