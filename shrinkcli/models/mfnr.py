"""MFNR: MobileFaceNet with a residual path through every bottleneck.

The ShrinkTeaNet paper lists "MFNR" as a student without defining it. We read the R as
"residual everywhere": the MobileFaceNet layout unchanged, but the three bottlenecks that change
resolution or width (which have no shortcut in MobileFaceNet) get a projection shortcut:
2x2 average pool (for stride 2) then a linear 1x1 conv + BN (for a width change). Every block is
then residual, like a ResNet, for +0.7% parameters and MACs (1.209M vs 1.201M at 512-d).
Gradients reach the stem through identity-like paths, which helps when the distillation loss
sits on every stage.
"""

from __future__ import annotations

from shrinkcli.models.layers import StagedFaceNet
from shrinkcli.models.mobilefacenet import _build
from shrinkcli.models.base import register_model


@register_model("mfnr", "student")
def mfnr(embedding_size: int = 512, input_size: int = 112, width: float = 1.0,
         dropout: float = 0.0) -> StagedFaceNet:
    """MobileFaceNet layout with projection shortcuts on the downsampling bottlenecks."""
    return _build("mfnr", embedding_size, input_size, width, dropout, always_shortcut=True)
