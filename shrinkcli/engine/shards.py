"""Checkpoints of model-parallel (sharded) modules: whole on disk, sliced in memory.

A sharded module (`sharded = True`, e.g. shrinkcli.losses.partial_fc.ShardedMarginHead) holds rows
[class_start, class_start + num_local) of a `num_classes`-row weight on each rank. On save every
rank takes part in gathering the full weight, and every optimizer state tensor shaped like it (SGD
momentum, Adam moments), to rank 0 in row blocks, so no device ever holds more than W blocks at
once; the checkpoint then looks exactly like a single-process one. On resume every rank slices its
own rows again, whatever the number of processes that wrote the file.
"""

from __future__ import annotations

from typing import Any

import torch

BLOCK_ROWS = 1 << 16


def sharded_modules(modules: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in modules.items() if getattr(m, "sharded", False)}


def _param_index(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> int | None:
    """The integer key `optimizer.state_dict()` gives `param` (params numbered across groups)."""
    index = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p is param:
                return index
            index += 1
    return None


def gather_rows(local: torch.Tensor, num_rows: int, starts: list[int], counts: list[int], *, group=None,
                is_main: bool) -> torch.Tensor | None:
    """The full `num_rows` x ... tensor on rank 0 (host memory), None elsewhere. Collective."""
    import torch.distributed as dist

    world = len(counts)
    most = max(counts)
    full = torch.empty((num_rows, *local.shape[1:]), dtype=local.dtype) if is_main else None
    for offset in range(0, most, BLOCK_ROWS):
        rows = min(BLOCK_ROWS, most - offset)
        block = torch.zeros((rows, *local.shape[1:]), dtype=local.dtype, device=local.device)
        mine = local[offset:offset + rows]
        block[:len(mine)] = mine
        parts = [torch.empty_like(block) for _ in range(world)] if is_main else None
        dist.gather(block, parts, dst=0, group=group)
        if is_main:
            for rank, part in enumerate(parts):
                valid = max(0, min(rows, counts[rank] - offset))
                start = starts[rank] + offset
                full[start:start + valid] = part[:valid].cpu()
    return full


def gather_for_checkpoint(trainer) -> dict[str, Any]:
    """Every sharded module's full weight and optimizer state (rank 0; empty dict elsewhere). Collective."""
    from shrinkcli.losses.partial_fc import shard_range

    gathered: dict[str, Any] = {}
    for name, module in sharded_modules(trainer.modules).items():
        world = module.world_size
        ranges = [shard_range(module.num_classes, r, world) for r in range(world)]
        starts, counts = [s for s, _ in ranges], [c for _, c in ranges]

        def full(tensor):
            return gather_rows(tensor.detach(), module.num_classes, starts, counts, is_main=trainer.is_main)

        weight = full(module.weight)
        index = _param_index(trainer.optimizer, module.weight)
        state = trainer.optimizer.state.get(module.weight, {}) if index is not None else {}
        moments = {key: full(value) for key, value in sorted(state.items())
                   if torch.is_tensor(value) and value.shape == module.weight.shape}
        if trainer.is_main:
            gathered[name] = {"weight": weight, "index": index, "moments": moments}
    return gathered


def write_into(state: dict[str, Any], gathered: dict[str, Any]) -> dict[str, Any]:
    """Replace rank 0's shards in a checkpoint dict by the gathered full tensors."""
    for name, entry in gathered.items():
        state["modules"][name]["weight"] = entry["weight"]
        if entry["index"] is not None and entry["moments"]:
            saved = state["optimizer"]["state"][entry["index"]]
            state["optimizer"]["state"][entry["index"]] = {**saved, **entry["moments"]}
    return state


def localise(trainer, state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint dict whose full sharded-module tensors are cut to this rank's rows (a shallow
    copy; module weights are sliced by the modules' own load hooks, optimizer state here)."""
    for name, module in sharded_modules(trainer.modules).items():
        index = _param_index(trainer.optimizer, module.weight)
        entries = state.get("optimizer", {}).get("state", {})
        if index is None or index not in entries:
            continue
        lo, hi = module.class_start, module.class_start + module.num_local
        entry = {key: value[lo:hi].clone() if torch.is_tensor(value) and value.ndim == 2
                 and value.shape[0] == module.num_classes else value for key, value in entries[index].items()}
        state = {**state, "optimizer": {**state["optimizer"], "state": {**entries, index: entry}}}
    return state


def bind_sampled_heads(modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer, *,
                       distributed: bool) -> None:
    """Let sampled margin heads update only their sampled rows (`head_update = "sparse"`). A head
    replicated under DDP cannot (DDP's gradient buckets have fixed shapes); a sharded one stays
    outside DDP and can."""
    for module in modules.values():
        if hasattr(module, "bind_optimizer") and (not distributed or getattr(module, "sharded", False)):
            module.bind_optimizer(optimizer)


def flush_sampled_heads(modules: dict[str, torch.nn.Module]) -> None:
    for module in modules.values():
        if hasattr(module, "flush_rows"):
            module.flush_rows()


def all_ranks(flag: bool, modules: dict[str, torch.nn.Module], device: torch.device) -> bool:
    """`flag` and-ed over the ranks when sharded modules make the ranks' states differ (collective
    then, so that no rank stops alone and leaves the others waiting in a gather)."""
    import torch.distributed as dist

    if not sharded_modules(modules) or not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0)
