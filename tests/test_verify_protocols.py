"""IJB 1:1 templates and MegaFace rank-1 through `shrink verify` on small generated sets."""

import json

import numpy as np
import torch
from PIL import Image
from typer.testing import CliRunner

from shrinkcli.cli import app
from shrinkcli.models import create_model
from shrinkcli.models.io import save_model_safetensors


def _model(tmp_path):
    model = create_model("mobilefacenet", input_size=32, width=0.25, embedding_size=16).eval()
    return str(save_model_safetensors(model, tmp_path / "m.safetensors"))


def _write_ijb(root, rng):
    """Two templates per identity, each image a noisy copy of its identity's base picture."""
    (root / "meta").mkdir(parents=True)
    (root / "images").mkdir()
    bases = rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    faces, template = [], 0
    for identity in range(4):
        for _ in range(2):
            template += 1
            for media in range(2):
                name = f"{identity}_{template}_{media}.png"
                noise = rng.integers(-8, 8, bases[identity].shape)
                Image.fromarray(np.clip(bases[identity] + noise, 0, 255).astype(np.uint8)).save(root / "images" / name)
                faces.append(f"{name} {template} {template * 10 + media}")
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text("\n".join(faces) + "\n")
    pairs = [f"{a} {b} {int((a - 1) // 2 == (b - 1) // 2)}" for a in range(1, 9) for b in range(a + 1, 9)]
    (root / "meta" / "ijbc_template_pair_label.txt").write_text("\n".join(pairs) + "\n")
    return len(pairs)


def test_ijb_and_megaface_run_through_verify(tmp_path):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    pair_count = _write_ijb(tmp_path / "ijb", rng)
    model = _model(tmp_path)
    result = CliRunner().invoke(app, [
        "--json", "verify", "--model", model, "--data", "synthetic:4:3:1", "--project", str(tmp_path / "runs"),
        "--set", f"ijb={tmp_path / 'ijb'}", "--set", "megaface=true", "--set", "distractors=synthetic:6:2:5",
        "--set", "latency_seconds=0", "--set", "identification=false"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["report"]
    ijb = report["ijb"]["model"]
    assert ijb["pairs"] == pair_count and ijb["templates"] == 8 and ijb["images"] == 16
    assert ijb["positives"] == 4 and set(ijb["tar_at_far"]) == {"1e-01"}  # 24 negatives: only FAR 1e-1 is measurable
    mega = report["megaface"]["model"]
    assert mega["distractors"] == 12 and mega["trials"] == 4 * 3 * 2 and 0.0 <= mega["rank1"] <= 1.0


def test_megaface_without_distractors_is_refused(tmp_path):
    result = CliRunner().invoke(app, ["verify", "--model", _model(tmp_path), "--data", "synthetic:4:3:1",
                                      "--project", str(tmp_path / "runs"), "--set", "megaface=true"])
    assert result.exit_code == 2 and "distractor" in result.stderr
