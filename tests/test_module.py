"""LldModule pieces that need no Trainer: region filtering, components, optimiser groups."""

from __future__ import annotations

import functools

import pytest
import torch

from lld_lightning.losses import SparseDetectionLoss
from lld_lightning.metrics import keep_inside_regions
from lld_lightning.models import Detector, PostProcess, Readout
from lld_lightning.module import LldModule

TINY = functools.partial(Detector, backbone="test_resnet", fpn_channels=16, readout=None)


def _pred(boxes: list[list[float]]) -> dict[str, torch.Tensor]:
    n = len(boxes)
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
        "scores": torch.linspace(0.9, 0.5, n),
        "labels": torch.arange(n),
        "attributes": torch.zeros(n, 7, dtype=torch.int64),
        "attribute_scores": torch.ones(n, 7),
    }


def test_keep_inside_regions_uses_box_centres() -> None:
    pred = _pred([[0, 0, 10, 10], [40, 40, 60, 60], [95, 0, 125, 10]])  # centres (5,5) (50,50) (110,5)
    target = {"regions": torch.tensor([[0.0, 0.0, 100.0, 30.0]])}
    kept = keep_inside_regions([pred], [target])[0]
    torch.testing.assert_close(kept["boxes"], pred["boxes"][[0]])
    assert kept["attributes"].shape == (1, 7) and kept["labels"].tolist() == [0]
    whole = {"regions": torch.tensor([[0.0, 0.0, 200.0, 200.0]])}
    assert len(keep_inside_regions([pred], [whole])[0]["boxes"]) == 3
    two = {"regions": torch.tensor([[0.0, 0.0, 20.0, 20.0], [100.0, 0.0, 120.0, 20.0]])}
    assert keep_inside_regions([pred], [two])[0]["labels"].tolist() == [0, 2]


def test_components_are_built_for_the_label_space_and_validated() -> None:
    module = LldModule(num_classes=3, attribute_spec={"a": 2}, class_names=["x", "y", "z"], detector=TINY,
                       loss=functools.partial(SparseDetectionLoss, weights={"attributes": 0.5}))
    assert module.detector.num_classes == 3 and module.detector.attribute_spec == {"a": 2}
    assert module.criterion.num_classes == 3 and module.criterion.weights["attributes"] == 0.5
    assert module.settings == PostProcess()
    with pytest.raises(ValueError, match="unknown loss terms"):
        LldModule(detector=TINY, loss=functools.partial(SparseDetectionLoss, weights={"clss": 1.0}))
    with pytest.raises(ValueError, match="class names"):
        LldModule(detector=TINY, num_classes=3, class_names=["a", "b"])
    with pytest.raises(ValueError, match="quality_weight"):
        LldModule(detector=TINY, postprocess=PostProcess(quality_weight=2.0))


def test_hyperparameters_are_plain_values_that_rebuild_the_model() -> None:
    detector = functools.partial(Detector, backbone="test_resnet", fpn_channels=16, box_bins=9,
                                 readout=Readout(pixel_crop=16, copies=3))
    module = LldModule(detector=detector, postprocess=PostProcess(nms_iou=0.7))
    hparams = dict(module.hparams)
    assert hparams["detector"] == {
        "class_path": "lld_lightning.models.detector.Detector",
        "init_args": {"backbone": "test_resnet", "fpn_channels": 16, "box_bins": 9,
                      "readout": {"pixel_crop": 16, "crop_classes": True, "copies": 3, "jitter": 0.1}},
    }
    assert hparams["postprocess"]["nms_iou"] == 0.7
    # Only plain types, so a checkpoint loads with torch.load(weights_only=True).
    def plain(value: object) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (str, int, float, bool))
    assert plain(hparams)
    rebuilt = LldModule(**hparams)  # what a checkpoint reload does
    rebuilt.load_state_dict(module.state_dict())  # strict: the same parameters and shapes
    assert rebuilt.detector.head.box_bins == 9 and rebuilt.detector.readout.copies == 3
    assert rebuilt.settings.nms_iou == 0.7


def test_optimizer_groups_no_decay_for_biases_and_norms() -> None:
    module = LldModule(detector=TINY, lr=0.01, weight_decay=0.05, warmup_steps=2)

    class FakeTrainer:
        estimated_stepping_batches = 10

    module._trainer = FakeTrainer()  # type: ignore[assignment]
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    seen = 0
    for group in optimizer.param_groups:
        assert group["initial_lr"] == pytest.approx(0.01)
        no_decay = all(p.ndim <= 1 for p in group["params"])
        assert group["weight_decay"] == (0.0 if no_decay else 0.05)
        seen += len(group["params"])
    assert seen == sum(1 for p in module.detector.parameters() if p.requires_grad)
    # warm-up then cosine down to min_lr_ratio
    factors = []
    for _ in range(10):
        factors.append(scheduler.get_last_lr()[-1] / optimizer.param_groups[-1]["initial_lr"])
        optimizer.step()
        scheduler.step()
    assert factors[0] == pytest.approx(1 / 3) and factors[1] == pytest.approx(2 / 3)
    assert factors[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[2:], factors[3:], strict=False))
    assert factors[-1] > module.hparams.min_lr_ratio - 1e-9


@pytest.mark.parametrize("clip, fused", [(10.0, False), (None, True)])
def test_fused_adamw_only_without_gradient_clipping(
    clip: float | None, fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Lightning's mixed precision refuses to clip a fused optimizer's gradients (seen on an
    # H200 with every shipped config), so a GPU run with clipping takes the foreach path.
    module = LldModule(detector=TINY)

    class FakeTrainer:
        estimated_stepping_batches = 10
        gradient_clip_val = clip

    module._trainer = FakeTrainer()  # type: ignore[assignment]
    monkeypatch.setattr(LldModule, "device", property(lambda self: torch.device("cuda")))
    optimizer = module.configure_optimizers()["optimizer"]
    assert bool(optimizer.defaults["fused"]) is fused


def test_schedule_length_can_move() -> None:
    module = LldModule(detector=TINY, warmup_steps=0)

    class FakeTrainer:
        estimated_stepping_batches = 1000
        gradient_clip_val = None

    module._trainer = FakeTrainer()  # type: ignore[assignment]
    config = module.configure_optimizers()
    scheduler = config["lr_scheduler"]["scheduler"]
    module.set_schedule_steps(10)  # e.g. a TimeBudget measured the speed: 10 steps fit
    for _ in range(10):
        scheduler.step()
    assert scheduler.get_last_lr()[-1] == pytest.approx(module.hparams.lr * module.hparams.min_lr_ratio)
