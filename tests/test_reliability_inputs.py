"""Bad and corrupt input through the real CLI, one table row per case.

Every row builds its input in a temp dir, runs `shrink ...` and checks the documented contract:
the exit code (2 bad input, 1 a gate), exactly one `shrink: error:` line on stderr, last, naming
the offending file or key, and no traceback anywhere. A few rows are inputs that must WORK
(greyscale PGM, RGBA PNG) because rejecting them would be a bug too.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from shrinkcli.cli import app

runner = CliRunner()
SIZE = 32
TINY_TEACHER = ["--arch", "r18", "--input-size", str(SIZE), "--width", "0.125", "--embedding-size", "16",
                "--epochs", "1", "--batch-size", "4", "--set", "max_steps=1", "--set", "workers=0",
                "--device", "cpu"]
PWNED = "PWNED_MARKER"


# ------------------------------------------------------------------------------------- builders

def _jpeg(seed: int = 0, size: int = 40) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _face_folder(root: Path, identities: int = 2, per_identity: int = 2) -> Path:
    for i in range(identities):
        folder = root / f"person{i}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_identity):
            (folder / f"{j}.jpg").write_bytes(_jpeg(seed=10 * i + j))
    return root


def _rec(root: Path, labels=(0, 0, 1, 1), num_classes: int | None = 2) -> Path:
    """A valid headerless train.rec/.idx (+ property) written with the project's own writer format."""
    from shrinkcli.data.recordio import MAGIC, pack_header

    root.mkdir(parents=True, exist_ok=True)
    rec, index = bytearray(), []
    for key, label in enumerate(labels):
        payload = pack_header(float(label), _jpeg(seed=key))
        index.append(f"{key}\t{len(rec)}")
        rec += struct.pack("<II", MAGIC, len(payload)) + payload + b"\0" * ((4 - len(payload) % 4) % 4)
    (root / "train.rec").write_bytes(bytes(rec))
    (root / "train.idx").write_text("\n".join(index) + "\n")
    if num_classes is not None:
        (root / "property").write_text(f"{num_classes},{SIZE},{SIZE}\n")
    return root / "train.rec"


def _r18_weights(path: Path) -> Path:
    import torch

    from shrinkcli.models import create_model

    torch.manual_seed(0)
    model = create_model("r18", input_size=SIZE, width=0.125, embedding_size=16)
    torch.save(model.state_dict(), path)
    return path


class _Exploit:
    """Pickles into a call of os.system: loading it unsafely would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_pickle(path: Path, wrap=lambda payload: payload) -> Path:
    path.write_bytes(pickle.dumps(wrap(_Exploit(path.parent / PWNED)), protocol=2))
    return path


# --------------------------------------------------------------------------------------- cases
# Each case: (tmp) -> (argv, expected exit code, text the error line must contain).

def corrupt_jpeg_in_folder(tmp):
    root = _face_folder(tmp / "faces")
    (root / "person1" / "9.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return ["teacher", "--data", f"folder:{root}", *TINY_TEACHER, "--set", "batch_size=5"], 2, "9.jpg"


def corrupt_jpeg_in_dataloader_worker(tmp):
    # the default two loader processes: the error must still be one line, not the worker's traceback
    argv, code, needle = corrupt_jpeg_in_folder(tmp)
    return argv + ["--set", "workers=1"], code, needle


def truncated_jpeg_in_folder(tmp):
    root = _face_folder(tmp / "faces")
    data = _jpeg(seed=99)
    (root / "person0" / "5.jpg").write_bytes(data[: len(data) // 2])
    return ["teacher", "--data", f"folder:{root}", *TINY_TEACHER, "--set", "batch_size=5"], 2, "5.jpg"


def zero_byte_image(tmp):
    root = _face_folder(tmp / "faces")
    (root / "person0" / "empty.png").write_bytes(b"")
    return ["teacher", "--data", f"folder:{root}", *TINY_TEACHER, "--set", "batch_size=5"], 2, "empty.png"


def empty_dataset_no_identities(tmp):
    (tmp / "nothing").mkdir()
    return ["teacher", "--data", f"folder:{tmp / 'nothing'}", *TINY_TEACHER], 2, "no identity folders"


def empty_identity_folder(tmp):
    root = _face_folder(tmp / "faces")
    (root / "person_without_images").mkdir()
    return ["teacher", "--data", f"folder:{root}", *TINY_TEACHER], 2, "person_without_images"


def wrong_recordio_magic(tmp):
    rec = _rec(tmp / "rec")
    blob = bytearray(rec.read_bytes())
    blob[0:4] = b"\x00\x11\x22\x33"
    rec.write_bytes(bytes(blob))
    return ["teacher", "--data", f"rec:{rec}", *TINY_TEACHER], 2, "wrong magic"


def truncated_idx(tmp):
    rec = _rec(tmp / "rec")
    idx = rec.with_suffix(".idx")
    lines = idx.read_text().splitlines()
    idx.write_text("\n".join(lines[:-1] + [lines[-1].split("\t")[0]]))  # cut after the last key
    return ["teacher", "--data", f"rec:{rec}", *TINY_TEACHER], 2, "train.idx"


def idx_offset_past_end(tmp):
    rec = _rec(tmp / "rec")
    idx = rec.with_suffix(".idx")
    idx.write_text(idx.read_text() + f"4\t{rec.stat().st_size + 4096}\n")
    return ["teacher", "--data", f"rec:{rec}", *TINY_TEACHER], 2, "past the end"


def truncated_rec(tmp):
    rec = _rec(tmp / "rec")
    rec.write_bytes(rec.read_bytes()[:-40])
    return ["teacher", "--data", f"rec:{rec}", *TINY_TEACHER], 2, "train.rec"


def labels_out_of_range(tmp):
    rec = _rec(tmp / "rec", labels=(0, 1, 5, 1), num_classes=2)
    return ["teacher", "--data", f"rec:{rec}", *TINY_TEACHER], 2, "labels must lie in"


def missing_data_path(tmp):
    return ["teacher", "--data", str(tmp / "no_such_dir"), *TINY_TEACHER], 2, "no_such_dir"


def unknown_data_spec_prefix(tmp):
    return ["teacher", "--data", "s3://bucket/faces", *TINY_TEACHER], 2, "unknown data spec kind 's3'"


def malformed_synthetic_spec(tmp):
    return ["teacher", "--data", "synthetic:many", *TINY_TEACHER], 2, "synthetic"


def wrong_architecture_state_dict(tmp):
    weights = _r18_weights(tmp / "r18.pt")
    return ["teacher", "--load", str(weights), "--arch", "r50", "--project", str(tmp / "runs")], 2, "does not fit r50"


def malicious_pt(tmp):
    evil = _evil_pickle(tmp / "evil.pt", wrap=lambda payload: {"model": payload})
    return ["teacher", "--load", str(evil), "--project", str(tmp / "runs")], 2, "evil.pt"


def garbage_pt(tmp):
    (tmp / "garbage.pt").write_bytes(b"\x00" * 100 + b"definitely not a zip")
    return ["teacher", "--load", str(tmp / "garbage.pt"), "--project", str(tmp / "runs")], 2, "garbage.pt"


def malicious_bin(tmp):
    evil = _evil_pickle(tmp / "evil.bin", wrap=lambda payload: ([payload, b"x"], [True]))
    return ["teacher", "--data", "synthetic:2:2", "--val", str(evil), *TINY_TEACHER,
            "--project", str(tmp / "runs")], 2, "refusing to load global"


def garbage_bin(tmp):
    (tmp / "lfw.bin").write_bytes(b"GIF89a not a pickle")
    return ["teacher", "--data", "synthetic:2:2", "--val", str(tmp / "lfw.bin"), *TINY_TEACHER,
            "--project", str(tmp / "runs")], 2, "lfw.bin"


def onnx_that_is_not_onnx(tmp):
    (tmp / "bad.onnx").write_text("<html>404 not found</html>")
    return ["verify", "--model", str(tmp / "bad.onnx"), "--pairs", "pairs:8@synthetic:4:2",
            "--project", str(tmp / "runs")], 2, "bad.onnx"


def recipe_unknown_key(tmp):
    (tmp / "r.toml").write_text("[teacher]\narch = 'r18'\nepochz = 3\n")
    return ["teacher", "--config", str(tmp / "r.toml")], 2, "epochz"


def recipe_unknown_table(tmp):
    (tmp / "r.toml").write_text("[teacherr]\narch = 'r18'\n")
    return ["teacher", "--config", str(tmp / "r.toml")], 2, "teacherr"


def recipe_wrong_type(tmp):
    (tmp / "r.toml").write_text("[teacher]\nbatch_size = 'big'\n")
    return ["teacher", "--config", str(tmp / "r.toml")], 2, "batch_size"


def recipe_not_toml(tmp):
    (tmp / "r.toml").write_text('{"teacher": {"arch": "r18"}}\n')
    return ["teacher", "--config", str(tmp / "r.toml")], 2, "not valid TOML"


def recipe_missing(tmp):
    return ["pipeline", str(tmp / "absent.toml"), "--project", str(tmp / "runs")], 2, "absent.toml"


def unknown_override_key(tmp):
    return ["teacher", "--set", "learning_rate=0.1"], 2, "learning_rate"


def input_size_not_multiple_of_16(tmp):
    return ["teacher", "--data", "synthetic:2:2", "--input-size", "50"], 2, "input_size=50"


def distill_without_teacher(tmp):
    return ["distill", "--data", "synthetic:2:2", "--project", str(tmp / "runs")], 2, "teacher"


def distill_teacher_does_not_exist(tmp):
    return ["distill", "--teacher", str(tmp / "runs/teacher/missing"), "--data", "synthetic:2:2",
            "--project", str(tmp / "runs")], 2, "missing"


def tampered_artifact_in_run_dir(tmp):
    from shrinkcli.models import create_model
    from shrinkcli.models.io import save_model_safetensors
    from shrinkcli.rundir import RunDir

    run = RunDir.create("distill", root=tmp / "runs", name="d1")
    model = create_model("mobilefacenet", input_size=SIZE, width=0.25, embedding_size=16)
    weights = save_model_safetensors(model, run.file("model.safetensors"), {"mean": 127.5, "std": 127.5,
                                     "crop": None, "input_size": SIZE, "channel_order": "RGB"})
    run.add_output(weights, "weights")
    run.finish()
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF                                  # one flipped bit-pattern in the last weight
    weights.write_bytes(bytes(blob))
    return ["export", "--run", str(run.path), "--project", str(tmp / "runs")], 2, "sha256 mismatch"


def corrupt_manifest(tmp):
    run = tmp / "runs" / "teacher" / "t1"
    run.mkdir(parents=True)
    (run / "manifest.json").write_text('{"stage": "teacher", "outputs": [')
    return ["distill", "--teacher", str(run), "--data", "synthetic:2:2", "--project", str(tmp / "runs")], 2, \
        "manifest.json"


def corrupt_checkpoint_for_resume(tmp):
    run = tmp / "runs" / "teacher" / "t1"
    (run / "weights").mkdir(parents=True)
    (run / "weights" / "last.pt").write_bytes(b"PK\x03\x04 truncated zip")
    return ["teacher", "--resume", str(run)], 2, "last.pt"


def project_under_a_regular_file(tmp):
    (tmp / "blocker").write_text("a file, not a folder")
    return ["teacher", "--data", "synthetic:2:2", *TINY_TEACHER, "--project", str(tmp / "blocker" / "runs")], \
        2, "blocker"


def verify_accuracy_gate_fails(tmp):
    from shrinkcli.models import create_model
    from shrinkcli.models.io import save_model_safetensors

    model = create_model("mobilefacenet", input_size=SIZE, width=0.25, embedding_size=16)
    weights = save_model_safetensors(model, tmp / "m.safetensors", {"mean": 127.5, "std": 127.5, "crop": None,
                                                                   "input_size": SIZE, "channel_order": "RGB"})
    return ["verify", "--model", str(weights), "--pairs", "pairs:16@synthetic:4:4", "--min-accuracy", "1.0",
            "--set", "latency_seconds=0", "--set", "identification=false", "--project", str(tmp / "runs")], \
        1, "accuracy"


BAD_INPUT_CASES = [
    corrupt_jpeg_in_folder, corrupt_jpeg_in_dataloader_worker, truncated_jpeg_in_folder, zero_byte_image,
    empty_dataset_no_identities, empty_identity_folder, wrong_recordio_magic, truncated_idx,
    idx_offset_past_end, truncated_rec, labels_out_of_range, missing_data_path, unknown_data_spec_prefix,
    malformed_synthetic_spec, wrong_architecture_state_dict, malicious_pt, garbage_pt, malicious_bin,
    garbage_bin, onnx_that_is_not_onnx, recipe_unknown_key, recipe_unknown_table, recipe_wrong_type,
    recipe_not_toml, recipe_missing, unknown_override_key, input_size_not_multiple_of_16,
    distill_without_teacher, distill_teacher_does_not_exist, tampered_artifact_in_run_dir, corrupt_manifest,
    corrupt_checkpoint_for_resume, project_under_a_regular_file, verify_accuracy_gate_fails,
]


@pytest.mark.parametrize("case", BAD_INPUT_CASES, ids=lambda case: case.__name__)
def test_bad_input_is_one_clear_line_with_the_documented_exit_code(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)            # stray `runs/` folders land in the temp dir, never the repo
    argv, expected_code, needle = case(tmp_path)
    result = runner.invoke(app, argv)
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == expected_code, result.output
    lines = result.stderr.rstrip("\n").splitlines()
    error_lines = [line for line in lines if line.startswith("shrink: ")]
    assert len(error_lines) == 1 and error_lines[0].startswith("shrink: error: "), result.stderr
    assert lines[-1] == error_lines[0], f"the error must be one line, and the last:\n{result.stderr}"
    assert needle.lower() in error_lines[0].lower(), error_lines[0]
    assert not list(tmp_path.rglob(PWNED)), "a pickle executed code"


# ----------------------------------------------------------------------------- inputs that work

def test_greyscale_pgm_and_rgba_png_train(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    for person in ("grey", "rgba"):
        (tmp_path / "faces" / person).mkdir(parents=True)
    for j in range(2):
        Image.fromarray(rng.integers(0, 255, (56, 46), dtype=np.uint8), mode="L").save(
            tmp_path / "faces" / "grey" / f"{j}.pgm")
        Image.fromarray(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8), mode="RGBA").save(
            tmp_path / "faces" / "rgba" / f"{j}.png")
    result = runner.invoke(app, ["--json", "teacher", "--data", f"folder:{tmp_path / 'faces'}", *TINY_TEACHER])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
