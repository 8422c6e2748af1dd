"""Post-processing on hand-written detector outputs: scores, threshold, NMS, caps, read-outs."""

from __future__ import annotations

import math

import pytest
import torch

from lld_lightning.models import Detector, PostProcess, postprocess

#: A quality logit whose sigmoid is 1 in float32, so that score = sqrt(sigmoid(cls)).
SURE = 40.0
#: A class logit whose candidate never passes any threshold used here.
NEVER = -40.0


def _logit(probability: float) -> float:
    return math.log(probability / (1.0 - probability))


def _cls_for_score(score: float) -> float:
    """The class logit giving ``score`` when the quality is `SURE`."""
    return _logit(score**2)


def _outputs(
    num_images: int,
    points: list[list[float]],
    num_classes: int = 3,
    attribute_spec: dict[str, int] | None = None,
) -> dict:
    """All-negative outputs over the given points (stride 8, zero-size boxes made 1 stride)."""
    num_points = len(points)
    spec = {"size": 3, "shape": 2} if attribute_spec is None else attribute_spec
    return {
        "cls_logits": torch.full((num_images, num_points, num_classes), NEVER),
        "box_deltas": torch.ones((num_images, num_points, 4)),
        "quality_logits": torch.full((num_images, num_points), SURE),
        "attr_logits": {name: torch.zeros((num_images, num_points, k)) for name, k in spec.items()},
        "points": torch.tensor(points),
        "strides": torch.full((num_points,), 8.0),
    }


def test_score_is_geometric_mean_and_box_is_decoded() -> None:
    outputs = _outputs(1, [[20.0, 20.0]])
    outputs["cls_logits"][0, 0, 2] = 0.0  # sigmoid 0.5
    outputs["quality_logits"][0, 0] = 0.0  # sigmoid 0.5
    outputs["box_deltas"][0, 0] = torch.tensor([1.0, 0.5, 2.0, 0.25])
    (result,) = postprocess(outputs)
    torch.testing.assert_close(result["scores"], torch.tensor([0.5]))
    torch.testing.assert_close(result["boxes"], torch.tensor([[12.0, 16.0, 36.0, 22.0]]))
    assert result["labels"].tolist() == [2]
    assert result["labels"].dtype == torch.int64


def test_score_threshold_is_strict() -> None:
    outputs = _outputs(1, [[10.0, 10.0], [100.0, 100.0]])
    outputs["cls_logits"][0, 0, 0] = _cls_for_score(0.04)
    outputs["cls_logits"][0, 1, 0] = _cls_for_score(0.06)
    (result,) = postprocess(outputs, score_threshold=0.05)
    torch.testing.assert_close(result["scores"], torch.tensor([0.06]))
    torch.testing.assert_close(result["boxes"], torch.tensor([[92.0, 92.0, 108.0, 108.0]]))
    (none,) = postprocess(outputs, score_threshold=0.5)
    assert none["boxes"].shape == (0, 4)


def test_nms_is_class_aware_and_per_image() -> None:
    # Points 0 and 1 give boxes [2,2,18,18] and [4,2,20,18]: IoU 14*16 / (18*16) = 0.78.
    outputs = _outputs(2, [[10.0, 10.0], [12.0, 10.0]])
    outputs["cls_logits"][0, 0, 0] = _cls_for_score(0.9)
    outputs["cls_logits"][0, 1, 1] = _cls_for_score(0.8)  # other class: kept
    outputs["cls_logits"][1, 0, 0] = _cls_for_score(0.7)
    outputs["cls_logits"][1, 1, 0] = _cls_for_score(0.8)  # same class: suppresses point 0
    first, second = postprocess(outputs, nms_iou=0.6)
    assert first["labels"].tolist() == [0, 1]
    torch.testing.assert_close(first["scores"], torch.tensor([0.9, 0.8]))
    assert second["labels"].tolist() == [0]
    torch.testing.assert_close(second["scores"], torch.tensor([0.8]))
    torch.testing.assert_close(second["boxes"], torch.tensor([[4.0, 2.0, 20.0, 18.0]]))
    # The same overlap in another image is never suppressed across images.
    outputs["cls_logits"][1] = outputs["cls_logits"][0]
    first, second = postprocess(outputs, nms_iou=0.6)
    assert first["labels"].tolist() == second["labels"].tolist() == [0, 1]
    # Above the IoU threshold nothing is suppressed.
    outputs["cls_logits"][0, 1, 0] = _cls_for_score(0.8)
    (kept_both, _) = postprocess(outputs, nms_iou=0.9)
    assert kept_both["boxes"].shape == (3, 4)


def test_pre_nms_topk_and_max_detections() -> None:
    points = [[20.0 + 40.0 * i, 20.0] for i in range(4)]  # disjoint boxes
    outputs = _outputs(2, points)
    for i, score in enumerate([0.3, 0.9, 0.5, 0.7]):
        outputs["cls_logits"][0, i, 0] = _cls_for_score(score)
    outputs["cls_logits"][1, 3, 2] = _cls_for_score(0.6)
    first, second = postprocess(outputs, pre_nms_topk=3)
    torch.testing.assert_close(first["scores"], torch.tensor([0.9, 0.7, 0.5]))
    first, second = postprocess(outputs, max_detections=2)
    torch.testing.assert_close(first["scores"], torch.tensor([0.9, 0.7]))
    torch.testing.assert_close(first["boxes"][:, 0], torch.tensor([52.0, 132.0]))
    torch.testing.assert_close(second["scores"], torch.tensor([0.6]))
    assert second["labels"].tolist() == [2]


def test_attributes_read_at_the_detection_location() -> None:
    outputs = _outputs(2, [[20.0, 20.0], [100.0, 20.0]])
    outputs["cls_logits"][1, 1, 0] = _cls_for_score(0.9)
    outputs["cls_logits"][0, 0, 1] = _cls_for_score(0.8)
    size = outputs["attr_logits"]["size"]
    shape = outputs["attr_logits"]["shape"]
    size[1, 1] = torch.tensor([0.0, 0.0, math.log(3.0)])  # softmax [0.2, 0.2, 0.6] -> 2
    shape[1, 1] = torch.tensor([math.log(3.0), 0.0])  # softmax [0.75, 0.25] -> 0
    size[1, 0] = torch.tensor([9.0, 0.0, 0.0])  # wrong location, must not be read
    size[0, 1] = torch.tensor([0.0, 9.0, 0.0])  # wrong image, must not be read
    size[0, 0] = torch.tensor([math.log(2.0), 0.0, 0.0])  # image 0 point 0: [.5, .25, .25] -> 0
    shape[0, 0] = torch.tensor([0.0, math.log(4.0)])  # image 0 point 0: [0.2, 0.8] -> 1
    first, second = postprocess(outputs)
    assert second["attributes"].tolist() == [[2, 0]]
    torch.testing.assert_close(second["attribute_scores"], torch.tensor([[0.6, 0.75]]))
    assert first["attributes"].tolist() == [[0, 1]]
    torch.testing.assert_close(first["attribute_scores"], torch.tensor([[0.5, 0.8]]))
    assert second["attributes"].dtype == torch.int64


def test_empty_outputs_have_typed_empty_shapes() -> None:
    results = postprocess(_outputs(2, [[10.0, 10.0], [30.0, 10.0]]))
    assert len(results) == 2
    for result in results:
        assert result["boxes"].shape == (0, 4)
        assert result["scores"].shape == (0,)
        assert result["labels"].shape == (0,)
        assert result["labels"].dtype == torch.int64
        assert result["attributes"].shape == (0, 2)
        assert result["attributes"].dtype == torch.int64
        assert result["attribute_scores"].shape == (0, 2)
        assert result["attribute_scores"].dtype == torch.float32


def test_no_attributes_gives_zero_columns() -> None:
    outputs = _outputs(1, [[10.0, 10.0]], attribute_spec={})
    outputs["cls_logits"][0, 0, 0] = _cls_for_score(0.9)
    (result,) = postprocess(outputs)
    assert result["attributes"].shape == (1, 0)
    assert result["attribute_scores"].shape == (1, 0)


def test_clipping_to_one_size_and_per_image_sizes() -> None:
    outputs = _outputs(2, [[4.0, 4.0], [60.0, 60.0]])
    outputs["cls_logits"][:, 0, 0] = _cls_for_score(0.9)
    outputs["cls_logits"][:, 1, 1] = _cls_for_score(0.8)
    first, _ = postprocess(outputs, image_size=(64, 62))  # (h, w)
    torch.testing.assert_close(
        first["boxes"], torch.tensor([[0.0, 0.0, 12.0, 12.0], [52.0, 52.0, 62.0, 64.0]])
    )
    # Image 1 is 40x40 inside the padded batch: the box at (60, 60) lies in the padding.
    sizes = torch.tensor([[64, 64], [40, 40]])
    first, second = postprocess(outputs, image_size=sizes)
    assert first["boxes"].shape == (2, 4)
    torch.testing.assert_close(second["boxes"], torch.tensor([[0.0, 0.0, 12.0, 12.0]]))
    assert second["labels"].tolist() == [0]


def test_postprocess_settings_are_the_function_s_keywords() -> None:
    outputs = _outputs(1, [[20.0 + 40.0 * i, 20.0] for i in range(3)])
    outputs["cls_logits"][0, :, 0] = torch.tensor([_cls_for_score(s) for s in (0.3, 0.9, 0.5)])
    settings = PostProcess(score_threshold=0.4, max_detections=1, max_containment=None)
    (expected,) = postprocess(outputs, score_threshold=0.4, max_detections=1)
    (actual,) = postprocess(outputs, **settings.dense_settings())
    torch.testing.assert_close(actual["scores"], expected["scores"])
    torch.testing.assert_close(actual["scores"], torch.tensor([0.9]))
    for bad in ({"quality_weight": 1.5}, {"classes_per_box": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            PostProcess(**bad)


def test_runs_on_real_detector_outputs() -> None:
    torch.manual_seed(0)
    model = Detector(4, {"a": 3}, backbone="test_resnet", fpn_channels=16, readout=None).eval()
    with torch.no_grad():
        outputs = model(torch.rand(2, 3, 64, 64))
    sizes = torch.tensor([[64, 64], [48, 32]])
    # An untrained head's boxes overlap heavily: NMS at IoU 1 keeps them all.
    results = postprocess(outputs, score_threshold=0.0, nms_iou=1.0, max_detections=7, image_size=sizes)
    for result, (height, width) in zip(results, sizes.tolist(), strict=True):
        assert result["boxes"].shape == (7, 4)
        assert (result["boxes"][:, 2] <= width).all() and (result["boxes"][:, 3] <= height).all()
        assert (result["scores"][:-1] >= result["scores"][1:]).all()
        assert result["attributes"].shape == (7, 1)


def test_detection_scores_weigh_class_and_quality() -> None:
    from lld_lightning.models.postprocess import detection_scores

    cls_logits = torch.tensor([[[_logit(0.81), _logit(0.25)]]])  # [1, 1, 2]
    quality_logits = torch.tensor([[_logit(0.36)]])
    assert torch.allclose(detection_scores(cls_logits, quality_logits), torch.tensor([[[0.54, 0.3]]]))
    assert torch.allclose(detection_scores(cls_logits, quality_logits, 0.0), torch.tensor([[[0.81, 0.25]]]))
    assert torch.allclose(detection_scores(cls_logits, quality_logits, 1.0), torch.tensor([[[0.36, 0.36]]]))
    expected = torch.tensor([[[0.81**0.75 * 0.36**0.25, 0.25**0.75 * 0.36**0.25]]])
    assert torch.allclose(detection_scores(cls_logits, quality_logits, 0.25), expected)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="quality_weight"):
            detection_scores(cls_logits, quality_logits, bad)


def test_quality_weight_reorders_the_detections() -> None:
    # Location 0: sure class, poor quality; location 1: doubtful class, good quality.
    outputs = _outputs(1, [[20.0, 20.0], [60.0, 60.0]], num_classes=1, attribute_spec={})
    outputs["cls_logits"][0, :, 0] = torch.tensor([_logit(0.9), _logit(0.4)])
    outputs["quality_logits"][0] = torch.tensor([_logit(0.1), _logit(0.9)])
    by_class = postprocess(outputs, score_threshold=0.0, quality_weight=0.0)[0]
    by_quality = postprocess(outputs, score_threshold=0.0, quality_weight=1.0)[0]
    assert torch.allclose(by_class["scores"], torch.tensor([0.9, 0.4]))
    assert torch.allclose(by_quality["scores"], torch.tensor([0.9, 0.1]))
    assert by_class["boxes"][0, 0] < by_quality["boxes"][0, 0]  # location 0 first, then 1 first
