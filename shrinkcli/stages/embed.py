"""`shrink embed MODEL --data SPEC --out STORE`: embed a whole data set once into a feature store.

The store (see `shrinkcli.evaluate.store`) is written chunk by chunk; a chunk counts only once its
rows are on disk, so a run killed at any point continues at its last whole chunk when the same
command is run again. A store made from another model, data spec or preprocessing is refused
(exit 2) unless `--overwrite`. `shrink verify` reads stores where it takes probe or distractor
images, so a million distractors are embedded once per model.

The store folder is this stage's output; it writes no separate run dir.
"""

from __future__ import annotations

import time
from typing import Any

from shrinkcli import __version__, log
from shrinkcli.config import EmbedConfig
from shrinkcli.errors import BadInputError
from shrinkcli.rundir import RunOptions


class _Progress:
    """A rich bar at a terminal; a log line about every tenth of the work otherwise."""

    def __init__(self, total: int, done: int, what: str):
        self.total, self.done, self.started, self.bar = total, done, time.perf_counter(), None
        self.every = max(1, (total - done) // 10)
        self.what = what
        if log.show_progress():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} chunks"),
                                TimeRemainingColumn(), transient=False)
            self.bar.start()
            self.task = self.bar.add_task(what, total=total, completed=done)

    def advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)
        elif self.done == self.total or self.done % self.every == 0:
            log.info(f"{self.what}: {self.done}/{self.total} chunks ({time.perf_counter() - self.started:.0f} s)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _check(config: EmbedConfig) -> None:
    for key, hint in (("model", "a .onnx, .safetensors, .pt file or a run dir"), ("data", "a labelled data spec"),
                      ("out", "the store folder to write, e.g. --out stores/megaface-student")):
        if not getattr(config, key):
            raise BadInputError(f"embed needs --{key}", hint=hint)


def run(config: EmbedConfig, options: RunOptions | None = None) -> dict[str, Any]:
    import numpy as np

    from shrinkcli.evaluate.images import dataset_pixels, open_labelled
    from shrinkcli.evaluate.runners import open_runner
    from shrinkcli.evaluate.store import StoreWriter, preprocess_of

    _check(config)
    runner = open_runner(config.model, "model", allow_incomplete=config.allow_incomplete)
    crop = config.crop if config.crop is not None else runner.crop
    dataset = open_labelled(config.data, input_size=runner.input_size, crop=crop)
    identity = {"model_sha256": runner.sha256, "data": config.data,
                "preprocess": preprocess_of(runner, crop=crop, flip=config.flip), "count": len(dataset),
                "dtype": config.dtype, "chunk_size": config.chunk_size}
    extra = {"model": {"path": str(runner.path.resolve()), "kind": runner.kind, "dtype": runner.dtype,
                       "arch": runner.arch}, "shrink_version": __version__}
    writer = StoreWriter(config.out, identity, np.asarray(dataset.labels), extra=extra, overwrite=config.overwrite)
    pending = writer.pending()
    if writer.resumed:
        log.info(f"embed: continuing {config.out}: {writer.total - len(pending)}/{writer.total} chunks already complete")
    started = time.perf_counter()
    progress = _Progress(writer.total, writer.total - len(pending), f"embed {runner.path.name}")
    try:
        for chunk in pending:
            start, stop = writer.rows(chunk)
            pixels = dataset_pixels(dataset, np.arange(start, stop))
            writer.write(chunk, runner.embed(pixels, batch_size=config.batch_size, flip=config.flip))
            progress.advance()
    finally:
        progress.close()
    seconds = time.perf_counter() - started
    manifest = writer.finish()
    embedded = sum(writer.rows(c)[1] - writer.rows(c)[0] for c in pending)
    log.info(f"embed: {manifest['count']} x {manifest['dim']} {config.dtype} in {config.out} "
             f"({embedded} embedded now, {seconds:.1f} s)")
    return {"summary": {"store": str(config.out), "count": manifest["count"], "dim": manifest["dim"],
                        "dtype": config.dtype, "chunks": writer.total, "chunks_embedded_now": len(pending),
                        "images_embedded_now": embedded, "seconds": round(seconds, 2),
                        "model_sha256": runner.sha256}}
