"""Deferred step checks: the NaN policy without reading the loss on the host every step.

Reading a CUDA tensor on the host (`float(loss)`, `bool(bad)`) waits for the GPU to finish the
step, so the CPU cannot queue the next one meanwhile. On CUDA the trainer therefore keeps each
step's loss and non-finite flag on the device and reads them together every `log_every` steps
(and before any checkpoint, validation or the end of the run). The policy keeps its guarantees
because the decision to apply a step is made on the device:

- every step's update is `where(apply, updated, before)` over the parameters, the optimizer
  state and the BatchNorm buffers, so a non-finite step leaves no trace (skip);
- `apply` is false for a non-finite step, and for every step after the run must stop (the first
  non-finite step with nan_policy=stop, the one past max_nan_skips with skip): the state stays
  exactly as it was before that step, and the next read raises naming that step.

A few steps of compute after a stop are wasted; nothing they computed is kept. Paths that read
on the host every step anyway keep the immediate check: CPU (reading is free there), fp16 with a
GradScaler (its `step` reads found-inf on the host), and optimizer state that lives on the host
or does not exist yet (AdamW's step counter; every optimizer before its first step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shrinkcli import log
from shrinkcli.errors import TrainingDivergedError


@dataclass
class Pending:
    step: int               # 1-based number of the step
    epoch: int
    loss: torch.Tensor      # mean loss over the ranks, on the device
    bad: torch.Tensor       # bool: some rank saw a non-finite loss or gradient


class DeferredChecks:
    """Device-side gate of the NaN policy plus the queue of unread step results."""

    def __init__(self, policy: str, max_skips: int, skips: int, device: torch.device):
        self.policy, self.max_skips = policy, int(max_skips)
        self.halted = torch.zeros((), dtype=torch.bool, device=device)
        self.skips = torch.full((), int(skips), dtype=torch.int64, device=device)
        self.pending: list[Pending] = []

    def gate(self, bad: torch.Tensor) -> torch.Tensor:
        """Whether this step's update is applied (a 0-d bool tensor; nothing is read)."""
        apply = ~bad & ~self.halted
        if self.policy == "stop":
            self.halted = self.halted | bad
        else:
            counted = bad & ~self.halted
            self.skips = self.skips + counted.long()
            self.halted = self.halted | (self.skips > self.max_skips)
        return apply

    def add(self, step: int, epoch: int, loss: torch.Tensor, bad: torch.Tensor) -> None:
        self.pending.append(Pending(step, epoch, loss.detach(), bad))

    def read(self) -> list[tuple[Pending, float, bool]]:
        """(entry, loss, bad) of every unread step, in order, with one device-to-host copy."""
        if not self.pending:
            return []
        entries, self.pending = self.pending, []
        values = torch.stack([torch.stack([e.loss.float(), e.bad.float()]) for e in entries]).cpu().tolist()
        return [(e, loss, bad > 0) for e, (loss, bad) in zip(entries, values)]


def optimizer_tensors(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """The optimizer's state tensors of `params` when all of them can be restored on the device;
    None when some state is missing (before the first step) or lives on another device."""
    found: list[torch.Tensor] = []
    for param in params:
        state = optimizer.state.get(param)
        if not state:
            return None
        for value in state.values():
            if torch.is_tensor(value):
                if value.device != param.device:
                    return None
                found.append(value)
    return found


def snapshot(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def keep_where(apply: torch.Tensor, tensors: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    """`t = apply ? t : saved` in place for each tensor, on the device (no host read)."""
    with torch.no_grad():
        for tensor, before in zip(tensors, saved):
            tensor.copy_(torch.where(apply, tensor, before))


def masked_step(optimizer: torch.optim.Optimizer, apply: torch.Tensor, tensors: list[torch.Tensor],
                buffers: list[torch.Tensor], saved_buffers: list[torch.Tensor]) -> None:
    """`optimizer.step()`, kept only where `apply` (parameters and optimizer state in `tensors`,
    BatchNorm `buffers` as they were before the forward pass in `saved_buffers`)."""
    before = snapshot(tensors)
    optimizer.step()
    keep_where(apply, tensors, before)
    keep_where(apply, buffers, saved_buffers)


def apply_nan_policy(trainer, loss_value: float, step: int, epoch: int) -> None:
    """The NaN policy for non-finite step `step` (1-based); a deferred check reaches it later,
    when the device has already kept that step and every later one from changing anything."""
    trainer.optimizer.zero_grad(set_to_none=True)
    where = f"step {step} (epoch {epoch})"
    last = f"last good checkpoint: {trainer.last_good}" if trainer.last_good else "no checkpoint written yet"
    if trainer.config.nan_policy == "stop":
        trainer.step = step - 1        # the state is that of the last good step
        trainer._mark("diverged")
        raise TrainingDivergedError(f"non-finite loss/gradient ({loss_value}) at {where}",
                                    hint=f"{last}; lower --lr, use amp=bf16/off, or set nan_policy=skip")
    trainer.nan_skips += 1
    if trainer.is_main:
        log.warning(f"non-finite loss/gradient at {where}: step skipped ({trainer.nan_skips}/{trainer.config.max_nan_skips})")
    if trainer.nan_skips > trainer.config.max_nan_skips:
        trainer.step = step - 1
        trainer._mark("diverged")
        raise TrainingDivergedError(f"{trainer.nan_skips} non-finite steps (more than max_nan_skips="
                                    f"{trainer.config.max_nan_skips}), the last at {where}", hint=last)
