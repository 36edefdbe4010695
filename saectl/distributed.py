"""Data-parallel training of one SAE with torch.distributed, launched by `torchrun` (or SLURM's
`srun`, which sets the same variables through `SLURM_PROCID`/`SLURM_NTASKS`).

Every rank reads its own slice of each global batch (saectl.reader), computes its loss on it,
and the gradients are averaged across ranks before the optimizer step, so N ranks with a
global batch B take the steps one process would with batch B. What the recipe computes over
a whole batch is computed over the global one: the tokens each latent fired on (AuxK's dead
latents), BatchTopK's top k·B and its threshold, the logged figures. The initialisation (input
scale, geometric median) is computed by every rank from the same sample and then broadcast
from rank 0, so the ranks start from identical weights.

Only rank 0 locks, checkpoints and writes the artifact (saectl.stage: the other ranks
follow). When one rank dies, torchrun (or srun --kill-on-bad-exit) stops the others; the run
resumes from the last checkpoint, with any number of ranks: the batch a step reads is a
function of the step alone, and the address does not depend on the number of ranks.

With `--shards S` the ranks also split the latents (saectl.sharding): `mesh` lays them out
as data × latents, and the batch is split over the data dimension only.

This module is a thin wrapper: with one process (no WORLD_SIZE) every function is a no-op
and nothing imports torch.distributed.
"""

from __future__ import annotations

import os
from datetime import timedelta

from saectl.errors import ConfigError

TIMEOUT = timedelta(minutes=float(os.environ.get("SAECTL_DIST_TIMEOUT_MINUTES", "30")))
_MESH = None
"""The (data, latents) device mesh when the latents are sharded (`mesh`); None otherwise."""


def world() -> tuple[int, int]:
    """(rank, world size) of this process: torchrun's RANK/WORLD_SIZE, or srun's SLURM_PROCID/
    SLURM_NTASKS when MASTER_ADDR says a group is meant; (0, 1) otherwise."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
    if "MASTER_ADDR" in os.environ and "SLURM_NTASKS" in os.environ:
        return int(os.environ.get("SLURM_PROCID", "0")), int(os.environ["SLURM_NTASKS"])
    return 0, 1


def active() -> bool:
    return world()[1] > 1


def rank() -> int:
    return world()[0]


def init(device: str = "cpu") -> None:
    """Join the process group (gloo on CPU, nccl on CUDA) once, and check every rank runs the
    same saectl."""
    if not active():
        return
    import torch.distributed as dist

    if dist.is_initialized():
        return
    r, n = world()
    os.environ.setdefault("RANK", str(r))
    os.environ.setdefault("WORLD_SIZE", str(n))
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    import torch

    cuda = str(device).startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT)
    if r > 0:  # rank 0 speaks for the group: its progress, its lines, its ref
        from saectl.console import console

        console.quiet = True
    from saectl import __version__

    versions = gather(__version__)
    if len(set(versions)) > 1:
        raise ConfigError(f"the ranks run different saectl versions ({', '.join(sorted(set(versions)))}); "
                          "install the same saectl on every node")


def mesh(shards: int, device: str = "cpu") -> None:
    """Lay the ranks out as a 2-D mesh, data × latents with `shards` ranks per latent group
    (torch.distributed.device_mesh; saectl.sharding), consecutive ranks sharing the data."""
    global _MESH
    if shards <= 1:
        return
    if not active() or world()[1] % shards:
        raise ConfigError(f"shards {shards} split the latents over ranks, and this run has "
                          f"{world()[1]}: run a multiple of {shards} ranks (torchrun, srun)")
    from torch.distributed.device_mesh import init_device_mesh

    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    _MESH = init_device_mesh(device_type, (world()[1] // shards, shards),
                             mesh_dim_names=("data", "latents"))


def data_part() -> tuple[int, int]:
    """(index, count) of this rank's part of each global batch: its rank and the world size,
    or with sharded latents its place along the mesh's data dimension."""
    if _MESH is None:
        return world()
    return _MESH.get_local_rank("data"), _MESH.size(0)


def data_group():
    """The process group over which gradients are averaged (None: every rank)."""
    return None if _MESH is None else _MESH.get_group("data")


def latent_group():
    """(group, this rank's shard) of the latent-sharded mesh dimension."""
    assert _MESH is not None, "distributed.mesh(shards) first"
    return _MESH.get_group("latents"), _MESH.get_local_rank("latents")


def gather(obj) -> list:
    """Every rank's `obj`, in rank order (just [obj] with one process)."""
    if not active():
        return [obj]
    import torch.distributed as dist

    out = [None] * world()[1]
    dist.all_gather_object(out, obj)
    return out


def agree(error: str | None) -> None:
    """Every rank passes the error it met (None if none); all raise the first one, so a store
    one node cannot see stops every rank with one line instead of hanging the others."""
    errors = [(i, e) for i, e in enumerate(gather(error)) if e]
    if errors:
        i, e = errors[0]
        raise ConfigError(e if not active() else f"rank {i}: {e}")


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's flag on every rank."""
    if not active():
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(t, 0)
    return bool(t.item())


def all_reduce(t, op: str = "sum", group=None):
    """In place over the ranks (of `group`; None: all of them): sum, max or min."""
    if not active():
        return t
    import torch.distributed as dist

    dist.all_reduce(t, {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                        "min": dist.ReduceOp.MIN}[op], group=group)
    return t


def average_gradients(params) -> None:
    """Each gradient replaced by its mean over the ranks that hold other data (all of them,
    or with sharded latents the mesh's data dimension), in one flat all-reduce."""
    if not active() or data_part()[1] == 1:
        return
    import torch
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, dist.ReduceOp.SUM, group=data_group())
    flat /= data_part()[1]
    pos = 0
    for g in grads:
        g.copy_(flat[pos:pos + g.numel()].view_as(g))
        pos += g.numel()


def broadcast_module(module) -> None:
    """Rank 0's parameters and buffers on every rank (identical starting weights)."""
    if not active():
        return
    import torch.distributed as dist

    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, 0)


def keep_largest(values, count: int):
    """The entries of this rank's `values` (1-D, the same length on each rank) that are among
    the `count` largest over every rank's, as a bool mask: exactly `count` in all. Ties at the
    cut go to the lower ranks first and, within a rank, to the earlier entries; keeping every
    tie would keep more than `count`, which bf16 values, with 8 bits of mantissa, often tie
    (BatchTopK's L0 would exceed k). Only under torchrun (one process takes its top k)."""
    import torch
    import torch.distributed as dist

    n_world, me = world()[1], rank()
    local = values.topk(min(count, values.numel()), sorted=False).values
    parts = [torch.empty_like(local) for _ in range(n_world)]
    dist.all_gather(parts, local)
    cut = torch.cat(parts).topk(count, sorted=False).values.min()
    above, tied = values > cut, values == cut
    mine = torch.stack([above.sum(), tied.sum()])
    counts = [torch.empty_like(mine) for _ in range(n_world)]
    dist.all_gather(counts, mine)
    counts = torch.stack(counts)  # (world, 2): each rank's entries above the cut and at it
    room = count - int(counts[:, 0].sum()) - int(counts[:me, 1].sum())
    ties = tied.nonzero().flatten()[: max(0, min(room, int(mine[1])))]
    return above.index_fill_(0, ties, True)


def shutdown() -> None:
    global _MESH
    _MESH = None
    if active():
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
