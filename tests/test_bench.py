"""Smoke test of the benchmark harness (--quick): rows carry the right fields, Markdown is written.
No timing is asserted: speeds depend on the machine and its load."""

from __future__ import annotations

import pytest
import torch

from shrinkcli.bench.timing import ROW_FIELDS, interleaved_rates, ratio_row
from shrinkcli.errors import BadInputError
from shrinkcli.evaluate.parity import MIN_COSINE
from shrinkcli.stages import bench


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny tensors on a shared box: one thread avoids oversubscription stalls
    yield
    torch.set_num_threads(previous)


def test_interleaved_rates_runs_every_workload_in_rotating_order():
    calls = []
    rates = interleaved_rates({"a": lambda: calls.append("a") or 2, "b": lambda: calls.append("b") or 3},
                              repeats=2, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a"]
    assert set(rates) == {"a", "b"} and all(rate > 0 for rate in rates.values())


def test_ratio_row_pass_and_fail():
    assert ratio_row("s", "m", a="A", a_value=1, b="B", b_value=2, unit="x", ratio=2.0, target=1.5)["pass"] == "pass"
    row = ratio_row("s", "m", a="A", a_value=1, b="B", b_value=2, unit="x", ratio=0.2, target=0.1, higher_is_better=False)
    assert row["pass"] == "FAIL" and row["target"] == "<= 0.1"


@pytest.mark.parametrize("suite", ["distill", "int8"])
def test_quick_suite_writes_rows_and_markdown(tmp_path, suite):
    output = tmp_path / "bench.md"
    result = bench.run(suite=suite, output=str(output), quick=True)
    rows = result["rows"]
    assert rows and all(tuple(row) == ROW_FIELDS for row in rows)
    assert all(row["suite"] == suite and row["pass"] in ("pass", "FAIL", "info") for row in rows)
    assert any(row["ratio"] is not None and row["a_value"] > 0 and row["b_value"] > 0 for row in rows)
    text = output.read_text()
    assert f"shrink bench {suite} --quick --output {output}" in text
    assert "torch" in text and "onnxruntime" in text and "| suite | measure |" in text
    assert text.count("\n| " + suite + " |") == len(rows)


def test_unknown_suite_is_bad_input():
    with pytest.raises(BadInputError):
        bench.run(suite="nope")


def test_peak_rss_is_the_childs_own_not_the_parents():
    import sys

    from shrinkcli.bench.memory import peak_rss

    ballast = bytearray(400 * 2**20)   # the parent is big; a forked child would inherit this high-water mark
    small, _, code = peak_rss([sys.executable, "-c", "pass"])
    big, _, _ = peak_rss([sys.executable, "-c", "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096])"])
    assert code == 0 and small < 200 and big > 300
    del ballast


def test_gpu_distill_script_runs_end_to_end_on_cpu():
    # The GPU benchmark cannot be timed here, but it must not rot: run it tiny on CPU.
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_precision.py"
    result = subprocess.run([sys.executable, str(script), "--device", "cpu", "--teacher", "r18", "--batch", "2",
                             "--input-size", "32", "--steps", "1", "--repeats", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| bf16 + channels_last |" in result.stdout and "| fp32 NCHW |" in result.stdout
    assert "of the bound" in result.stdout


def test_quick_scale_megaface_child_measures_the_rank1_of_the_same_store(tmp_path):
    from shrinkcli.bench.scale import synthetic_probes, synthetic_store
    from shrinkcli.evaluate.megaface import megaface_rank1
    from shrinkcli.evaluate.store import FeatureStore

    rows = {row["measure"]: row for row in bench.run(suite="scale", quick=True)["rows"]}
    assert all(tuple(row) == ROW_FIELDS and row["suite"] == "scale" for row in rows.values())
    wall, rss = rows["megaface: rank-1 wall time / 5 min"], rows["megaface: rank-1 peak RSS / 3 GB"]
    assert wall["settings"].startswith("ok;") and wall["a_value"] > 0 and rss["a_value"] > 0
    synthetic_store(tmp_path / "store", 20_000)       # seeded: the very vectors the child read
    probes, labels = synthetic_probes(20, 200)
    expected = megaface_rank1(probes, labels, FeatureStore(tmp_path / "store").blocks(4096))
    assert rows["megaface: rank-1 (synthetic)"]["a_value"] == round(expected["rank1"], 4)
    assert rows["megaface: rank-1 (synthetic)"]["b_value"] == expected["trials"]


def test_quick_deploy_suite_times_every_installed_runtime_against_onnxruntime(tmp_path):
    import json
    import subprocess
    import sys

    from shrinkcli.export import deploy

    # In a child process: the runtimes' native libraries (ncnn, pnnx, OpenVINO) stay out of the
    # test process, where one of them crashed it later in the run during garbage collection.
    code = ("import json, sys; from shrinkcli.stages import bench; "
            "r = bench.run(suite='deploy', output=sys.argv[1], quick=True); print(json.dumps(r, default=str))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "deploy.md")], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = {row["measure"]: row for row in result["rows"]}
    assert all(tuple(row) == ROW_FIELDS and row["suite"] == "deploy" for row in rows.values())
    parity = {(p["runtime"], p["variant"]): p for p in next(t for name, t in result["tables"].items() if name.startswith("deploy parity"))}
    assert parity[("onnxruntime", "fp32")]["min_cosine"] >= 0.99999
    for runtime in deploy.RUNTIMES:
        if not deploy.available(runtime, to_write=True):     # skipped, and the run says so
            assert f"{runtime}: skipped, its extra is not installed (the {runtime} extra of shrink)" in rows
            continue
        for variant in ("fp32", "int8"):
            if variant not in deploy.FILES[runtime]:
                continue
            row = rows[f"{runtime} {variant} vs onnxruntime {variant}, 1 thread (speed-up)"]
            assert row["a"] == "onnxruntime" and row["a_value"] > 0 and row["b_value"] > 0 and row["ratio"] > 0
            assert parity[(runtime, variant)]["min_cosine"] >= MIN_COSINE[variant]
    assert "shrink bench deploy --quick" in (tmp_path / "deploy.md").read_text()


def test_bench_weights_only_for_the_deploy_suite():
    with pytest.raises(BadInputError):
        bench.run(suite="int8", weights="student.safetensors", quick=True)
