"""Backbone, neck, head and detector: the output contract, points, gradients, precision."""

from __future__ import annotations

import math
import os

import pytest
import timm
import torch

from lld_lightning.constants import LLD_ATTRIBUTE_SPEC
from lld_lightning.models import (
    DenseHead,
    Detector,
    Readout,
    TimmBackbone,
    decode_boxes,
    encode_boxes,
    level_points,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NUM_CLASSES = 14


def build_detector(backbone: str, num_classes: int, spec: dict, readout=None, **options) -> Detector:
    """A detector without the region read-out unless asked (its outputs are tested in test_roi_head)."""
    return Detector(num_classes, spec, backbone=backbone, readout=readout, **options)


def _touch_all(outputs: dict) -> torch.Tensor:
    """A scalar that depends on every head output."""
    attr_total = sum(logits.square().mean() for logits in outputs["attr_logits"].values())
    return (
        outputs["cls_logits"].square().mean()
        + outputs["box_deltas"].square().mean()
        + outputs["quality_logits"].square().mean()
        + attr_total
    )


@pytest.mark.parametrize(
    ("backbone", "height", "width", "channels"),
    [("test_resnet", 64, 64, [48, 192, 96]), ("resnet18", 96, 128, [128, 256, 512])],
)
def test_output_contract(backbone: str, height: int, width: int, channels: list[int]) -> None:
    torch.manual_seed(0)
    model = build_detector(backbone, NUM_CLASSES, LLD_ATTRIBUTE_SPEC, fpn_channels=32)
    assert model.backbone.channels == channels
    assert model.backbone.strides == [8, 16, 32]
    assert model.strides_per_level == [8, 16, 32]
    outputs = model(torch.rand(2, 3, height, width))
    num_points = sum((height // s) * (width // s) for s in (8, 16, 32))
    assert set(outputs) == {
        "cls_logits",
        "box_deltas",
        "box_distribution",
        "quality_logits",
        "attr_logits",
        "points",
        "strides",
    }
    assert outputs["cls_logits"].shape == (2, num_points, NUM_CLASSES)
    assert outputs["box_deltas"].shape == (2, num_points, 4)
    assert outputs["quality_logits"].shape == (2, num_points)
    assert outputs["points"].shape == (num_points, 2)
    assert outputs["strides"].shape == (num_points,)
    assert list(outputs["attr_logits"]) == list(LLD_ATTRIBUTE_SPEC)
    for name, num_values in LLD_ATTRIBUTE_SPEC.items():
        assert outputs["attr_logits"][name].shape == (2, num_points, num_values)
    assert (outputs["box_deltas"] >= 0).all()
    for key in ("cls_logits", "box_deltas", "quality_logits", "points", "strides"):
        assert outputs[key].dtype == torch.float32


def test_strides_and_channels_come_from_feature_info() -> None:
    backbone = TimmBackbone("test_resnet", out_indices=(1, 2, 3))
    reference = timm.create_model("test_resnet", features_only=True, out_indices=(1, 2, 3))
    assert backbone.channels == reference.feature_info.channels()
    assert backbone.strides == reference.feature_info.reduction() == [4, 8, 16]
    features = backbone(torch.rand(1, 3, 64, 64))
    assert [f.shape[1] for f in features] == backbone.channels
    assert [64 // f.shape[-1] for f in features] == backbone.strides


def test_detector_normalises_once_with_pretrained_cfg() -> None:
    model = build_detector("resnet18", 3, {"a": 2}, readout=Readout(pixel_crop=16)).eval()
    seen: dict[str, torch.Tensor] = {}
    model.backbone.body.register_forward_pre_hook(lambda _, args: seen.setdefault("backbone", args[0]))
    encoder = model.roi_head.crop_encoder
    crop = encoder.crop
    encoder.crop = lambda images, boxes: seen.setdefault("crops", images) is not None and crop(images, boxes)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    images = torch.rand(1, 3, 32, 32)
    model(images, [torch.tensor([[4.0, 4.0, 20.0, 20.0]])])
    torch.testing.assert_close(seen["backbone"], (images - mean) / std)
    torch.testing.assert_close(seen["crops"], (images - mean) / std)  # the crops read the same tensor
    assert "backbone.mean" not in model.state_dict()  # statistics follow the model name
    with pytest.raises(TypeError, match="float"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_pretrained_file_loads_a_local_checkpoint(tmp_path) -> None:
    full = timm.create_model("test_resnet")
    with torch.no_grad():
        full.conv1[0].weight.fill_(0.125)
    checkpoint = tmp_path / "test_resnet.pth"
    torch.save(full.state_dict(), checkpoint)
    backbone = TimmBackbone("test_resnet", pretrained_file=checkpoint)
    assert torch.all(backbone.body.conv1[0].weight == 0.125)
    with pytest.raises(FileNotFoundError):
        TimmBackbone("test_resnet", pretrained_file=tmp_path / "missing.pth")


def test_level_points_hand_computed() -> None:
    points, strides = level_points([(2, 3), (1, 2)], [8, 16])
    expected = torch.tensor(
        [
            [4.0, 4.0],
            [12.0, 4.0],
            [20.0, 4.0],
            [4.0, 12.0],
            [12.0, 12.0],
            [20.0, 12.0],
            [8.0, 8.0],
            [24.0, 8.0],
        ]
    )
    torch.testing.assert_close(points, expected)
    torch.testing.assert_close(strides, torch.tensor([8.0] * 6 + [16.0] * 2))


def test_detector_points_first_of_each_level_and_cache() -> None:
    model = build_detector("test_resnet", 3, {"size": 3}, fpn_channels=16)
    outputs = model(torch.rand(1, 3, 64, 96))
    points, strides = outputs["points"], outputs["strides"]
    start = 0
    for stride in (8, 16, 32):
        count = (64 // stride) * (96 // stride)
        torch.testing.assert_close(points[start], torch.tensor([stride / 2, stride / 2]))
        # last point of the level: bottom-right cell centre
        torch.testing.assert_close(
            points[start + count - 1], torch.tensor([96 - stride / 2, 64 - stride / 2])
        )
        assert torch.all(strides[start : start + count] == stride)
        start += count
    assert start == points.shape[0]
    again = model(torch.rand(2, 3, 64, 96))
    assert again["points"] is points  # cached per input size and device
    other = model(torch.rand(2, 3, 32, 32))
    assert other["points"].shape == (16 + 4 + 1, 2)


def test_decode_and_encode_hand_computed() -> None:
    points = torch.tensor([[12.0, 4.0], [40.0, 24.0]])
    strides = torch.tensor([8.0, 16.0])
    deltas = torch.tensor([[[1.0, 0.5, 2.0, 0.25], [0.5, 1.0, 1.5, 0.0]]])  # [1, 2, 4]
    boxes = decode_boxes(points, strides, deltas)
    expected = torch.tensor([[[4.0, 0.0, 28.0, 6.0], [32.0, 8.0, 64.0, 24.0]]])
    torch.testing.assert_close(boxes, expected)
    torch.testing.assert_close(encode_boxes(points, strides, boxes), deltas)


def test_class_bias_uses_focal_prior() -> None:
    head = DenseHead(16, NUM_CLASSES, {"a": 2})
    torch.testing.assert_close(
        head.cls_pred.bias.sigmoid(), torch.full((NUM_CLASSES,), 0.01), rtol=0, atol=1e-6
    )


def test_head_rejects_bad_spec_and_level_count() -> None:
    with pytest.raises(ValueError, match="'.'"):
        DenseHead(16, 2, {"a.b": 2})
    with pytest.raises(ValueError, match=">= 2 values"):
        DenseHead(16, 2, {"a": 1})
    with pytest.raises(ValueError, match="box_bins"):
        DenseHead(16, 2, {"a": 2}, box_bins=1)


@pytest.mark.parametrize("options", [{}, {"box_bins": 9, "head_convs": 2}])
def test_every_parameter_receives_a_gradient(options: dict) -> None:
    torch.manual_seed(0)
    model = build_detector("test_resnet", 4, {"a": 3, "b": 2}, fpn_channels=16, **options)
    # timm zero-initialises the last norm of each residual block, which blocks the gradient of
    # the block's other convs at init; a unit gamma makes "non-zero gradient" meaningful.
    for module in model.backbone.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(module.weight)
    _touch_all(model(torch.rand(2, 3, 64, 64))).backward()
    missing = [
        name for name, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)
    ]
    assert not missing


def test_box_distribution_expectation_is_the_distance() -> None:
    torch.manual_seed(0)
    model = build_detector("test_resnet", 4, {"a": 3}, fpn_channels=16, box_bins=9).eval()
    with torch.no_grad():
        outputs = model(torch.rand(2, 3, 64, 96))
    num_points = outputs["points"].shape[0]
    distribution = outputs["box_distribution"]
    assert distribution.shape == (2, num_points, 4, 9) and distribution.dtype == torch.float32
    expected = (distribution.softmax(dim=-1) * torch.arange(9.0)).sum(dim=-1)
    torch.testing.assert_close(outputs["box_deltas"], expected)
    assert outputs["box_deltas"].min() >= 0 and outputs["box_deltas"].max() <= 8


def test_channels_last_matches_contiguous() -> None:
    torch.manual_seed(0)
    model = build_detector("test_resnet", 4, {"a": 3}, fpn_channels=16).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
        model = model.to(memory_format=torch.channels_last)
        actual = model(images.contiguous(memory_format=torch.channels_last))
    for key in ("cls_logits", "box_deltas", "quality_logits"):
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(actual["attr_logits"]["a"], expected["attr_logits"]["a"])


def test_bf16_autocast_runs_and_returns_float32() -> None:
    torch.manual_seed(0)
    model = build_detector("test_resnet", 4, {"a": 3}, fpn_channels=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(torch.rand(2, 3, 64, 64))
        loss = _touch_all(outputs)
    loss.backward()
    for key in ("cls_logits", "box_deltas", "quality_logits"):
        assert outputs[key].dtype == torch.float32
        assert torch.isfinite(outputs[key]).all()
    assert outputs["attr_logits"]["a"].dtype == torch.float32
    assert math.isfinite(loss.item())
