"""The `partialfc` part of `shrink bench scale` in its quick mode: 1 and 2 gloo ranks, one run."""

from shrinkcli.bench.partial_fc import run_part


def test_quick_partialfc_part_times_both_world_sizes_and_halves_the_head_per_rank():
    rows = {row["measure"]: row for row in run_part(quick=True)}
    memory = rows["partialfc: head memory per rank at 10,000 classes, 2 / 1 ranks"]
    assert memory["settings"].startswith("ok / ok")
    assert memory["ratio"] == 0.5 and memory["pass"] == "pass"          # 5,000 of 10,000 rows per rank
    assert 9.7 < memory["b_value"] < 9.8        # sparse update: centres + momentum, 10k x 128 x 2 float32
    for world in (1, 2):
        step = rows[f"partialfc: step at 10,000 / 1,000 classes, {world} rank(s), r18 width 0.125"]
        assert step["settings"].startswith("ok;") and step["a_value"] > 0 and step["b_value"] > 0
        assert step["target"] == "<= 2" and step["pass"] in ("pass", "FAIL")
        assert rows[f"partialfc: sparse / dense update at 10,000 classes, {world} rank(s)"]["ratio"] > 0
        for count in ("1,000", "10,000"):
            for update in ("sparse", "dense"):
                info = rows[f"partialfc: {count} classes, {world} rank(s), {update} update"]
                assert info["a_value"] > 0 and info["b_value"] > 100             # peak RSS MiB of a torch process
        dense = rows[f"partialfc: 10,000 classes, {world} rank(s), dense update"]["settings"]
        assert f"head {14.6 / world:.1f} MiB" in dense                           # + the dense C x D gradient
