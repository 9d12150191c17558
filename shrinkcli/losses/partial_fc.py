"""Model-parallel PartialFC: the margin head's class centres sharded over the ranks of a torchrun.

With W processes, rank r owns the rows [start_r, start_r + C_r) of the C x D centre matrix
(C_r = C / W, the first C % W ranks one more) and their optimizer state; no rank ever holds or
all-reduces the full matrix. Every step:

1. the ranks all-gather their embeddings and labels, so each scores the GLOBAL batch B against
   its own centres; the gather's backward sums the embedding gradient of every shard and hands
   each rank the rows of its own samples (times W, because DDP then averages the backbone's
   gradient over the W ranks);
2. with `sample_rate < 1` each rank keeps the positives of its shard (labels it owns) plus random
   negatives up to `sample_rate * C_r` (PartialFC, An et al. 2021);
3. the margin is applied to a row's target logit on the rank that owns that class;
4. the softmax is normalised across ranks: the row maxima are all-reduced (MAX), then the sums
   of exponentials and the target logits (SUM); the loss is the mean over the global batch.

At sample rate 1 the loss and every gradient equal those of a single-process `MarginHead` over
the same global batch. The head's collectives use their own process group, so their order never
interleaves with DDP's gradient buckets. Its parameters stay out of DDP: each rank updates its
shard from the full-batch gradient it computed itself.

A checkpoint holds the FULL matrix under the same key as `MarginHead` ("weight", C x D), gathered
by rank 0 in row blocks (see shrinkcli.engine.shards); loading slices this rank's rows, so a run
resumes on any number of processes, a single process included.
"""

from __future__ import annotations

import torch
from torch import nn

from shrinkcli.losses.margin import MarginHead, centre_cosines

# Below this many centre values the initial matrix is drawn whole (on the host, from the global RNG,
# exactly as MarginHead draws it), so a run starts from the same centres on any number of processes.
# Above it each rank draws only its rows, from generators seeded per row block.
FULL_INIT_LIMIT = 1 << 26
INIT_BLOCK_ROWS = 1 << 14


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """(first class, number of classes) owned by `rank`: sizes differ by at most one."""
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + int(rank < extra)


class _GatherRows(torch.autograd.Function):
    """All-gather of equal-sized row blocks whose backward returns this rank's rows of the summed
    gradient, scaled by W to cancel DDP's averaging of the backbone gradient."""

    @staticmethod
    def forward(ctx, tensor, group, rank, world):
        import torch.distributed as dist

        ctx.group, ctx.rank, ctx.world, ctx.rows = group, rank, world, tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        mine = grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows] * ctx.world
        return mine, None, None, None


class _ShardedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy over the global batch when each rank holds some columns of the logits.

    `targets` are column indices in this rank's logits, -1 where another rank owns the class."""

    @staticmethod
    def forward(ctx, logits, targets, group):
        import torch.distributed as dist

        owned = targets >= 0
        column = targets.clamp_min(0).view(-1, 1)
        row_max = logits.max(dim=1, keepdim=True).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - row_max
        exp = shifted.exp()
        sums = exp.sum(dim=1, keepdim=True)
        target = torch.where(owned.view(-1, 1), shifted.gather(1, column), torch.zeros_like(sums))
        both = torch.cat([sums, target], dim=1)
        dist.all_reduce(both, group=group)
        sums, target = both[:, :1], both[:, 1:]
        loss = (sums.log() - target).mean()
        probs = exp.div_(sums)
        ctx.save_for_backward(probs, column, owned)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        probs, column, owned = ctx.saved_tensors
        grad = probs.clone()
        grad.scatter_add_(1, column, -owned.view(-1, 1).to(grad.dtype))
        grad.mul_(grad_loss / grad.shape[0])
        return grad, None, None


class ShardedMarginHead(MarginHead):
    """A MarginHead whose `weight` is this rank's C_r x D shard. Same `forward(embeddings, labels)`,
    same hyper-parameters and checkpoint key; `sharded` tells tasks to keep it out of DDP."""

    sharded = True

    def __init__(self, embedding_size: int, num_classes: int, *, kind: str = "arcface",
                 margin: float | None = None, scale: float = 64.0, sample_rate: float = 1.0,
                 rank: int = 0, world_size: int = 1):
        with torch.random.fork_rng(devices=[]):     # the parent's placeholder draw must not move the RNG
            super().__init__(embedding_size, 2, kind=kind, margin=margin, scale=scale, sample_rate=sample_rate)
        del self.weight
        self.num_classes, self.embedding_size = int(num_classes), int(embedding_size)
        if num_classes < 2:     # the parent checked a placeholder: check the real count
            from shrinkcli.errors import BadInputError

            raise BadInputError(f"a margin head needs at least 2 identities, got {num_classes}",
                                hint="check the training data: every folder/label is one identity")
        self.rank, self.world_size = int(rank), int(world_size)
        self.class_start, self.num_local = shard_range(self.num_classes, self.rank, self.world_size)
        self.weight = nn.Parameter(self._initial_rows())
        self._group = None

    def _initial_rows(self) -> torch.Tensor:
        start, count, dim = self.class_start, self.num_local, self.embedding_size
        if self.num_classes * dim <= FULL_INIT_LIMIT:
            full = torch.empty(self.num_classes, dim)
            nn.init.normal_(full, std=0.01)
            return full[start:start + count].clone()
        base = int(torch.randint(0, 2**62, (1,)))      # the same on every rank: same seed, same draws
        rows = torch.empty(count, dim)
        first = start // INIT_BLOCK_ROWS
        for block in range(first, (start + count - 1) // INIT_BLOCK_ROWS + 1 if count else first):
            lo, hi = block * INIT_BLOCK_ROWS, min((block + 1) * INIT_BLOCK_ROWS, self.num_classes)
            values = torch.randn(hi - lo, dim, generator=torch.Generator().manual_seed(base + block)) * 0.01
            a, b = max(lo, start), min(hi, start + count)
            rows[a - start:b - start] = values[a - lo:b - lo]
        return rows

    @property
    def num_sampled(self) -> int:
        """Centres scored per step on this rank."""
        return max(1, min(self.num_local, int(round(self.sample_rate * self.num_local))))

    def group(self):
        """The head's own process group, created on first use (every rank runs the first step)."""
        import torch.distributed as dist

        if self._group is None:
            self._group = dist.new_group(ranks=list(range(self.world_size)))
        return self._group

    def _local_targets(self, labels: torch.Tensor) -> torch.Tensor:
        local = labels - self.class_start
        return torch.where((local >= 0) & (local < self.num_local), local, torch.full_like(local, -1))

    def sample_local(self, targets: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(indices of this shard's centres used this step or None for all, targets remapped into them)."""
        if self.sample_rate >= 1.0 or not self.training:
            return None, targets
        owned = targets >= 0
        # One spare slot takes the rows another rank owns, so marking positives needs no host sync.
        scores = torch.rand(self.num_local + 1, device=targets.device)
        scores[torch.where(owned, targets, torch.full_like(targets, self.num_local))] = 2.0
        scores = scores[:self.num_local]
        count = self.num_sampled
        if count < len(targets):
            count = max(count, int(torch.unique(targets[owned]).numel()))
        chosen = torch.topk(scores, k=min(count, self.num_local)).indices.sort().values
        remapped = torch.searchsorted(chosen, targets.clamp_min(0))
        return chosen, torch.where(owned, remapped, targets)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        group = self.group()
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            gathered = _GatherRows.apply(embeddings.float(), group, self.rank, self.world_size)
            all_labels = [torch.empty_like(labels.long()) for _ in range(self.world_size)]
            dist.all_gather(all_labels, labels.long().contiguous(), group=group)
            targets = self._local_targets(torch.cat(all_labels))
            chosen, targets = self.sample_local(targets)
            weight = self._centres(chosen)
            cosine = centre_cosines(gathered, weight)
            owned = (targets >= 0).view(-1, 1)
            column = targets.clamp_min(0).view(-1, 1)
            target = cosine.gather(1, column)
            logits = cosine.scatter(1, column, torch.where(owned, self._apply_margin(target), target))
            return _ShardedCrossEntropy.apply(logits * self.scale, targets, group)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "weight"
        full = state_dict.get(key)
        if full is not None and full.ndim == 2 and full.shape[0] == self.num_classes != self.num_local:
            state_dict = {**state_dict, key: full[self.class_start:self.class_start + self.num_local]}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, shard rows {self.class_start}..{self.class_start + self.num_local - 1} "
                f"of rank {self.rank}/{self.world_size}")


def margin_head(embedding_size: int, num_classes: int, **options) -> MarginHead:
    """The learned-centre margin head for this process: sharded under torchrun, else MarginHead."""
    from shrinkcli.engine.distributed import env_dist_info

    info = env_dist_info()
    if info.world_size > 1:
        return ShardedMarginHead(embedding_size, num_classes, rank=info.rank, world_size=info.world_size,
                                 **options)
    return MarginHead(embedding_size, num_classes, **options)


def is_sharded(module) -> bool:
    return bool(getattr(module, "sharded", False))


__all__ = ["ShardedMarginHead", "margin_head", "shard_range", "is_sharded"]
