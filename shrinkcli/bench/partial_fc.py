"""Part `partialfc` of suite `scale`: the teacher step with a PartialFC head at 10k, 100k and 1M classes.

One child process per world size runs every class count in increasing order: 1 process directly,
2 processes under `torchrun` (gloo, the sharded head of shrinkcli.losses.partial_fc). A step is what
the Trainer does: backbone forward (DDP at 2 ranks), margin head at sample rate 0.1, backward, SGD
with momentum and weight decay, each class count twice on an r18 at 1/8 width: with the row-sparse
head update (the default, `head_update = "sparse"`) and with the dense one; then the smallest and
largest count again on the full-width r18 (sparse), whose backbone weighs what a real one does
against the head; its time is the median over timed steps after warm-up, the slowest rank's. Head
memory per rank is counted from the tensors (centres + momentum, + the dense gradient in dense
mode, float32); peak RSS is the process's high-water mark after that class count (counts run in
increasing order, so each is dominated by its own).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from shrinkcli.bench.timing import info_row, ratio_row

SUITE = "scale"
EMBEDDING = 128
INPUT = 32
SAMPLE_RATE = 0.1


# The toy width makes the backbone so cheap that the head's sampled work dominates the step; the
# full-width r18 (the field's smallest IResNet) shows the regime PartialFC is meant for.
TOY_WIDTH, FULL_WIDTH = 0.125, 1.0


def _settings(quick: bool) -> dict[str, Any]:
    classes = [1_000, 10_000] if quick else [10_000, 100_000, 1_000_000]
    cases = [[TOY_WIDTH, c, u] for c in classes for u in ("sparse", "dense")]
    if quick:
        return {"classes": classes, "cases": cases, "steps": 2, "warmup": 1, "batch": 16}
    cases += [[FULL_WIDTH, c, "sparse"] for c in (classes[0], classes[-1])]
    return {"classes": classes, "cases": cases, "steps": 8, "warmup": 2, "batch": 64}


def _launch(world: int, settings: dict[str, Any], out: Path) -> tuple[int, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["-m", "shrinkcli.bench.partial_fc", json.dumps(settings), str(out)]
    if world > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", *args]
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, check=False)
    return proc.returncode, (proc.stderr or "").strip().splitlines()[-1:][0] if proc.returncode else ""


def _read(out: Path, world: int) -> list[list[dict[str, Any]]]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def run_part(quick: bool) -> list[dict[str, Any]]:
    settings = _settings(quick)
    classes = settings["classes"]
    results: dict[int, list[list[dict[str, Any]]]] = {}
    status: dict[int, str] = {}
    with tempfile.TemporaryDirectory(prefix="shrink-bench-pfc-") as tmp:
        for world in (1, 2):
            out = Path(tmp) / f"w{world}"
            out.mkdir()
            code, why = _launch(world, settings, out)
            status[world] = "ok" if code == 0 else f"exit {code}: {why}"
            results[world] = _read(out, world) if code == 0 else []
    about = (f"{INPUT} px, embedding {EMBEDDING}, global batch {settings['batch']}, sample rate "
             f"{SAMPLE_RATE}, SGD momentum 0.9, median of {settings['steps']} steps after {settings['warmup']}, gloo CPU")
    small, large = classes[0], classes[-1]
    rows: list[dict[str, Any]] = []
    nan = float("nan")

    widths = sorted({width for width, _, _ in settings["cases"]}, reverse=True)

    def entry(rank: list[dict[str, Any]], count: int, update: str, width: float) -> dict[str, Any]:
        return next(e for e in rank if e["classes"] == count and e["update"] == update and e["width"] == width)

    def step(world: int, count: int, update: str = "sparse", width: float = TOY_WIDTH) -> float:
        if not results[world]:
            return nan
        return max(entry(rank, count, update, width)["step_s"] for rank in results[world]) * 1000

    def head_mib(world: int, count: int, update: str = "sparse") -> float:
        if not results[world]:
            return nan
        return max(entry(rank, count, update, TOY_WIDTH)["head_bytes"] for rank in results[world]) / 2**20

    for world in (1, 2):
        for width in widths:
            a, b = step(world, large, width=width), step(world, small, width=width)
            rows.append(ratio_row(SUITE, f"partialfc: step at {large:,} / {small:,} classes, {world} rank(s), "
                                  f"r18 width {width:g}", a=f"{large:,} ms", a_value=a, b=f"{small:,} ms",
                                  b_value=b, unit="ms", ratio=a / b if b else nan, target=2.0,
                                  higher_is_better=False,
                                  settings=f"{status[world]}; sparse update; r18 width {width:g}, {about}"))
        a, b = step(world, large, "sparse"), step(world, large, "dense")
        rows.append(ratio_row(SUITE, f"partialfc: sparse / dense update at {large:,} classes, {world} rank(s)",
                              a="sparse ms", a_value=a, b="dense ms", b_value=b, unit="ms",
                              ratio=a / b if b else nan, target=None, higher_is_better=False,
                              settings=f"{status[world]}; r18 width {TOY_WIDTH:g}, {about}"))
    a, b = head_mib(2, large), head_mib(1, large)
    rows.append(ratio_row(SUITE, f"partialfc: head memory per rank at {large:,} classes, 2 / 1 ranks",
                          a="2 ranks MiB", a_value=a, b="1 rank MiB", b_value=b, unit="MiB",
                          ratio=a / b if b else nan, target=0.5, higher_is_better=False,
                          settings=f"{status[1]} / {status[2]}; sparse update: centres + momentum, float32, largest rank"))
    for world in (1, 2):
        for update in ("sparse", "dense"):
            for count in classes:
                rss = max((entry(rank, count, update, TOY_WIDTH)["rss_mib"] for rank in results[world]),
                          default=nan)
                rows.append(info_row(SUITE, f"partialfc: {count:,} classes, {world} rank(s), {update} update",
                                     a="step ms", a_value=step(world, count, update), b="peak RSS MiB per rank",
                                     b_value=rss, unit="ms", settings=f"{status[world]}; head "
                                     f"{head_mib(world, count, update):.1f} MiB per rank; "
                                     f"r18 width {TOY_WIDTH:g}, {about}"))
    return rows


def _child(settings: dict[str, Any], out: str) -> None:
    """The measured process (one rank): every case (backbone width, class count, head update) in order."""
    import gc
    import resource

    import torch

    from shrinkcli.atomic import atomic_write_json
    from shrinkcli.engine.distributed import barrier, init_distributed, wrap_ddp
    from shrinkcli.engine.optim import param_groups
    from shrinkcli.losses.partial_fc import margin_head
    from shrinkcli.models import create_model
    from shrinkcli.stages.teacher import MarginTask

    info = init_distributed("cpu")
    local = settings["batch"] // info.world_size
    report = []
    for width, count, update in settings["cases"]:
        torch.manual_seed(0)
        backbone = create_model("r18", embedding_size=EMBEDDING, input_size=INPUT, width=width)
        head = margin_head(EMBEDDING, count, sample_rate=SAMPLE_RATE)
        task = MarginTask(backbone.train(), head.train())
        if info.enabled:
            task.distribute(lambda module: wrap_ddp(module, torch.device("cpu")))
        optimizer = torch.optim.SGD(param_groups([backbone, head], 5e-4), lr=0.01, momentum=0.9)
        if update == "sparse":
            head.bind_optimizer(optimizer)      # as the Trainer does with head_update = "sparse"
        generator = torch.Generator().manual_seed(info.rank)
        images = torch.randn(local, 3, INPUT, INPUT, generator=generator)
        labels = torch.randint(0, count, (local,), generator=generator)
        times = []
        for index in range(settings["warmup"] + settings["steps"]):
            barrier()
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss, _ = task.loss(images, labels, None, None)
            loss.backward()
            optimizer.step()
            head.flush_rows()       # done by the next forward pass anyway: timed here, in the step
            barrier()
            if index >= settings["warmup"]:
                times.append(time.perf_counter() - started)
        times.sort()
        weight = head.weight
        moments = sum(v.numel() for v in optimizer.state[weight].values() if torch.is_tensor(v) and v.ndim)
        gradient = weight.numel() if update == "dense" else 0   # sparse: only k x D, freed each step
        report.append({"width": width, "classes": count, "update": update, "rows": int(weight.shape[0]),
                       "step_s": times[len(times) // 2],
                       "head_bytes": (weight.numel() + gradient + moments) * weight.element_size(),
                       "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                       "loss": float(loss)})
        del task, backbone, head, optimizer, weight, loss
        gc.collect()
    atomic_write_json(Path(out) / f"rank{info.rank}.json", report)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m shrinkcli.bench.partial_fc SETTINGS_JSON OUT_DIR")
    _child(json.loads(sys.argv[1]), sys.argv[2])
