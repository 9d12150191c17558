"""The shared training engine: one loop for teacher and distillation training.

A stage builds a *task* and hands it to `Trainer(config, run_dir, task, dataset, val_pairs).fit(resume)`.
The engine owns everything around the maths: device and AMP, channels_last, the data loader and
its resumable sampler, the random horizontal flip of each batch, optimizer and schedule, gradient
clipping, DistributedDataParallel, NaN policy, checkpoints, validation, metrics and progress.

The task protocol (`TrainTask`) is deliberately small:

- `modules() -> dict[str, nn.Module]`: the trainable modules, checkpointed and optimised. The FIRST
  entry is the backbone (its weights are the model a stage exports).
- `loss(images, labels, indices, flipped) -> (loss, logs)`: `images` float [B,3,H,W] on the device
  (already flipped where `flipped` is True), `labels` int64 [B] on the device, `flipped` bool [B]
  and `indices` int64 [B] dataset indices on the CPU (e.g. to look up cached teacher outputs per
  (index, flipped) without reading the device). `loss` is a scalar tensor; `logs` maps names to floats or 0-d tensors (the
  engine converts them only on logging steps, so returning tensors avoids a device sync per step).
  The call runs under the engine's autocast context.
- `embedder() -> nn.Module`: maps a normalised batch to embeddings, for periodic validation.
- optional `frozen_modules() -> dict[str, nn.Module]`: moved to the device and channels_last, put
  in eval mode with gradients off, never optimised or checkpointed (e.g. a distillation teacher).
- `distribute(wrap)` (needed under torchrun): called once before the first step; the task passes
  each module whose forward it calls per step to `wrap` (torch DistributedDataParallel) and calls
  the returned module from then on. A sharded module (whose gradients must not be all-reduced)
  is simply not wrapped.
- optional `on_start(trainer)`: called once before the first step (after a resume has been
  restored), e.g. to precompute a teacher cache with `trainer.device`.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from shrinkcli.engine.trainer import Trainer, resume_run


@runtime_checkable
class TrainTask(Protocol):
    def modules(self) -> dict[str, Any]: ...

    def loss(self, images: Any, labels: Any, indices: Any, flipped: Any) -> tuple[Any, dict[str, Any]]: ...

    def embedder(self) -> Any: ...


__all__ = ["Trainer", "TrainTask", "resume_run"]
