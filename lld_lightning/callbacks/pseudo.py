"""`PseudoLabeller`: learn from the whole field of view of sparsely annotated images.

Only the cells inside one rectangle per training image are labelled; the region-masked loss ignores
everything else. This callback turns confident detections **outside** the annotated regions into
extra targets, so the unlabelled rest of each field of view trains the model too.

Two sources of detections (``mode``):

- ``"teacher"`` (default): an EMA copy of the detector (`ema_copy`) looks at a *weak* view of each
  image (the evaluation letterbox, ``LldDataModule(teacher_view=True)``) while the student trains
  on the strong, augmented view; boxes move between the views with the per-image matrices,
  ``student = transform @ inverse(teacher_transform)``. Inside a region only the expert labels
  count.
- ``"self"``: the reference self-training of the LLD paper's code: the student's own current
  detections on its own view, score > 0.95, weight 0.1, no overlap with an expert box, and no
  check that they lie outside the region.

Every training step after the warm-up, `PseudoLabeller.select_and_append` runs the steps below,
each a function of this module, vectorised over all detections of the batch: `select_by_score`,
`one_class_per_cell`, `overlaps_expert`, `inside_regions` (teacher only), `to_student_view`,
`visible`, `cap_per_image`, `confident_attributes`, `append_pseudo_labels`; `pseudo_label_quality` scores
them when the batch carries the hidden full annotation. Lightning hands the mutated batch on to
``training_step``. See docs/pseudo-labels.md.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.optim.swa_utils import AveragedModel

from lld_lightning.boxes import box_centres, elementwise_iou, nms, points_in_boxes
from lld_lightning.callbacks.ema import ema_copy
from lld_lightning.constants import IGNORE_INDEX, MATCH_IOU
from lld_lightning.data.sample import pack_per_image
from lld_lightning.data.transforms import (
    Augmentation,
    clip_boxes,
    content_boxes,
    invert_boxes,
    transform_boxes,
)
from lld_lightning.models.postprocess import Detections

PseudoMode = Literal["teacher", "self"]

#: IoU above which two pseudo-labels are one cell (class-agnostic NMS: one class per cell).
ONE_CELL_IOU: float = 0.5

#: Batch keys the teacher's view adds (``LldDataModule(teacher_view=True)``).
TEACHER_PREFIX = "teacher_"


@dataclass(frozen=True)
class ModeRecipe:
    """What a mode does by default (``threshold``/``weight`` left unset) and by construction.

    Args:
        threshold: minimum pseudo-label score.
        weight: loss weight of a pseudo-label.
        expert_iou: a pseudo-label overlapping an expert box above this IoU is the expert's cell.
        strict: the score must exceed the threshold (``>``) instead of reaching it (``>=``).
        outside_regions_only: drop pseudo-labels centred inside an annotated region.
        expert_normaliser: pseudo-labels do not count in the loss's positive count, so they add to
            the expert loss instead of diluting it (the loss divides every term by that count).
    """

    threshold: float
    weight: float
    expert_iou: float
    strict: bool
    outside_regions_only: bool
    expert_normaliser: bool


#: The teacher recipe and the LLD reference code's self-training (the sparse study's baseline).
MODES: dict[str, ModeRecipe] = {
    "teacher": ModeRecipe(
        0.6, 0.5, 0.5, strict=False, outside_regions_only=True, expert_normaliser=True
    ),
    "self": ModeRecipe(
        0.95, 0.1, 0.0, strict=True, outside_regions_only=False, expert_normaliser=False
    ),
}


@dataclass
class Candidates:
    """The detections of a whole batch, one row each, in the detector's view."""

    boxes: Tensor  # float [N, 4] xyxy
    scores: Tensor  # float [N]
    labels: Tensor  # int64 [N]
    attributes: Tensor  # int64 [N, A]
    attribute_scores: Tensor  # float [N, A]
    image: Tensor  # int64 [N], the image in the batch

    @classmethod
    def from_detections(cls, preds: list[Detections], device: torch.device) -> Candidates:
        """Concatenate per-image detection dicts (image-major, each image in score order)."""
        counts = torch.tensor([int(p["boxes"].shape[0]) for p in preds], device=device)
        return cls(
            boxes=torch.cat([p["boxes"] for p in preds]).float().to(device),
            scores=torch.cat([p["scores"] for p in preds]).float().to(device),
            labels=torch.cat([p["labels"] for p in preds]).to(device),
            attributes=torch.cat([p["attributes"] for p in preds]).to(device),
            attribute_scores=torch.cat([p["attribute_scores"] for p in preds]).to(device),
            image=torch.repeat_interleave(torch.arange(len(preds), device=device), counts),
        )

    def __getitem__(self, index: Tensor) -> Candidates:
        """The rows ``index`` (bool mask or int64 indices) of every field."""
        return Candidates(
            **{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)}
        )

    def __len__(self) -> int:
        return int(self.scores.shape[0])


# ----------------------------------------------------------------------------------- selection
def select_by_score(scores: Tensor, labels: Tensor, thresholds: Tensor, strict: bool) -> Tensor:
    """bool ``[N]``: scores ``[N]`` reaching (``strict``: exceeding) their class's threshold
    (``thresholds`` ``[C]``)."""
    threshold = thresholds.to(scores.device)[labels.clamp(max=thresholds.numel() - 1)]
    return scores > threshold if strict else scores >= threshold


def one_class_per_cell(boxes: Tensor, scores: Tensor, image: Tensor, iou: float) -> Tensor:
    """int64 indices kept by class-agnostic NMS inside each image, image-major, score order kept."""
    kept = nms(boxes, scores, iou, groups=image)
    return kept[torch.sort(image[kept], stable=True).indices]


def overlaps_expert(
    boxes: Tensor, image: Tensor, expert_boxes: Tensor, expert_labels: Tensor, iou: float
) -> Tensor:
    """bool ``[N]``: boxes overlapping a real expert box of their image by more than ``iou``.

    Args:
        boxes: float ``[N, 4]``; ``image`` int64 ``[N]`` their image.
        expert_boxes: float ``[B, M, 4]``; ``expert_labels`` int64 ``[B, M]`` (padding
            ``IGNORE_INDEX``).
        iou: 0 drops any overlap (the reference code).
    """
    if expert_boxes.shape[1] == 0:
        return torch.zeros_like(image, dtype=torch.bool)
    overlap = elementwise_iou(boxes[:, None], expert_boxes[image].float())  # [N, M]
    return ((overlap > iou) & (expert_labels[image] != IGNORE_INDEX)).any(dim=1)


def inside_regions(boxes: Tensor, image: Tensor, regions: Tensor, region_valid: Tensor) -> Tensor:
    """bool ``[N]``: box centres inside an annotated region of their image (regions
    ``[B, R, 4]``, ``region_valid`` ``[B, R]``), where the expert labelled every cell."""
    centres = box_centres(boxes)[:, None]  # [N, 1, 2]
    return points_in_boxes(centres, regions[image].float(), region_valid[image])[:, 0]


def to_student_view(
    boxes: Tensor, image: Tensor, batch: dict[str, Any], prefix: str
) -> tuple[Tensor, Tensor]:
    """Map boxes from the detector's view to the student's, clipped to the visible content.

    Args:
        boxes: float ``[N, 4]`` in the view of ``prefix`` (``"teacher_"`` or ``""``, the
            student's own); ``image`` int64 ``[N]``.
        batch: reads ``transform``, ``image``, ``image_size`` and ``<prefix>transform``.

    Returns:
        The mapped boxes before clipping and after it, float ``[N, 4]`` each.
    """
    student_transform = batch["transform"].float()  # [B, 3, 3]
    if prefix:
        view_to_original = torch.linalg.inv(batch[f"{prefix}transform"].double()).float()
        to_student = student_transform @ view_to_original
    else:  # the detections were made on the student's own view
        to_student = torch.eye(3, device=boxes.device).expand_as(student_transform)
    moved = transform_boxes(boxes[:, None], to_student[image])[:, 0]  # [N, 4]
    output_size = int(batch["image"].shape[-1])
    bounds = content_boxes(batch["image_size"].to(boxes.device), student_transform, output_size)
    return moved, clip_boxes(moved[:, None], bounds[image])[:, 0]


def visible(moved: Tensor, clipped: Tensor, min_visibility: float, min_size: float) -> Tensor:
    """bool ``[N]``: boxes visible enough to train on, the augmentation's rule for expert cells.

    Args:
        moved: float ``[N, 4]`` whole boxes in the student's view; ``clipped`` their visible part.
        min_visibility: least visible fraction of the box's area.
        min_size: least visible width and height, pixels.
    """
    full_area = (moved[:, 2:] - moved[:, :2]).clamp(min=0).prod(dim=1)  # [N]
    size = (clipped[:, 2:] - clipped[:, :2]).clamp(min=0)  # [N, 2]
    return (
        (size.prod(dim=1) >= min_visibility * full_area)
        & (size >= min_size).all(dim=1)
        & (full_area > 0)
    )


def cap_per_image(image: Tensor, max_per_image: int, batch_size: int) -> Tensor:
    """bool ``[N]``: the first ``max_per_image`` rows of each image (``image`` sorted, so in
    score order the highest scores)."""
    per_image = torch.bincount(image, minlength=batch_size)  # [B]
    rank = (
        torch.arange(image.numel(), device=image.device) - (per_image.cumsum(0) - per_image)[image]
    )
    return rank < max_per_image


def confident_attributes(attributes: Tensor, attribute_scores: Tensor, threshold: float) -> Tensor:
    """int64 ``[N, A]``: each predicted attribute value where its probability reaches
    ``threshold``, else ``IGNORE_INDEX`` (no attribute loss)."""
    return torch.where(attribute_scores >= threshold, attributes, IGNORE_INDEX)


# -------------------------------------------------------------------------------- batch surgery
def append_pseudo_labels(
    batch: dict[str, Any],
    found: Candidates,
    boxes: Tensor,
    attributes: Tensor,
    weight: float,
    expert_normaliser: bool,
) -> None:
    """Append pseudo-labels to the padded targets of ``batch``, in place.

    Writes ``boxes [B, M+K, 4]``, ``labels [B, M+K]``, ``attributes [B, M+K, A]`` and
    ``weights [B, M+K]`` (expert cells keep theirs, pseudo-labels get ``weight``, padding 0).
    ``box_weights`` and ``normaliser_weights`` grow with them where present;
    ``expert_normaliser`` adds ``normaliser_weights`` 0 for the pseudo-labels.

    Args:
        found: the pseudo-labels (labels and image index read), image-major.
        boxes: float ``[K, 4]`` their boxes in the student's view; ``attributes`` int64 ``[K, A]``.
    """
    batch_size = batch["labels"].shape[0]
    expert = (batch["labels"] != IGNORE_INDEX).float()  # [B, M]
    packed = pack_per_image(
        {"boxes": boxes, "labels": found.labels, "attributes": attributes}, found.image, batch_size
    )
    new = packed["valid"].float()  # [B, K]
    padded_labels = torch.where(packed["valid"], packed["labels"], IGNORE_INDEX)
    padded_attributes = torch.where(packed["valid"][..., None], packed["attributes"], IGNORE_INDEX)
    batch["boxes"] = torch.cat([batch["boxes"].float(), packed["boxes"]], dim=1)
    batch["labels"] = torch.cat([batch["labels"], padded_labels], dim=1)
    batch["attributes"] = torch.cat([batch["attributes"], padded_attributes], dim=1)
    _extend(batch, "weights", expert, new * weight)
    if "box_weights" in batch:
        _extend(batch, "box_weights", expert, new * weight)
    if expert_normaliser or "normaliser_weights" in batch:
        counted = torch.zeros_like(new) if expert_normaliser else new
        _extend(batch, "normaliser_weights", torch.ones_like(expert), counted)


def _extend(batch: dict[str, Any], key: str, default: Tensor, new: Tensor) -> None:
    """``batch[key] = cat(batch.get(key, default), new)`` along the cell dimension."""
    batch[key] = torch.cat([batch.get(key, default).float(), new], dim=1)


# ----------------------------------------------------------------------------------- statistics
def pseudo_label_quality(
    boxes: Tensor,
    labels: Tensor,
    image_index: Tensor,
    hidden_boxes: Tensor,
    hidden_labels: Tensor,
    hidden_outside: Tensor,
) -> dict[str, Tensor]:
    """Count pseudo-labels that are right and hidden cells they found (all in original pixels).

    A pseudo-label is correct when some hidden cell of its image has the same class and
    IoU >= `MATCH_IOU`; a hidden cell outside the regions is found when some pseudo-label of its
    image matches it that way.

    Args:
        boxes: float ``[N, 4]`` pseudo-label boxes, xyxy original pixels.
        labels: int64 ``[N]`` their classes.
        image_index: int64 ``[N]`` their image in the batch.
        hidden_boxes: float ``[B, H, 4]`` full annotation, original pixels.
        hidden_labels: int64 ``[B, H]``, ``IGNORE_INDEX`` = padding.
        hidden_outside: bool ``[B, H]``, hidden cells the pseudo-labeller is meant to find.

    Returns:
        int64 scalars ``num_pseudo``, ``num_correct``, ``num_hidden`` (outside the regions) and
        ``num_found``.
    """
    iou = elementwise_iou(boxes[:, None], hidden_boxes[image_index])  # [N, H]
    same = labels[:, None] == hidden_labels[image_index]  # [N, H]; padding (-1) never equals
    match = (iou >= MATCH_IOU) & same  # [N, H]
    found = torch.zeros_like(hidden_outside)
    rows, cols = match.nonzero(as_tuple=True)
    found[image_index[rows], cols] = True
    found &= hidden_outside
    return {
        "num_pseudo": torch.tensor(boxes.shape[0]),
        "num_correct": match.any(dim=1).sum().cpu(),
        "num_hidden": hidden_outside.sum().cpu(),
        "num_found": found.sum().cpu(),
    }


def hidden_outside_regions(batch: dict[str, Any], prefix: str) -> Tensor:
    """bool ``[B, H]``: hidden cells the pseudo-labeller may find: real, centred outside every
    annotated region and inside the content of the detector's view (``prefix``)."""
    view_transform = batch[f"{prefix}transform"].float()  # [B, 3, 3]
    hidden_boxes = batch["hidden_boxes"].float().to(view_transform.device)  # original pixels
    centres = box_centres(transform_boxes(hidden_boxes, view_transform))  # [B, H, 2]
    regions = batch[f"{prefix}regions"].float()  # [B, R, 4]
    inside_region = points_in_boxes(centres, regions, batch[f"{prefix}region_valid"])  # [B, H]
    output_size = int(batch[f"{prefix}image"].shape[-1])
    image_size = batch["image_size"].to(view_transform.device)
    bounds = content_boxes(image_size, view_transform, output_size)  # [B, 4]
    in_view = points_in_boxes(centres, bounds[:, None])  # [B, H]
    real = batch["hidden_labels"].to(view_transform.device) != IGNORE_INDEX
    return real & ~inside_region & in_view


def quality_against_hidden(
    batch: dict[str, Any], found: Candidates, prefix: str
) -> dict[str, Tensor]:
    """`pseudo_label_quality` of ``found`` (boxes in the detector's view, unclipped)."""
    view_transform = batch[f"{prefix}transform"].float()
    original = invert_boxes(found.boxes[:, None], view_transform[found.image])[:, 0]  # [N, 4]
    return pseudo_label_quality(
        original,
        found.labels,
        found.image,
        batch["hidden_boxes"].float().to(original.device),
        batch["hidden_labels"].to(original.device),
        hidden_outside_regions(batch, prefix),
    )


# ------------------------------------------------------------------------------------ callback
class PseudoLabeller(Callback):
    """Adds pseudo-labels outside the annotated regions to every training batch after a warm-up.

    The defaults are the recipe; a config names only the callback (and ``--data.teacher_view
    true``, which the teacher needs)::

        trainer:
          callbacks:
            - class_path: lld_lightning.callbacks.pseudo.PseudoLabeller

    Args:
        mode: ``teacher`` (EMA teacher on the weak view, outside the regions only) or ``self`` (the LLD reference self-training).
        threshold: least score of a pseudo-label; null = the mode's (0.6 teacher, above 0.95 self).
        class_thresholds: per-class overrides ``{class name: threshold}`` (e.g. from ``lld_lightning.tools.score_thresholds``).
        weight: loss weight of a pseudo-label (expert cells weigh 1); null = the mode's (0.5 teacher, 0.1 self).
        warmup_steps: optimizer steps on expert labels only; the teacher starts as a copy of the student then.
        ema_decay: the teacher's EMA decay per optimizer step (about ``1 / (1 - decay)`` steps of memory).
        attribute_threshold: copy a predicted attribute to the pseudo-label at this probability or
            above; null copies none (copied attributes lowered attribute F1, docs/research.md).
        max_per_image: at most this many pseudo-labels per image, highest scores first.
    """

    def __init__(
        self,
        mode: PseudoMode = "teacher",
        threshold: float | None = None,
        class_thresholds: dict[str, float] | None = None,
        weight: float | None = None,
        warmup_steps: int = 500,
        ema_decay: float = 0.99,
        attribute_threshold: float | None = None,
        max_per_image: int = 50,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
        self.mode = mode
        self.recipe = MODES[mode]
        self.threshold = self.recipe.threshold if threshold is None else float(threshold)
        self.class_thresholds = dict(class_thresholds or {})
        self.weight = self.recipe.weight if weight is None else float(weight)
        if not all(0.0 <= t <= 1.0 for t in [self.threshold, *self.class_thresholds.values()]):
            raise ValueError("pseudo-label thresholds must lie in [0, 1]")
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1], got {ema_decay}")
        if self.weight < 0 or max_per_image < 1 or warmup_steps < 0:
            raise ValueError("weight and warmup_steps must be >= 0 and max_per_image >= 1")
        self.warmup_steps = warmup_steps
        self.ema_decay = ema_decay
        self.attribute_threshold = attribute_threshold
        self.max_per_image = max_per_image
        # The augmentation's rule for expert cells; `setup` reads the data module's own.
        self.min_visibility, self.min_size = Augmentation.min_visibility, Augmentation.min_size
        self.thresholds = torch.tensor([self.threshold])  # per class, set in `on_fit_start`
        self.teacher: AveragedModel | None = None
        self._pending_teacher: dict[str, Any] | None = None
        self._last_step = 0
        self.totals = dict.fromkeys(
            ("num_images", "num_pseudo", "num_correct", "num_hidden", "num_found"), 0
        )

    # ------------------------------------------------------------------------------- lifecycle
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if stage != "fit" or datamodule is None:
            return
        if self.mode == "teacher" and not getattr(datamodule, "teacher_view", False):
            raise ValueError(
                "PseudoLabeller(mode='teacher') needs the teacher's view in every training batch: "
                "build the data module with teacher_view=True (--data.teacher_view true)."
            )
        options = getattr(getattr(datamodule, "train_augmentation", None), "options", None)
        if isinstance(options, Augmentation):
            self.min_visibility, self.min_size = options.min_visibility, options.min_size

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.thresholds = self.class_threshold_tensor(list(getattr(pl_module, "class_names", [])))
        self.thresholds = self.thresholds.to(pl_module.device)
        self._last_step = trainer.global_step
        if self.mode == "teacher":
            # An attribute of the callback, not a submodule of the LightningModule: in no
            # optimizer param group and outside DDP's gradient synchronisation.
            self.teacher = ema_copy(pl_module.detector, self.ema_decay)
            if self._pending_teacher is not None:
                self.teacher.load_state_dict(self._pending_teacher)
                self._pending_teacher = None

    def class_threshold_tensor(self, class_names: list[str]) -> Tensor:
        """float ``[C]``: each class's threshold (``threshold`` unless ``class_thresholds`` names it)."""
        unknown = sorted(set(self.class_thresholds) - set(class_names))
        if unknown:
            raise ValueError(
                f"class_thresholds names unknown classes {unknown}; classes: {class_names}"
            )
        thresholds = [self.class_thresholds.get(name, self.threshold) for name in class_names]
        return torch.tensor(thresholds or [self.threshold])

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"totals": dict(self.totals)}
        if self.teacher is not None:
            state["teacher"] = self.teacher.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before `on_fit_start` builds the teacher: applied there.
        self.totals.update(state_dict.get("totals", {}))
        if "teacher" in state_dict:
            if self.teacher is not None:
                self.teacher.load_state_dict(state_dict["teacher"])
            else:
                self._pending_teacher = state_dict["teacher"]

    def active(self, global_step: int) -> bool:
        """Whether pseudo-labels are made at this optimizer step (after the warm-up)."""
        return global_step >= self.warmup_steps

    # ------------------------------------------------------------------------------ training
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.active(trainer.global_step):
            return
        if self.teacher is not None and int(self.teacher.n_averaged) == 0:
            self.teacher.update_parameters(pl_module.detector)  # the first update copies
        # The training precision (e.g. bf16 autocast) for the extra forward pass too.
        with trainer.precision_plugin.forward_context():
            stats = self.add_pseudo_labels(batch, pl_module)
        self._record(stats, batch["image"].shape[0], pl_module)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # One EMA update per optimizer step (global_step counts them, also under accumulation).
        if self.teacher is None or trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        if self.active(trainer.global_step) and int(self.teacher.n_averaged) > 0:
            self.teacher.update_parameters(pl_module.detector)

    @torch.no_grad()
    def add_pseudo_labels(
        self, batch: dict[str, Any], pl_module: L.LightningModule
    ) -> dict[str, Tensor]:
        """Detect, then `select_and_append`; returns the counts of `select_and_append`."""
        preds, prefix = self.detections(batch, pl_module)
        return self.select_and_append(batch, preds, prefix)

    @torch.no_grad()
    def detections(
        self, batch: dict[str, Any], pl_module: L.LightningModule
    ) -> tuple[list[Detections], str]:
        """Raw detections of the teacher (weak view) or of the student (own view), in eval mode.

        Returns:
            Per-image detection dicts and the batch-key prefix of their view (``"teacher_"`` or
            ``""``).
        """
        if self.mode == "teacher":
            if f"{TEACHER_PREFIX}image" not in batch:
                raise KeyError(
                    "PseudoLabeller(mode='teacher') needs batch['teacher_image']: "
                    "set --data.teacher_view true"
                )
            assert self.teacher is not None, "on_fit_start builds the teacher"
            model, prefix = self.teacher.module, TEACHER_PREFIX
        else:
            model, prefix = pl_module.detector, ""
        lowest = float(self.thresholds.min())
        # postprocess keeps scores strictly above its threshold: just below it for ">=".
        settings = dataclasses.replace(
            pl_module.settings,
            score_threshold=lowest if self.recipe.strict else max(0.0, lowest - 1e-6),
            nms_iou=ONE_CELL_IOU,
        )
        images = batch[f"{prefix}image"]
        was_training = model.training
        model.eval()  # running BN statistics; the student's are not disturbed
        try:
            preds = model.detections(
                model(images), images, settings, image_size=tuple(images.shape[-2:])
            )
        finally:
            model.train(was_training)
        return preds, prefix

    def select_and_append(
        self, batch: dict[str, Any], preds: list[Detections], prefix: str
    ) -> dict[str, Tensor]:
        """Filter detections (in the view of ``prefix``) into pseudo-labels and append them to
        ``batch`` (`append_pseudo_labels`).

        Returns:
            ``num_pseudo`` and, when the batch has ``hidden_boxes``, ``num_correct``,
            ``num_hidden`` and ``num_found`` (`pseudo_label_quality`).
        """
        found = self.select(batch, Candidates.from_detections(preds, batch["boxes"].device), prefix)
        moved, clipped = to_student_view(found.boxes, found.image, batch, prefix)
        keep = visible(moved, clipped, self.min_visibility, self.min_size)
        found, clipped = found[keep], clipped[keep]
        keep = cap_per_image(found.image, self.max_per_image, batch["labels"].shape[0])
        found, clipped = found[keep], clipped[keep]
        attributes = confident_attributes(
            found.attributes,
            found.attribute_scores,
            math.inf if self.attribute_threshold is None else self.attribute_threshold,
        )
        append_pseudo_labels(
            batch, found, clipped, attributes, self.weight, self.recipe.expert_normaliser
        )
        stats = {"num_pseudo": torch.tensor(len(found))}
        if "hidden_boxes" in batch:
            stats.update(quality_against_hidden(batch, found, prefix))
        return stats

    def select(self, batch: dict[str, Any], found: Candidates, prefix: str) -> Candidates:
        """The detections that may become pseudo-labels, tested in the detector's own view
        (where the expert boxes and regions are exact), image-major in score order."""
        recipe = self.recipe
        view = {
            key: batch[f"{prefix}{key}"] for key in ("boxes", "labels", "regions", "region_valid")
        }
        found = found[select_by_score(found.scores, found.labels, self.thresholds, recipe.strict)]
        found = found[one_class_per_cell(found.boxes, found.scores, found.image, ONE_CELL_IOU)]
        expert = overlaps_expert(
            found.boxes, found.image, view["boxes"], view["labels"], recipe.expert_iou
        )
        found = found[~expert]
        if recipe.outside_regions_only:
            inside = inside_regions(found.boxes, found.image, view["regions"], view["region_valid"])
            found = found[~inside]
        return found

    # ------------------------------------------------------------------------------- reporting
    def _record(
        self, stats: dict[str, Tensor], batch_size: int, pl_module: L.LightningModule
    ) -> None:
        """Add a batch's counts to the run's totals and log pseudo-labels per image, precision
        and recall (the last two only with the hidden annotation)."""
        self.totals["num_images"] += batch_size
        for key in ("num_pseudo", "num_correct", "num_hidden", "num_found"):
            self.totals[key] += int(stats.get(key, 0))
        per_image = stats["num_pseudo"].float() / batch_size
        pl_module.log("train/pseudo_per_image", per_image, batch_size=batch_size)
        if "num_correct" in stats and int(stats["num_pseudo"]) > 0:
            precision = stats["num_correct"].float() / stats["num_pseudo"].float()
            pl_module.log("train/pseudo_precision", precision, batch_size=batch_size)
        if "num_found" in stats and int(stats["num_hidden"]) > 0:
            recall = stats["num_found"].float() / stats["num_hidden"].float()
            pl_module.log("train/pseudo_recall", recall, batch_size=batch_size)

    def summary(self) -> dict[str, float]:
        """Totals over the run: pseudo-labels per image, precision and recall (NaN when unknown)."""
        t, nan = self.totals, float("nan")
        known = t["num_hidden"] > 0  # the batches carried the hidden annotation
        return {
            "pseudo_per_image": t["num_pseudo"] / t["num_images"] if t["num_images"] else nan,
            "pseudo_precision": t["num_correct"] / t["num_pseudo"]
            if t["num_pseudo"] and known
            else nan,
            "pseudo_recall": t["num_found"] / t["num_hidden"] if known else nan,
        }
