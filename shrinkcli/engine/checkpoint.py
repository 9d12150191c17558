"""Full training state on disk: save atomically, load safely, capture and restore RNG states.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (no pickled objects),
so it loads with `torch.load(weights_only=True)`. Layout:

  format, version         "shrink-train", 1
  model                   state_dict of the first task module (the backbone), so model loaders
                          that look for a "model" key import the backbone directly
  arch, arch_kwargs, preprocess   how to rebuild the backbone (when it carries `arch`)
  modules                 {name: state_dict} of the other trainable modules (margin head, adapters)
  backbone_name           the task's name for the first module
  optimizer, scheduler, scaler    their state_dicts (scaler None without fp16)
  epoch, position, step   current epoch, global samples already consumed in it, optimizer steps
  rng                     torch / cuda / numpy / python RNG states
  config                  the resolved training config
  best_accuracy, nan_skips, world_size
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shrinkcli.atomic import atomic_torch_save
from shrinkcli.errors import BadInputError

FORMAT = "shrink-train"
VERSION = 1


def capture_rng() -> dict[str, Any]:
    version, state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    rng = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": version, "state": list(state), "gauss": gauss},
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    np_state = rng["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    python = rng["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    cuda_states = rng.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


def all_finite(modules: dict[str, torch.nn.Module]) -> bool:
    """Parameters and floating buffers (BatchNorm running stats) all finite."""
    tensors = [t for m in modules.values() for t in list(m.parameters()) + list(m.buffers()) if t.is_floating_point()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def build_state(trainer) -> dict[str, Any]:
    """Everything needed to continue `trainer` exactly where it is."""
    names = list(trainer.modules)
    backbone = trainer.modules[names[0]]
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": _cpu(backbone.state_dict()),
        "arch": getattr(backbone, "arch", None),
        "arch_kwargs": dict(getattr(backbone, "arch_kwargs", {}) or {}),
        "preprocess": trainer.preprocess,
        "backbone_name": names[0],
        "modules": {name: _cpu(trainer.modules[name].state_dict()) for name in names[1:]},
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.schedule.state_dict(),
        "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
        "epoch": trainer.epoch,
        "position": trainer.position,
        "step": trainer.step,
        "rng": capture_rng(),
        "config": trainer.config.to_dict(),
        "best_accuracy": trainer.best_accuracy,
        "nan_skips": trainer.nan_skips,
        "world_size": trainer.dist.world_size,
    }


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) if v.is_cuda else v.detach().clone() for k, v in state.items()}


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    return atomic_torch_save(state, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"checkpoint {path} does not exist", hint="pass a run dir or its weights/last.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input problem
        # torch's messages span many lines; the error must stay one line, naming a refused global
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        refused = next((line for line in lines if "GLOBAL" in line), None)
        if refused:
            raise BadInputError(f"{path} refused: it holds pickled objects other than tensors ({refused})",
                                hint="it may be malicious; resume only from weights/last.pt written by shrink") from exc
        raise BadInputError(f"cannot read checkpoint {path}: {type(exc).__name__}: {lines[0] if lines else ''}",
                            hint="the file is corrupt or not a shrink training checkpoint") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise BadInputError(f"{path} is not a shrink training checkpoint (no full training state)",
                            hint="--resume needs weights/last.pt of a teacher or distill run; "
                                 "to start from weights only, use --load")
    return state


def module_states(state: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    return {state["backbone_name"]: state["model"], **state["modules"]}
