"""The training loop (insightface-style: one loop, every step an optimizer step)."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shrinkcli import log
from shrinkcli.engine import checkpoint as ckpt
from shrinkcli.engine import distributed as ddp
from shrinkcli.engine import shards
from shrinkcli.engine.batches import build_loader, device_batch, seed_everything
from shrinkcli.engine.health import DeferredChecks, apply_nan_policy, masked_step, optimizer_tensors, snapshot
from shrinkcli.engine.metrics import MetricsFiles, ProgressView
from shrinkcli.engine.optim import LRSchedule, build_optimizer
from shrinkcli.engine.resume import resume_run
from shrinkcli.engine.validation import verify_pairs, warn_if_collapsed
from shrinkcli.errors import BadInputError, TrainingDivergedError

__all__ = ["Trainer", "resume_run"]


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """None means fp32. auto: bf16 autocast on CUDA, fp32 on CPU (bf16 is slow on most CPUs)."""
    if mode == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[mode]


class Trainer:
    def __init__(self, config, run_dir, task, dataset, val_pairs=None):
        self.config, self.run_dir, self.task, self.dataset, self.val_pairs = config, run_dir, task, dataset, val_pairs
        self.device = ddp.resolve_device(config.device, ddp.env_dist_info())  # checked before joining a group
        self.dist = ddp.init_distributed(str(self.device))
        self.is_main = self.dist.is_main
        self.modules: dict[str, torch.nn.Module] = dict(task.modules())
        if not self.modules:
            raise BadInputError("the training task has no modules")
        frozen = getattr(task, "frozen_modules", None)
        self.frozen: dict[str, torch.nn.Module] = dict(frozen()) if frozen else {}
        self.preprocess = {"mean": config.mean, "std": config.std, "crop": config.crop,
                           "input_size": config.input_size, "channel_order": "RGB"}
        self.autocast_dtype = amp_dtype(config.amp, self.device)
        if self.device.type == "cuda":
            # Fixed input shapes: let cuDNN pick its fastest kernels. fp32 matmuls (the margin
            # head's GEMM) may use TF32, the precision arcface_torch trains its heads with.
            torch.backends.cudnn.benchmark = True
            torch.set_float32_matmul_precision("high")
        # Reading the loss on the host waits for the GPU: on CUDA it is read every log_every steps
        # (see shrinkcli.engine.health); on CPU reading costs nothing and happens every step.
        self.defer_checks = self.device.type == "cuda"
        self.epoch = self.position = self.step = self.nan_skips = 0
        self.stop_requested = False
        self.best_accuracy: float | None = None
        self.last_good: Path | None = None
        self.last_val: dict[str, Any] | None = None
        self.throughput: list[float] = []  # img/s of each logged window (the first includes warm-up)
        # batch_size is the global batch: a recipe trains the same way on any number of processes
        # (same steps, same schedule). A per-process batch would halve the steps at 2 ranks, and a
        # short run's BatchNorm running statistics then never converge (an eval-mode collapse).
        if config.batch_size % self.dist.world_size:
            raise BadInputError(f"batch_size={config.batch_size} is not divisible by the {self.dist.world_size} "
                                "processes of this run", hint="batch_size is the global batch; make it a multiple "
                                                              "of --nproc_per_node x nodes")
        self.sampler = ddp.GlobalBatchSampler(len(dataset), config.batch_size // self.dist.world_size,
                                              seed=config.seed, rank=self.dist.rank,
                                              world_size=self.dist.world_size)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        if self.steps_per_epoch == 0:
            raise BadInputError(f"the training data has {len(dataset)} images, fewer than one global batch "
                                f"({self.sampler.global_batch})", hint="lower --batch-size or add data")
        self._prepare_modules()
        self.params = [p for m in self.modules.values() for p in m.parameters() if p.requires_grad]
        # Gradient clipping covers the backbone (the task's first module) only, as arcface_torch
        # does: a margin head's gradient norm grows with its class count and would otherwise
        # shrink the backbone's update on large datasets. The rest is still checked for non-finite values.
        backbone = {id(p) for p in next(iter(self.modules.values())).parameters()}
        self.clipped = [p for p in self.params if id(p) in backbone]
        self.unclipped = [p for p in self.params if id(p) not in backbone]
        self.float_buffers = [b for m in self.modules.values() for b in m.buffers() if b.is_floating_point()]
        self.optimizer = build_optimizer(config, self.modules.values())
        if config.head_update == "sparse":
            shards.bind_sampled_heads(self.modules, self.optimizer, distributed=self.dist.enabled)
        self.schedule = LRSchedule.from_config(self.optimizer, config, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.autocast_dtype == torch.float16 else None
        self.checks = DeferredChecks(config.nan_policy, config.max_nan_skips, 0, self.device)
        self.normalise = None   # (mean, std) on the device when the loader ships uint8 images

    @property
    def weights_dir(self) -> Path | None:
        return self.run_dir.path / "weights" if self.run_dir is not None and self.is_main else None

    def _prepare_modules(self) -> None:
        memory_format = torch.channels_last if self.config.channels_last else torch.contiguous_format
        for module in self.modules.values():
            module.to(self.device, memory_format=memory_format).train()
        for module in self.frozen.values():
            module.to(self.device, memory_format=memory_format).eval().requires_grad_(False)

    def _distribute(self) -> None:
        """Under torchrun, let the task route its per-step forward passes through DDP wrappers."""
        if not self.dist.enabled:
            return
        distribute = getattr(self.task, "distribute", None)
        if distribute is None:
            raise BadInputError(f"{type(self.task).__name__} cannot train on several processes",
                                hint="implement distribute(wrap) on the task, or run one process")
        distribute(lambda module: ddp.wrap_ddp(module, self.device))

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ---------------------------------------------------------------- state
    def _restore(self, state: dict[str, Any]) -> None:
        state = shards.localise(self, state)   # a sharded head's optimizer state: this rank's rows
        saved = ckpt.module_states(state)
        missing = sorted(set(self.modules) - set(saved))
        if missing:
            raise BadInputError(f"checkpoint has no state for module(s) {', '.join(missing)}",
                                hint="resume with the same stage and architecture that wrote it")
        for name, module in self.modules.items():
            try:
                module.load_state_dict(saved[name])
            except RuntimeError as exc:
                raise BadInputError(f"checkpoint does not fit module {name!r}: {str(exc).splitlines()[0]}",
                                    hint="resume with the same architecture and data that wrote it") from exc
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.position, self.step = int(state["epoch"]), int(state["position"]), int(state["step"])
        if int(state.get("world_size", 1)) != self.dist.world_size:
            # Keep the schedule aligned with samples seen, not with the old processes' step count.
            self.step = self.epoch * self.steps_per_epoch + self.position // self.sampler.global_batch
            self.schedule.load_state_dict({"step_count": self.step})
        self.best_accuracy = state.get("best_accuracy")
        self.nan_skips = int(state.get("nan_skips", 0))
        ckpt.restore_rng(state["rng"])
        if self.dist.enabled:
            seed_everything(self.config.seed + self.dist.rank + 7 * self.step)

    def save(self, best: bool = False) -> Path | None:
        """Write weights/last.pt (and best.pt); refuse to replace a good checkpoint with non-finite weights."""
        self._flush_checks()
        shards.flush_sampled_heads(self.modules)     # sampled rows back into the full matrix and its state
        ddp.average_buffers(self.modules.values())
        if not shards.all_ranks(ckpt.all_finite(self.modules), self.modules, self.device):
            raise TrainingDivergedError(f"weights became non-finite at step {self.step}; no checkpoint written",
                                        hint=f"last good checkpoint: {self.last_good or 'none'}")
        gathered = shards.gather_for_checkpoint(self)   # sharded heads: every rank sends its rows
        if self.weights_dir is None:
            return None
        state = shards.write_into(ckpt.build_state(self), gathered)
        last = ckpt.save_checkpoint(state, self.weights_dir / "last.pt")
        self.run_dir.add_output(last, "checkpoint")
        self.last_good = last
        if best:
            self.run_dir.add_output(ckpt.save_checkpoint(state, self.weights_dir / "best.pt"), "best_checkpoint")
        return last

    # ---------------------------------------------------------------- loop
    def fit(self, resume: str | Path | None = None) -> dict[str, Any]:
        started = time.perf_counter()
        resumed_from = None
        if resume is not None:
            path = Path(resume)
            path = path / "weights" / "last.pt" if path.is_dir() else path
            self._restore(ckpt.load_checkpoint(path))
            resumed_from = str(path)
            self.last_good = path if self.is_main else None
            if self.is_main:
                log.info(f"resumed from {path} at epoch {self.epoch}, step {self.step}")
        else:
            seed_everything(self.config.seed + self.dist.rank)
        # A sharded head's ranks hold different rows by design: only replicated modules start from rank 0's.
        ddp.broadcast_modules([m for m in self.modules.values() if not shards.sharded_modules({"m": m})])
        self._distribute()
        self.checks = DeferredChecks(self.config.nan_policy, self.config.max_nan_skips, self.nan_skips, self.device)
        if self.run_dir is not None and self.is_main:
            self.run_dir.set_device(str(self.device) + (f" x{self.dist.world_size}" if self.dist.enabled else ""))
            if resumed_from:
                resumes = self.run_dir.manifest["results"].get("resumes", [])
                self.run_dir.set_results(resumes=resumes + [{"from": resumed_from, "step": self.step, "epoch": self.epoch}])
        metrics = MetricsFiles(self.run_dir.path if self.run_dir is not None and self.is_main else None,
                               resume_step=self.step if resumed_from else None)
        if hasattr(self.task, "on_start"):
            self.task.on_start(self)
        total = self.config.epochs * self.steps_per_epoch
        if self.config.max_steps:
            total = min(total, self.config.max_steps)
        progress = ProgressView(self.is_main, total, self.step, self.config.log_every)
        try:
            with self._stop_on_ctrl_c():
                last_loss = self._loop(metrics, progress, total)
        except KeyboardInterrupt:
            self._mark("interrupted")
            raise
        except Exception as exc:
            if self.run_dir is not None and self.run_dir.manifest.get("status") == "running":
                self._mark("diverged" if isinstance(exc, TrainingDivergedError) else "failed")
            raise
        finally:
            progress.close()
        if self.val_pairs is not None and self.last_val is None:
            self._validate()
        summary = self._finish(metrics, last_loss, time.perf_counter() - started)
        return summary

    @contextlib.contextmanager
    def _stop_on_ctrl_c(self):
        """First Ctrl-C: finish the current step, write an exactly resumable checkpoint, stop.
        A second Ctrl-C stops at once. Under torchrun the ranks would have to agree on the step
        to stop at, so there Ctrl-C keeps its default meaning (resume from the last checkpoint)."""
        if self.dist.enabled or threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True
            log.warning("Ctrl-C: stopping after this step and writing a checkpoint (Ctrl-C again to stop now)")

        previous = signal.signal(signal.SIGINT, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _stop_now(self) -> None:
        path = self.save()
        if path is not None:
            log.warning(f"interrupted at step {self.step}: checkpoint {path}; continue with --resume {path.parent.parent}")
        raise KeyboardInterrupt

    def _loader(self) -> torch.utils.data.DataLoader:
        loader, self.normalise = build_loader(self.dataset, self.sampler, workers=self.config.workers,
                                              device=self.device, seed=self.config.seed + self.dist.rank)
        return loader

    def _loop(self, metrics: MetricsFiles, progress: ProgressView, total: int) -> float | None:
        config = self.config
        loader = self._loader()
        last_loss = None
        window_start, window_images = time.perf_counter(), 0
        while self.epoch < config.epochs and self.step < total:
            self.sampler.set_epoch(self.epoch, self.position)
            flips = ddp.flip_flags(config.seed, self.epoch, len(self.dataset)) if config.flip else None
            for module in self.modules.values():
                module.train()
            batches = iter(loader)
            while True:
                try:
                    images, labels, indices = next(batches)
                except StopIteration:
                    break
                except RuntimeError:
                    if self.stop_requested:      # Ctrl-C also reached the loader's worker processes
                        self._stop_now()
                    raise
                last_loss, logs = self._train_step(images, labels, indices, flips)
                window_images += len(images) * self.dist.world_size
                if self.step % max(1, config.log_every) == 0 or self.step == total:
                    last_loss = self._flush_checks(last_loss)
                    now = time.perf_counter()
                    record = {"step": self.step, "epoch": self.epoch + self.position / (self.steps_per_epoch * self.sampler.global_batch),
                              "loss": last_loss, "lr": self.schedule.lr(),
                              "img_per_s": window_images / max(now - window_start, 1e-9), "nan_skips": self.nan_skips,
                              **{k: float(v) for k, v in logs.items()}}
                    window_start, window_images = now, 0
                    self.throughput.append(record["img_per_s"])
                    if self.is_main:
                        metrics.log_step(record)
                    progress.update(self.step, self.epoch, {k: record[k] for k in ("loss", "lr", "img_per_s")})
                if self.stop_requested:
                    self._stop_now()
                if config.save_every_steps and self.step % config.save_every_steps == 0:
                    self.save()
                if self.step >= total:
                    break
            last_loss = self._flush_checks(last_loss)
            if self.position >= self.steps_per_epoch * self.sampler.global_batch:
                self._end_epoch(metrics, last_loss)
            elif self.step >= total:
                self.save()  # stopped mid-epoch by max_steps: keep an exactly resumable state
        return self._flush_checks(last_loss)

    def _flush_checks(self, last_loss: Any = None) -> float | None:
        """Read the deferred steps' losses and flags (one host sync) and apply the NaN policy to
        them in order; the loss of the latest step read (else `last_loss` as a float)."""
        for entry, loss, bad in self.checks.read():
            last_loss = loss
            if bad:
                apply_nan_policy(self, loss, entry.step, entry.epoch)
        return None if last_loss is None else float(last_loss)

    def _train_step(self, images, labels, indices, flips) -> tuple[Any, dict[str, Any]]:
        """One optimizer step; returns the loss (a device tensor when its check is deferred)."""
        images, labels, flipped = device_batch(images, labels, indices, flips, device=self.device,
                                               normalise=self.normalise, channels_last=self.config.channels_last)
        self.optimizer.zero_grad(set_to_none=True)
        masked = self.defer_checks and self.scaler is None
        # A step that turns out non-finite must leave no trace: its forward pass already updated
        # BatchNorm running stats in train mode, so keep a copy to put back.
        buffers = snapshot(self.float_buffers) if self.config.nan_policy == "skip" or masked else None
        with self._autocast():
            # `flipped` stays on the host (like `indices`): a cache lookup by it then needs no sync.
            loss, logs = self.task.loss(images, labels, indices, flipped)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()  # DDP all-reduces here
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        zero = torch.zeros((), device=self.device)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.clipped, self.config.clip_grad) if self.config.clip_grad else zero
        rest = [p.grad for p in (self.unclipped if self.config.clip_grad else self.params) if p.grad is not None]
        rest_norm = torch.nn.utils.get_total_norm(rest) if rest else zero
        # The mean loss over ranks and whether any rank saw a non-finite value, reduced on the device.
        finite = torch.isfinite(loss.detach())
        if self.scaler is None:
            finite = finite & torch.isfinite(grad_norm) & torch.isfinite(rest_norm)
        stats = torch.stack([loss.detach().float(), (~finite).float()])
        ddp.all_reduce_mean(stats)
        # Only after the forward pass: a sampled head has just swapped its rows and their state in.
        stepped = [p for p in self.params if p.grad is not None]
        state = optimizer_tensors(self.optimizer, stepped) if masked else None
        if state is not None:
            bad = stats[1] > 0
            masked_step(self.optimizer, self.checks.gate(bad), stepped + state, self.float_buffers, buffers)
            self.checks.add(self.step + 1, self.epoch, stats[0], bad)
            loss_value: Any = stats[0]
        else:
            self._flush_checks()
            loss_value, any_bad = float(stats[0]), bool(stats[1] > 0)
            if any_bad:
                apply_nan_policy(self, loss_value, self.step + 1, self.epoch)
                with torch.no_grad():
                    for buf, saved in zip(self.float_buffers, buffers or []):
                        buf.copy_(saved)
                if self.scaler is not None:
                    # unscale_ already ran for this step: without update() the next step's unscale_ raises.
                    self.scaler.update()
            elif self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        self.schedule.step()
        self.step += 1
        self.position += self.sampler.global_batch
        return loss_value, logs

    def _mark(self, status: str) -> None:
        if self.run_dir is not None and self.is_main:
            self.run_dir.set_results(nan_skips=self.nan_skips, step=self.step, last_good_checkpoint=str(self.last_good))
            self.run_dir.finish(status)

    def _end_epoch(self, metrics: MetricsFiles, last_loss: float | None) -> None:
        self.epoch += 1
        self.position = 0
        ddp.average_buffers(self.modules.values())
        row: dict[str, Any] = {"epoch": self.epoch, "step": self.step, "loss": last_loss, "lr": self.schedule.lr(),
                               "nan_skips": self.nan_skips}
        improved = False
        every = max(1, self.config.val_every_epochs)
        if self.val_pairs is not None and (self.epoch % every == 0 or self.epoch == self.config.epochs):
            result = self._validate()
            row["val_accuracy"] = result["accuracy"]
            if self.is_main:
                warn_if_collapsed(result, self.epoch)
            improved = self.best_accuracy is None or result["accuracy"] > self.best_accuracy
            if improved:
                self.best_accuracy = result["accuracy"]
        self.save(best=improved)
        if self.is_main:
            metrics.log_epoch(row)
            log.info(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))

    def _validate(self) -> dict[str, Any]:
        result: dict[str, Any] = {}
        if self.is_main:
            result = verify_pairs(self.task.embedder(), self.val_pairs, mean=self.config.mean, std=self.config.std,
                                  device=self.device, channels_last=self.config.channels_last,
                                  autocast_dtype=self.autocast_dtype)
        result = ddp.broadcast_object(result)
        self.last_val = result
        return result

    def _finish(self, metrics: MetricsFiles, last_loss: float | None, wall_s: float) -> dict[str, Any]:
        speeds = self.throughput[1:] or self.throughput
        summary = {
            "epochs": self.epoch, "steps": self.step, "final_loss": last_loss,
            "val_accuracy": (self.last_val or {}).get("accuracy"), "best_accuracy": self.best_accuracy,
            "nan_skips": self.nan_skips, "world_size": self.dist.world_size, "device": str(self.device),
            "img_per_s": float(np.median(speeds)) if speeds else None,
            "wall_s": round(wall_s, 2),
        }
        if self.run_dir is not None and self.is_main:
            curves = metrics.plot()
            for path in (metrics.jsonl, metrics.csv, curves):
                if path is not None and Path(path).is_file():
                    self.run_dir.add_output(path, "metrics")
            if self.last_good is not None:
                summary["last_checkpoint"] = str(self.last_good)
            best = self.weights_dir / "best.pt"
            if best.is_file():
                summary["best_checkpoint"] = str(best)
            self.run_dir.set_results(**{k: v for k, v in summary.items()})
        ddp.barrier()
        return summary
