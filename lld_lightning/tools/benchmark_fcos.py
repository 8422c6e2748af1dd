"""The benchmark's baseline: torchvision's stock FCOS on the same timm backbone as lld.

Only the backbone is swapped: a timm ``features_only`` model with lld's ``out_indices``, a
torchvision `FeaturePyramidNetwork` with P6/P7 (what `fcos_resnet50_fpn` builds), and
torchvision's own `FCOSHead`, assigner, loss and post-processing, untouched. Its internal
`GeneralizedRCNNTransform` gets ``min_size = max_size = image_size`` and the timm model's mean/std,
so a square ``image_size`` input keeps its size and is normalised exactly like lld's backbone does.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import lightning as L
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torchvision.models.detection import FCOS
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

#: Stock FCOS pyramid width (torchvision's `fcos_resnet50_fpn`).
FCOS_FPN_CHANNELS: int = 256


class TimmFpnBackbone(nn.Module):
    """timm ``features_only`` body + torchvision FPN with P6/P7, the backbone contract of FCOS.

    Args:
        name: timm model name.
        out_indices: backbone stages fed to the FPN (lld's default ``(2, 3, 4)``: strides 8-32).
        out_channels: FPN width.

    Attributes:
        out_channels: FPN width (FCOS reads it to build its head).
        mean, std: the timm model's normalisation (FCOS's transform applies it).
    """

    def __init__(
        self,
        name: str,
        out_indices: tuple[int, ...] = (2, 3, 4),
        out_channels: int = FCOS_FPN_CHANNELS,
    ) -> None:
        super().__init__()
        self.body = timm.create_model(
            name, pretrained=False, features_only=True, out_indices=out_indices
        )
        self.fpn = FeaturePyramidNetwork(
            list(self.body.feature_info.channels()),
            out_channels,
            extra_blocks=LastLevelP6P7(out_channels, out_channels),
        )
        self.out_channels = out_channels
        cfg = getattr(self.body, "pretrained_cfg", None) or {}
        self.mean: list[float] = [float(v) for v in cfg.get("mean", IMAGENET_DEFAULT_MEAN)]
        self.std: list[float] = [float(v) for v in cfg.get("std", IMAGENET_DEFAULT_STD)]

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Normalised ``[B, 3, H, W]`` -> 5 levels ``[B, out_channels, H / s, W / s]``, s = 8..128."""
        features = self.body(images)
        return self.fpn(OrderedDict((f"c{i}", f) for i, f in enumerate(features)))


def build_fcos(
    backbone: str,
    num_classes: int,
    image_size: int,
    out_indices: tuple[int, ...] = (2, 3, 4),
    score_threshold: float = 0.05,
    nms_iou: float = 0.6,
    pre_nms_topk: int = 1000,
    max_detections: int = 100,
) -> FCOS:
    """torchvision `FCOS` on a timm backbone, post-processing set like lld's defaults.

    Args:
        backbone: timm model name.
        num_classes: number of classes (FCOS uses sigmoid classification, no background class).
        image_size: the square input side; the internal transform keeps it.
        out_indices: backbone stages, as in lld.
        score_threshold, nms_iou, pre_nms_topk, max_detections: FCOS's ``score_thresh``,
            ``nms_thresh``, ``topk_candidates`` (per level in FCOS) and ``detections_per_img``.

    Returns:
        The model; ``model(list_of_images, targets)`` gives losses in train mode and
        detections in eval mode.
    """
    body = TimmFpnBackbone(backbone, tuple(out_indices))
    return FCOS(
        body,
        num_classes=num_classes,
        min_size=image_size,
        max_size=image_size,
        image_mean=body.mean,
        image_std=body.std,
        score_thresh=score_threshold,
        nms_thresh=nms_iou,
        topk_candidates=pre_nms_topk,
        detections_per_img=max_detections,
    )


def fcos_targets(batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
    """The batch's cells as FCOS targets (padding removed); regions are ignored (stock FCOS).

    Args:
        batch: an augmented batch, ``boxes [B, M, 4]`` and ``labels [B, M]`` (``-1`` padding).

    Returns:
        Per image ``boxes`` float ``[N, 4]`` and ``labels`` int64 ``[N]``.
    """
    real = batch["labels"] >= 0  # [B, M]
    return [
        {"boxes": boxes[keep], "labels": labels[keep]}
        for boxes, labels, keep in zip(batch["boxes"], batch["labels"], real, strict=True)
    ]


def fcos_loss(model: FCOS, images: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """FCOS's summed training loss for float images ``[B, 3, S, S]`` in ``[0, 1]``."""
    losses = model(list(images), fcos_targets(batch))
    return sum(losses.values())


class FcosModule(L.LightningModule):
    """The smallest LightningModule around `FCOS`, so both detectors train through one Trainer.

    Args:
        model: a `build_fcos` model (compiled parts or not).
        lr: AdamW learning rate.
    """

    def __init__(self, model: FCOS, lr: float = 1e-4) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = fcos_loss(self.model, batch["image"], batch)
        self.log("train/loss", loss, batch_size=batch["image"].shape[0])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, fused=self.device.type == "cuda")


def compile_fcos(model: FCOS) -> FCOS:
    """Compile FCOS's backbone and head in place (its transform, loss and decoding loop in Python)."""
    model.backbone = torch.compile(model.backbone)
    model.head = torch.compile(model.head)
    return model


def num_parameters(model: nn.Module) -> float:
    """Parameters in millions."""
    return sum(p.numel() for p in model.parameters()) / 1e6
