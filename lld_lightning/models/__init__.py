"""Plain-PyTorch models: timm backbone, FPN neck, dense head, region read-out, post-processing."""

from lld_lightning.models.backbone import TimmBackbone
from lld_lightning.models.detector import Detector, decode_boxes, encode_boxes, level_points
from lld_lightning.models.heads import DenseHead
from lld_lightning.models.neck import FpnNeck
from lld_lightning.models.postprocess import PostProcess, postprocess
from lld_lightning.models.roi_head import Readout, RoiHead

__all__ = [
    "DenseHead",
    "Detector",
    "FpnNeck",
    "PostProcess",
    "Readout",
    "RoiHead",
    "TimmBackbone",
    "decode_boxes",
    "encode_boxes",
    "level_points",
    "postprocess",
]
