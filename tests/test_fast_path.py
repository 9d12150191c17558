"""The training data path and the per-step code that must not read the device: uint8 batches
normalised on the device (same numbers as the float path), persistent workers, the sampled head
without a distinct-label count, RecordIO offsets in flat arrays, cache lookups from host flags."""

import pickle

import numpy as np
import torch

from shrinkcli.data import open_dataset
from shrinkcli.engine import Trainer
from shrinkcli.losses.margin import MarginHead
from test_engine_toys import ToyTask, toy_config


class FloatOnly(torch.utils.data.Dataset):
    """Today's path: the dataset's own float32 items (no `item_uint8`)."""

    def __init__(self, dataset):
        self.dataset, self.labels, self.num_classes = dataset, dataset.labels, dataset.num_classes

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index]


def images_seen(dataset, **config):
    torch.manual_seed(0)
    task = ToyTask(num_classes=dataset.num_classes)
    seen = []
    original = task.loss

    def loss(images, labels, indices, flipped):
        seen.append(images.clone())
        return original(images, labels, indices, flipped)

    task.loss = loss
    trainer = Trainer(toy_config(epochs=1, max_steps=3, **config), None, task, dataset)
    trainer.fit()
    return torch.cat(seen), trainer


def test_uint8_loader_gives_the_float_paths_numbers_exactly():
    dataset = open_dataset("synthetic:4:6", input_size=16, mean=120.0, std=57.3)
    assert dataset.item_uint8(0)[0].dtype == torch.uint8
    fast, trainer = images_seen(dataset)
    slow, reference = images_seen(FloatOnly(dataset))
    assert trainer.normalise is not None and reference.normalise is None
    assert fast.dtype == torch.float32 and torch.equal(fast, slow)


def test_worker_processes_persist_across_epochs():
    dataset = open_dataset("synthetic:4:6", input_size=16)
    trainer = Trainer(toy_config(epochs=1, workers=1), None, ToyTask(num_classes=4), dataset)
    assert trainer._loader().persistent_workers
    trainer = Trainer(toy_config(epochs=1, workers=0), None, ToyTask(num_classes=4), dataset)
    assert not trainer._loader().persistent_workers


def test_sampled_head_counts_distinct_labels_only_when_the_batch_outgrows_the_sample(monkeypatch):
    head = MarginHead(8, 100, sample_rate=0.5).train()
    labels = torch.tensor([3, 3, 7, 9])
    calls = []
    unique = torch.unique
    monkeypatch.setattr(torch, "unique", lambda *a, **k: calls.append(1) or unique(*a, **k))
    chosen, remapped = head.sample_centres(labels)
    assert calls == [] and len(chosen) == 50 and torch.equal(chosen[remapped], labels)
    small = MarginHead(8, 100, sample_rate=0.02).train()      # 2 sampled, 3 distinct positives
    chosen, remapped = small.sample_centres(labels)
    assert calls == [1] and len(chosen) == 3 and torch.equal(chosen[remapped], labels)


def test_recordio_offsets_are_flat_arrays_and_pickle_small(tmp_path):
    from shrinkcli.data.recordio import _key_table
    from shrinkcli.data.recordio_writer import write_recordio
    from test_data_readers import _png

    samples = [(i // 3, _png((10 * i, 20, 30))) for i in range(9)]
    write_recordio(tmp_path, samples, 3, (8, 8))
    ds = open_dataset(f"rec:{tmp_path / 'train.rec'}", input_size=8)
    assert isinstance(ds._index_offsets, np.ndarray) and ds._index_offsets.dtype == np.int64
    assert len(ds) == 9 and tuple(ds.load_uint8(4)[:, 0, 0]) == (40, 20, 30)
    clone = pickle.loads(pickle.dumps(ds))
    assert tuple(clone.load_uint8(4)[:, 0, 0]) == (40, 20, 30)
    keys, offsets = _key_table([5, 1, 5, 3], [50, 10, 51, 30])    # a repeated key keeps its last offset
    assert keys.tolist() == [1, 3, 5] and offsets.tolist() == [10, 30, 51]


def test_cache_lookup_takes_host_flags_and_gathers_the_same_rows(tmp_path):
    from shrinkcli.distill.cache import TeacherCache

    embeddings = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
    stage = np.arange(2 * 5 * 2 * 2 * 2, dtype=np.float16).reshape(2, 5, 2, 2, 2)
    cache = TeacherCache(tmp_path, embeddings, [stage])
    assert not cache.place("cpu") and cache.device_embeddings is None
    maps, emb = cache.lookup(torch.tensor([4, 0, 2]), torch.tensor([True, False, True]), with_stages=True)
    assert emb.tolist() == [embeddings[1, 4].tolist(), embeddings[0, 0].tolist(), embeddings[1, 2].tolist()]
    assert maps[0].dtype == torch.float32 and torch.equal(maps[0][0], torch.from_numpy(stage[1, 4]).float())


cuda = __import__("pytest").mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu.sh runs it)")


@cuda
def test_cuda_cache_embeddings_live_on_the_device(tmp_path):
    from shrinkcli.distill.cache import TeacherCache

    embeddings = np.random.default_rng(0).standard_normal((2, 7, 4)).astype(np.float32)
    cache = TeacherCache(tmp_path, embeddings, None)
    assert cache.place("cuda") and cache.device_embeddings.is_cuda
    _, emb = cache.lookup(torch.tensor([6, 1]), torch.tensor([False, True]), device="cuda", with_stages=False)
    assert emb.is_cuda and torch.equal(emb.cpu(), torch.from_numpy(embeddings[[0, 1], [6, 1]]))


@cuda
def test_cuda_trainer_defers_checks_sets_fast_kernels_and_skips_a_nan_step_exactly():
    from test_engine_deferred import poisoned

    dataset = open_dataset("synthetic:4:6", input_size=16)
    trainer = Trainer(toy_config(epochs=2, device="cuda", amp="bf16", nan_policy="skip", log_every=5),
                      None, poisoned(4), dataset)
    assert trainer.defer_checks and torch.backends.cudnn.benchmark
    assert torch.get_float32_matmul_precision() == "high"
    assert trainer.fit()["nan_skips"] == 1 and trainer.checks.pending == []
    fast, _ = images_seen(dataset, device="cuda")
    slow, _ = images_seen(FloatOnly(dataset), device="cuda")
    assert torch.equal(fast.cpu(), slow.cpu())


def test_gpu_benchmark_smoke_mode_runs_on_cpu_through_the_trainer(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_distill.py"
    spec = importlib.util.spec_from_file_location("gpu_distill", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--smoke"])
    assert [r["variant"] for r in rows] == ["inline distill (Trainer)", "cached distill (Trainer)",
                                            "teacher forward only (bound)"]
    assert rows[0]["teacher_steps"] == 6 and rows[1]["teacher_steps"] == 0     # cached: no teacher per step
    assert all(r["img_per_s"] > 0 for r in rows)
    assert "| inline distill (Trainer) |" in capsys.readouterr().out
