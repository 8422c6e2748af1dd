"""`Predictor`: the cells of blood-film images, with named classes and attributes, without a Trainer.

::

    from lld_lightning.predictor import Predictor

    predictor = Predictor.from_checkpoint("runs/sparse/latest/checkpoints/best.ckpt")
    cells = predictor(["film_1.png", "film_2.jpg"])[0]  # one list of cells per image
    for cell in cells:
        print(cell.class_name, round(cell.score, 2), cell.box, cell.attributes["nucleolus"])
    print(predictor.differential_count(cells))  # {"Myeloblast": 3, "Neutrophil": 12, ...}

Images are letterboxed exactly as evaluation and ``lld predict`` do (`DeviceAugmentation` with
``train=False``), detected by `LldModule.detect` (or an exported model, `Predictor.from_exported`),
mapped back to the original pixels (`invert_boxes`) and kept as ``lld predict`` keeps them
(`select_cells`: ``min_score``, then one cell per ``cell_iou`` overlap).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from lld_lightning.boxes import nms
from lld_lightning.constants import LLD_ATTRIBUTE_VALUES
from lld_lightning.data.images import DEFAULT_MAX_IMAGE_PIXELS, _to_rgb_array, read_image
from lld_lightning.data.red_cells import (
    AUTO_PIXEL_SIZE,
    PixelSizeEstimate,
    estimate_pixel_size,
    pixel_size_option,
)
from lld_lightning.data.sample import Batch, collate
from lld_lightning.data.transforms import Augmentation, DeviceAugmentation, invert_boxes
from lld_lightning.models.postprocess import Detections

#: What `Predictor` accepts as one image: a file path, a PIL image, an ``[H, W, 3]`` (or
#: ``[H, W]``) uint8 numpy array, or a uint8 ``[3, H, W]`` tensor.
ImageLike = str | Path | Image.Image | np.ndarray | Tensor

#: The evaluation size of a checkpoint whose data settings do not say (`LldDataModule`'s default).
DEFAULT_IMAGE_SIZE: int = 640


@dataclass(frozen=True)
class Cell:
    """One detected cell.

    Attributes:
        box: ``(x1, y1, x2, y2)`` in the original image's pixels.
        label: class index.
        class_name: class name.
        score: detection score in ``[0, 1]``.
        attributes: ``{attribute: (value name, probability)}``, in the model's attribute order.
    """

    box: tuple[float, float, float, float]
    label: int
    class_name: str
    score: float
    attributes: dict[str, tuple[str, float]]


def attribute_value_names(
    attribute_spec: dict[str, int], attribute_columns: dict[str, Sequence[str]] | None = None
) -> dict[str, list[str]]:
    """Readable value names per attribute: the data's attribute columns, else LLD's table, else
    the value indices (whichever has the right number of values)."""
    columns = attribute_columns or {}
    names = {}
    for name, count in attribute_spec.items():
        values = columns.get(name) or LLD_ATTRIBUTE_VALUES.get(name)
        names[name] = (
            list(values)
            if values is not None and len(values) == count
            else [str(i) for i in range(count)]
        )
    return names


def to_original_pixels(boxes: Tensor, transform: Tensor, height: int, width: int) -> Tensor:
    """Boxes ``[N, 4]`` from letterboxed pixels back to the original image's, clipped to it.

    Args:
        boxes: float ``[N, 4]`` xyxy in model-input pixels.
        transform: float ``[3, 3]``, the image's ``batch["transform"]``.
        height: original height.
        width: original width.
    """
    original = invert_boxes(boxes[None], transform[None])[0]  # [N, 4]
    original[:, 0::2] = original[:, 0::2].clamp(0, width)
    original[:, 1::2] = original[:, 1::2].clamp(0, height)
    return original


def select_cells(
    boxes: Tensor, scores: Tensor, min_score: float = 0.3, cell_iou: float | None = 0.5
) -> Tensor:
    """Which detections are cells: int64 indices, best score first.

    A detection with no area left in the original image is not a cell: the detector also reads
    the letterbox padding of a non-square image, and a box there is clipped to nothing when it
    is mapped back (`to_original_pixels`).

    Args:
        boxes: float ``[N, 4]`` xyxy in original pixels.
        scores: float ``[N]``.
        min_score: detections scoring below this are left out.
        cell_iou: of detections overlapping above this IoU, whatever their class, only the best
            is kept; ``None`` keeps all.
    """
    has_area = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    keep = ((scores >= min_score) & has_area).nonzero(as_tuple=True)[0]
    if cell_iou is not None and keep.numel():
        keep = keep[nms(boxes[keep], scores[keep], cell_iou)]
    return keep


def cells_from_detections(
    detections: Detections,
    class_names: Sequence[str],
    value_names: dict[str, list[str]],
    min_score: float = 0.3,
    cell_iou: float | None = 0.5,
) -> list[Cell]:
    """`Cell` records of one image's detections (boxes already in original pixels), selected
    by `select_cells`."""
    keep = select_cells(detections["boxes"], detections["scores"], min_score, cell_iou)
    boxes = detections["boxes"][keep].tolist()
    scores = detections["scores"][keep].tolist()
    labels = detections["labels"][keep].tolist()
    attributes = detections["attributes"][keep].tolist()
    probabilities = detections["attribute_scores"][keep].tolist()
    names = list(value_names)
    return [
        Cell(
            box=tuple(float(v) for v in boxes[j]),  # type: ignore[arg-type]
            label=int(labels[j]),
            class_name=class_names[labels[j]],
            score=float(scores[j]),
            attributes={
                name: (value_names[name][attributes[j][a]], float(probabilities[j][a]))
                for a, name in enumerate(names)
            },
        )
        for j in range(len(boxes))
    ]


@dataclass
class LoadedCheckpoint:
    """A checkpoint's model and what prediction needs from its data settings.

    Attributes:
        module: the `LldModule`, in eval mode.
        image_size: the evaluation letterbox side (the data's ``image_size``).
        fill: grey level of the letterbox outside the image (the data's ``augmentation.fill``).
        value_names: `attribute_value_names` from the data's attribute columns.
        working_pixel_size: micrometres per pixel the model works at (the data's
            ``pixel_size.working``), None = it letterboxes.
    """

    module: Any
    image_size: int
    fill: float
    value_names: dict[str, list[str]]
    working_pixel_size: float | None = None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Load a checkpoint with ``weights_only=True`` (no object of ours is unpickled).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a checkpoint of `LldModule` (one line naming the file).
    """
    from lld_lightning.callbacks.checkpoint import read_checkpoint
    from lld_lightning.module import LldModule

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint there")
    # One-line refusals (truncated, foreign, naming code to run) as `lld test` gives them.
    checkpoint = read_checkpoint(path)
    module = LldModule.load_from_checkpoint(path, map_location=device, weights_only=True).eval()
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    reading = data.get("reading") or {}
    augmentation = data.get("augmentation") or {}
    return LoadedCheckpoint(
        module=module,
        image_size=int(data.get("image_size") or DEFAULT_IMAGE_SIZE),
        fill=float(augmentation.get("fill", Augmentation().fill)),
        value_names=attribute_value_names(module.attribute_spec, reading.get("attribute_columns")),
        working_pixel_size=(data.get("pixel_size") or {}).get("working"),
    )


def load_image(image: ImageLike, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Tensor:
    """One image as uint8 ``[3, H, W]`` RGB, converted as the data loaders convert files.

    Raises:
        DataError: an unreadable file (naming it).
        ValueError: an array or tensor of the wrong type or shape.
    """
    if isinstance(image, (str, Path)):
        return read_image(image, max_image_pixels)
    if isinstance(image, Image.Image):
        array = _to_rgb_array(Path("<PIL image>"), image)
        return torch.from_numpy(np.ascontiguousarray(array).copy()).permute(2, 0, 1).contiguous()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (
            image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)
        ):
            raise ValueError(
                f"expected a uint8 [H, W, 3] (or [H, W]) array, got {image.dtype} {list(image.shape)}"
            )
        rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
        return torch.from_numpy(np.ascontiguousarray(rgb).copy()).permute(2, 0, 1).contiguous()
    if isinstance(image, Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(
                f"expected a uint8 [3, H, W] tensor, got {image.dtype} {list(image.shape)}"
            )
        return image.contiguous()
    raise ValueError(
        f"expected a path, a PIL image, a numpy array or a tensor, got {type(image).__name__}"
    )


#: ``pixel_size_um`` of `Predictor`: micrometres per pixel, `AUTO_PIXEL_SIZE` (measured from the
#: images' red cells) or None (unknown).
PixelSizeArg = float | Literal["auto"] | None



def collate_images(
    images: Sequence[Tensor], num_attributes: int, pixel_size_um: float | None = None
) -> Batch:
    """A `Batch` of unlabelled uint8 ``[3, H, W]`` images, all of pixel size ``pixel_size_um``."""
    return collate(
        [
            {
                "image": image,
                "boxes": torch.zeros((0, 4)),
                "labels": torch.zeros((0,), dtype=torch.int64),
                "attributes": torch.zeros((0, num_attributes), dtype=torch.int64),
                "regions": torch.zeros((0, 4)),
                "domain": "",
                "image_id": i,
                "path": "",
                "pixel_size_um": math.nan if pixel_size_um is None else float(pixel_size_um),
            }
            for i, image in enumerate(images)
        ]
    )


class Predictor:
    """Cells with named classes and attributes from images, in the original images' pixels.

    Build it with `from_checkpoint` or `from_exported`; call it on images.

    Args:
        detect: letterboxed float ``[B, 3, S, S]`` images -> per-image detections in input pixels
            (`LldModule.detect`, `ExportedModel.detect`).
        class_names: class names, index = class id.
        value_names: ``{attribute: [value names]}`` in the model's attribute order.
        image_size: side ``S`` of the letterbox.
        min_score: cells scoring below this are left out (``lld predict``'s default).
        cell_iou: of cells overlapping above this IoU, whatever their class, only the best is
            kept; ``None`` keeps all.
        fill: grey level of the letterbox outside the image.
        device: where letterbox and ``detect`` run.
        batch_size: images per ``detect`` call.
        working_pixel_size: micrometres per pixel the model works at; images whose pixel size
            is given are resampled to it instead of letterboxed. None = the model letterboxes.
        fixed_input: ``detect`` takes only ``S x S`` inputs (an exported model): an image
            resampled beyond ``S`` is refused instead of given a larger canvas.
    """

    def __init__(
        self,
        detect: Callable[[Tensor], list[Detections]],
        class_names: Sequence[str],
        value_names: dict[str, list[str]],
        image_size: int,
        min_score: float = 0.3,
        cell_iou: float | None = 0.5,
        fill: float = 0.5,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        working_pixel_size: float | None = None,
        fixed_input: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.detect = detect
        self.class_names = list(class_names)
        self.value_names = {name: list(values) for name, values in value_names.items()}
        self.image_size = int(image_size)
        self.min_score = min_score
        self.cell_iou = cell_iou
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.working_pixel_size = working_pixel_size
        self.fixed_input = fixed_input
        #: What the last ``pixel_size_um="auto"`` call measured.
        self.pixel_size_estimate: PixelSizeEstimate | None = None
        self.letterbox = DeviceAugmentation(
            self.image_size, False, Augmentation(fill=fill), working_pixel_size=working_pixel_size
        )

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        image_size: int | None = None,
        min_score: float = 0.3,
        cell_iou: float | None = 0.5,
        batch_size: int = 8,
    ) -> Predictor:
        """A predictor running a checkpoint's `LldModule.detect` (loaded with ``weights_only``).

        Args:
            path: a checkpoint written by ``lld fit``.
            device: ``cpu``, ``cuda``, ``cuda:1`` ...
            image_size: letterbox side; default: the checkpoint's data ``image_size``.
            min_score: see `Predictor`.
            cell_iou: see `Predictor`.
            batch_size: see `Predictor`.
        """
        loaded = load_checkpoint(path, device)
        module = loaded.module

        def detect(images: Tensor) -> list[Detections]:
            with torch.inference_mode():
                return module.detect(images)

        return cls(
            detect,
            module.class_names,
            loaded.value_names,
            image_size or loaded.image_size,
            min_score=min_score,
            cell_iou=cell_iou,
            fill=loaded.fill,
            device=device,
            batch_size=batch_size,
            working_pixel_size=loaded.working_pixel_size,
        )

    @classmethod
    def from_exported(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        min_score: float = 0.3,
        cell_iou: float | None = 0.5,
        batch_size: int = 8,
    ) -> Predictor:
        """A predictor running a model written by ``lld export`` (`ExportedModel`: ONNX in
        onnxruntime, TorchScript in ``torch.jit``); class and value names from its metadata."""
        from lld_lightning.tools.export import ExportedModel

        model = ExportedModel(path, device=device)
        return cls(
            model.detect,
            model.class_names,
            model.value_names,
            model.image_size,
            min_score=min_score,
            cell_iou=cell_iou,
            fill=model.fill,
            device=model.device,
            batch_size=batch_size,
            working_pixel_size=model.metadata.get("working_pixel_size_um"),
            fixed_input=True,
        )

    def __call__(
        self, images: ImageLike | Sequence[ImageLike], pixel_size_um: PixelSizeArg = None
    ) -> list[list[Cell]]:
        """The cells of each image (one image or a list of them), best score first.

        Args:
            images: one image or a list of them.
            pixel_size_um: micrometres per pixel of these images (one microscope), None =
                unknown (letterboxed), ``"auto"`` = measured from their red cells (all of them
                pooled: give images of one microscope; the result is kept in
                `pixel_size_estimate`). Only for a model with a working resolution.

        Returns:
            One list of `Cell` per image, in input order (a list of one for a single image).
        """
        return [
            cells_from_detections(
                d, self.class_names, self.value_names, self.min_score, self.cell_iou
            )
            for d in self.detections(images, pixel_size_um)
        ]

    def detections(
        self, images: ImageLike | Sequence[ImageLike], pixel_size_um: PixelSizeArg = None
    ) -> list[Detections]:
        """Every detection of each image before `select_cells`, boxes in original pixels (what
        `LldModule.predict_step` gives ``lld predict``'s writer): ``boxes [N, 4]``, ``scores``,
        ``labels``, ``attributes [N, A]``, ``attribute_scores [N, A]``, on the CPU.
        ``pixel_size_um`` as in `__call__`."""
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        loaded = [load_image(x) for x in items]
        pixel_size = self._pixel_size(pixel_size_um, loaded)
        results: list[Detections] = []
        for start in range(0, len(loaded), self.batch_size):
            results.extend(self._detect_batch(loaded[start : start + self.batch_size], pixel_size))
        return results

    def _pixel_size(self, pixel_size_um: PixelSizeArg, images: list[Tensor]) -> float | None:
        if pixel_size_um is None:
            return None
        value = pixel_size_option(pixel_size_um, self.working_pixel_size)
        if value == AUTO_PIXEL_SIZE:
            self.pixel_size_estimate = estimate_pixel_size(images)
            return self.pixel_size_estimate.pixel_size_um
        return float(value)

    def _detect_prepared(self, batch: Batch) -> tuple[Batch, list[Detections]]:
        """Letterbox (or resample) a collated batch on the device and detect: (view, detections)."""
        batch = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        view = self.letterbox(batch)
        if self.fixed_input and view["image"].shape[-1] != self.image_size:
            raise ValueError(
                f"an image resampled to {self.working_pixel_size} um per pixel needs a "
                f"{view['image'].shape[-1]}-pixel input; this exported model takes "
                f"{self.image_size}: export it again with a larger --image_size, or crop the image"
            )
        return view, self.detect(view["image"])

    def _detect_batch(self, images: list[Tensor], pixel_size: float | None) -> list[Detections]:
        batch = collate_images(images, len(self.value_names), pixel_size)
        letterboxed, preds = self._detect_prepared(batch)
        results = []
        for i, pred in enumerate(preds):
            height, width = (int(v) for v in batch["image_size"][i])
            boxes = to_original_pixels(
                pred["boxes"].float(),
                letterboxed["transform"][i].to(pred["boxes"].device),
                height,
                width,
            )
            results.append(
                {
                    **{
                        k: v.detach().float().cpu() if v.is_floating_point() else v.cpu()
                        for k, v in pred.items()
                    },
                    "boxes": boxes.detach().float().cpu(),
                }
            )
        return results

    def differential_count(self, cells: Sequence[Cell]) -> dict[str, int]:
        """Cells per class of one image (the differential count), every class, in class order."""
        counts = dict.fromkeys(self.class_names, 0)
        for cell in cells:
            counts[cell.class_name] += 1
        return counts
