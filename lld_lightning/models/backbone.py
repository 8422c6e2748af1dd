"""The timm feature backbone: which stages feed the pyramid, and the statistics of its weights.

Any timm model with ``features_only`` works. Without ``out_indices`` the stages come from the
model's own ``feature_info``: the deepest stage at each of strides 8, 16 and 32 when the model
has all three (ResNet, EfficientNet, MobileNetV3, ConvNeXt, RegNet ...), else the deepest stage
at each of its three coarsest strides. Transformers whose timm config fixes the input size
(``fixed_input_size``: ViT, Swin ...) are built with timm's ``dynamic_img_size`` so that they
take the training crops and the letterboxed evaluation images alike; a model without that
option, or one that has no pyramid (a plain ViT: every block at stride 16), is refused at
construction with one line that says why.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

#: The strides the default pyramid takes when the model has them (FCOS / RetinaNet levels).
DEFAULT_STRIDES: tuple[int, ...] = (8, 16, 32)

#: The probe input is this many coarsest strides high and wide: non-square, and large enough
#: for models whose convolutions shrink small maps without padding.
_PROBE_STRIDES: tuple[int, int] = (4, 5)

_MODEL_SOURCES: tuple[str, ...] = ("hf-hub:", "hf_hub:", "local-dir:")


class BackboneError(ValueError):
    """A timm model that cannot serve as the detector's backbone; the message is one line."""


class TimmBackbone(nn.Module):
    """A timm model in ``features_only`` mode, returning the stages the pyramid reads.

    It takes images already normalised with its ``mean`` and ``std`` (`Detector.forward` does
    that once, for the backbone and the pixel crops alike). The model is built once (twice
    only when the default build computes stages past the chosen ones, which are then dropped)
    and probed with one small no-grad forward, so that a model that cannot run on the
    detector's inputs fails here with one line instead of deep inside the first step.

    Args:
        name: timm model name (``resnet18``, ``convnext_tiny``, ``test_resnet`` ...).
        pretrained: load the model's default pretrained weights (needs the HF hub or its cache).
        out_indices: which feature stages to return (timm ``out_indices``), finest first with
            increasing strides; ``None`` picks them from ``feature_info`` (module docstring).
        pretrained_file: a local checkpoint of the *full* timm model (``.pth``/``.safetensors``),
            for machines without the hub. Loaded through timm's ``pretrained_cfg_overlay`` so
            that timm's own key filtering (classifier, input conv) applies; implies pretrained.

    Raises:
        BackboneError: (a ValueError) an unknown model name, ``out_indices`` that do not fit
            the model, a model without a pyramid, or one that cannot run on other sizes.

    Attributes:
        out_indices: the stages returned, as indices into the model's ``feature_info``.
        channels: channels of each returned feature map, from ``feature_info``.
        strides: reduction of each returned feature map, from ``feature_info``.
        mean: ``[1, 3, 1, 1]`` the pretrained weights' RGB mean (timm ``pretrained_cfg``).
        std: ``[1, 3, 1, 1]`` their RGB standard deviation.
    """

    def __init__(
        self,
        name: str,
        pretrained: bool = False,
        out_indices: Sequence[int] | None = None,
        pretrained_file: str | Path | None = None,
    ) -> None:
        super().__init__()
        _check_model_name(name)
        options: dict[str, Any] = {"pretrained": pretrained or pretrained_file is not None}
        if pretrained_file is not None:
            path = Path(pretrained_file).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"pretrained_file {path} does not exist")
            options["pretrained_cfg_overlay"] = {"file": str(path)}
        fixed_size = _fixed_input_size(name)
        if fixed_size is not None:
            # One fixed size cannot serve both the training crops and the evaluation letterbox.
            options["dynamic_img_size"] = True

        self.body, stages, chosen, built = _build(name, out_indices, fixed_size, options)
        # Positions of the chosen stages in what the body returns; empty when it returns them all.
        self._take: list[int] = [] if built == chosen else [built.index(i) for i in chosen]
        # timm hands some transformers' maps back channels-last (its `output_fmt`).
        self._channels_last: bool = getattr(self.body, "output_fmt", "NCHW") == "NHWC"

        self.out_indices: list[int] = list(chosen)
        self.channels: list[int] = [stages[i][1] for i in chosen]
        self.strides: list[int] = [stages[i][0] for i in chosen]
        cfg = getattr(self.body, "pretrained_cfg", None) or {}
        mean = torch.tensor(cfg.get("mean", IMAGENET_DEFAULT_MEAN), dtype=torch.float32)
        std = torch.tensor(cfg.get("std", IMAGENET_DEFAULT_STD), dtype=torch.float32)
        # Non-persistent: the statistics belong to the model name, not to a checkpoint, so a
        # checkpoint never overrides them and older checkpoints still load.
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)
        self._probe(name, fixed_size)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Extract features.

        Args:
            images: float ``[B, 3, H, W]`` RGB, normalised with ``mean`` and ``std``.

        Returns:
            One ``[B, channels[i], H / strides[i], W / strides[i]]`` map per ``out_indices``.
        """
        features = list(self.body(images))
        if self._take:
            features = [features[i] for i in self._take]
        if self._channels_last:
            features = [f.permute(0, 3, 1, 2) for f in features]  # [B, H, W, C] -> [B, C, H, W]
        return features

    def _probe(self, name: str, fixed_size: tuple[int, int] | None) -> None:
        """Run one small non-square input through the body and check the returned channels."""
        parameter = next(self.body.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        dtype = parameter.dtype if parameter is not None else torch.float32
        height, width = (n * max(self.strides) for n in _PROBE_STRIDES)
        was_training = self.body.training
        self.body.eval()  # no batch-norm statistics update from the probe
        try:
            with torch.no_grad():
                features = self(torch.zeros(1, 3, height, width, device=device, dtype=dtype))
        except Exception as err:  # noqa: BLE001 (any failure means the model cannot run here)
            fixed = "" if fixed_size is None else f" (timm fixes its input to {_size(fixed_size)})"
            raise BackboneError(
                f"backbone {name!r} cannot run on a {height}x{width} input{fixed}: "
                f"{type(err).__name__}: {_one_line(err).rstrip('.')}; the detector feeds crops and "
                "letterboxed images of the configured sizes, so pick a backbone that takes any "
                "size (convnext_atto, resnet18, efficientnet_b0 ...)"
            ) from None
        finally:
            self.body.train(was_training)
        got = [int(f.shape[1]) if f.ndim == 4 else -1 for f in features]
        if got != self.channels:
            raise BackboneError(
                f"backbone {name!r} returns maps with {got} channels where its feature_info "
                f"promises {self.channels}; it does not fit the timm features_only contract"
            )


def default_out_indices(name: str, stages: list[tuple[int, int]]) -> list[int]:
    """The stages the pyramid reads when ``out_indices`` is not given.

    Args:
        name: the timm model name (for the error).
        stages: ``(stride, channels)`` of every stage in ``feature_info`` order.

    Returns:
        The deepest stage at each of strides 8, 16 and 32 when all three exist, else the
        deepest stage at each of the three coarsest strides.

    Raises:
        BackboneError: the model has fewer than three distinct strides (no pyramid).
    """
    deepest = {stride: index for index, (stride, _) in enumerate(stages)}  # the last one wins
    if all(stride in deepest for stride in DEFAULT_STRIDES):
        return [deepest[stride] for stride in DEFAULT_STRIDES]
    distinct = sorted(deepest)
    if len(distinct) < len(DEFAULT_STRIDES):
        raise BackboneError(
            f"backbone {name!r} has no feature pyramid: its {len(stages)} stages are at strides "
            f"{distinct} only, and the detector needs "
            f"{len(DEFAULT_STRIDES)} stages of increasing stride; pick a hierarchical backbone "
            "(convnext_atto, resnet18, swin_tiny_patch4_window7_224 ...) or name its stages "
            "in out_indices"
        )
    return [deepest[stride] for stride in distinct[-len(DEFAULT_STRIDES) :]]


def _check_indices(name: str, requested: list[int], stages: list[tuple[int, int]]) -> list[int]:
    """``requested`` if they name existing stages with increasing strides."""
    strides = [stages[i][0] for i in requested if 0 <= i < len(stages)]
    in_range = len(strides) == len(requested) > 0
    increasing = all(a < b for a, b in zip(strides, strides[1:], strict=False))
    if not (in_range and increasing):
        problem = "are out of range" if not in_range else f"give strides {strides}"
        raise BackboneError(
            f"out_indices {requested} {problem} for backbone {name!r}: its stages are "
            f"{_describe(stages)}; give indices in 0..{len(stages) - 1} with increasing strides"
        )
    return list(requested)


def _build(
    name: str,
    out_indices: Sequence[int] | None,
    fixed_size: tuple[int, int] | None,
    options: dict[str, Any],
) -> tuple[nn.Module, list[tuple[int, int]], list[int], list[int]]:
    """Build the body once (twice when the default build holds stages past the chosen ones).

    Returns:
        The body, ``(stride, channels)`` of every stage of the model, the chosen stages and
        the stages the body returns (a superset, in ``feature_info`` order).
    """
    requested = None if out_indices is None else [int(i) for i in out_indices]
    try:
        body = _create(name, requested, fixed_size, options)
    except (IndexError, AssertionError):
        if requested is None:
            raise
        # timm rejects indices past its stage count deep inside; name the stages instead.
        listing = {**options, "pretrained": False}  # only the stage list is needed
        stages = _stages(_create(name, None, fixed_size, listing))
        try:
            _check_indices(name, requested, stages)
        except BackboneError as error:
            raise error from None
        raise
    stages = _stages(body)
    if requested is None:
        chosen = default_out_indices(name, stages)
    else:
        chosen = _check_indices(name, requested, stages)
    built = [i % len(stages) for i in body.feature_info.out_indices]  # timm allows negatives
    if not set(chosen) <= set(built) or max(chosen) != max(built):
        # The default build would compute (and hold parameters for) stages past the last one
        # read, which would never get a gradient.
        body = _create(name, chosen, fixed_size, options)
        built = list(chosen)
    return body, stages, chosen, built


def _create(
    name: str,
    out_indices: list[int] | None,
    fixed_size: tuple[int, int] | None,
    options: dict[str, Any],
) -> nn.Module:
    """``timm.create_model(features_only=True)``; ``None`` indices take timm's default stages."""
    try:
        indices = None if out_indices is None else tuple(out_indices)
        return timm.create_model(name, features_only=True, out_indices=indices, **options)
    except TypeError as err:
        if "dynamic_img_size" not in str(err):
            raise
        raise BackboneError(
            f"backbone {name!r} takes only {_size(fixed_size)} inputs (timm fixed_input_size) and "
            "has no dynamic_img_size option, while the detector feeds crops and letterboxed "
            "images of other sizes; pick a backbone that takes any size (convnext_atto, "
            "swin_tiny_patch4_window7_224 ...)"
        ) from None


def _stages(body: nn.Module) -> list[tuple[int, int]]:
    """``(stride, channels)`` of every stage the model has, whichever ones it returns."""
    return [(int(info["reduction"]), int(info["num_chs"])) for info in body.feature_info.info]


def _check_model_name(name: str) -> None:
    """A `BackboneError` naming close timm names for a name timm does not know."""
    if name.startswith(_MODEL_SOURCES) or timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    hint = f"; close names: {', '.join(close)}" if close else ""
    raise BackboneError(f"backbone {name!r} is not a timm model{hint}")


def _fixed_input_size(name: str) -> tuple[int, int] | None:
    """``(H, W)`` when timm's config says the model takes only that size, else ``None``."""
    if name.startswith(_MODEL_SOURCES):
        return None  # read from the hub: not known before building
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:
        return None  # an unknown pretrained tag: `timm.create_model` reports it
    if cfg is None or not cfg.fixed_input_size:
        return None
    return int(cfg.input_size[-2]), int(cfg.input_size[-1])


def _describe(stages: list[tuple[int, int]]) -> str:
    return ", ".join(f"{i}: stride {stride}" for i, (stride, _) in enumerate(stages))


def _size(size: tuple[int, int] | None) -> str:
    return "a fixed size" if size is None else f"{size[0]}x{size[1]}"


def _one_line(err: Exception, limit: int = 200) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
