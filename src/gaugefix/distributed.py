"""Statistics across processes, GPUs and machines, on torch.distributed (run by torchrun).

``torchrun --nproc-per-node N -m gaugefix stats|match|trajectory ...``: each rank takes a
disjoint, contiguous share of the token windows (shares differ by at most one window), runs
both models on it, and the co-moments are reduced exactly: one all-reduce of the counts and
sums gives the global means; each rank re-centres its co-moments on them,
``C_r + n_r (μa_r − μa)(μb_r − μb)ᵀ`` (Chan's merge, generalised to many parts); a second
all-reduce sums them. Every rank ends with the same statistics, equal to a single process's
on the same tokens up to rounding. Rank 0 alone writes outputs, after a final barrier, so
that a rank that fails anywhere leaves nothing written (torchrun then stops the others).

Backend: NCCL when the statistics run on CUDA, gloo otherwise. Multi-node runs use
torchrun's rendezvous unchanged (``--nnodes``, ``--rdzv-endpoint``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from .errors import GaugefixError


@dataclass(frozen=True)
class World:
    rank: int
    size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world(device: str = "cpu") -> World | None:
    """This process's place in a torchrun job (initialising the process group on first use),
    or None when running alone."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return None
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return World(dist.get_rank(), dist.get_world_size())


def share(n: int, w: World | None) -> slice:
    """The rank's contiguous share of ``n`` items (sizes differ by at most one)."""
    if w is None:
        return slice(0, n)
    if n < w.size:
        raise GaugefixError(f"{w.size} processes but only {n} token windows: every process "
                            "needs at least one (more tokens, a shorter --seq-len, or fewer "
                            "processes)")
    return slice(w.rank * n // w.size, (w.rank + 1) * n // w.size)


def all_reduce_moments(m, device: str = "cpu"):  # Moments -> Moments
    """The moments of the union of every rank's samples, on every rank (of ``m``'s type:
    :class:`gaugefix.stats.Moments`, which imports this module)."""
    import torch
    import torch.distributed as dist

    dev = torch.device("cuda", torch.cuda.current_device()) if device.startswith(
        "cuda") else torch.device("cpu")
    n_local = torch.tensor([float(m.n)], dtype=torch.float64, device=dev)
    sums = torch.cat([n_local, m.mean_a.to(dev) * m.n, m.mean_b.to(dev) * m.n])
    dist.all_reduce(sums)
    n = round(float(sums[0]))
    if n == 0:
        return m
    d = m.d
    mean_a, mean_b = sums[1:1 + d] / n, sums[1 + d:] / n
    da, db = m.mean_a.to(dev) - mean_a, m.mean_b.to(dev) - mean_b
    parts = torch.cat([(m.m2_a.to(dev) + m.n * da * da), (m.m2_b.to(dev) + m.n * db * db),
                       (m.cross.to(dev) + m.n * torch.outer(da, db)).reshape(-1)])
    dist.all_reduce(parts)
    return type(m)(n, mean_a.cpu(), mean_b.cpu(), parts[:d].cpu(), parts[d:2 * d].cpu(),
                   parts[2 * d:].reshape(d, d).cpu())


def all_reduce_count(n: int, device: str = "cpu") -> int:
    import torch
    import torch.distributed as dist

    dev = torch.device("cuda", torch.cuda.current_device()) if device.startswith(
        "cuda") else torch.device("cpu")
    t = torch.tensor([n], dtype=torch.int64, device=dev)
    dist.all_reduce(t)
    return int(t.item())


def is_main_rank() -> bool:
    """False in a process that belongs to an initialised torch.distributed group (gaugefix's
    own under torchrun, or a caller's) with a rank other than 0: every rank computed the
    same result, and one writes it."""
    dist = sys.modules.get("torch.distributed")  # never imported just to ask
    return dist is None or not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank, in a torchrun job (never imports torch just to ask)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_initialized():
        dist.barrier()
