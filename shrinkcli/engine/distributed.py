"""Distributed data parallel helpers: torchrun detection, process group, sampler, gradient sync.

`torchrun --nproc_per_node=N -m shrinkcli teacher ...` sets RANK/WORLD_SIZE/LOCAL_RANK; we join a
process group (nccl on CUDA, gloo on CPU). Every rank keeps a full replica of every trainable
module; after backward the engine averages gradients with bucketed all-reduces (so any task's
modules work unwrapped, whatever their call structure) and averages BatchNorm buffers before each
evaluation and checkpoint. Only rank 0 logs and writes files.

Sampling is defined in GLOBAL sample positions: epoch e visits a permutation of the dataset seeded
by (seed, e); optimizer step k of that epoch consumes positions [k*W*B, (k+1)*W*B) and rank r takes
its B-slice. A checkpoint stores the position, so a run can resume mid-epoch on a different number
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
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and info.enabled:
        return torch.device("cuda", info.local_rank)
    return torch.device(device)


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


def average_gradients(params: list[nn.Parameter], bucket_bytes: int = 32 << 20) -> None:
    """Average .grad across ranks, flattening into buckets to keep the all-reduce count low."""
    import torch.distributed as dist

    if not _active():
        return
    world = dist.get_world_size()
    for param in params:
        # A parameter unused on one rank must still join the same all-reduce buckets as on the others.
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    grads = [p.grad for p in params]
    bucket: list[torch.Tensor] = []
    size = 0
    for grad in grads + [None]:
        if grad is not None and bucket and (size + grad.numel() * grad.element_size() > bucket_bytes
                                            or grad.dtype != bucket[0].dtype):
            _reduce_bucket(bucket, world)
            bucket, size = [], 0
        if grad is None:
            if bucket:
                _reduce_bucket(bucket, world)
            break
        bucket.append(grad)
        size += grad.numel() * grad.element_size()


def _reduce_bucket(bucket: list[torch.Tensor], world: int) -> None:
    import torch.distributed as dist

    flat = torch.cat([g.reshape(-1) for g in bucket])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for grad in bucket:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


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
