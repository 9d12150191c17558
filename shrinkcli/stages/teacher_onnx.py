"""`shrink teacher --load model.onnx`: an ONNX face model (e.g. an insightface model pack) as a teacher.

An insightface IResNet graph is mapped onto the registry's IResNet, parity-checked against
onnxruntime (exit 1 below cosine 0.9999) and written as model.safetensors: a teacher with all four
stage maps, like any imported backbone.pth. Any other graph is kept as ONNX (model.onnx in the run
dir, with the input contract written into its metadata) and runs in onnxruntime as an
embedding-only teacher. Either way the manifest records the input contract and the checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shrinkcli import __version__
from shrinkcli.config import TeacherConfig
from shrinkcli.rundir import RunOptions


def contract_options(config) -> dict[str, Any]:
    """The input-contract options a config carries (distill configs have no channel_order)."""
    return {"input_size": config.input_size, "mean": config.mean, "std": config.std,
            "channel_order": getattr(config, "channel_order", None)}


def write_embedding_teacher(source: Path, target: Path, contract, imported_sha256: str) -> Path:
    """A copy of the graph whose metadata says how to feed it, so the run dir alone is enough later."""
    import onnx

    from shrinkcli.atomic import atomic_write_bytes

    proto = onnx.load(str(source), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    props.update({"input_size": str(contract.input_size), "mean": repr(contract.mean), "std": repr(contract.std),
                  "channel_order": contract.channel_order, "shrink_version": __version__,
                  "shrink_teacher": "embedding-only", "imported_sha256": imported_sha256})
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return atomic_write_bytes(target, proto.SerializeToString())


def import_onnx_teacher(config: TeacherConfig, options: RunOptions) -> dict[str, Any]:
    from shrinkcli.models.io import save_model_safetensors
    from shrinkcli.models.onnx_import import load_onnx_teacher
    from shrinkcli.stages.teacher import _check_images, check_embeddings

    source = Path(config.load)
    model, meta = load_onnx_teacher(source, contract_options(config), parity_data=config.data, seed=config.seed)
    info = meta["onnx"]
    contract = info["contract"]
    images, described = _check_images(config, int(model.input_size), meta["preprocess"])
    check = check_embeddings(model, images)
    run_dir = options.create("teacher", config.to_dict())
    run_dir.add_input(source, "weights")
    if info["kind"] == "iresnet":
        weights = save_model_safetensors(model, run_dir.file("model.safetensors"), meta["preprocess"],
                                         extra={"imported_from": source.name, "imported_sha256": meta["sha256"],
                                                "onnx_input_contract": contract, "onnx_parity": info["parity"]})
    else:
        weights = write_embedding_teacher(source, run_dir.file("model.onnx"), model.contract, meta["sha256"])
    run_dir.add_output(weights, "weights")
    params = sum(p.numel() for p in model.parameters())
    summary = {"run_dir": str(run_dir.path), "arch": meta["arch"], "arch_kwargs": str(meta["arch_kwargs"]),
               "teacher_kind": info["kind"], "stages": 4 if info["kind"] == "iresnet" else 0,
               "params": params if params else None, "embedding_size": int(model.embedding_size),
               "input_size": int(model.input_size), "mean": contract["mean"], "std": contract["std"],
               "channel_order": contract["channel_order"], "contract_from": contract["source"],
               "opset": info["opset"], "imported": str(source)}
    if info["kind"] == "iresnet":
        summary.update(blocks=str(info["blocks"]), folded_bn=info["folded_bn"],
                       parity_images=info["parity"]["images"], parity_min_cosine=info["parity"]["min_cosine"],
                       parity_max_abs_diff=info["parity"]["max_abs_diff"])
    else:
        summary["not_iresnet"] = info["not_iresnet"]
    summary.update(checked_on=described, **check, weights=str(weights))
    run_dir.set_results(**{k: v for k, v in summary.items() if k != "run_dir"}, onnx_input_contract=contract)
    run_dir.finish()
    return {"run_dir": str(run_dir.path), "summary": summary}
