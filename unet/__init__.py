"""Attention UNets for image segmentation: the model, its loss, its metrics and the paper's
post-processing.

    import unet
    model = unet.build_model("tiny")                      # an AttentionUNet
    loss, parts = unet.SegmentationLoss()(model(images), labels, boundary)

The post-processing chain itself is ``unet.postprocess.postprocess`` (the module keeps that name);
its steps are exported here. Inference helpers live in `unet.inference`; the command-line tools are
`unet.train`, `unet.predict` and `unet.evaluate`.
"""

from unet.losses import SegmentationLoss
from unet.metrics import ConfusionMatrix
from unet.model import AttentionUNet, SegmentationOutput, UNetConfig, build_model, to_probabilities
from unet.postprocess import (
    argmax_labels, boundary_from_labels, boundary_regions, close_gaps, dust_fill, prepare_boundary, segment,
)

__all__ = [
    "AttentionUNet",
    "ConfusionMatrix",
    "SegmentationLoss",
    "SegmentationOutput",
    "UNetConfig",
    "argmax_labels",
    "boundary_from_labels",
    "boundary_regions",
    "build_model",
    "close_gaps",
    "dust_fill",
    "prepare_boundary",
    "segment",
    "to_probabilities",
]
