"""Plain-PyTorch models: timm backbone, FPN neck, dense head, detector, post-processing."""

from lld_lightning.models.backbone import TimmBackbone
from lld_lightning.models.detector import (
    Detector,
    build_detector,
    decode_boxes,
    encode_boxes,
    level_points,
)
from lld_lightning.models.heads import DenseHead
from lld_lightning.models.neck import FpnNeck
from lld_lightning.models.postprocess import PostProcessor, postprocess

__all__ = [
    "DenseHead",
    "Detector",
    "FpnNeck",
    "PostProcessor",
    "TimmBackbone",
    "build_detector",
    "decode_boxes",
    "encode_boxes",
    "level_points",
    "postprocess",
]
