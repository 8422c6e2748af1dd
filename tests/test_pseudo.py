"""The pseudo-labeller: filters, view mapping, EMA teacher, warm-up, self-training, quality."""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.plugins import Precision

from lld_lightning.callbacks.pseudo import (
    PseudoLabeller,
    cap_per_image,
    pseudo_label_quality,
    visible,
)
from lld_lightning.constants import IGNORE_INDEX
from lld_lightning.data.datamodule import LldDataModule
from lld_lightning.data.sample import pack_per_image
from lld_lightning.data.transforms import Augmentation, DeviceAugmentation, GeometryParams
from lld_lightning.models import Detector
from lld_lightning.module import LldModule
from tests.conftest import REPO

S = 64


def _batch(num_images: int = 1) -> dict:
    """A letterboxed batch of 64x64 images, identity transforms, one expert cell per image."""
    eye = torch.eye(3).expand(num_images, 3, 3).clone()
    return {
        "image": torch.zeros(num_images, 3, S, S),
        "image_size": torch.full((num_images, 2), S),
        "transform": eye,
        "boxes": torch.tensor([[[2.0, 2.0, 12.0, 12.0]]]).repeat(num_images, 1, 1),
        "labels": torch.tensor([[1]]).repeat(num_images, 1),
        "attributes": torch.tensor([[[0, 1]]]).repeat(num_images, 1, 1),
        "regions": torch.tensor([[[0.0, 0.0, 20.0, 20.0]]]).repeat(num_images, 1, 1),
        "region_valid": torch.ones(num_images, 1, dtype=torch.bool),
    }


def _with_teacher_view(batch: dict) -> dict:
    for key in ("image", "transform", "boxes", "labels", "regions", "region_valid"):
        batch[f"teacher_{key}"] = batch[key].clone()
    return batch


def _preds(
    boxes: list[list[float]],
    scores: list[float],
    labels: list[int],
    attribute_scores: list[list[float]] | None = None,
) -> dict[str, torch.Tensor]:
    n = len(boxes)
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
        "scores": torch.tensor(scores),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "attributes": torch.tensor([[1, 0]] * n, dtype=torch.int64).reshape(n, 2),
        "attribute_scores": torch.tensor(attribute_scores or [[0.9, 0.9]] * n).reshape(n, 2),
    }


def _labeller(**kwargs) -> PseudoLabeller:
    labeller = PseudoLabeller(**kwargs)
    labeller.thresholds = torch.tensor([labeller.threshold] * 3)
    return labeller


def test_inside_regions_and_expert_overlaps_are_never_pseudo_labelled() -> None:
    batch = _with_teacher_view(_batch())
    preds = [
        _preds(
            [
                [4.0, 4.0, 10.0, 10.0],  # centre (7, 7) inside the region: only experts count there
                [16.0, 2.0, 26.0, 12.0],  # centre (21, 7) outside, IoU with the expert box 0
                [3.0, 3.0, 13.0, 13.0],  # IoU 81/119 = 0.68 with the expert box (centre inside too)
                [40.0, 40.0, 50.0, 50.0],
            ],  # far outside
            [0.9, 0.8, 0.95, 0.7],
            [2, 2, 2, 0],
        )
    ]
    stats = _labeller(threshold=0.5).select_and_append(batch, preds, "teacher_")
    assert int(stats["num_pseudo"]) == 2
    assert batch["boxes"].shape == (1, 3, 4)
    torch.testing.assert_close(
        batch["boxes"][0, 1:], torch.tensor([[16.0, 2.0, 26.0, 12.0], [40.0, 40.0, 50.0, 50.0]])
    )
    assert batch["labels"].tolist() == [[1, 2, 0]]
    assert batch["weights"].tolist() == [[1.0, 0.5, 0.5]]  # the teacher recipe's weight
    assert (batch["attributes"][0, 1:] == IGNORE_INDEX).all()  # by default no attribute is copied


def test_expert_overlap_above_half_removed_below_kept() -> None:
    batch = _with_teacher_view(_batch())
    batch["regions"] = batch["teacher_regions"] = torch.tensor([[[50.0, 50.0, 60.0, 60.0]]])
    preds = [
        _preds(
            [
                [3.0, 3.0, 13.0, 13.0],  # IoU 0.68 > 0.5: the expert's cell, removed
                [7.0, 2.0, 17.0, 12.0],
            ],  # IoU 50/150 = 0.33: another cell, kept
            [0.9, 0.9],
            [1, 1],
        )
    ]
    _labeller().select_and_append(batch, preds, "teacher_")
    torch.testing.assert_close(batch["boxes"][0, 1], torch.tensor([7.0, 2.0, 17.0, 12.0]))
    assert batch["boxes"].shape[1] == 2


def test_threshold_per_class_weight_and_attribute_threshold() -> None:
    batch = _with_teacher_view(_batch(2))
    boxes = [[30.0, 30.0, 40.0, 40.0], [45.0, 45.0, 55.0, 55.0], [30.0, 45.0, 40.0, 55.0]]
    preds = [
        _preds(boxes, [0.5, 0.49, 0.65], [0, 0, 2], [[0.7, 0.69]] * 3),
        _preds(boxes[:1], [0.99], [2]),
    ]
    labeller = _labeller(threshold=0.5, weight=0.3, attribute_threshold=0.7)
    labeller.thresholds = torch.tensor([0.5, 0.5, 0.7])  # class_thresholds {"2": 0.7}
    stats = labeller.select_and_append(batch, preds, "teacher_")
    # image 0: 0.5 >= 0.5 kept, 0.49 dropped, class 2 at 0.65 < 0.7 dropped; image 1: kept.
    assert int(stats["num_pseudo"]) == 2
    assert batch["labels"].tolist() == [[1, 0], [1, 2]]
    torch.testing.assert_close(batch["weights"], torch.tensor([[1.0, 0.3], [1.0, 0.3]]))
    assert batch["attributes"][0, 1].tolist() == [1, IGNORE_INDEX]  # probability 0.69 < 0.7


def test_class_thresholds_by_name_and_unknown_name_rejected() -> None:
    module = SimpleNamespace(class_names=["a", "b"], device=torch.device("cpu"))
    labeller = PseudoLabeller(mode="self", class_thresholds={"b": 0.99})
    labeller.on_fit_start(SimpleNamespace(global_step=0), module)
    assert labeller.thresholds.tolist() == pytest.approx([0.95, 0.99])
    with pytest.raises(ValueError, match="unknown classes"):
        PseudoLabeller(mode="self", class_thresholds={"c": 0.5}).on_fit_start(
            SimpleNamespace(global_step=0), module
        )


def test_weak_to_strong_mapping_is_exact_for_a_flip() -> None:
    # A 100 x 50 image: letterbox scale 0.64, content 64 x 32. A flip maps x -> 64 - x.
    raw = {
        "image": torch.zeros(1, 3, 50, 100, dtype=torch.uint8),
        "image_size": torch.tensor([[50, 100]]),
        "boxes": torch.tensor([[[60.0, 30.0, 80.0, 45.0]]]),
        "labels": torch.tensor([[4]]),
        "attributes": torch.zeros(1, 1, 2, dtype=torch.int64),
        "regions": torch.tensor([[[50.0, 25.0, 100.0, 50.0]]]),
        "region_valid": torch.ones(1, 1, dtype=torch.bool),
    }
    params = GeometryParams.identity(1)
    params.hflip = torch.tensor([True])
    letterbox = Augmentation(crop_size=None)
    batch = DeviceAugmentation(S, train=True, augmentation=letterbox)(raw, params=params)
    weak = DeviceAugmentation(S, train=False)(raw)
    for key in ("image", "transform", "boxes", "labels", "regions", "region_valid"):
        batch[f"teacher_{key}"] = weak[key]
    # The teacher finds the original box (10, 5, 30, 25): weak (6.4, 3.2, 19.2, 16).
    preds = [_preds([[6.4, 3.2, 19.2, 16.0]], [0.9], [3])]
    _labeller().select_and_append(batch, preds, "teacher_")
    torch.testing.assert_close(batch["boxes"][0, 1], torch.tensor([44.8, 3.2, 57.6, 16.0]))
    torch.testing.assert_close(batch["boxes"][0, 0], torch.tensor([12.8, 19.2, 25.6, 28.8]))


def test_self_mode_is_the_reference_behaviour() -> None:
    labeller = PseudoLabeller(mode="self")
    assert (labeller.threshold, labeller.weight, labeller.recipe.expert_iou) == (0.95, 0.1, 0.0)
    assert labeller.teacher is None
    batch = _batch()
    labeller.thresholds = torch.tensor([0.95] * 3)
    preds = [
        _preds(
            [
                [14.0, 14.0, 18.0, 18.0],  # inside the region: kept (no region check)
                [11.0, 2.0, 19.0, 10.0],  # touches the expert box (IoU > 0): dropped
                [30.0, 30.0, 40.0, 40.0],  # kept
                [31.0, 31.0, 41.0, 41.0],  # IoU 0.68 with it, other class: agnostic NMS
                [50.0, 50.0, 60.0, 60.0],
            ],  # exactly 0.95: dropped (strictly greater)
            [0.97, 0.99, 0.98, 0.96, 0.95],
            [1, 1, 2, 0, 1],
        )
    ]
    labeller.select_and_append(batch, preds, "")
    assert batch["boxes"][0, 1:].tolist() == [[30.0, 30.0, 40.0, 40.0], [14.0, 14.0, 18.0, 18.0]]
    torch.testing.assert_close(batch["weights"], torch.tensor([[1.0, 0.1, 0.1]]))


def test_precision_and_recall_on_a_hand_case() -> None:
    hidden_boxes = torch.tensor(
        [[[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [40.0, 40.0, 50.0, 50.0]]]
    )
    hidden_labels = torch.tensor([[1, 2, 3]])
    outside = torch.tensor([[False, True, True]])
    boxes = torch.tensor(
        [
            [21.0, 21.0, 31.0, 31.0],  # IoU 81/119 with cell 1, class 2: right
            [40.0, 40.0, 50.0, 50.0],  # cell 2 but class 1: wrong
            [0.0, 0.0, 6.0, 10.0],
        ]
    )  # IoU 0.6 with cell 0, class 1: right
    counts = pseudo_label_quality(
        boxes,
        torch.tensor([2, 1, 1]),
        torch.zeros(3, dtype=torch.int64),
        hidden_boxes,
        hidden_labels,
        outside,
    )
    assert {k: int(v) for k, v in counts.items()} == {
        "num_pseudo": 3,
        "num_correct": 2,
        "num_hidden": 2,
        "num_found": 1,
    }


def test_pack_per_image_keeps_order_and_pads() -> None:
    packed = pack_per_image({"v": torch.tensor([5, 6, 7])}, torch.tensor([0, 0, 2]), 3)
    assert packed["v"].tolist() == [[5, 6], [0, 0], [7, 0]]
    assert packed["valid"].tolist() == [[True, True], [False, False], [True, False]]


def _tiny_module() -> LldModule:
    return LldModule(
        num_classes=3,
        attribute_spec={"a": 2, "b": 2},
        detector=functools.partial(Detector, backbone="test_resnet", fpn_channels=32, readout=None),
    )


def test_warmup_then_ema_teacher_outside_optimizer_and_gradients() -> None:
    torch.manual_seed(0)
    module = _tiny_module()
    trainer = SimpleNamespace(global_step=0, precision_plugin=Precision())
    labeller = PseudoLabeller(threshold=0.0, warmup_steps=2, ema_decay=0.5)
    labeller.on_fit_start(trainer, module)
    module.log = lambda *args, **kwargs: None
    teacher_ids = {id(p) for p in labeller.teacher.parameters()}
    assert not teacher_ids & {id(p) for p in module.parameters()}
    assert all(not p.requires_grad for p in labeller.teacher.parameters())

    batch = _with_teacher_view(_batch(2))
    labeller.on_train_batch_start(trainer, module, batch, 0)
    assert "weights" not in batch and batch["boxes"].shape[1] == 1  # warm-up: experts only
    assert int(labeller.teacher.n_averaged) == 0

    trainer.global_step = 2
    labeller.on_train_batch_start(trainer, module, batch, 0)
    assert int(labeller.teacher.n_averaged) == 1  # the teacher starts as a copy of the student
    assert batch["weights"].shape == batch["labels"].shape and batch["boxes"].shape[1] > 1

    loss = module.criterion.total(module.criterion(module(batch["image"]), batch))
    loss.backward()
    assert all(p.grad is None for p in labeller.teacher.parameters())
    student = next(module.detector.parameters())
    before = next(labeller.teacher.module.parameters()).clone()
    with torch.no_grad():
        student.add_(1.0)
    trainer.global_step = 3  # one optimizer step later: EMA with decay 0.5
    labeller.on_train_batch_end(trainer, module, None, batch, 0)
    torch.testing.assert_close(
        next(labeller.teacher.module.parameters()), 0.5 * before + 0.5 * student
    )

    restored = PseudoLabeller(warmup_steps=2)
    restored.load_state_dict(labeller.state_dict())
    restored.on_fit_start(trainer, _tiny_module())
    torch.testing.assert_close(
        next(restored.teacher.module.parameters()), next(labeller.teacher.module.parameters())
    )


PSEUDO_CALLBACKS = """
trainer:
  callbacks:
    - class_path: lld_lightning.callbacks.pseudo.PseudoLabeller
      init_args: {threshold: 0.0, warmup_steps: 1, ema_decay: 0.9}
"""


def test_fit_with_the_teacher_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lld_lightning.cli import main

    extra = tmp_path / "pseudo.yaml"
    extra.write_text(PSEUDO_CALLBACKS)
    seen: list[bool] = []
    original = LldModule.training_step

    def recording(self, batch, batch_idx):
        seen.append("weights" in batch)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(LldModule, "training_step", recording)
    monkeypatch.chdir(tmp_path)
    cli = main(
        [
            "fit",
            "--config",
            str(REPO / "configs" / "tiny.yaml"),
            "--config",
            str(extra),
            "--data.synthetic.dir",
            str(tmp_path / "data"),
            "--data.synthetic.sparse_fraction",
            "0.0",
            "--data.sparse_simulation",
            "0.2",
            "--data.keep_hidden",
            "true",
            "--data.teacher_view",
            "true",
            "--data.batch_size",
            "2",
            "--trainer.limit_train_batches",
            "3",
            "--trainer.limit_val_batches",
            "0",
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    labeller = next(c for c in cli.trainer.callbacks if isinstance(c, PseudoLabeller))
    assert seen == [False, True, True]  # step 0 is warm-up; then pseudo-labels reach the loss
    assert labeller.totals["num_images"] == 4 and labeller.totals["num_hidden"] > 0
    optimised = {id(p) for group in cli.trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in labeller.teacher.parameters()}
    assert cli.trainer.logged_metrics.get("train/pseudo_per_image") is not None
    last = tmp_path / "run" / "latest" / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert any(
        "teacher" in value for key, value in state["callbacks"].items() if "PseudoLabeller" in key
    )


def test_teacher_pseudo_labels_do_not_count_in_the_normaliser_self_training_ones_do() -> None:
    preds = [_preds([[40.0, 40.0, 50.0, 50.0]], [0.99], [0])]
    batch = _with_teacher_view(_batch())
    _labeller(threshold=0.5).select_and_append(batch, preds, "teacher_")
    assert batch["weights"].tolist() == [[1.0, 0.5]]
    assert batch["normaliser_weights"].tolist() == [[1.0, 0.0]]
    batch = _batch()
    _labeller(mode="self").select_and_append(batch, preds, "")
    assert "normaliser_weights" not in batch  # the reference counts every positive


def test_teacher_mode_refuses_a_data_module_without_the_teacher_view() -> None:
    module = SimpleNamespace(class_names=["a", "b", "c"])
    plain = SimpleNamespace(datamodule=LldDataModule(teacher_view=False))
    with pytest.raises(ValueError, match="--data.teacher_view true"):
        PseudoLabeller().setup(plain, module, "fit")
    assert not plain.datamodule.teacher_view  # refused, never switched on behind the user's back
    PseudoLabeller(mode="self").setup(plain, module, "fit")  # the student's own view suffices
    PseudoLabeller().setup(plain, module, "validate")  # only fitting makes pseudo-labels
    # The visibility rule is the data module's own, the one its expert cells follow.
    strict = Augmentation(min_visibility=0.6, min_size=4.0)
    with_view = LldDataModule(teacher_view=True, augmentation=strict)
    labeller = PseudoLabeller()
    labeller.setup(SimpleNamespace(datamodule=with_view), module, "fit")
    assert (labeller.min_visibility, labeller.min_size) == (0.6, 4.0)


def test_barely_visible_boxes_are_dropped_and_each_image_capped() -> None:
    moved = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3)
    clipped = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 2.5], [0.0, 0.0, 1.5, 10.0]])
    # Whole; a quarter visible (< 0.3); 1.5 px wide (< 2 px).
    assert visible(moved, clipped, 0.3, 2.0).tolist() == [True, False, False]
    image = torch.tensor([0, 0, 0, 1, 2, 2])
    assert cap_per_image(image, 2, 3).tolist() == [True, True, False, True, True, True]

    batch = _with_teacher_view(_batch())
    preds = [_preds([[40.0, 40.0, 50.0, 50.0], [25.0, 40.0, 35.0, 50.0]], [0.8, 0.9], [0, 2])]
    _labeller(max_per_image=1).select_and_append(batch, preds, "teacher_")
    assert batch["labels"].tolist() == [[1, 2]]  # the higher score of the two


def test_quality_is_measured_only_against_a_hidden_annotation() -> None:
    preds = [_preds([[40.0, 40.0, 50.0, 50.0]], [0.9], [0])]
    batch = _with_teacher_view(_batch())
    assert set(_labeller().select_and_append(batch, preds, "teacher_")) == {"num_pseudo"}
    batch = _with_teacher_view(_batch())
    # The expert cell (inside the region) and two cells outside it, one of them found.
    batch["hidden_boxes"] = torch.tensor(
        [[[2.0, 2.0, 12.0, 12.0], [40.0, 40.0, 50.0, 50.0], [30.0, 2.0, 40.0, 12.0]]]
    )
    batch["hidden_labels"] = torch.tensor([[1, 0, 2]])
    stats = _labeller().select_and_append(batch, preds, "teacher_")
    assert {k: int(v) for k, v in stats.items()} == {
        "num_pseudo": 1,
        "num_correct": 1,
        "num_hidden": 2,
        "num_found": 1,
    }


def test_self_training_detects_with_the_student_and_leaves_it_training() -> None:
    torch.manual_seed(0)
    module = _tiny_module()
    labeller = PseudoLabeller(mode="self", threshold=0.0)
    labeller.on_fit_start(SimpleNamespace(global_step=0), module)
    assert labeller.teacher is None
    batch = _batch(2)
    batch["labels"][:] = IGNORE_INDEX  # no expert cell: an untrained detector's boxes may stay
    stats = labeller.add_pseudo_labels(batch, module)
    assert module.detector.training  # eval mode only for the detection pass
    assert int(stats["num_pseudo"]) > 0
    pseudo = batch["labels"][:, 1:] >= 0
    assert int(pseudo.sum()) == int(stats["num_pseudo"])
    torch.testing.assert_close(batch["weights"][:, 1:], pseudo.float() * 0.1)
