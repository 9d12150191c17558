"""Five-point alignment: the similarity transform, the warped image, and IJB loose crops."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from shrinkcli.cli import app
from shrinkcli.errors import BadInputError
from shrinkcli.evaluate.align import TEMPLATE_112, align_face, read_landmarks, similarity_transform
from test_verify_protocols import _model, _write_ijb


def _pose(points, angle_deg=25.0, scale=1.6, shift=(40.0, 25.0)):
    angle = math.radians(angle_deg)
    rotation = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return points @ rotation.T + np.array(shift)


def test_similarity_transform_recovers_a_known_pose():
    posed = _pose(TEMPLATE_112)
    matrix = similarity_transform(posed, TEMPLATE_112)
    back = posed @ matrix[:, :2].T + matrix[:, 2]
    assert np.abs(back - TEMPLATE_112).max() < 1e-9
    mirrored = posed * np.array([-1.0, 1.0])           # no reflection: the fit stays a rotation
    assert np.linalg.det(similarity_transform(mirrored, TEMPLATE_112)[:, :2]) > 0
    with pytest.raises(BadInputError, match="same point"):
        similarity_transform(np.ones((5, 2)), TEMPLATE_112)


def test_aligned_image_puts_the_landmarks_on_the_template():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    posed = _pose(TEMPLATE_112)
    canvas = Image.new("RGB", (260, 260), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for (x, y), colour in zip(posed, colours):
        draw.ellipse([x - 6, y - 6, x + 6, y + 6], fill=colour)
    for size in (112, 64):
        aligned = np.asarray(align_face(canvas, posed, size=size)).astype(int)
        assert aligned.shape == (size, size, 3)
        for (x, y), colour in zip(TEMPLATE_112 * size / 112, colours):
            assert np.abs(aligned[int(round(y)), int(round(x))] - colour).max() < 60, (size, colour)
    with pytest.raises(BadInputError, match="5 finite"):
        align_face(canvas, posed[:4])


def test_landmark_file_errors_name_the_line(tmp_path):
    good = tmp_path / "ok.txt"
    good.write_text("a.jpg " + " ".join(["1"] * 10) + " 0.9\n\n")
    assert read_landmarks(good)["a.jpg"].shape == (5, 2)
    bad = tmp_path / "bad.txt"
    bad.write_text("a.jpg 1 2 3\n")
    with pytest.raises(BadInputError, match=r"bad.txt:1: expected an image name and 10"):
        read_landmarks(bad)


def test_ijb_loose_crops_are_aligned_with_the_release_landmarks(tmp_path):
    torch.manual_seed(0)
    root = tmp_path / "ijb"
    pair_count = _write_ijb(root, np.random.default_rng(0))
    (root / "images").rename(root / "loose_crop")
    args = ["--json", "verify", "--model", _model(tmp_path), "--project", str(tmp_path / "runs"),
            "--set", f"ijb={root}", "--set", "latency_seconds=0", "--set", "identification=false"]
    missing = CliRunner().invoke(app, args)
    assert missing.exit_code == 2 and "_name_5pts_score.txt" in missing.stderr
    names = [line.split()[0] for line in (root / "meta" / "ijbc_face_tid_mid.txt").read_text().splitlines()]
    points = " ".join(f"{x:.2f} {y:.2f}" for x, y in TEMPLATE_112 * 32 / 112)   # the 32 px images are aligned already
    (root / "meta" / "ijbc_name_5pts_score.txt").write_text("".join(f"{n} {points} 0.99\n" for n in names))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    ijb = json.loads(result.stdout)["report"]["ijb"]["model"]
    assert ijb["aligned_from_landmarks"] and ijb["pairs"] == pair_count and ijb["images"] == 16
