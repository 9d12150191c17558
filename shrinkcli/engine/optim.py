"""Optimizer construction and learning-rate schedules (per optimizer step, checkpointable).

Weight decay is applied only to weight matrices and conv kernels: BatchNorm scales/shifts, biases
and PReLU slopes (every parameter with fewer than 2 dimensions) are excluded, as insightface does
for its backbones, because decaying them only shrinks normalisation and activation shapes.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from shrinkcli.errors import BadInputError


def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """Two groups: decayed (ndim >= 2) and not decayed (BN, bias, PReLU); frozen params skipped."""
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for param in module.parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "group": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "group": "no_decay"}]
    return [g for g in groups if g["params"]]


def build_optimizer(config, modules: Iterable[nn.Module]) -> torch.optim.Optimizer:
    groups = param_groups(modules, config.weight_decay)
    if not groups:
        raise BadInputError("nothing to train: the task has no trainable parameters")
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    raise BadInputError(f"unknown optimizer {config.optimizer!r}", hint="use sgd or adamw")


class LRSchedule:
    """Linear warm-up then cosine / poly / step / constant, evaluated per optimizer step.

    Like `torch.optim.lr_scheduler.LambdaLR`, but the factor is a pure function of the step count,
    so `state_dict()` is just that count (plus the shape, to warn when a resume changes it).

    factor(t) during warm-up (t < W):  (t + 1) / W
    afterwards, with p = (t - W) / max(1, T - W) in [0, 1]:
      cosine:   r + (1 - r) * (1 + cos(pi * p)) / 2,   r = min_lr / lr
      poly:     r + (1 - r) * (1 - p) ** power
      step:     gamma ** (number of milestones already passed)
      constant: 1
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, kind: str, total_steps: int,
                 warmup_steps: int = 0, base_lr: float, min_lr: float = 0.0,
                 milestones_steps: Iterable[int] = (), gamma: float = 0.1, power: float = 2.0):
        if kind not in ("cosine", "poly", "step", "constant"):
            raise BadInputError(f"unknown schedule {kind!r}", hint="use cosine, poly, step or constant")
        self.optimizer = optimizer
        self.kind = kind
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = max(0, int(warmup_steps))
        self.base_lr = float(base_lr)
        self.min_ratio = float(min_lr) / self.base_lr if self.base_lr else 0.0
        self.milestones = sorted(int(m) for m in milestones_steps)
        self.gamma = float(gamma)
        self.power = float(power)
        self.step_count = 0
        self._apply()

    @classmethod
    def from_config(cls, optimizer, config, steps_per_epoch: int) -> "LRSchedule":
        return cls(optimizer, kind=config.schedule, total_steps=config.epochs * steps_per_epoch,
                   warmup_steps=round(config.warmup_epochs * steps_per_epoch), base_lr=config.lr,
                   min_lr=config.min_lr, gamma=config.gamma, power=config.poly_power,
                   milestones_steps=[round(m * steps_per_epoch) for m in config.milestones])

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        if self.kind == "step":
            return self.gamma ** sum(step >= m for m in self.milestones)
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        r = self.min_ratio
        if self.kind == "cosine":
            return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * progress))
        return r + (1 - r) * (1 - progress) ** self.power

    def lr(self) -> float:
        return self.base_lr * self.factor(self.step_count)

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr()

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "kind": self.kind, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._apply()
