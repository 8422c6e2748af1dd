"""Properties of the sparse multi-task loss, on fake detector outputs over a two-level toy pyramid.

Toy pyramid (see tests/test_assign.py): a 32x32 image, stride 8 locations ``row * 4 + col`` at
``(4 + 8 col, 4 + 8 row)`` and stride 16 locations ``16 + row * 2 + col``; P = 20, C = 3.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from lld_lightning.constants import IGNORE, IGNORE_INDEX
from lld_lightning.losses import DEFAULT_LOSS_WEIGHTS, LOSS_TERMS, SparseDetectionLoss
from lld_lightning.losses.sparse_loss import distribution_focal_loss, quality_focal_loss
from lld_lightning.models.assign import assign_locations

NUM_CLASSES = 3
SPEC = {"size": 3, "shape": 2}
TERMS = ("cls", "box", "quality", "dfl", "attributes")
NUM_BINS = 6
WHOLE_IMAGE = [0.0, 0.0, 32.0, 32.0]
LN2 = math.log(2.0)

# Cell 0 [0,0,16,16] is positive at 0, 1, 4, 5; cell 1 [8,8,26,26] at 6, 9, 10 (it loses 5 to
# the smaller cell 0). With the region [0,0,16,16] the locations 0, 1, 4, 5, 16 are inside.
TWO_CELLS = [[0.0, 0.0, 16.0, 16.0], [8.0, 8.0, 26.0, 26.0]]
CELL0_LOCATIONS = [0, 1, 4, 5]
CELL1_LOCATIONS = [6, 9, 10]


def toy_grid() -> tuple[torch.Tensor, torch.Tensor]:
    points, strides = [], []
    for stride in (8, 16):
        cells = 32 // stride
        for row in range(cells):
            for col in range(cells):
                points.append((stride / 2 + stride * col, stride / 2 + stride * row))
                strides.append(stride)
    return torch.tensor(points), torch.tensor(strides)


def make_outputs(batch_size: int = 1, seed: int = 0, dtype=torch.float32) -> dict:
    """Random detector outputs (leaf tensors that require grad) with the documented keys."""
    generator = torch.Generator().manual_seed(seed)
    points, strides = toy_grid()
    num_points = points.shape[0]

    def leaf(values: torch.Tensor) -> torch.Tensor:
        return values.to(dtype).requires_grad_()

    return {
        "cls_logits": leaf(torch.randn(batch_size, num_points, NUM_CLASSES, generator=generator)),
        "box_deltas": leaf(torch.rand(batch_size, num_points, 4, generator=generator) * 2 + 0.1),
        "box_distribution": leaf(torch.randn(batch_size, num_points, 4, NUM_BINS, generator=generator)),
        "quality_logits": leaf(torch.randn(batch_size, num_points, generator=generator)),
        "attr_logits": {
            name: leaf(torch.randn(batch_size, num_points, k, generator=generator))
            for name, k in SPEC.items()
        },
        "points": points,
        "strides": strides,
    }


def make_targets(
    boxes: list[list[float]],
    labels: list[int],
    attributes: list[list[int]],
    region: list[float],
    weights: list[float] | None = None,
) -> dict:
    """Targets for a single image (B = 1)."""
    targets = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(1, -1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64).reshape(1, -1),
        "attributes": torch.tensor(attributes, dtype=torch.int64).reshape(1, -1, len(SPEC)),
        "regions": torch.tensor([[region]], dtype=torch.float32),
        "region_valid": torch.ones(1, 1, dtype=torch.bool),
    }
    if weights is not None:
        targets["weights"] = torch.tensor([weights], dtype=torch.float32)
    return targets


def two_cell_targets(region: list[float] | None = None, **kwargs) -> dict:
    return make_targets(TWO_CELLS, [1, 2], [[2, 0], [0, 1]], region or [0, 0, 16, 16], **kwargs)


def leaves(outputs: dict) -> dict[str, torch.Tensor]:
    """Every differentiable input, by name."""
    named = {k: outputs[k] for k in ("cls_logits", "box_deltas", "box_distribution", "quality_logits")}
    named.update({f"attr/{k}": v for k, v in outputs["attr_logits"].items()})
    return named


def total(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(terms[k] for k in TERMS)


def gradients(loss: SparseDetectionLoss, outputs: dict, targets: dict) -> tuple[dict, dict]:
    terms = loss(outputs, targets)
    total(terms).backward()
    return terms, {name: t.grad.clone() for name, t in leaves(outputs).items()}


def perturbed(outputs: dict, where: torch.Tensor, seed: int = 1) -> dict:
    """Fresh leaf copies of ``outputs`` with new values at the ``[B, P]`` locations ``where``."""
    generator = torch.Generator().manual_seed(seed)

    def redraw(t: torch.Tensor, positive: bool = False) -> torch.Tensor:
        new = t.detach().clone()
        noise = torch.randn(new[where].shape, generator=generator) * 5
        new[where] = noise.abs() if positive else noise
        return new.requires_grad_()

    return {
        "cls_logits": redraw(outputs["cls_logits"]),
        "box_deltas": redraw(outputs["box_deltas"], positive=True),
        "box_distribution": redraw(outputs["box_distribution"]),
        "quality_logits": redraw(outputs["quality_logits"]),
        "attr_logits": {k: redraw(v) for k, v in outputs["attr_logits"].items()},
        "points": outputs["points"],
        "strides": outputs["strides"],
    }


def matched_for(targets: dict, masked: bool = True) -> torch.Tensor:
    points, strides = toy_grid()
    return assign_locations(
        points,
        strides,
        targets["boxes"],
        targets["labels"] != IGNORE_INDEX,
        targets["regions"],
        targets["region_valid"],
        ignore_outside_regions=masked,
    )


def test_fixture_assignment() -> None:
    matched = matched_for(two_cell_targets())[0]
    assert (matched == 0).nonzero().flatten().tolist() == CELL0_LOCATIONS
    assert (matched == 1).nonzero().flatten().tolist() == CELL1_LOCATIONS
    assert (matched != IGNORE).nonzero().flatten().tolist() == [0, 1, 4, 5, 6, 9, 10, 16]


# 1. Outside the regions: no loss, no gradient, no influence on other locations.
@pytest.mark.parametrize("cls_loss", ["focal", "quality_focal"])
def test_outside_region_logits_change_nothing_in_masked_mode(cls_loss: str) -> None:
    loss = SparseDetectionLoss(NUM_CLASSES, SPEC, cls_loss=cls_loss)
    targets = two_cell_targets()
    ignored = matched_for(targets) == IGNORE  # [1, P], 12 locations
    assert ignored.sum() == 12

    outputs = make_outputs()
    terms, grads = gradients(loss, outputs, targets)
    other = perturbed(outputs, ignored)
    other_terms, other_grads = gradients(loss, other, targets)

    for key in (*TERMS, "num_foreground"):
        assert torch.equal(terms[key], other_terms[key]), key
    for name, grad in grads.items():
        assert torch.equal(grad[~ignored], other_grads[name][~ignored]), name
        assert (grad[ignored] == 0).all() and (other_grads[name][ignored] == 0).all(), name
    # The outside positives of cell 1 (6, 9, 10) are not ignored: they do train.
    assert (grads["box_deltas"][0, CELL1_LOCATIONS] != 0).any()


def test_outside_region_logits_change_the_naive_loss() -> None:
    loss = SparseDetectionLoss(NUM_CLASSES, SPEC, mode="naive")
    targets = two_cell_targets()
    outside = matched_for(targets) == IGNORE
    outputs = make_outputs()
    terms, grads = gradients(loss, outputs, targets)
    other_terms = loss(perturbed(outputs, outside), targets)
    assert not torch.equal(terms["cls"], other_terms["cls"])
    assert (grads["cls_logits"][outside] != 0).all()


# 2. A whole-image region is the dense loss.
def test_whole_image_region_equals_naive_loss() -> None:
    targets = two_cell_targets(region=WHOLE_IMAGE)
    outputs = make_outputs(seed=3)
    masked_terms, masked_grads = gradients(SparseDetectionLoss(NUM_CLASSES, SPEC), outputs, targets)
    outputs = make_outputs(seed=3)
    naive = SparseDetectionLoss(NUM_CLASSES, SPEC, mode="naive")
    naive_terms, naive_grads = gradients(naive, outputs, targets)
    for key in (*TERMS, "num_foreground"):
        assert torch.equal(masked_terms[key], naive_terms[key]), key
    for name in masked_grads:
        assert torch.equal(masked_grads[name], naive_grads[name]), name
    # ...whereas a sparse region makes the two differ.
    sparse = two_cell_targets()
    masked_sparse = SparseDetectionLoss(NUM_CLASSES, SPEC)(make_outputs(seed=3), sparse)
    assert not torch.equal(masked_sparse["cls"], naive(make_outputs(seed=3), sparse)["cls"])


# 3. An image without cells.
@pytest.mark.parametrize("num_padding_cells", [0, 2])
def test_empty_image_gives_finite_loss_and_zero_box_terms(num_padding_cells: int) -> None:
    targets = make_targets(
        [[0.0, 0.0, 8.0, 8.0]] * num_padding_cells,  # padding: labels are IGNORE_INDEX
        [IGNORE_INDEX] * num_padding_cells,
        [[IGNORE_INDEX] * len(SPEC)] * num_padding_cells,
        WHOLE_IMAGE,
    )
    outputs = make_outputs()
    with torch.no_grad():
        outputs["cls_logits"].zero_()
    terms, grads = gradients(SparseDetectionLoss(NUM_CLASSES, SPEC), outputs, targets)
    for key in ("box", "quality", "attributes", "num_foreground"):
        assert terms[key].item() == 0.0, key
    # Every one of the 20 x 3 logits is 0, a negative: 0.75 * 0.5**2 * ln 2 each, divided by 1.
    assert terms["cls"].item() == pytest.approx(60 * 0.75 * 0.25 * LN2, rel=1e-6)
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
    assert (grads["box_deltas"] == 0).all()


# 4. All attributes missing.
def test_all_attributes_missing_gives_exact_zero() -> None:
    targets = make_targets(TWO_CELLS, [1, 2], [[IGNORE_INDEX] * 2] * 2, WHOLE_IMAGE)
    outputs = make_outputs()
    terms, grads = gradients(SparseDetectionLoss(NUM_CLASSES, SPEC), outputs, targets)
    assert terms["attributes"].item() == 0.0
    assert terms["num_foreground"].item() == 7
    for name in SPEC:
        grad = grads[f"attr/{name}"]
        assert not torch.isnan(grad).any() and (grad == 0).all()
    assert all(torch.isfinite(g).all() for g in grads.values())


# 5. A missing attribute of a cell is ignored; its other attributes still train.
def test_one_missing_attribute_is_ignored_per_cell() -> None:
    attributes = [[1, IGNORE_INDEX], [IGNORE_INDEX, 0]]
    targets = make_targets(TWO_CELLS, [1, 2], attributes, WHOLE_IMAGE)
    outputs = make_outputs(seed=4)
    terms, grads = gradients(SparseDetectionLoss(NUM_CLASSES, SPEC), outputs, targets)

    size_grad, shape_grad = grads["attr/size"][0], grads["attr/shape"][0]
    assert (size_grad[CELL0_LOCATIONS].abs().sum(dim=1) > 0).all()  # cell 0 trains its size
    assert (size_grad[CELL1_LOCATIONS] == 0).all()  # cell 1's size is missing
    assert (shape_grad[CELL1_LOCATIONS].abs().sum(dim=1) > 0).all()
    assert (shape_grad[CELL0_LOCATIONS] == 0).all()

    size_logits = outputs["attr_logits"]["size"].detach()[0]
    shape_logits = outputs["attr_logits"]["shape"].detach()[0]
    expected = (
        -size_logits[CELL0_LOCATIONS].log_softmax(dim=1)[:, 1].sum()
        - shape_logits[CELL1_LOCATIONS].log_softmax(dim=1)[:, 0].sum()
    ) / 7  # 7 positive locations
    assert terms["attributes"].item() == pytest.approx(expected.item(), rel=1e-6)


# 6. Per-cell weights.
def test_zero_weight_removes_a_cell_from_box_and_attribute_terms() -> None:
    loss = SparseDetectionLoss(NUM_CLASSES, SPEC)
    outputs = make_outputs(seed=5)
    terms, grads = gradients(loss, outputs, two_cell_targets(WHOLE_IMAGE, weights=[1.0, 0.0]))
    for name, grad in grads.items():
        assert (grad[0, CELL1_LOCATIONS] == 0).all(), name
        assert (grad[0, CELL0_LOCATIONS] != 0).any(), name

    # The weight-0 cell's predictions do not matter.
    where = torch.zeros(1, 20, dtype=torch.bool)
    where[0, CELL1_LOCATIONS] = True
    other = loss(perturbed(outputs, where), two_cell_targets(WHOLE_IMAGE, weights=[1.0, 0.0]))
    for key in ("box", "quality", "attributes"):
        assert torch.equal(terms[key], other[key]), key

    # The terms are linear in the weights (the normaliser counts positives, not weights).
    both = loss(outputs, two_cell_targets(WHOLE_IMAGE, weights=[1.0, 1.0]))
    only_cell1 = loss(outputs, two_cell_targets(WHOLE_IMAGE, weights=[0.0, 1.0]))
    for key in ("box", "quality", "attributes"):
        assert both[key].item() == pytest.approx((terms[key] + only_cell1[key]).item(), rel=1e-6)
        assert terms[key] < both[key]
    half = loss(outputs, two_cell_targets(WHOLE_IMAGE, weights=[1.0, 0.5]))
    assert half["box"].item() == pytest.approx((terms["box"] + 0.5 * only_cell1["box"]).item())
    # Omitted weights are weights of 1.
    default = loss(outputs, two_cell_targets(WHOLE_IMAGE))
    for key in TERMS:
        assert torch.equal(default[key], both[key]), key


# Hand-computed values.
def single_cell_outputs(quality_logit: float = 1.0) -> tuple[dict, dict]:
    """Cell [0,0,16,16] (positives 0, 1, 4, 5) and every positive predicting [2,2,14,14]."""
    targets = make_targets([[0.0, 0.0, 16.0, 16.0]], [1], [[2, 1]], WHOLE_IMAGE)
    outputs = make_outputs()
    points, strides = toy_grid()
    predicted = torch.tensor([2.0, 2.0, 14.0, 14.0])
    deltas = torch.cat([points - predicted[:2], predicted[2:] - points], dim=1) / strides[:, None]
    with torch.no_grad():
        outputs["box_deltas"][0, CELL0_LOCATIONS] = deltas[CELL0_LOCATIONS]
        outputs["quality_logits"].fill_(quality_logit)
        outputs["cls_logits"].zero_()
    return outputs, targets


def test_hand_computed_values() -> None:
    outputs, targets = single_cell_outputs()
    terms = SparseDetectionLoss(NUM_CLASSES, SPEC)(outputs, targets)
    assert terms["num_foreground"].item() == 4
    # IoU([2,2,14,14], [0,0,16,16]) = 144 / 256; the enclosing box is the cell, so the GIoU
    # loss equals 1 - IoU.
    iou = 144 / 256
    assert terms["box"].item() == pytest.approx(1 - iou, abs=1e-5)
    # BCE(logit 1, target IoU) = log(1 + e) - IoU, the same at each of the 4 positives.
    assert terms["quality"].item() == pytest.approx(math.log1p(math.e) - iou, rel=1e-5)
    # Logits 0: a positive costs 0.25 * 0.5**2 * ln 2, a negative 0.75 * 0.5**2 * ln 2;
    # 4 positive (class, location) pairs and 56 negatives, divided by 4.
    expected_cls = (4 * 0.25 + 56 * 0.75) * 0.25 * LN2 / 4
    assert terms["cls"].item() == pytest.approx(expected_cls, rel=1e-6)


def test_quality_focal_hand_computed_and_detached_from_the_boxes() -> None:
    outputs, targets = single_cell_outputs()
    terms = SparseDetectionLoss(NUM_CLASSES, SPEC, cls_loss="quality_focal")(outputs, targets)
    # Logits 0 (probability 0.5), so BCE = ln 2 whatever the target. The positive class of each
    # of the 4 positives aims at the IoU 144/256: |IoU - 0.5|^2 ln 2; the 56 other entries aim
    # at 0: 0.25 ln 2. Divided by the 4 positives.
    iou = 144 / 256
    expected = (4 * (iou - 0.5) ** 2 + 56 * 0.25) * LN2 / 4
    assert terms["cls"].item() == pytest.approx(expected, rel=1e-5)
    grad = torch.autograd.grad(terms["cls"], outputs["box_deltas"], allow_unused=True)[0]
    assert grad is None or (grad == 0).all()
    # Box, quality and attribute terms do not depend on the classification loss.
    focal = SparseDetectionLoss(NUM_CLASSES, SPEC)(outputs, targets)
    for key in ("box", "quality", "attributes", "num_foreground"):
        assert torch.equal(terms[key], focal[key]), key


def test_quality_focal_loss_is_zero_at_its_target() -> None:
    logits = torch.tensor([[-2.0, 0.0, 3.0]])
    at_target = quality_focal_loss(logits, logits.sigmoid())
    assert torch.allclose(at_target, torch.zeros_like(at_target), atol=1e-7)
    assert (quality_focal_loss(logits, torch.zeros_like(logits)) > 0).all()


def test_quality_target_is_detached_from_the_boxes() -> None:
    outputs, targets = single_cell_outputs()
    terms = SparseDetectionLoss(NUM_CLASSES, SPEC)(outputs, targets)
    grad = torch.autograd.grad(terms["quality"], outputs["box_deltas"], allow_unused=True)[0]
    assert grad is None or (grad == 0).all()


def test_num_foreground_is_averaged_over_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend a second rank holds 6 positives: the normaliser becomes (4 + 6) / 2 = 5.
    def fake_all_reduce(tensor: torch.Tensor, op=None) -> None:
        tensor += 6

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    outputs, targets = single_cell_outputs()
    terms = SparseDetectionLoss(NUM_CLASSES, SPEC)(outputs, targets)
    assert terms["num_foreground"].item() == 5
    assert terms["box"].item() == pytest.approx(4 * (1 - 144 / 256) / 5, abs=1e-5)


# 8. Precision and gradient flow.
def test_float32_under_bf16_autocast_and_gradients_reach_every_input() -> None:
    loss = SparseDetectionLoss(NUM_CLASSES, SPEC)
    targets = two_cell_targets()
    reference = loss(make_outputs(seed=6, dtype=torch.bfloat16), targets)

    outputs = make_outputs(seed=6, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = loss(outputs, targets)
        summed = total(terms)
    for key in (*TERMS, "num_foreground"):
        assert terms[key].dtype == torch.float32, key
        assert terms[key].item() == pytest.approx(reference[key].item(), rel=1e-6), key
    assert all(terms[key] > 0 for key in TERMS)
    summed.backward()
    for name, tensor in leaves(outputs).items():
        assert tensor.grad is not None and tensor.grad.dtype == torch.bfloat16, name
        assert torch.isfinite(tensor.grad.float()).all() and (tensor.grad != 0).any(), name
    assert not terms["num_foreground"].requires_grad


def test_batch_of_two_images() -> None:
    # Image 0: the two-cell sparse case; image 1: empty and fully annotated (all background).
    loss = SparseDetectionLoss(NUM_CLASSES, SPEC)
    single = two_cell_targets()
    batch = {
        "boxes": torch.cat([single["boxes"], torch.zeros(1, 2, 4)]),
        "labels": torch.cat([single["labels"], torch.full((1, 2), IGNORE_INDEX)]),
        "attributes": torch.cat([single["attributes"], torch.full((1, 2, 2), IGNORE_INDEX)]),
        "regions": torch.tensor([[[0.0, 0, 16, 16]], [WHOLE_IMAGE]]),
        "region_valid": torch.ones(2, 1, dtype=torch.bool),
    }
    outputs = make_outputs(batch_size=2, seed=7)
    terms = loss(outputs, batch)
    first_image = {k: outputs[k][:1] for k in ("cls_logits", "box_deltas", "quality_logits")}
    first_image["attr_logits"] = {k: v[:1] for k, v in outputs["attr_logits"].items()}
    alone = loss({**outputs, **first_image}, single)
    assert terms["num_foreground"].item() == 7
    for key in ("box", "quality", "attributes"):
        assert terms[key].item() == pytest.approx(alone[key].item(), rel=1e-6), key
    assert terms["cls"] > alone["cls"]  # image 1 adds 20 background locations


def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="mode"):
        SparseDetectionLoss(NUM_CLASSES, SPEC, mode="dense")
    with pytest.raises(ValueError, match="unknown loss terms"):
        SparseDetectionLoss(NUM_CLASSES, SPEC, weights={"ciou": 1.0})
    with pytest.raises(ValueError, match="cls_loss"):
        SparseDetectionLoss(NUM_CLASSES, SPEC, cls_loss="softmax")
    targets = two_cell_targets()
    targets["attributes"] = targets["attributes"][..., :1]
    with pytest.raises(ValueError, match="attribute"):
        SparseDetectionLoss(NUM_CLASSES, SPEC)(make_outputs(), targets)


def test_box_weights_stop_only_box_and_quality() -> None:
    loss = SparseDetectionLoss(NUM_CLASSES, SPEC)
    outputs = make_outputs(seed=6)
    targets = two_cell_targets(WHOLE_IMAGE)
    plain = loss(outputs, targets)
    targets["box_weights"] = torch.tensor([[1.0, 0.0]])
    class_only = loss(outputs, targets)
    # Cell 1 still trains the class and attributes, but not the box or quality.
    for key in ("cls", "attributes"):
        assert torch.equal(class_only[key], plain[key]), key
    only_cell0 = loss(outputs, two_cell_targets(WHOLE_IMAGE, weights=[1.0, 0.0]))
    for key in ("box", "quality"):
        assert torch.equal(class_only[key], only_cell0[key]), key
        assert class_only[key] < plain[key], key


def test_normaliser_weights_only_change_the_divisor() -> None:
    loss = SparseDetectionLoss(NUM_CLASSES, SPEC)
    outputs = make_outputs(seed=6)
    default = loss(outputs, two_cell_targets(WHOLE_IMAGE, weights=[1.0, 0.5]))
    targets = two_cell_targets(WHOLE_IMAGE, weights=[1.0, 0.5])
    targets["normaliser_weights"] = torch.tensor([[1.0, 1.0]])
    ones = loss(outputs, targets)
    for key in TERMS:
        assert torch.equal(default[key], ones[key]), key
    # Cell 1 (a pseudo-label, say) counted 0: the positive count is cell 0's alone, and every
    # term is the same sum over a smaller divisor.
    targets["normaliser_weights"] = torch.tensor([[1.0, 0.0]])
    expert = loss(outputs, targets)
    assert expert["num_foreground"].item() == len(CELL0_LOCATIONS)
    scale = default["num_foreground"] / expert["num_foreground"]
    for key in ("cls", "box", "quality", "attributes"):
        assert expert[key].item() == pytest.approx((default[key] * scale).item(), rel=1e-6), key


def test_supervised_fraction_counts_locations_with_a_classification_loss() -> None:
    targets = two_cell_targets()  # 12 of the 20 locations are ignored (see the fixture test)
    masked = SparseDetectionLoss(NUM_CLASSES, SPEC)(make_outputs(), targets)
    assert masked["supervised_fraction"].item() == pytest.approx(8 / 20)
    naive = SparseDetectionLoss(NUM_CLASSES, SPEC, mode="naive")(make_outputs(), targets)
    assert naive["supervised_fraction"].item() == 1.0
    whole = SparseDetectionLoss(NUM_CLASSES, SPEC)(make_outputs(), two_cell_targets(region=WHOLE_IMAGE))
    assert whole["supervised_fraction"].item() == 1.0
    assert not whole["supervised_fraction"].requires_grad


def test_distribution_focal_loss_hand_computed() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5]] * 4)
    log_p = torch.log_softmax(logits[0], dim=0)
    targets = torch.tensor([1.25, 3.0, 7.0, -1.0])
    loss = distribution_focal_loss(logits, targets)
    # 1.25 sits between bins 1 and 2 with weights 0.75 / 0.25; 3.0 is the top bin (all mass on
    # it); 7.0 and -1.0 are clamped to the top and the bottom bin.
    expected = torch.stack(
        [-(0.75 * log_p[1] + 0.25 * log_p[2]), -log_p[3], -log_p[3], -log_p[0]]
    )
    torch.testing.assert_close(loss, expected)


def test_distribution_focal_loss_is_stationary_at_the_two_bin_mixture() -> None:
    # The cross-entropy to the mixture 0.6 / 0.4 of bins 2 and 3 has zero gradient exactly when
    # the distribution is that mixture (softmax - target = 0); its expectation is then 2.4.
    mixture = torch.tensor([1e-12, 1e-12, 0.6, 0.4, 1e-12])
    logits = mixture.log()[None].requires_grad_()
    loss = distribution_focal_loss(logits, torch.tensor([2.4]))
    loss.sum().backward()
    assert logits.grad.abs().max() < 1e-6
    assert float((logits.detach().softmax(-1) * torch.arange(5.0)).sum()) == pytest.approx(2.4, abs=1e-6)
    moved = distribution_focal_loss(torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0]]), torch.tensor([2.4]))
    assert float(moved) > float(loss.detach())


def distribution_outputs(num_bins: int = 6, seed: int = 3) -> tuple[dict, dict]:
    """`single_cell_outputs` with random side distributions whose expectation is the box."""
    outputs, targets = single_cell_outputs()
    generator = torch.Generator().manual_seed(seed)
    num_points = outputs["points"].shape[0]
    outputs["box_distribution"] = torch.randn(
        1, num_points, 4, num_bins, generator=generator
    ).requires_grad_()  # replaces make_outputs' distribution
    return outputs, targets


def test_dfl_term_hand_computed_and_only_at_positives() -> None:
    outputs, targets = distribution_outputs()
    loss = SparseDetectionLoss(NUM_CLASSES, SPEC)
    terms = loss(outputs, targets)
    # Cell [0,0,16,16]; its positives are the stride-8 locations 0, 1, 4, 5 at (4|12, 4|12).
    points, strides = toy_grid()
    expected = 0.0
    for location in CELL0_LOCATIONS:
        x, y = points[location].tolist()
        sides = torch.tensor([x - 0, y - 0, 16 - x, 16 - y]) / strides[location]
        expected += float(
            distribution_focal_loss(outputs["box_distribution"][0, location].detach(), sides).mean()
        )
    assert terms["dfl"].item() == pytest.approx(expected / 4, rel=1e-6)
    grad = torch.autograd.grad(terms["dfl"], outputs["box_distribution"])[0]
    touched = grad.abs().flatten(2).sum(dim=2)[0] > 0
    assert touched.nonzero()[:, 0].tolist() == CELL0_LOCATIONS


def test_dfl_term_follows_the_box_weights() -> None:
    outputs, targets = distribution_outputs()
    loss = SparseDetectionLoss(NUM_CLASSES, SPEC)
    targets["box_weights"] = torch.tensor([[0.0]])
    assert loss(outputs, targets)["dfl"].item() == 0.0
    targets["box_weights"] = torch.tensor([[0.5]])
    half = loss(outputs, targets)["dfl"].item()
    del targets["box_weights"]
    assert half == pytest.approx(0.5 * loss(outputs, targets)["dfl"].item(), rel=1e-6)


def test_total_weights_the_named_terms() -> None:
    outputs, targets = single_cell_outputs()
    loss = SparseDetectionLoss(NUM_CLASSES, SPEC, weights={"box": 5.0, "attributes": 0.0})
    terms = loss(outputs, targets)
    expected = sum(loss.weights[name] * terms[name] for name in LOSS_TERMS)
    assert loss.total(terms).item() == pytest.approx(expected.item())
    assert loss.weights == {**DEFAULT_LOSS_WEIGHTS, "box": 5.0, "attributes": 0.0}
    assert terms["box"] > 0 and terms["attributes"] > 0  # terms stay unweighted
