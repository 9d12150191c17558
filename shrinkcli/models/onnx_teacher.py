"""An ONNX face model of unknown architecture as an embedding-only teacher, run by onnxruntime.

Its weights cannot be mapped onto a shrink architecture, so it has no stage maps: only embedding
distillation (with or without identity labels) can learn from it. It behaves as a frozen
`nn.Module` (no parameters) so the distillation task, the teacher cache and the verification table
use it like any other teacher; inputs go to onnxruntime on the CPU, embeddings come back on the
input's device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shrinkcli.errors import BadInputError
from shrinkcli.models.onnx_graph import InputContract, OnnxFile, make_session, run_embeddings
from shrinkcli.models.base import FaceOutput

ARCH = "onnx"


class OnnxEmbeddingTeacher(nn.Module):
    """`forward_features(x)` -> FaceOutput(stage_maps=[], embedding); `stage_channels` is None."""

    stage_channels = None

    def __init__(self, onnx_file: OnnxFile, contract: InputContract):
        super().__init__()
        self.session = make_session(onnx_file)
        self.contract = contract
        self.source = onnx_file.path.name
        self.arch = ARCH
        self.arch_kwargs: dict[str, Any] = {}
        self.input_size = contract.input_size
        probe = torch.zeros(1, 3, contract.input_size, contract.input_size)
        self.embedding_size = int(self._run(probe).shape[1])

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, self.input_size, self.input_size):
            raise BadInputError(f"the ONNX teacher takes [N, 3, {self.input_size}, {self.input_size}] images, "
                                f"got {list(x.shape)}", hint="use the teacher's input size for the student too")
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(run_embeddings(self.session, self.contract, array))

    def forward_features(self, x: torch.Tensor) -> FaceOutput:
        return FaceOutput(stage_maps=[], embedding=self._run(x).to(x.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).embedding

    def __getstate__(self):  # an onnxruntime session cannot be pickled (DataLoader workers, deepcopy)
        raise TypeError("OnnxEmbeddingTeacher holds an onnxruntime session and cannot be pickled")


def embedding_only_config(config, teacher):
    """`config` with the stage losses off when the teacher has no stage maps and they were left at
    their defaults; a stage loss the user asked for is an error that names the reason."""
    from shrinkcli import log
    from shrinkcli.config import DistillConfig

    if getattr(teacher, "stage_channels", None) is not None:
        return config
    defaults = DistillConfig()
    stages_on = config.stage_loss != "none" and any(w != 0 for w in config.stage_weights)
    asked = (config.stage_loss, list(config.stage_weights)) != (defaults.stage_loss, list(defaults.stage_weights))
    why = (f"the teacher {getattr(teacher, 'source', 'model')} is an ONNX model shrink cannot map onto a known "
           "architecture, so it gives an embedding but no stage maps")
    if stages_on and asked:
        raise BadInputError(f"stage losses need the teacher's stage maps: {why}",
                            hint="use --stage-weights 0,0,0,0 (embedding distillation), or an insightface IResNet "
                                 "ONNX, which imports with all four stages")
    if config.cache_stages:
        raise BadInputError(f"cache_stages needs the teacher's stage maps: {why}", hint="drop cache_stages")
    if not config.labels and (config.embed_loss == "none" or config.embed_weight == 0):
        raise BadInputError(f"nothing to learn: {why}, the embedding loss is off and --no-labels is set",
                            hint="turn the embedding loss on or train with labels")
    if stages_on:
        log.info(f"stage losses off: {why}; distilling the embedding only")
        config = config.replace("embedding-only teacher", stage_weights=[0.0, 0.0, 0.0, 0.0])
    return config
