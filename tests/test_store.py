"""Feature store reading and blocked rank-1: blocks of a store give the brute-force rank-1 (whole
similarity matrix at once), and broken or unfinished stores are refused with one clear error."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shrinkcli.errors import BadInputError
from shrinkcli.evaluate.identification import rank1_from_labelled
from shrinkcli.evaluate.megaface import megaface_rank1
from shrinkcli.evaluate.store import FeatureStore, StoreWriter


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _store(path, rows: np.ndarray, *, chunk: int = 128, dtype: str = "float32", labels=None) -> FeatureStore:
    identity = {"model_sha256": "0" * 64, "data": "test", "preprocess": {}, "count": len(rows), "dtype": dtype,
                "chunk_size": chunk}
    writer = StoreWriter(path, identity, np.zeros(len(rows), np.int64) if labels is None else labels)
    for index in writer.pending():
        start, stop = writer.rows(index)
        writer.write(index, rows[start:stop])
    writer.finish()
    return FeatureStore(path)


@pytest.fixture
def sets():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(12), 5)
    centres = _unit(rng.standard_normal((12, 24)))
    probes = _unit(centres[labels] + 0.25 * rng.standard_normal((60, 24))).astype(np.float32)
    distractors = _unit(rng.standard_normal((1000, 24))).astype(np.float32)
    return probes, labels, distractors


def _brute_megaface(probes, labels, distractors):
    sims = probes.astype(np.float64) @ probes.astype(np.float64).T
    best = (probes.astype(np.float64) @ distractors.astype(np.float64).T).max(axis=1)
    hits = trials = 0
    for i in range(len(probes)):
        for j in range(len(probes)):
            if i != j and labels[i] == labels[j]:
                trials += 1
                hits += sims[i, j] > best[i]
    return hits / trials, trials


@pytest.mark.parametrize("rows_per_block", [7, 256, 5000])
def test_blocked_megaface_rank1_over_a_store_equals_brute_force(tmp_path, sets, rows_per_block):
    probes, labels, distractors = sets
    store = _store(tmp_path / "d", distractors)
    assert [len(b) for b in store.blocks(rows_per_block)][:1] == [min(rows_per_block, 1000)]
    result = megaface_rank1(probes, labels, store.blocks(rows_per_block))
    rank1, trials = _brute_megaface(probes, labels, distractors)
    assert 0.05 < rank1 < 0.95          # neither trivial: distractors do win some trials
    assert result["rank1"] == rank1 and result["trials"] == trials and result["distractors"] == 1000


def test_blocked_identification_with_a_distractor_store_equals_brute_force(tmp_path, sets):
    probes, labels, distractors = sets
    distractors = distractors[:100]     # one gallery image per identity: fewer distractors keep it non-trivial
    result = rank1_from_labelled(probes, labels, _store(tmp_path / "d", distractors).blocks(33))
    first = np.unique(labels, return_index=True)[1]
    is_probe = np.ones(len(labels), bool)
    is_probe[first] = False
    gallery = np.concatenate([probes[first], distractors]).astype(np.float64)
    gallery_labels = np.concatenate([labels[first], np.full(len(distractors), -1)])
    nearest = np.argmax(probes[is_probe].astype(np.float64) @ gallery.T, axis=1)
    expected = np.mean(gallery_labels[nearest] == labels[is_probe])
    assert 0.05 < expected < 0.95
    assert result["rank1"] == pytest.approx(expected) and result["distractors"] == 100


def test_store_blocks_round_trip_and_fp16_rounds_only(tmp_path, sets):
    _, _, distractors = sets
    exact = _store(tmp_path / "f32", distractors, chunk=64, labels=np.arange(1000))
    assert np.array_equal(exact.array(), distractors) and np.array_equal(exact.labels(), np.arange(1000))
    half = _store(tmp_path / "f16", distractors, chunk=64, dtype="float16")
    assert half.array().dtype == np.float32
    np.testing.assert_allclose(half.array(), distractors, atol=5e-4)
    assert 256 <= half.block_rows_for(10**6) and half.block_rows_for(3530) * 3530 <= 1 << 25
    assert half.block_rows_for(1) == 16384


def test_unfinished_truncated_or_nan_stores_are_refused(tmp_path, sets):
    _, _, distractors = sets
    identity = {"model_sha256": "0" * 64, "data": "test", "preprocess": {}, "count": 1000, "dtype": "float32",
                "chunk_size": 100}
    writer = StoreWriter(tmp_path / "u", identity, np.zeros(1000, np.int64))
    writer.write(0, distractors[:100])
    with pytest.raises(BadInputError, match=r"incomplete \(1/10 chunks\)"):
        FeatureStore(tmp_path / "u")
    with pytest.raises(BadInputError, match="non-finite"):
        writer.write(1, np.full((100, 24), np.nan, np.float32))
    assert json.loads((tmp_path / "u" / "store.json").read_text())["chunks_done"] == [0]

    _store(tmp_path / "t", distractors)
    features = tmp_path / "t" / "features.npy"
    features.write_bytes(features.read_bytes()[:-100])
    with pytest.raises(BadInputError, match="truncated"):
        list(FeatureStore(tmp_path / "t").blocks(256))

    _store(tmp_path / "n", distractors)
    manifest = tmp_path / "n" / "store.json"
    manifest.write_text(manifest.read_text().replace('"count": 1000', '"count": NaN'))
    with pytest.raises(BadInputError, match="not a readable feature store manifest"):
        FeatureStore(tmp_path / "n")
    with pytest.raises(BadInputError, match="not a feature store"):
        FeatureStore(tmp_path)


def test_a_kill_before_the_first_manifest_or_a_lost_labels_file_does_not_block_a_rerun(tmp_path, sets):
    _, _, distractors = sets
    identity = {"model_sha256": "0" * 64, "data": "test", "preprocess": {}, "count": 1000, "dtype": "float16",
                "chunk_size": 400}
    folder = tmp_path / "s"
    folder.mkdir()
    np.save(folder / "labels.npy", np.zeros(3, np.int64))          # what a kill during creation can leave
    (folder / ".store.json.abc.tmp").write_text("{")
    writer = StoreWriter(folder, identity, np.arange(1000))
    writer.write(0, distractors[:400])
    (folder / "labels.npy").unlink()
    again = StoreWriter(folder, identity, np.arange(1000))
    assert again.resumed == 1 and again.pending() == [1, 2]
    for index in again.pending():
        start, stop = again.rows(index)
        again.write(index, distractors[start:stop])
    again.finish()
    store = FeatureStore(folder)
    assert np.array_equal(store.labels(), np.arange(1000))
    np.testing.assert_allclose(store.array(), distractors, atol=5e-4)
