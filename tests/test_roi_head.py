"""The region read-out: training boxes, pooling, loss terms, class-agnostic proposals, re-classing."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from lld_lightning.boxes import grow_boxes
from lld_lightning.constants import IGNORE_INDEX, LLD_ATTRIBUTE_SPEC
from lld_lightning.losses import SparseDetectionLoss
from lld_lightning.models import Detector, PostProcess, Readout, postprocess
from lld_lightning.models.postprocess import apply_readout
from lld_lightning.models.roi_head import RoiHead, training_rois

SPEC = {"size": 3, "shape": 2}


def _batch_targets() -> dict:
    boxes = torch.tensor(
        [
            [[10.0, 10.0, 30.0, 30.0], [0.0, 0.0, 0.0, 0.0]],
            [[40.0, 8.0, 60.0, 40.0], [4.0, 4.0, 20.0, 24.0]],
        ]
    )
    return {
        "boxes": boxes,
        "labels": torch.tensor([[2, IGNORE_INDEX], [0, 1]]),
        "attributes": torch.tensor([[[1, 0], [IGNORE_INDEX, IGNORE_INDEX]], [[0, IGNORE_INDEX], [2, 1]]]),
        "regions": torch.tensor([[[0.0, 0.0, 64.0, 64.0]], [[0.0, 0.0, 64.0, 64.0]]]),
        "region_valid": torch.ones(2, 1, dtype=torch.bool),
    }


def test_training_rois_exact_first_then_jittered_image_major() -> None:
    targets = _batch_targets()
    rois = training_rois(targets["boxes"], targets["labels"], copies=3, jitter=0.1,
                         generator=torch.Generator().manual_seed(0))
    # Padding is never read out; 3 real cells x 3 copies, image-major.
    assert [b.shape[0] for b in rois.boxes] == [3, 6]
    assert rois.image_index.tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert sorted(rois.cell_index[rois.image_index == 1].tolist()) == [0, 0, 0, 1, 1, 1]
    everything = torch.cat(rois.boxes)
    cells = targets["boxes"][rois.image_index, rois.cell_index]
    # Every copy stays within the jitter of its own cell: centre within 10% of the size ...
    size = cells[:, 2:] - cells[:, :2]
    centre_shift = ((everything[:, :2] + everything[:, 2:]) - (cells[:, :2] + cells[:, 2:])).abs() / 2
    assert torch.all(centre_shift <= 0.1 * size + 1e-4)
    # ... and its sides within 1 +- 10%.
    ratio = (everything[:, 2:] - everything[:, :2]) / size
    assert torch.all((ratio >= 0.9 - 1e-5) & (ratio <= 1.1 + 1e-5))
    # Each cell is read out once exactly.
    exact = (everything - cells).abs().amax(dim=1) < 1e-6
    assert exact.sum() == 3
    single = training_rois(targets["boxes"], targets["labels"], copies=1)
    torch.testing.assert_close(torch.cat(single.boxes), targets["boxes"][single.image_index, single.cell_index])
    with pytest.raises(ValueError, match="copies"):
        training_rois(targets["boxes"], targets["labels"], copies=0)


def test_grow_boxes_about_the_centre() -> None:
    grown = grow_boxes(torch.tensor([[10.0, 20.0, 30.0, 60.0]]), 1.5)
    torch.testing.assert_close(grown, torch.tensor([[5.0, 10.0, 35.0, 70.0]]))


def test_roi_head_shapes_order_and_empty_input() -> None:
    torch.manual_seed(0)
    head = RoiHead(16, 4, SPEC, stride=8, pool_size=5, hidden=32)
    feature = [torch.randn(2, 16, 8, 8), torch.randn(2, 16, 4, 4)]
    boxes = [torch.tensor([[0.0, 0.0, 32.0, 32.0]]), torch.tensor([[8.0, 8.0, 40.0, 40.0], [0.0, 0.0, 16.0, 16.0]])]
    out = head(feature, boxes)
    assert out["cls_logits"].shape == (3, 4) and out["cls_logits"].dtype == torch.float32
    assert {k: v.shape for k, v in out["attr_logits"].items()} == {"size": (3, 3), "shape": (3, 2)}
    # Order follows the boxes: reading image 1's boxes alone gives the last two rows.
    alone = head([f[1:] for f in feature], boxes[1:])
    torch.testing.assert_close(alone["cls_logits"], out["cls_logits"][1:])
    # A box elsewhere in the image reads other features (pooling is over the box).
    moved = head([f[:1] for f in feature], [torch.tensor([[32.0, 32.0, 64.0, 64.0]])])
    assert not torch.allclose(moved["cls_logits"], out["cls_logits"][:1])
    empty = head(feature, [torch.zeros(0, 4), torch.zeros(0, 4)])
    assert empty["cls_logits"].shape == (0, 4)
    # Only the finest level is read.
    unchanged = head([feature[0], feature[1] + 1.0], boxes)
    torch.testing.assert_close(unchanged["cls_logits"], out["cls_logits"])
    with pytest.raises(ValueError, match="context"):
        RoiHead(16, 4, SPEC, stride=8, context=0.5)


def _roi_outputs(targets: dict, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    rois = training_rois(targets["boxes"], targets["labels"], copies=2, generator=generator)
    n = rois.image_index.numel()
    points = torch.tensor([[4.0 + 8 * (i % 8), 4.0 + 8 * (i // 8)] for i in range(64)])
    return {
        "cls_logits": torch.randn(2, 64, 3, generator=generator),
        "box_deltas": torch.rand(2, 64, 4, generator=generator) + 0.5,
        "box_distribution": torch.randn(2, 64, 4, 5, generator=generator),
        "quality_logits": torch.randn(2, 64, generator=generator),
        "attr_logits": {k: torch.randn(2, 64, v, generator=generator) for k, v in SPEC.items()},
        "points": points,
        "strides": torch.full((64,), 8.0),
        "roi": {
            "cls_logits": torch.randn(n, 3, generator=generator).requires_grad_(),
            "attr_logits": {k: torch.randn(n, v, generator=generator).requires_grad_() for k, v in SPEC.items()},
            "image_index": rois.image_index,
            "cell_index": rois.cell_index,
        },
    }


def test_readout_terms_are_hand_computable_and_weighted() -> None:
    targets = _batch_targets()
    outputs = _roi_outputs(targets)
    roi = outputs["roi"]
    terms = SparseDetectionLoss(3, SPEC)(outputs, targets)
    labels = targets["labels"][roi["image_index"], roi["cell_index"]]
    expected_cls = F.cross_entropy(roi["cls_logits"], labels)
    torch.testing.assert_close(terms["roi_cls"], expected_cls)
    attributes = targets["attributes"][roi["image_index"], roi["cell_index"]]
    expected_attr = sum(
        F.cross_entropy(roi["attr_logits"][name], attributes[:, column], ignore_index=IGNORE_INDEX,
                        reduction="sum")
        for column, name in enumerate(SPEC)
    ) / labels.numel()
    torch.testing.assert_close(terms["roi_attributes"], expected_attr)
    (terms["roi_cls"] + terms["roi_attributes"]).backward()
    assert torch.any(roi["cls_logits"].grad != 0)
    # A weight-0 cell (e.g. a discarded pseudo-label) gives its read-outs zero gradient.
    outputs = _roi_outputs(targets)
    targets["weights"] = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    terms = SparseDetectionLoss(3, SPEC)(outputs, targets)
    terms["roi_cls"].backward()
    silent = (outputs["roi"]["image_index"] == 1) & (outputs["roi"]["cell_index"] == 0)
    assert torch.all(outputs["roi"]["cls_logits"].grad[silent] == 0)
    assert torch.any(outputs["roi"]["cls_logits"].grad[~silent] != 0)


def test_readout_terms_are_zero_without_a_readout() -> None:
    targets = _batch_targets()
    outputs = _roi_outputs(targets)
    del outputs["roi"]
    terms = SparseDetectionLoss(3, SPEC)(outputs, targets)
    assert float(terms["roi_cls"]) == 0.0 and float(terms["roi_attributes"]) == 0.0


def test_class_agnostic_postprocess_keeps_one_hypothesis_per_cell() -> None:
    points = torch.tensor([[10.0, 10.0], [12.0, 10.0], [60.0, 60.0]])
    cls = torch.full((1, 3, 3), -40.0)
    cls[0, 0, 0], cls[0, 0, 1] = 2.0, 1.0  # two classes at one location
    cls[0, 1, 2] = 1.5  # a neighbouring location, another class, same cell
    cls[0, 2, 1] = 0.0  # a separate cell
    outputs = {
        "cls_logits": cls,
        "box_deltas": torch.ones(1, 3, 4),
        "quality_logits": torch.full((1, 3), 40.0),
        "attr_logits": {},
        "points": points,
        "strides": torch.full((3,), 8.0),
    }
    (aware,) = postprocess(outputs)
    assert aware["labels"].tolist() == [0, 2, 1, 1]
    (agnostic,) = postprocess(outputs, class_agnostic=True)
    assert agnostic["labels"].tolist() == [0, 1]
    expected = [math.sqrt(1 / (1 + math.exp(-2.0))), math.sqrt(0.5)]
    torch.testing.assert_close(agnostic["scores"], torch.tensor(expected))


def test_apply_readout_reclasses_boxes_and_caps_per_image() -> None:
    preds = [
        {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]),
         "scores": torch.tensor([0.81, 0.36]), "labels": torch.tensor([2, 2]),
         "attributes": torch.zeros(2, 1, dtype=torch.int64), "attribute_scores": torch.ones(2, 1)},
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
         "attributes": torch.zeros(0, 1, dtype=torch.int64), "attribute_scores": torch.zeros(0, 1)},
    ]
    probabilities = torch.tensor([[0.5, 0.3, 0.2], [0.0, 0.0, 1.0]])
    readout = {"cls_logits": probabilities.clamp(min=1e-12).log(),
               "attr_logits": {"size": torch.tensor([[0.0, 5.0], [5.0, 0.0]])}}
    first, second = apply_readout(preds, readout, classes_per_box=2, max_detections=3)
    # Hypotheses: box0 c0 .81*.5=.405, box1 c2 .36*1=.36, box0 c1 .81*.3=.243, box1 c0 ~0
    # -> capped at 3, sorted by score.
    assert first["labels"].tolist() == [0, 2, 1]
    torch.testing.assert_close(first["scores"], torch.tensor([0.405, 0.36, 0.243]))
    torch.testing.assert_close(first["boxes"], preds[0]["boxes"][[0, 1, 0]])
    assert first["attributes"][:, 0].tolist() == [1, 0, 1]
    assert second["boxes"].shape == (0, 4) and second["attributes"].shape == (0, 1)
    one, _ = apply_readout(preds, readout, classes_per_box=1)
    assert one["labels"].tolist() == [0, 2]


def test_detector_with_readout_reads_every_detection_and_trains_every_parameter() -> None:
    torch.manual_seed(0)
    model = Detector(4, SPEC, backbone="test_resnet", fpn_channels=16, readout=Readout(pixel_crop=0))
    for module in model.backbone.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(module.weight)
    images = torch.rand(2, 3, 64, 64)
    outputs = model(images, [torch.tensor([[8.0, 8.0, 40.0, 40.0]]), torch.zeros(0, 4)])
    assert outputs["roi"]["cls_logits"].shape == (1, 4)
    loss = outputs["roi"]["cls_logits"].square().sum() + sum(
        v.square().sum() for v in outputs["roi"]["attr_logits"].values()
    ) + outputs["cls_logits"].square().mean() + outputs["box_deltas"].square().mean() + \
        outputs["quality_logits"].square().mean() + sum(v.square().mean() for v in outputs["attr_logits"].values())
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing
    model.eval()
    with torch.no_grad():
        outputs = model(images)
        settings = PostProcess(score_threshold=0.0, max_detections=10, classes_per_box=2)
        preds = model.detections(outputs, images, settings, image_size=(64, 64), evaluation=True)
    for pred in preds:
        # Two hypotheses per box, each box at most twice, attributes per box.
        assert pred["boxes"].shape[0] <= 10
        _, counts = torch.unique(pred["boxes"], dim=0, return_counts=True)
        assert counts.max() <= 2
        assert pred["attributes"].shape[1] == len(SPEC)
        assert torch.all(pred["scores"][:-1] >= pred["scores"][1:])


def test_lld_spec_readout_builds_from_module() -> None:
    from lld_lightning.module import LldModule

    module = LldModule(detector=functools.partial(Detector, backbone="test_resnet", fpn_channels=16))
    assert module.detector.roi_head is not None  # the read-out is the default
    assert module.detector.roi_head.class_crop_encoder is not None
    assert set(module.detector.roi_head.attr_preds) == set(LLD_ATTRIBUTE_SPEC)


# Pixel crops (`CropEncoder`).
def test_pixel_crops_see_only_their_box() -> None:
    from lld_lightning.models.crop_encoder import CropEncoder

    torch.manual_seed(0)
    encoder = CropEncoder(crop_size=16, context=1.0, width=4).eval()
    images = torch.full((1, 3, 64, 64), 0.5)
    boxes = [torch.tensor([[8.0, 8.0, 24.0, 24.0], [40.0, 40.0, 56.0, 56.0]])]
    before = encoder(images, boxes)
    assert before.shape == (2, encoder.out_dim)
    images[0, :, 14:17, 14:17] = 1.0  # a white dot (a vacuole) inside the first box only
    after = encoder(images, boxes)
    assert not torch.allclose(after[0], before[0])
    torch.testing.assert_close(after[1], before[1])


def test_pixel_crop_read_out_needs_images_and_trains_only_attributes() -> None:
    head = RoiHead(8, 3, SPEC, stride=8, pixel_crop=16)
    features = [torch.randn(1, 8, 8, 8)]
    boxes = [torch.tensor([[8.0, 8.0, 40.0, 40.0]])]
    with pytest.raises(ValueError, match="needs the input images"):
        head(features, boxes)
    images = torch.rand(1, 3, 64, 64)
    out = head(features, boxes, images)
    assert out["attr_logits"]["size"].shape == (1, 3)
    out["cls_logits"].sum().backward(retain_graph=True)  # the class does not read the crops
    assert all(p.grad is None for p in head.crop_encoder.parameters())
    sum(v.sum() for v in out["attr_logits"].values()).backward()
    assert all(p.grad is not None for p in head.crop_encoder.parameters())


@pytest.mark.parametrize(
    "readout",
    [Readout(pixel_crop=0), Readout(pixel_crop=16, crop_classes=False), Readout(pixel_crop=16)],
)
def test_read_out_variants_detect_and_train(readout: Readout) -> None:
    detector = Detector(3, SPEC, backbone="test_resnet", fpn_channels=16, readout=readout)
    images = torch.rand(2, 3, 64, 64)
    rois = [torch.tensor([[4.0, 4.0, 30.0, 30.0]]), torch.tensor([[20.0, 10.0, 50.0, 44.0]])]
    out = detector(images, rois=rois)
    assert out["roi"]["cls_logits"].shape == (2, 3)
    sum(v.sum() for v in out["roi"]["attr_logits"].values()).backward()
    detector.eval()
    with torch.no_grad():
        settings = PostProcess(classes_per_box=2)
        dets = detector.detections(detector(images), images, settings, image_size=(64, 64), evaluation=True)
    assert len(dets) == 2 and dets[0]["attributes"].shape[1] == len(SPEC)


def test_class_crops_have_their_own_encoder() -> None:
    head = RoiHead(8, 3, SPEC, stride=8, pixel_crop=16, crop_classes=True)
    out = head([torch.randn(1, 8, 8, 8)], [torch.tensor([[8.0, 8.0, 40.0, 40.0]])],
               torch.rand(1, 3, 64, 64))
    out["cls_logits"].sum().backward()
    assert all(p.grad is not None for p in head.class_crop_encoder.parameters())
    assert all(p.grad is None for p in head.crop_encoder.parameters())  # attributes' own
    with pytest.raises(ValueError, match="crop_classes needs pixel_crop"):
        RoiHead(8, 3, SPEC, stride=8, crop_classes=True)
