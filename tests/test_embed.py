"""`shrink embed` feature stores: contents equal the model's embeddings, resume after an exception
or a SIGKILL continues at the last whole chunk, another model/data is refused (exit 2) unless
--overwrite, and `shrink verify` over stores gives what it gives over images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from shrinkcli.cli import app
from shrinkcli.evaluate.store import FeatureStore, StoreWriter

cli = CliRunner()
SIZE = 32
PROBES = "synthetic:6:4:1"
DISTRACTORS = "synthetic:12:2:7"


def _save(path: Path, seed: int) -> Path:
    import torch

    from shrinkcli.models import create_model
    from shrinkcli.models.io import save_model_safetensors

    torch.manual_seed(seed)
    model = create_model("mobilefacenet", embedding_size=16, input_size=SIZE, width=0.125).eval()
    save_model_safetensors(model, path, preprocess={"mean": 127.5, "std": 127.5, "crop": None,
                                                    "input_size": SIZE, "channel_order": "RGB"})
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed-models")
    return {"a": _save(root / "a.safetensors", 0), "b": _save(root / "b.safetensors", 1)}


def _embed(*args):
    return cli.invoke(app, ["--json", "embed", *map(str, args)])


def _expected(model: Path, spec: str) -> np.ndarray:
    from shrinkcli.evaluate.sources import labelled_embeddings
    from shrinkcli.evaluate.runners import open_runner

    runner = open_runner(str(model))
    return labelled_embeddings(spec, runner, crop=runner.crop)[0]


def test_store_holds_the_models_embeddings_and_a_strict_manifest(models, tmp_path):
    result = _embed(models["a"], "--data", PROBES, "--out", tmp_path / "s", "--dtype", "float32", "--chunk-size", "5")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["summary"]["chunks_embedded_now"] == 5
    manifest = json.loads((tmp_path / "s" / "store.json").read_text(),
                          parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    from shrinkcli.atomic import sha256_file

    assert manifest["model_sha256"] == sha256_file(models["a"]) and manifest["data"] == PROBES
    assert (manifest["count"], manifest["dim"], manifest["chunk_size"]) == (24, 16, 5)
    assert manifest["chunks_done"] == [0, 1, 2, 3, 4] and manifest["complete"] is True
    assert manifest["preprocess"] == {"input_size": SIZE, "crop": None, "mean": 127.5, "std": 127.5, "flip": True}
    store = FeatureStore(tmp_path / "s")
    # batches of 5 instead of one of 24: the kernels sum in another order
    np.testing.assert_allclose(store.array(), _expected(models["a"], PROBES), atol=1e-5)
    assert np.array_equal(store.labels(), np.repeat(np.arange(6), 4))
    assert np.load(tmp_path / "s" / "features.npy", mmap_mode="r").dtype == np.float32

    half = _embed(models["a"], "--data", PROBES, "--out", tmp_path / "h", "--chunk-size", "5")
    assert half.exit_code == 0, half.output
    assert np.abs(FeatureStore(tmp_path / "h").array() - store.array()).max() < 1e-3


def test_an_exception_after_two_chunks_resumes_at_the_third(models, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_write = StoreWriter.write

    def failing_write(self, chunk, rows):
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        calls["n"] += 1
        real_write(self, chunk, rows)

    monkeypatch.setattr(StoreWriter, "write", failing_write)
    monkeypatch.setenv("SHRINK_DEBUG", "1")
    args = (models["a"], "--data", PROBES, "--out", tmp_path / "s", "--dtype", "float32", "--chunk-size", "5")
    crashed = _embed(*args)
    assert isinstance(crashed.exception, RuntimeError)
    assert json.loads((tmp_path / "s" / "store.json").read_text())["chunks_done"] == [0, 1]
    with pytest.raises(Exception, match="incomplete"):
        FeatureStore(tmp_path / "s")
    monkeypatch.setattr(StoreWriter, "write", real_write)
    resumed = _embed(*args)
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads(resumed.stdout)["summary"]
    assert summary["chunks_embedded_now"] == 3 and summary["images_embedded_now"] == 14
    whole = _embed(*args[:4], tmp_path / "whole", *args[5:])
    assert whole.exit_code == 0, whole.output
    assert np.array_equal(FeatureStore(tmp_path / "s").array(), FeatureStore(tmp_path / "whole").array())


def test_sigkill_mid_run_then_rerun_continues_at_the_last_whole_chunk(models, tmp_path):
    spec, out = "synthetic:10:10:3", tmp_path / "s"
    command = [sys.executable, "-m", "shrinkcli", "embed", str(models["a"]), "--data", spec, "--out", str(out),
               "--dtype", "float32", "--chunk-size", "4"]
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and child.poll() is None:
            try:
                if json.loads((out / "store.json").read_text()).get("chunks_done"):
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL, "the embed finished before it could be killed"
    done = json.loads((out / "store.json").read_text())["chunks_done"]
    assert 1 <= len(done) < 25
    resumed = _embed(*command[4:])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["summary"]["chunks_embedded_now"] == 25 - len(done)
    whole = _embed(*command[4:8], tmp_path / "whole", *command[9:])
    assert whole.exit_code == 0, whole.output
    assert np.array_equal(FeatureStore(out).array(), FeatureStore(tmp_path / "whole").array())


def test_another_model_or_data_is_refused_unless_overwrite(models, tmp_path):
    out = tmp_path / "s"
    assert _embed(models["a"], "--data", PROBES, "--out", out, "--chunk-size", "8").exit_code == 0
    other_model = _embed(models["b"], "--data", PROBES, "--out", out, "--chunk-size", "8")
    assert other_model.exit_code == 2 and "model_sha256" in other_model.output and "--overwrite" in other_model.output
    other_data = _embed(models["a"], "--data", DISTRACTORS, "--out", out, "--chunk-size", "8")
    assert other_data.exit_code == 2 and "data: store synthetic:6:4:1" in other_data.output
    assert FeatureStore(out).model_sha256 == json.loads((out / "store.json").read_text())["model_sha256"]
    replaced = _embed(models["b"], "--data", DISTRACTORS, "--out", out, "--chunk-size", "8", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    np.testing.assert_allclose(FeatureStore(out).array(), _expected(models["b"], DISTRACTORS), atol=1e-3)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    busy = _embed(models["a"], "--data", PROBES, "--out", tmp_path / "busy")
    assert busy.exit_code == 2 and "not a feature store" in busy.output
    assert _embed(models["a"], "--data", PROBES).exit_code == 2      # no --out


def _verify(*args):
    return cli.invoke(app, ["--json", "verify", "--set", "latency_seconds=0", "--set", "parity_images=4",
                            "--set", "megaface=true", *map(str, args)])


def test_verify_over_stores_equals_verify_over_images(models, tmp_path):
    # chunks of one batch: the store's forwards see the very batches the image path does
    for spec, name in ((PROBES, "probes"), (DISTRACTORS, "distractors")):
        made = _embed(models["a"], "--data", spec, "--out", tmp_path / name, "--dtype", "float32", "--chunk-size", "64")
        assert made.exit_code == 0, made.output
    images = _verify("--model", models["a"], "--data", PROBES, "--set", f"distractors={DISTRACTORS}",
                     "--run-dir", tmp_path / "v-images")
    stores = _verify("--model", models["a"], "--data", tmp_path / "probes", "--set",
                     f"distractors={tmp_path / 'distractors'}", "--run-dir", tmp_path / "v-stores")
    assert images.exit_code == 0 and stores.exit_code == 0, images.output + stores.output
    by_images, by_stores = json.loads(images.stdout)["report"], json.loads(stores.stdout)["report"]
    assert by_stores["identification"] == by_images["identification"]
    assert by_images["identification"]["model"]["distractors"] == 24
    for key in ("rank1", "rank1_identity_mean", "trials", "identities", "distractors"):
        assert by_stores["megaface"]["model"][key] == by_images["megaface"]["model"][key]
    inputs = json.loads((tmp_path / "v-stores" / "manifest.json").read_text())["inputs"]
    assert {"probe-store", "distractor-store"} <= {record["kind"] for record in inputs}

    mismatch = _verify("--model", models["b"], "--data", PROBES, "--set", f"distractors={tmp_path / 'distractors'}",
                       "--run-dir", tmp_path / "v-other")
    assert mismatch.exit_code == 2 and "another model" in mismatch.output
    assert not (tmp_path / "v-other").exists()
    with_teacher = _verify("--model", models["a"], "--teacher", models["b"], "--data", PROBES, "--set",
                           f"distractors={tmp_path / 'distractors'}", "--run-dir", tmp_path / "v-teacher")
    assert with_teacher.exit_code == 0, with_teacher.output
    report = json.loads(with_teacher.stdout)["report"]
    assert "another model" in report["megaface"]["teacher"]["skipped"]
    assert report["megaface"]["model"]["rank1"] == by_images["megaface"]["model"]["rank1"]
