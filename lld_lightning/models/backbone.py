"""The timm feature backbone: the one place in the package where images are normalised."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn


class TimmBackbone(nn.Module):
    """A timm model in ``features_only`` mode that takes ``[0, 1]`` images.

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
        """Normalise and extract features.

        Args:
            images: float ``[B, 3, H, W]`` RGB in ``[0, 1]``.

        Returns:
            One ``[B, channels[i], H / strides[i], W / strides[i]]`` map per ``out_indices``.
        """
        if not images.is_floating_point():
            # uint8 here means the device transform was skipped; dividing silently would hide it.
            raise TypeError(f"expected float images in [0, 1], got {images.dtype}")
        normalised = (images - self.mean) / self.std
        return list(self.body(normalised))
