"""Human-readable verify outputs: the teacher-vs-student Markdown table and the ROC plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shrinkcli.atomic import atomic_open, atomic_write_text


def _num(value: Any, digits: int = 3) -> str:
    if value is None or value == "":
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def model_row(role: str, info: dict[str, Any], accuracy: dict[str, Any] | None, gap: float | None) -> dict[str, Any]:
    """One row of the comparison table (also used for the terminal table)."""
    row = {"role": role, "artifact": info["file"], "params (M)": _millions(info.get("params")),
           "MACs (M)": _millions(info.get("macs")), "size (MB)": round(info["size_bytes"] / 2**20, 3)}
    if "latency_ms_b1" in info:
        row.update({"ms/img b1": info["latency_ms_b1"], "ms/img b32": info["latency_ms_b32"]})
    if accuracy:
        row["accuracy"] = f"{100 * accuracy['accuracy']:.2f} +- {100 * accuracy['accuracy_std']:.2f}"
        for key, tar in accuracy["tar_at_far"].items():
            row[f"TAR@FAR={key}"] = round(tar, 4)
    if gap is not None:
        row["gap (pt)"] = round(100 * gap, 2)
    return row


def compact_row(row: dict[str, Any]) -> dict[str, Any]:
    """The terminal's version of a row: one TAR column (FAR 1e-3, else the strictest reported)."""
    tar_keys = [k for k in row if k.startswith("TAR@")]
    keep = "TAR@FAR=1e-03" if "TAR@FAR=1e-03" in tar_keys else (tar_keys[-1] if tar_keys else None)
    return {k: v for k, v in row.items() if not k.startswith("TAR@") or k == keep}


def _millions(value: int | None) -> float | None:
    return None if value is None else round(value / 1e6, 3)


def markdown(report: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = ["# shrink verify report", ""]
    lines += [f"- model: `{report['model']['path']}` ({report['model']['kind']}, {report['model']['dtype']})"]
    if report.get("pairs"):
        pairs = report["pairs"]
        lines += [f"- pairs: `{pairs['spec']}`: {pairs['pairs']} pairs, {pairs['folds']} folds ({pairs['folds_from']}),"
                  f" threshold chosen on the other folds; squared L2 distance of flip-summed, L2-normalised embeddings"]
    lines += ["", "## Models", ""]
    if rows:
        columns = list(dict.fromkeys(k for row in rows for k in row))
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_num(row.get(c)) for c in columns) + " |" for row in rows]
    if report.get("parity"):
        p = report["parity"]
        lines += ["", "## Parity", "",
                  f"{p['samples']} images ({p['images_from']}), model vs `{p['reference']}`: max abs diff "
                  f"{p['max_abs_diff']:.3g}, cosine mean {p['mean_cosine']:.6f}, min {p['min_cosine']:.6f} "
                  f"(gate: min cosine >= {p['min_cosine_required']}"
                  + (f", max abs diff <= {p['max_abs_diff_allowed']}" if p.get("max_abs_diff_allowed") is not None else "")
                  + ")."]
    for role, ident in (report.get("identification") or {}).items():
        if isinstance(ident, dict) and "rank1" in ident:
            lines += ["", f"## Identification ({role})", "",
                      f"rank-1 {100 * ident['rank1']:.2f}% over {ident['probes']} probes, gallery {ident['gallery']}"
                      f" (+{ident['distractors']} distractors), {ident['identities']} probe identities."]
    lines += ["", "## Gates", ""]
    gates = report.get("gates") or []
    lines += [f"- {g['name']}: {g['value']:.6g} {g['op']} {g['limit']:.6g} -> {'pass' if g['passed'] else 'FAIL'}"
              for g in gates] or ["- none requested"]
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, report: dict[str, Any], rows: list[dict[str, Any]]) -> Path:
    return atomic_write_text(path, markdown(report, rows))


def write_roc_plot(path: Path, curves: dict[str, dict[str, list[float]]]) -> Path:
    """TAR vs FAR (log x axis) for each model, from pooled ROC points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 4.2), dpi=120)
    for name, roc in curves.items():
        points = [(f, t) for f, t in zip(roc["fpr"], roc["tpr"]) if f > 0]
        if points:
            fpr, tpr = zip(*points)
            axis.plot(fpr, tpr, label=name)
    axis.set_xscale("log")
    axis.set_xlabel("false accept rate")
    axis.set_ylabel("true accept rate")
    axis.set_ylim(0, 1.01)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    with atomic_open(path, "wb") as handle:
        figure.savefig(handle, format="png")
    plt.close(figure)
    return path
