"""``lld adapt``: adapt a trained checkpoint to a new microscope from unlabelled images.

``lld adapt --ckpt_path C --data.predict_root NEW_IMAGES`` writes ``C``'s model with every
BatchNorm layer's running statistics re-estimated on the new images (AdaBN): the stain, the
illumination and the camera of another microscope shift the activations' means and variances,
and a BatchNorm layer trained elsewhere normalises them with the old ones. Nothing else changes:
every weight, and the hyper-parameters, stay as they are; the output loads wherever a checkpoint
does (``lld test|predict --ckpt_path``, `lld_lightning.predictor.Predictor.from_checkpoint`,
``lld export``).

The images go through the evaluation geometry of the checkpoint's data settings: the data module
is rebuilt from the checkpoint's saved data hyper-parameters (then ``--config``'s ``data``
section, then ``--data.*`` flags, which win), with ``predict_root`` set to the new images, and its
``eval_transform`` letterboxes (or resamples) each batch as ``lld predict`` would.

The output holds the weights, the hyper-parameters and `ADAPTATION_KEY` (what was done, on how
many images of which folder, when); the input's optimiser and loop state are dropped, so a fit
cannot resume from it into the weights it was adapted from.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from lightning.pytorch.utilities import move_data_to_device
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn

from lld_lightning.callbacks.checkpoint import (
    RNG_STATES_KEY,
    CheckpointError,
    atomic_save,
    read_checkpoint,
)
from lld_lightning.data.datamodule import LldDataModule
from lld_lightning.data.errors import DataError, error_message
from lld_lightning.data.red_cells import pixel_size_option
from lld_lightning.module import LldModule

#: Top-level checkpoint key recording the adaptation (plain values: ``weights_only`` loadable).
ADAPTATION_KEY = "lld_adaptation"
#: The method `adapt_checkpoint` applies.
METHOD = "adabn"
#: Images read by default: enough for stable per-channel statistics, a minute or two on a GPU.
DEFAULT_MAX_IMAGES = 500
#: Checkpoint entries that only a resumed fit reads; the adapted checkpoint holds weights only.
RESUME_KEYS: tuple[str, ...] = (
    "optimizer_states",
    "lr_schedulers",
    "loops",
    "callbacks",
    "current_model_state",  # Lightning's weight averaging: the pre-average training weights
    "averaging_state",
    RNG_STATES_KEY,
)


class AdaptError(ValueError):
    """Adaptation cannot run; the message is one line and names the file or folder."""


@dataclasses.dataclass
class AdaptResult:
    """What `adapt_model` did.

    Attributes:
        num_images: images whose activations the statistics were estimated from.
        num_layers: BatchNorm layers re-estimated.
        mean_shift: per layer name, the mean absolute change of its running mean, in units of
            the old running standard deviation (how far the new microscope moved it).
    """

    num_images: int
    num_layers: int
    mean_shift: dict[str, float]


# ------------------------------------------------------------------------------- the method
def batch_norm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers that keep running statistics, by module name (frozen
    BatchNorm variants and layers that always use batch statistics have none to adapt)."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
    }


def adapt_model(
    model: nn.Module, batches: Iterable[torch.Tensor], progress: Progress | None = None
) -> AdaptResult:
    """Re-estimate every BatchNorm layer's running mean and variance on ``batches`` (AdaBN).

    Each layer's statistics are reset and averaged over all batches with equal weight (momentum
    ``None``); every other module stays in eval mode and no gradient is computed, so only the
    BatchNorm buffers change. ``model`` is left in eval mode with its layers' momentum restored.

    Args:
        model: a module whose ``forward`` takes the batches (the detector).
        batches: float ``[B, 3, S, S]`` images as the model sees them in evaluation, on its device.
        progress: a Rich progress bar to advance by each batch's image count (task 0).

    Returns:
        What was done (`AdaptResult`).

    Raises:
        AdaptError: the model has no BatchNorm layer, or ``batches`` held no image.
    """
    layers = batch_norm_layers(model)
    if not layers:
        raise AdaptError("the model has no BatchNorm layer to adapt")
    before = {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in layers.items()}
    momenta = {name: m.momentum for name, m in layers.items()}
    model.eval()
    for layer in layers.values():
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over the batches
        layer.train()
    num_images = 0
    try:
        with torch.no_grad():
            for images in batches:
                if images.shape[0] == 0:
                    continue
                model(images)
                num_images += int(images.shape[0])
                if progress is not None:
                    progress.advance(progress.task_ids[0], int(images.shape[0]))
    finally:
        for name, layer in layers.items():
            layer.momentum = momenta[name]
        model.eval()
    if num_images == 0:
        for name, layer in layers.items():  # leave the model as it came
            layer.running_mean.copy_(before[name][0])
            layer.running_var.copy_(before[name][1])
        raise AdaptError("no image could be read")
    shift = {
        name: float(
            ((layer.running_mean - before[name][0]).abs() / before[name][1].clamp_min(1e-12).sqrt())
            .mean()
            .item()
        )
        for name, layer in layers.items()
    }
    return AdaptResult(num_images=num_images, num_layers=len(layers), mean_shift=shift)


# ----------------------------------------------------------------------------------- data
def _known(mapping: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``mapping`` restricted to the keys ``defaults`` has (one level into dataclass groups), so
    that a checkpoint written by another version of the data module still loads."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if key not in defaults:
            continue
        default = defaults[key]
        if dataclasses.is_dataclass(default) and isinstance(value, Mapping):
            names = {field.name for field in dataclasses.fields(default)}
            value = {k: v for k, v in value.items() if k in names}
        out[key] = value
    return out


def _config_data(config: str | Path | None) -> dict[str, Any]:
    """The ``data`` section of an ``lld`` config file (empty without a file)."""
    if config is None:
        return {}
    path = Path(config)
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise AdaptError(f"{path}: cannot read the config: {error_message(error)}") from None
    data = loaded.get("data") if isinstance(loaded, dict) else None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise AdaptError(f"{path}: its data section is not a mapping")
    return data.get("init_args", data) if "class_path" in data else data


def build_datamodule(
    checkpoint: Mapping[str, Any],
    images: str | Path,
    config: str | Path | None = None,
    data: Mapping[str, Any] | None = None,
    data_flags: Sequence[str] = (),
    pixel_size_um: float | str | None = None,
) -> LldDataModule:
    """The checkpoint's data module reading ``images`` (set up for ``predict``).

    Settings, each overriding the one before: `LldDataModule`'s defaults, the checkpoint's
    ``datamodule_hyper_parameters``, ``config``'s ``data`` section, ``data``, ``data_flags``
    (``--data.<name> VALUE`` as ``lld`` takes them); ``predict_root`` is ``images`` and the label
    space is the model's. ``pixel_size_um`` is the images' micrometres per pixel, or
    `AUTO_PIXEL_SIZE` to measure it from their red cells (as ``lld predict --pixel_size_um``).

    Raises:
        AdaptError: the settings do not parse (one line).
        DataError: ``images`` holds no readable image (naming the folder).
    """
    from lightning.pytorch.cli import LightningArgumentParser

    signature = inspect.signature(LldDataModule.__init__).parameters
    defaults = {
        k: p.default for k, p in signature.items() if p.default is not inspect.Parameter.empty
    }
    settings = _known(checkpoint.get("datamodule_hyper_parameters") or {}, defaults)
    for layer in (_config_data(config), dict(data or {})):
        for key, value in layer.items():
            if isinstance(value, Mapping) and isinstance(settings.get(key), Mapping):
                settings[key] = {**settings[key], **value}
            else:
                settings[key] = value
    hparams = checkpoint.get("hyper_parameters") or {}
    for key in ("class_names", "attribute_spec"):
        if hparams.get(key) is not None:
            settings[key] = hparams[key]
    settings["predict_root"] = str(images)
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_class_arguments(LldDataModule, "data", fail_untyped=False, sub_configs=True)
    try:
        parsed = parser.parse_args(
            ["--data", json.dumps(settings), *data_flags, "--data.predict_root", str(images)]
        )
    except (argparse.ArgumentError, SystemExit, ValueError) as error:
        reason = " ".join(str(error).split()) or "invalid data settings"
        raise AdaptError(f"data settings: {reason}") from None
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    datamodule: LldDataModule = instantiate(parsed).data
    if pixel_size_um is not None:
        try:
            checked = pixel_size_option(pixel_size_um, datamodule.pixel_size.working)
        except ValueError as error:
            raise AdaptError(f"--pixel_size_um {pixel_size_um}: {error}") from None
        datamodule.predict_pixel_size_um = checked
    datamodule.setup("predict")
    return datamodule


def _limit(datamodule: LldDataModule, max_images: int, seed: int) -> None:
    """Keep a seeded random ``max_images`` of the images to predict on (all when fewer), in
    their folder order: the statistics of a sample, not of the folder's first sub-folder."""
    dataset = datamodule.predict_set
    assert dataset is not None
    if len(dataset.records) <= max_images:
        return
    chosen = np.sort(np.random.default_rng(seed).permutation(len(dataset.records))[:max_images])
    dataset.records = [dataset.records[i] for i in chosen.tolist()]


def _eval_images(datamodule: LldDataModule, device: torch.device) -> Iterator[torch.Tensor]:
    """The predict images as evaluation sees them: float ``[B, 3, S, S]`` on ``device``."""
    for batch in datamodule.predict_dataloader():
        batch = move_data_to_device(batch, device)
        yield datamodule.eval_transform(batch)["image"]


# ------------------------------------------------------------------------------ the command
def default_output(ckpt_path: str | Path) -> Path:
    """``<folder>/<stem>-adapted.ckpt`` next to the input."""
    path = Path(ckpt_path)
    return path.with_name(f"{path.stem}-adapted.ckpt")


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def adapt_checkpoint(
    ckpt_path: str | Path,
    images: str | Path,
    output: str | Path | None = None,
    max_images: int = DEFAULT_MAX_IMAGES,
    config: str | Path | None = None,
    data: Mapping[str, Any] | None = None,
    data_flags: Sequence[str] = (),
    overwrite: bool = False,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    pixel_size_um: float | str | None = None,
) -> Path:
    """Write ``ckpt_path`` adapted to the microscope of ``images`` (AdaBN, `adapt_model`).

    Args:
        ckpt_path: a checkpoint written by ``lld fit`` (or an adapted one).
        images: a folder of unlabelled images from the new microscope (any layout), or one image.
        output: checkpoint to write; default `default_output`.
        max_images: read at most this many images (a seeded random sample when there are more).
        config: an ``lld`` config whose ``data`` section overrides the checkpoint's data settings.
        data: data settings overriding ``config``'s (``{"batch_size": 16}``).
        data_flags: ``--data.<name> VALUE`` command-line flags, overriding everything else.
        overwrite: replace an existing ``output``.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:1`` ...
        seed: seed of the image sample.
        progress: show a Rich progress bar.
        pixel_size_um: micrometres per pixel of ``images``, or `AUTO_PIXEL_SIZE` (measured from
            their red cells); None = what the data settings give (a model with a working
            resolution resamples the images to it, as ``lld predict`` does).

    Returns:
        The path written.

    Raises:
        AdaptError, CheckpointError, DataError: one line naming the file or folder at fault.
    """
    ckpt_path = Path(ckpt_path)
    output = Path(output) if output is not None else default_output(ckpt_path)
    if max_images < 1:
        raise AdaptError(f"max_images must be at least 1, got {max_images}")
    if output.exists() and not overwrite:
        raise AdaptError(
            f"{output} exists; pass --overwrite to replace it or --output another path"
        )
    if output.resolve() == ckpt_path.resolve():
        raise AdaptError(f"{output} is the input checkpoint; write the adapted one elsewhere")
    checkpoint = read_checkpoint(ckpt_path)
    module = LldModule.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    if not batch_norm_layers(module.detector):
        backbone = _backbone_name(checkpoint)
        raise AdaptError(
            f"{ckpt_path}: the model{backbone} has no BatchNorm layer to adapt (its layers "
            "normalise with LayerNorm or GroupNorm, which keep no running statistics)"
        )
    datamodule = build_datamodule(checkpoint, images, config, data, data_flags, pixel_size_um)
    _limit(datamodule, max_images, seed)
    target = _device(device)
    module.to(target)
    total = len(datamodule.predict_set or [])
    with Progress(
        TextColumn("lld adapt: {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not progress,
        transient=False,
    ) as bar:
        bar.add_task("BatchNorm statistics", total=total)
        try:
            result = adapt_model(module.detector, _eval_images(datamodule, target), bar)
        except AdaptError as error:
            raise AdaptError(f"{images}: {error}") from None
        finally:
            datamodule.teardown("predict")  # prints the images it skipped
    module.cpu()
    adapted = {key: value for key, value in checkpoint.items() if key not in RESUME_KEYS}
    state = module.state_dict()
    missing = sorted(set(checkpoint["state_dict"]) - set(state))
    if missing:
        raise AdaptError(f"{ckpt_path}: the model lacks the checkpoint's weights {missing[:3]}")
    adapted["state_dict"] = {key: state[key] for key in checkpoint["state_dict"]}
    record: dict[str, Any] = {
        "method": METHOD,
        "num_images": result.num_images,
        "num_layers": result.num_layers,
        "source": str(Path(images).resolve()),
        "checkpoint": str(ckpt_path.resolve()),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    sizes = sorted({r.pixel_size_um for r in datamodule.predict_set.records} - {None})
    if sizes:  # the scale the statistics were taken at
        record["pixel_size_um"] = sizes if len(sizes) > 1 else sizes[0]
    if isinstance(checkpoint.get(ADAPTATION_KEY), dict):
        record["previous"] = checkpoint[ADAPTATION_KEY]
    adapted[ADAPTATION_KEY] = record
    atomic_save(adapted, output)
    if progress:
        _print_summary(result)
    return output


def _backbone_name(checkpoint: Mapping[str, Any]) -> str:
    """`` (backbone 'name')`` from the checkpoint's detector settings, or nothing."""
    detector = (checkpoint.get("hyper_parameters") or {}).get("detector")
    init_args = detector.get("init_args") if isinstance(detector, Mapping) else None
    name = init_args.get("backbone") if isinstance(init_args, Mapping) else None
    return f" (backbone {name!r})" if isinstance(name, str) else ""


def _print_summary(result: AdaptResult) -> None:
    """The layers whose statistics moved most, as a table."""
    table = Table(
        title=f"lld adapt: {result.num_layers} BatchNorm layers, {result.num_images} images"
    )
    table.add_column("layer")
    table.add_column("mean shift (old std)", justify="right")
    for name, shift in sorted(result.mean_shift.items(), key=lambda item: -item[1])[:8]:
        table.add_row(name, f"{shift:.3f}")
    Console(stderr=True).print(table)


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The command's own options, and the ``--data.*`` flags it hands to the data module."""
    parser = argparse.ArgumentParser(
        prog="lld adapt",
        description="Adapt a checkpoint to a new microscope from a folder of its unlabelled "
        "images: every BatchNorm layer's running statistics are re-estimated on them (AdaBN), "
        "everything else is kept. Data settings come from the checkpoint; "
        "--config's data section and --data.* flags override them.",
        epilog="--data.predict_root DIR (required): the new microscope's images (any layout). Any "
        "other --data.<name> VALUE overrides a data setting, e.g. --data.batch_size 16 or, for "
        "images of another pixel size, --data.pixel_size.default 0.1 (or --pixel_size_um).",
    )
    parser.add_argument("--ckpt_path", required=True, help="the checkpoint to adapt")
    parser.add_argument(
        "--output",
        default=None,
        help="checkpoint to write (default: <ckpt stem>-adapted.ckpt beside it)",
    )
    parser.add_argument(
        "--max_images",
        type=int,
        default=DEFAULT_MAX_IMAGES,
        help=f"read at most this many images, a seeded random sample (default {DEFAULT_MAX_IMAGES})",
    )
    parser.add_argument("--config", default=None, help="an lld config whose data section applies")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda ...")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image sample (default 0)")
    parser.add_argument(
        "--pixel_size_um",
        default=None,
        help="micrometres per pixel of the images, or auto: measured from their red cells "
        "(as lld predict --pixel_size_um)",
    )
    args, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    stray = [a for a in rest if a.startswith("--") and not a.startswith("--data.")]
    if stray:
        parser.error(
            f"unrecognized arguments: {' '.join(stray)} (only --data.* flags pass through)"
        )
    return args, rest


def main(argv: Sequence[str] | None = None) -> int:
    """``lld adapt``: write the adapted checkpoint; 0 on success, 2 with one line on error."""
    args, data_flags = parse_args(argv)
    images = _predict_root(data_flags)
    if images is None:
        print(
            "lld adapt: no images: set --data.predict_root to a folder of the new microscope's "
            "images",
            file=sys.stderr,
        )
        return 2
    start = time.perf_counter()
    try:
        out = adapt_checkpoint(
            args.ckpt_path,
            images,
            args.output,
            max_images=args.max_images,
            config=args.config,
            data_flags=data_flags,
            overwrite=args.overwrite,
            device=args.device,
            seed=args.seed,
            pixel_size_um=args.pixel_size_um,
        )
    except (AdaptError, CheckpointError) as error:
        print(f"lld adapt: {error}", file=sys.stderr)
        return 2
    except DataError as error:
        print(f"lld adapt: data error: {error_message(error)}", file=sys.stderr)
        return 2
    print(f"lld adapt: {out} ({time.perf_counter() - start:.1f} s)")
    return 0


def _predict_root(flags: list[str]) -> str | None:
    """The value of ``--data.predict_root`` among ``flags`` (removed from them), if given."""
    for index, flag in enumerate(flags):
        if flag.startswith("--data.predict_root="):
            del flags[index]
            return flag.split("=", 1)[1]
        if flag == "--data.predict_root" and index + 1 < len(flags):
            value = flags[index + 1]
            del flags[index : index + 2]
            return value
    return None


if __name__ == "__main__":
    raise SystemExit(main())
