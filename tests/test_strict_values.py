"""Non-finite numbers from outside are refused where they enter, and every JSON shrink prints or
writes is strict (NaN and infinities are not JSON)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from shrinkcli.atomic import atomic_write_json, strict_json
from shrinkcli.cli import app

runner = CliRunner()


@pytest.mark.parametrize("args", [
    ["teacher", "--set", "width=inf", "--data", "synthetic:8:4:0"],
    ["teacher", "--lr", "nan", "--data", "synthetic:8:4:0"],
    ["distill", "--embed-weight", "-inf"],
    ["verify", "--min-cosine", "nan"],
    ["export", "--set", "min_cosine=inf"],
])
def test_non_finite_numbers_are_one_line_exit_2(args, tmp_path):
    result = runner.invoke(app, [*args, "--project", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "must be a finite number" in result.stderr and "Traceback" not in result.output
    assert not list(tmp_path.iterdir())            # refused before any run dir was made


def test_json_written_and_printed_is_strict(tmp_path):
    value = {"accuracy": float("nan"), "curve": [0.5, float("inf"), -float("inf")], "ok": 1.0}
    assert json.loads(strict_json(value)) == {"accuracy": None, "curve": [0.5, None, None], "ok": 1.0}
    path = atomic_write_json(tmp_path / "r.json", value)
    json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in {path}"))
