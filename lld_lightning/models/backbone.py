"""The timm feature backbone and the normalisation statistics of its pretrained weights."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn


class TimmBackbone(nn.Module):
    """A timm model in ``features_only`` mode.

    It takes images already normalised with its ``mean`` and ``std`` (`Detector.forward` does
    that once, for the backbone and the pixel crops alike).

    Args:
        name: timm model name (``resnet18``, ``convnext_tiny``, ``test_resnet`` ...).
        pretrained: load the model's default pretrained weights (needs the HF hub or its cache).
        out_indices: which feature stages to return (timm ``out_indices``); ``(2, 3, 4)`` gives
            strides 8/16/32 on most CNNs.
        pretrained_file: a local checkpoint of the *full* timm model (``.pth``/``.safetensors``),
            for machines without the hub. Loaded through timm's ``pretrained_cfg_overlay`` so
            that timm's own key filtering (classifier, input conv) applies; implies pretrained.

    Attributes:
        channels: channels of each returned feature map, from ``feature_info.channels()``.
        strides: reduction of each returned feature map, from ``feature_info.reduction()``.
        mean: ``[1, 3, 1, 1]`` the pretrained weights' RGB mean (timm ``pretrained_cfg``).
        std: ``[1, 3, 1, 1]`` their RGB standard deviation.
    """

    def __init__(
        self,
        name: str,
        pretrained: bool = False,
        out_indices: tuple[int, ...] = (2, 3, 4),
        pretrained_file: str | Path | None = None,
    ) -> None:
        super().__init__()
        overlay = {}
        if pretrained_file is not None:
            path = Path(pretrained_file).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"pretrained_file {path} does not exist")
            overlay = {"pretrained_cfg_overlay": {"file": str(path)}}
        self.body = timm.create_model(
            name,
            pretrained=pretrained or pretrained_file is not None,
            features_only=True,
            out_indices=tuple(out_indices),
            **overlay,
        )
        self.channels: list[int] = list(self.body.feature_info.channels())
        self.strides: list[int] = list(self.body.feature_info.reduction())
        cfg = getattr(self.body, "pretrained_cfg", None) or {}
        mean = torch.tensor(cfg.get("mean", IMAGENET_DEFAULT_MEAN), dtype=torch.float32)
        std = torch.tensor(cfg.get("std", IMAGENET_DEFAULT_STD), dtype=torch.float32)
        # Non-persistent: the statistics belong to the model name, not to a checkpoint, so a
        # checkpoint never overrides them and older checkpoints still load.
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Extract features.

        Args:
            images: float ``[B, 3, H, W]`` RGB, normalised with ``mean`` and ``std``.

        Returns:
            One ``[B, channels[i], H / strides[i], W / strides[i]]`` map per ``out_indices``.
        """
        return list(self.body(images))
