"""Sharded PartialFC on 2 and 3 CPU processes (gloo): the same loss and gradients as one full head,
C/W centre rows per rank, and checkpoints that re-shard when a run resumes at another world size."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from shrinkcli.engine import Trainer
from shrinkcli.engine.checkpoint import load_checkpoint
from shrinkcli.losses.margin import MarginHead
from shrinkcli.losses.partial_fc import ShardedMarginHead, margin_head, shard_range
from shrinkcli.stages.teacher import MarginTask
from test_engine_toys import ToyBackbone, ToyFaces, toy_config

WORKER = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from shrinkcli.engine import Trainer
    from shrinkcli.engine.checkpoint import load_checkpoint
    from shrinkcli.engine.distributed import init_distributed
    from shrinkcli.losses.margin import MarginHead
    from shrinkcli.losses.partial_fc import ShardedMarginHead, margin_head
    from shrinkcli.rundir import RunDir
    from shrinkcli.stages.teacher import MarginTask
    from test_engine_toys import ToyBackbone, ToyFaces, toy_config

    info = init_distributed("cpu")
    rank, world = info.rank, info.world_size
    out = {{"rank": rank}}

    def equivalence(kind, classes, batch=12):
        # one full head over the global batch against the sharded head over each rank's slice
        torch.manual_seed(5)
        backbone, full = ToyBackbone(embedding_size=16, norm=False), MarginHead(16, classes, kind=kind)
        images, labels = torch.randn(batch, 3, 16, 16), torch.randint(0, classes, (batch,))
        ref = full(backbone(images), labels)
        ref_grads = torch.autograd.grad(ref, list(backbone.parameters()) + [full.weight])
        sharded = ShardedMarginHead(16, classes, kind=kind, rank=rank, world_size=world)
        lo, hi = sharded.class_start, sharded.class_start + sharded.num_local
        sharded.load_state_dict(full.state_dict())           # a full matrix: the head keeps its rows
        assert torch.equal(sharded.weight.detach(), full.weight.detach()[lo:hi])
        model = DistributedDataParallel(backbone)
        local = batch // world
        loss = sharded(model(images[rank * local:(rank + 1) * local]), labels[rank * local:(rank + 1) * local])
        loss.backward()
        def error(a, b):  # |a - b| against 1e-5 (1 + |b|): absolute near 0, relative for large values
            return float(((a - b).abs() / (1 + b.abs())).max())
        errors = [error(loss.detach(), ref.detach())]
        errors += [error(p.grad, g) for p, g in zip(backbone.parameters(), ref_grads[:-1])]
        errors.append(error(sharded.weight.grad, ref_grads[-1][lo:hi]))
        return {{"loss": float(loss), "ref": float(ref), "max_error": max(errors), "rows": sharded.num_local,
                 "head_numel": sharded.weight.numel(), "start": lo}}

    out["arcface"] = equivalence("arcface", {classes})
    out["cosface"] = equivalence("cosface", {classes})

    # sampled: positives of the shard always among the scored centres
    torch.manual_seed(7 + rank)
    head = ShardedMarginHead(16, 40, sample_rate=0.25, rank=rank, world_size=world)
    labels = torch.arange(0, 40, 7)[:6]
    targets = head._local_targets(labels)
    chosen, remapped = head.sample_local(targets)
    owned = targets >= 0
    out["sampled"] = {{"count": len(chosen), "num_sampled": head.num_sampled,
                      "positives_kept": bool(torch.equal(chosen[remapped[owned]], targets[owned])),
                      "others": bool((remapped[~owned] == -1).all())}}
    loss = head(torch.randn(len(labels) // world * 1, 16, requires_grad=True), labels[rank::world][:len(labels) // world])
    out["sampled"]["finite"] = bool(torch.isfinite(loss))

    mode = {mode!r}
    if mode == "train":
        torch.manual_seed(0)
        # sampled (row-sparse update): the checkpoint must still hold the full matrix and momentum
        task = MarginTask(ToyBackbone(), margin_head(8, 4, kind="cosface", scale=16.0, sample_rate=0.5))
        run = RunDir.create("teacher", run_dir={run_dir!r}) if rank == 0 else None
        Trainer(toy_config(epochs=1, batch_size=12, max_steps=2), run, task, ToyFaces()).fit()
        torch.save({{"weight": task.head.weight.detach(), "start": task.head.class_start}},
                   {tmp!r} + f"/shard{{rank}}.pt")
        out["ddp_head"] = type(task.head_step).__name__
    elif mode == "resume":
        torch.manual_seed(1)
        head = margin_head(8, 4, kind="cosface", scale=16.0, sample_rate=0.5)
        task = MarginTask(ToyBackbone(), head)
        trainer = Trainer(toy_config(epochs=1, batch_size=12), None, task, ToyFaces())
        saved = load_checkpoint({run_dir!r} + "/weights/last.pt")
        trainer._restore(saved)
        lo, hi = head.class_start, head.class_start + head.num_local
        index = next(i for i, p in enumerate(trainer.optimizer.param_groups[0]["params"]) if p is head.weight)
        momentum = trainer.optimizer.state[head.weight]["momentum_buffer"]
        out["resharded"] = bool(torch.equal(head.weight.detach(), saved["modules"]["head"]["weight"][lo:hi]))
        out["momentum"] = bool(torch.equal(momentum, saved["optimizer"]["state"][index]["momentum_buffer"][lo:hi]))
        out["rows"] = head.num_local
        result = trainer.fit(resume={run_dir!r} + "/weights/last.pt")
        out["steps"] = result["steps"]
    # one file per rank: lines printed by two ranks to one pipe can run together
    with open({tmp!r} + f"/result_{mode}_{{world}}_{{rank}}.json", "w") as handle:
        json.dump(out, handle)
""")


def _torchrun(tmp_path, processes: int, mode: str, classes: int) -> list[dict]:
    import json

    script = tmp_path / f"pfc_{mode}_{processes}.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent), run_dir=str(tmp_path / "run"),
                                    tmp=str(tmp_path), mode=mode, classes=classes))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={processes}", str(script)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(tmp_path.glob(f"result_{mode}_{processes}_*.json"))
    results = [json.loads(f.read_text()) for f in files]
    assert len(results) == processes, (proc.stdout[-2000:], proc.stderr[-2000:])
    return sorted(results, key=lambda r: r["rank"])


def _check_equivalence(results, classes: int, processes: int) -> None:
    for kind in ("arcface", "cosface"):
        rows = [r[kind] for r in results]
        assert all(r["max_error"] < 1e-5 for r in rows), rows                       # loss and every gradient
        assert [(r["start"], r["rows"]) for r in rows] == [shard_range(classes, i, processes) for i in range(processes)]
        assert sum(r["rows"] for r in rows) == classes
        assert all(r["head_numel"] == r["rows"] * 16 for r in rows)                 # C/W x D per rank
        assert max(r["rows"] for r in rows) == -(-classes // processes)
    for r in results:
        sampled = r["sampled"]
        assert sampled["positives_kept"] and sampled["others"] and sampled["finite"], sampled


def test_two_ranks_match_one_full_head_and_their_checkpoint_resumes_on_one_and_three(tmp_path):
    results = _torchrun(tmp_path, 2, "train", classes=10)
    _check_equivalence(results, 10, 2)
    assert all(r["ddp_head"] == "ShardedMarginHead" for r in results)              # never wrapped in DDP

    state = load_checkpoint(tmp_path / "run" / "weights" / "last.pt")
    full = state["modules"]["head"]["weight"]
    shards = [torch.load(tmp_path / f"shard{r}.pt", weights_only=True) for r in range(2)]
    assert full.shape == (4, 8) and [s["start"] for s in shards] == [0, 2]
    assert torch.equal(full, torch.cat([s["weight"] for s in shards]))            # rank 0 gathered every row
    assert state["world_size"] == 2 and state["step"] == 2

    # 1 process: the checkpoint is a plain MarginHead one
    torch.manual_seed(2)
    head = MarginHead(8, 4, kind="cosface", scale=16.0)
    trainer = Trainer(toy_config(epochs=1, batch_size=12), None, MarginTask(ToyBackbone(), head), ToyFaces())
    trainer._restore(state)
    assert torch.equal(head.weight.detach(), full)
    momentum = trainer.optimizer.state[head.weight]["momentum_buffer"]
    assert momentum.shape == (4, 8) and float(momentum.abs().sum()) > 0
    assert trainer.fit(resume=tmp_path / "run")["steps"] == 4

    # 3 processes: each slices its rows of the centres and of their momentum, then trains on
    resumed = _torchrun(tmp_path, 3, "resume", classes=11)
    _check_equivalence(resumed, 11, 3)
    assert [r["rows"] for r in resumed] == [2, 1, 1]
    assert all(r["resharded"] and r["momentum"] and r["steps"] == 4 for r in resumed), resumed


def test_one_process_keeps_the_plain_margin_head(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    head = margin_head(16, 10, kind="arcface")
    assert type(head) is MarginHead and head.weight.shape == (10, 16)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    sharded = margin_head(16, 10, kind="arcface")
    assert isinstance(sharded, ShardedMarginHead) and sharded.weight.shape == (2, 16)
    assert (sharded.class_start, sharded.num_local) == (8, 2)


def test_the_initial_centres_do_not_depend_on_the_number_of_processes():
    torch.manual_seed(3)
    full = MarginHead(16, 10).weight.detach()
    rows = []
    for rank in range(3):
        torch.manual_seed(3)
        rows.append(ShardedMarginHead(16, 10, rank=rank, world_size=3).weight.detach())
    assert torch.equal(torch.cat(rows), full)


def test_large_heads_draw_only_their_own_rows_consistently(monkeypatch):
    from shrinkcli.losses import partial_fc

    monkeypatch.setattr(partial_fc, "FULL_INIT_LIMIT", 0)
    monkeypatch.setattr(partial_fc, "INIT_BLOCK_ROWS", 4)
    shards = {}
    for world in (1, 2, 3):
        parts = []
        for rank in range(world):
            torch.manual_seed(9)
            parts.append(ShardedMarginHead(8, 11, rank=rank, world_size=world).weight.detach())
        shards[world] = torch.cat(parts)
    assert torch.equal(shards[1], shards[2]) and torch.equal(shards[1], shards[3])
    assert shards[1].shape == (11, 8) and 0.005 < float(shards[1].std()) < 0.02


def test_a_sharded_head_rejects_fewer_than_two_classes():
    from shrinkcli.errors import BadInputError

    with pytest.raises(BadInputError, match="at least 2 identities"):
        ShardedMarginHead(8, 1, rank=0, world_size=2)
