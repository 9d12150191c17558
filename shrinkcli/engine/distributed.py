"""Distributed data parallel helpers: torchrun detection, process group, sampler, gradient sync.

`torchrun --nproc_per_node=N -m shrinkcli teacher ...` sets RANK/WORLD_SIZE/LOCAL_RANK; we join a
process group (nccl on CUDA, gloo on CPU). The modules a task calls every step are wrapped in
torch's DistributedDataParallel (the task says which through `distribute(wrap)`), so gradients are
averaged in buckets that overlap the backward pass; BatchNorm buffers are averaged before each
evaluation and checkpoint. Only rank 0 logs and writes files.

`batch_size` is the GLOBAL batch B; each of the W processes takes B / W images per step.

Sampling is defined in GLOBAL sample positions: epoch e visits a permutation of the dataset seeded
by (seed, e); optimizer step k of that epoch consumes positions [k*B, (k+1)*B) and rank r takes
its slice of B / W. A checkpoint stores the position, so a run can resume mid-epoch on a different number
of processes (W) and still visit each sample of the epoch exactly once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_dist_info() -> DistInfo:
    """What torchrun says about this process (a single process when nothing is set)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistInfo(rank=int(os.environ.get("RANK", "0")), world_size=world,
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group once (idempotent); a no-op for a single process."""
    import torch.distributed as dist

    info = env_dist_info()
    if not info.enabled or (dist.is_available() and dist.is_initialized()):
        return info
    use_cuda = torch.cuda.is_available() and not str(device).startswith("cpu")
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return info


def resolve_device(device: str, info: DistInfo) -> torch.device:
    """The device this process trains on; a device this machine lacks is bad input, not a crash.

    Under torchrun every process uses the GPU of its LOCAL_RANK: `cuda:N` would put every rank on
    GPU N, so it is refused there (choose GPUs with CUDA_VISIBLE_DEVICES instead)."""
    from shrinkcli.errors import BadInputError

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        wanted = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise BadInputError(f"device={device!r} is not a device name", hint="use auto, cpu, cuda or cuda:N") from exc
    if wanted.type not in ("cpu", "cuda"):
        raise BadInputError(f"device={device!r} is not supported", hint="use auto, cpu, cuda or cuda:N")
    if wanted.type == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise BadInputError(f"device={device!r} but this machine has no CUDA GPU", hint="use --device cpu or auto")
    if info.enabled:
        if wanted.index is not None:
            raise BadInputError(f"device={device!r} under torchrun would put every process on one GPU",
                                hint="pass --device cuda (each process takes the GPU of its LOCAL_RANK) and "
                                     "choose GPUs with CUDA_VISIBLE_DEVICES")
        wanted = torch.device("cuda", info.local_rank)
    if (wanted.index or 0) >= count:
        raise BadInputError(f"device={device!r} but this machine has {count} CUDA GPU(s)",
                            hint=f"use cuda:0..cuda:{count - 1}")
    return wanted


def _active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    import torch.distributed as dist

    if _active():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank (e.g. the run dir path only rank 0 created)."""
    import torch.distributed as dist

    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if _active():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def broadcast_modules(modules: Iterable[nn.Module], src: int = 0) -> None:
    """Make every rank start from rank `src`'s parameters and buffers."""
    import torch.distributed as dist

    if not _active():
        return
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=src)


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """torch DistributedDataParallel around a module the task calls every step (a no-op alone).

    Buffers are not broadcast at every forward: each process keeps its own BatchNorm statistics
    and `average_buffers` makes them equal before each validation and checkpoint."""
    if not _active() or not any(p.requires_grad for p in module.parameters()):
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False)


def average_buffers(modules: Iterable[nn.Module]) -> None:
    """Average floating buffers (BatchNorm running stats) so every rank holds the same model."""
    import torch.distributed as dist

    if not _active():
        return
    world = dist.get_world_size()
    for module in modules:
        for buf in module.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf.data)
                buf.data /= world
            else:
                dist.broadcast(buf.data, src=0)


class GlobalBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields this rank's index batches for one epoch, starting at a global sample position."""

    def __init__(self, num_samples: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_position = 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch  # the incomplete last global batch is dropped

    def set_epoch(self, epoch: int, start_position: int = 0) -> None:
        self.epoch = epoch
        self.start_position = start_position

    def permutation(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.permutation()
        end = self.steps_per_epoch * self.global_batch
        for start in range(self.start_position, end, self.global_batch):
            mine = start + self.rank * self.batch_size
            yield order[mine:mine + self.batch_size].tolist()

    def __len__(self) -> int:
        return max(0, (self.steps_per_epoch * self.global_batch - self.start_position) // self.global_batch)


def flip_flags(seed: int, epoch: int, num_samples: int) -> torch.Tensor:
    """The horizontal-flip decision of every global position of an epoch, from (seed, epoch) alone,
    so a resumed run (any world size) flips exactly the samples the uninterrupted run would."""
    generator = torch.Generator().manual_seed(seed * 100003 + epoch + 7919 * 1_000_003)
    return torch.rand(num_samples, generator=generator) < 0.5
