import json
import os
import threading

import pytest

from shrinkcli import atomic
from shrinkcli.errors import BadInputError
from shrinkcli.rundir import RunDir, load_manifest, newest_run, resolve_artifact


def test_auto_numbering(tmp_path):
    names = [RunDir.create("distill", root=tmp_path).path.name for _ in range(3)]
    assert names == ["distill", "distill2", "distill3"]
    assert RunDir.create("export", root=tmp_path).path == tmp_path / "export" / "export"


def test_named_and_exist_ok(tmp_path):
    RunDir.create("teacher", root=tmp_path, name="r90")
    with pytest.raises(BadInputError, match="already exists"):
        RunDir.create("teacher", root=tmp_path, name="r90")
    assert RunDir.create("teacher", root=tmp_path, name="r90", exist_ok=True).path.name == "r90"


def test_concurrent_runs_get_distinct_dirs(tmp_path):
    paths, lock = [], threading.Lock()

    def make():
        run = RunDir.create("distill", root=tmp_path)
        with lock:
            paths.append(run.path)

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 8


def test_manifest_round_trip_and_resolve(tmp_path):
    src = tmp_path / "input.bin"
    src.write_bytes(b"teacher weights")
    run = RunDir.create("distill", root=tmp_path, config={"epochs": 3})
    run.set_device("cpu")
    run.add_input(src, "teacher")
    out = run.file("weights/model.safetensors")
    out.write_bytes(b"student")
    run.add_output(out, "weights")
    run.finish()
    manifest = load_manifest(run.path)
    assert manifest["stage"] == "distill" and manifest["status"] == "completed"
    assert manifest["config"] == {"epochs": 3}
    assert manifest["inputs"][0]["kind"] == "teacher"
    assert manifest["outputs"][0]["path"] == "weights/model.safetensors"
    assert manifest["versions"]["shrink"]
    art = resolve_artifact(run.path, "weights")
    assert art.path == out and art.sha256 == atomic.sha256_file(out)
    assert newest_run(tmp_path, "distill") == run.path


def test_hash_mismatch_detected(tmp_path):
    run = RunDir.create("distill", root=tmp_path)
    out = run.file("model.safetensors")
    out.write_bytes(b"original")
    run.add_output(out, "weights")
    run.finish()
    out.write_bytes(b"tampered")
    with pytest.raises(BadInputError, match="sha256 mismatch"):
        resolve_artifact(run.path, "weights")
    with pytest.raises(BadInputError, match="no artifact of kind onnx"):
        resolve_artifact(run.path, "onnx")


def test_atomic_write_crash_leaves_old_file(tmp_path):
    target = tmp_path / "manifest.json"
    atomic.atomic_write_json(target, {"v": 1})

    class Boom(RuntimeError):
        pass

    with pytest.raises(Boom):
        with atomic.atomic_open(target, "wb") as handle:
            handle.write(b'{"v": 2, "trunc')
            raise Boom()
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_atomic_write_to_unwritable_dir_is_clear(tmp_path):
    if os.geteuid() == 0:
        target = tmp_path / "file.json"
        target.mkdir()  # a directory where the file should go: replace fails even for root
        with pytest.raises(BadInputError, match="cannot write"):
            atomic.atomic_write_json(target, {"v": 1})
        return
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    with pytest.raises(BadInputError, match="cannot write"):
        atomic.atomic_write_json(locked / "x.json", {})
