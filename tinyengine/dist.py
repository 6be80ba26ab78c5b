"""Tensor-parallel context for policies: a rank holds a slice of each layer's heads.

Head-wise policies need nothing from other ranks. A policy whose score averages over all
query heads of a layer (momentum's head average, TOVA) calls `head_mean`, which all-reduces
the per-slot sums so every rank makes the decision the single process would make. With one
process it is a plain mean. The collective is the functional one, so it traces into the
compiled decode step.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def head_mean(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean over dimension `dim` (this rank's query heads) across the heads of every rank."""
    world = world_size()
    if world == 1:
        return x.mean(dim)
    import torch.distributed._functional_collectives as fc

    total = fc.all_reduce(x.sum(dim), "sum", dist.group.WORLD)
    return total / (x.shape[dim] * world)


def init_from_env(device: str) -> int:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR...); return the world size.

    gloo on CPU, nccl on CUDA. Without torchrun (no WORLD_SIZE) this is a single process.
    """
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or dist.is_initialized():
        return world_size()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return world_size()


def shutdown():
    """Tear the group down once every rank is done with its collectives.

    Nothing of ours may hold the group (the model's all-reduce hooks name it instead), so
    destroy_process_group frees it here and joins gloo's worker threads. A group left to the
    interpreter's exit aborted the rank now and then (SIGABRT, "terminate called without an
    active exception") after its work was done: a worker thread still dropping the last
    collective's tensors asks for the GIL during finalization and is unwound through a noexcept
    destructor (gdb: ProcessGroupGloo::runLoop -> ~AsyncWork -> decref_pyobject -> take_gil).
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def first_on_node(fn):
    """Run fn() on each node's first rank (LOCAL_RANK 0) before the other ranks run it, e.g. to
    convert or download a checkpoint once per node; the others then find it cached. The barrier
    is reached even when fn raises, so a failure never leaves the other ranks waiting."""
    import os

    if world_size() == 1:
        return fn()
    first = int(os.environ.get("LOCAL_RANK", rank())) == 0
    if not first:
        dist.barrier()
    try:
        return fn()
    finally:
        if first:
            dist.barrier()
