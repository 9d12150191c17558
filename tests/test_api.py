"""The Python API: keyword arguments are the config fields, results are the CLI's --json result."""

from __future__ import annotations

import inspect
import json

import pytest

from shrinkcli import api
from shrinkcli.errors import BadInputError

TINY = dict(arch="r18", width=0.125, input_size=32, embedding_size=16, data="synthetic:8:4:0", epochs=1,
            batch_size=8, workers=0, device="cpu")


def test_signatures_list_every_config_field_with_its_default():
    from shrinkcli.config import DistillConfig

    params = inspect.signature(api.distill).parameters
    assert params["epochs"].default == DistillConfig().epochs and params["resume"].default is None
    assert "stage_weights" in params and "run_dir" in params
    assert "Training epochs." in api.distill.__doc__


def test_teacher_distill_export_verify_chain(tmp_path):
    teacher = api.teacher(**TINY, run_dir=str(tmp_path / "t"))
    assert teacher["summary"]["epochs"] == 1
    student = api.distill(teacher=str(tmp_path / "t"), student="mobilefacenet", width=0.25, embedding_size=16,
                          data="synthetic:8:4:0", epochs=1, batch_size=8, workers=0, device="cpu",
                          run_dir=str(tmp_path / "s"))
    assert student["summary"]["steps"] == 4 and student["summary"]["cached_teacher"] is False
    exported = api.export(run=str(tmp_path / "s"), format="onnx", run_dir=str(tmp_path / "e"))
    assert (tmp_path / "e" / "model.onnx").is_file() and exported["summary"]["status"] == "ok"
    report = api.verify(model=str(tmp_path / "e"), pairs="pairs:40@synthetic:8:4:1", latency_seconds=0,
                        run_dir=str(tmp_path / "v"))
    json.dumps(report, default=str)
    assert 0.0 <= report["summary"]["model_accuracy"] <= 1.0
    resumed = api.teacher(resume=str(tmp_path / "t"), epochs=2)
    assert resumed["summary"]["epochs"] == 2


def test_bad_keywords_raise_bad_input():
    with pytest.raises(BadInputError, match="unknown keyword"):
        api.teacher(epoch=3)
    with pytest.raises(BadInputError, match="finite"):
        api.distill(lr=float("nan"))
