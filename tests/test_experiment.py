"""A tiny seeded variant study through `shrink pipeline` with an [experiment] table."""

import json
from pathlib import Path

from typer.testing import CliRunner

from shrinkcli.cli import app

RECIPE = """
[common]
data = "synthetic:8:6:0"
input_size = 32
batch_size = 16
workers = 0
log_every = 50
[teacher]
arch = "r18"
width = 0.125
embedding_size = 64
head = "cosface"
scale = 16.0
epochs = 1
[distill]
student = "mobilefacenet"
width = 0.25
embedding_size = 64
epochs = 1
head = "cosface"
scale = 16.0
cache_teacher = true
[experiment]
seeds = [0, 1]
baseline = "baseline"
pairs = "pairs:60@synthetic:8:4:1"
bootstrap = 200
[experiment.variants.baseline]
embed_loss = "none"
stage_loss = "none"
[experiment.variants.embed]
embed_loss = "angular"
stage_loss = "none"
embed_weight = 10.0
"""


def test_experiment_runs_variants_and_seeds_then_skips_them(tmp_path):
    recipe = tmp_path / "study.toml"
    recipe.write_text(RECIPE)
    args = ["--json", "pipeline", str(recipe), "--project", str(tmp_path / "runs")]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    result = json.loads(first.stdout)
    parent = Path(result["run_dir"])
    table = {row["model"]: row for row in next(v for k, v in result["tables"].items() if k.startswith("accuracy"))}
    assert set(table) == {"teacher", "baseline", "embed"}
    assert table["baseline"]["seeds"] == 2 and table["baseline"]["gain_pt"] is None
    assert table["embed"]["gain_pt"] is not None and " .. " in table["embed"]["ci95_pt"]
    assert " .. " in table["embed"]["ci95_seeds_pt"]      # two seeds: the CI over pairs and seeds exists too
    for run in ("teacher", "distill-baseline-s0", "distill-baseline-s1", "distill-embed-s0", "distill-embed-s1"):
        assert json.loads((parent / run / "manifest.json").read_text())["status"] == "completed", run
    baseline = json.loads((parent / "distill-baseline-s0" / "manifest.json").read_text())
    assert baseline["results"]["cached_teacher"] is False  # a margin-only run never calls the teacher
    assert (parent / "results.md").read_text().count("|") > 20

    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0, second.output
    actions = {row["run"]: row["action"] for row in json.loads(second.stdout)["tables"]["runs"]}
    assert set(actions.values()) == {"skipped (up to date)"}

    only = CliRunner().invoke(app, [*args, "--set", 'experiment.only=["baseline"]'])
    assert only.exit_code == 0, only.output
    tables = json.loads(only.stdout)["tables"]
    assert [row["run"] for row in tables["runs"]] == ["teacher", "distill-baseline-s0", "distill-baseline-s1"]
    table = next(v for k, v in tables.items() if k.startswith("accuracy"))
    assert {row["model"] for row in table} == {"teacher", "baseline"}


def test_variant_contrasts_call_seed_scatter_noise():
    import numpy as np

    from shrinkcli.stages.experiment import _contrasts, _markdown

    rng = np.random.default_rng(0)
    base = (rng.random((3, 2000)) < 0.80).astype(float)
    # "steady" beats "noisy" on average, but noisy's seeds scatter by +-3 pt around it.
    steady = (rng.random((3, 2000)) < 0.84).astype(float)
    noisy = np.stack([(rng.random(2000) < p).astype(float) for p in (0.80, 0.83, 0.86)])
    clear = (rng.random((3, 2000)) < 0.90).astype(float)
    members = {"baseline": base, "noisy": noisy, "steady": steady, "clear": clear}
    rows = {(r["a"], r["b"]): r for r in _contrasts(members, "baseline", resamples=500)}
    assert set(rows) == {("noisy", "steady"), ("noisy", "clear"), ("steady", "clear")}
    assert rows[("noisy", "steady")]["verdict"] == "within noise"
    assert rows[("steady", "clear")]["verdict"] == "b better" and rows[("steady", "clear")]["difference_pt"] > 4
    text = _markdown([], list(rows.values()), "pairs", [0, 1, 2], "baseline")
    assert "within noise" in text and "Variant against variant" in text
