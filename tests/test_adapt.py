"""`lld adapt`: BatchNorm statistics re-estimated on a new microscope's images, nothing else."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from lld_lightning.cli import main
from lld_lightning.data.datamodule import LldDataModule
from lld_lightning.models import Detector, Readout
from lld_lightning.module import LldModule
from lld_lightning.predictor import Predictor
from lld_lightning.tools.adapt import (
    ADAPTATION_KEY,
    AdaptError,
    adapt_checkpoint,
    batch_norm_layers,
    build_datamodule,
)
from tests.conftest import REPO

TINY = str(REPO / "configs" / "tiny.yaml")
#: Evaluation letterbox of the tiny checkpoint.
IMAGE_SIZE = 128
#: Images in each adaptation folder (two batches of `BATCH_SIZE`: equal batch weights).
NUM_IMAGES = 4
BATCH_SIZE = 2


def save_tiny_checkpoint(path: Path, data_root: Path, backbone: str = "test_resnet") -> Path:
    """A tiny untrained detector saved as ``Trainer.save_checkpoint`` saves it, with resume state
    (optimiser, loops) that an adapted checkpoint must not carry on."""
    datamodule = LldDataModule(
        root=str(data_root), image_size=IMAGE_SIZE, batch_size=8, num_workers=0
    )
    torch.manual_seed(0)
    module = LldModule(
        num_classes=datamodule.num_classes,
        attribute_spec=datamodule.attribute_spec,
        class_names=datamodule.class_names,
        detector=functools.partial(
            Detector, backbone=backbone, fpn_channels=32, box_bins=2, readout=Readout(pixel_crop=16)
        ),
    )
    torch.save(
        {
            "epoch": 0,
            "global_step": 0,
            "pytorch-lightning_version": L.__version__,
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "datamodule_hyper_parameters": dict(datamodule.hparams),
            "optimizer_states": [{"state": {}, "param_groups": []}],
            "loops": {},
        },
        path,
    )
    return path


def _write_images(source: list[Path], folder: Path, cast: tuple[float, float, float] | None) -> Path:
    """Copies of ``source`` in ``folder``, each channel scaled by ``cast`` (a stain/colour shift)."""
    folder.mkdir(parents=True)
    for path in source:
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
        if cast is not None:
            pixels = pixels * np.asarray(cast, dtype=np.float32)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / path.name)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_synthetic: Path) -> dict[str, Path]:
    """The tiny checkpoint, its training images and the same images with a strong red cast."""
    work = tmp_path_factory.mktemp("adapt")
    source = sorted(tiny_synthetic.rglob("images/train/*.png"))[:NUM_IMAGES]
    return {
        "work": work,
        "data": tiny_synthetic,
        "ckpt": save_tiny_checkpoint(work / "tiny.ckpt", tiny_synthetic),
        "plain": _write_images(source, work / "plain", None),
        "cast": _write_images(source, work / "cast", (1.0, 0.35, 0.5)),
    }


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _first_bn_input_moments(ckpt: Path, images: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel mean, and the per-batch unbiased variance averaged over the batches, of
    what the backbone's first BatchNorm layer receives on ``images`` (no BatchNorm precedes it,
    so adaptation cannot change its input)."""
    checkpoint = _state(ckpt)
    module = LldModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    datamodule = build_datamodule(checkpoint, images, data={"batch_size": BATCH_SIZE})
    first = next(iter(batch_norm_layers(module.detector).values()))
    means, variances = [], []

    def record(_module, inputs, _output) -> None:
        x = inputs[0].transpose(0, 1).flatten(1)  # [C, B*H*W]
        means.append(x.mean(dim=1))
        variances.append(x.var(dim=1, unbiased=True))

    handle = first.register_forward_hook(record)
    with torch.no_grad():
        for batch in datamodule.predict_dataloader():
            module.detector(datamodule.eval_transform(batch)["image"])
    handle.remove()
    return torch.stack(means).mean(0), torch.stack(variances).mean(0)


def test_statistics_are_those_of_the_new_images(setup: dict[str, Path]) -> None:
    data = {"batch_size": BATCH_SIZE}
    cast = adapt_checkpoint(setup["ckpt"], setup["cast"], setup["work"] / "cast.ckpt", data=data,
                            progress=False)
    plain = adapt_checkpoint(setup["ckpt"], setup["plain"], setup["work"] / "plain.ckpt", data=data,
                             progress=False)
    module = LldModule.load_from_checkpoint(setup["ckpt"], map_location="cpu", weights_only=True)
    name = next(iter(batch_norm_layers(module.detector)))
    key = f"detector.{name}"
    mean, var = _first_bn_input_moments(setup["ckpt"], setup["cast"])
    adapted = _state(cast)["state_dict"]
    torch.testing.assert_close(adapted[f"{key}.running_mean"], mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(adapted[f"{key}.running_var"], var, rtol=1e-4, atol=1e-5)
    # The red cast moves the statistics: adapting on the plain images gives others.
    other = _state(plain)["state_dict"][f"{key}.running_mean"]
    assert (other - mean).abs().max() > 0.05
    # Every BatchNorm layer moved away from its initial statistics.
    original = _state(setup["ckpt"])["state_dict"]
    for layer in batch_norm_layers(module.detector):
        name_mean = f"detector.{layer}.running_mean"
        assert not torch.equal(adapted[name_mean], original[name_mean]), layer


def test_only_batch_norm_statistics_change(setup: dict[str, Path]) -> None:
    out = adapt_checkpoint(setup["ckpt"], setup["cast"], setup["work"] / "only.ckpt", max_images=3,
                           data={"batch_size": BATCH_SIZE}, progress=False)
    before, after = _state(setup["ckpt"]), _state(out)
    assert list(after["state_dict"]) == list(before["state_dict"])
    statistics = {"running_mean", "running_var", "num_batches_tracked"}
    changed = [k for k in before["state_dict"] if k.rsplit(".", 1)[-1] in statistics]
    assert changed
    for key, value in before["state_dict"].items():
        if key not in changed:
            assert torch.equal(after["state_dict"][key], value), key
    assert after["hyper_parameters"] == before["hyper_parameters"]
    assert after["datamodule_hyper_parameters"] == before["datamodule_hyper_parameters"]
    assert "optimizer_states" not in after and "loops" not in after  # weights only
    record = after[ADAPTATION_KEY]
    assert record["method"] == "adabn" and record["num_images"] == 3
    assert record["source"] == str(setup["cast"].resolve()) and record["date"]


@pytest.fixture(scope="module")
def adapted(setup: dict[str, Path]) -> Path:
    """The tiny checkpoint adapted to the red-cast images."""
    return adapt_checkpoint(setup["ckpt"], setup["cast"], setup["work"] / "load.ckpt",
                            data={"batch_size": BATCH_SIZE}, progress=False)


def test_adapted_checkpoint_loads_in_the_predictor(setup: dict[str, Path], adapted: Path) -> None:
    predictor = Predictor.from_checkpoint(adapted)
    image = next(setup["cast"].iterdir())
    assert isinstance(predictor([image])[0], list)


def test_adapted_checkpoint_loads_in_lld_test(
    setup: dict[str, Path], adapted: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(setup["work"])
    cli = main(["test", "--config", TINY, "--data.root", str(setup["data"]), "--ckpt_path",
                str(adapted), "--trainer.default_root_dir", str(setup["work"] / "runs")])
    assert cli.model.test_results["all/num_images"] == 4


def test_lld_adapt_command(setup: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    args = ["adapt", "--ckpt_path", str(setup["ckpt"]), "--data.predict_root", str(setup["cast"]),
            "--data.batch_size", "2", "--max_images", "3"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    out = setup["work"] / "tiny-adapted.ckpt"
    assert _state(out)[ADAPTATION_KEY]["num_images"] == 3
    # A second run refuses to replace it, unless asked to.
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert f"{out} exists" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--overwrite"])
    assert exit_info.value.code == 0


def _refusal(args: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["adapt", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_refusals_are_one_line(setup: dict[str, Path], tmp_path: Path,
                               capsys: pytest.CaptureFixture) -> None:
    ckpt, images = str(setup["ckpt"]), str(setup["cast"])
    output = ["--output", str(tmp_path / "out.ckpt")]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    assert str(empty) in _refusal(["--ckpt_path", ckpt, "--data.predict_root", str(empty), *output],
                                  capsys)
    assert "predict_root" in _refusal(["--ckpt_path", ckpt, *output], capsys)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    assert str(bad) in _refusal(["--ckpt_path", str(bad), "--data.predict_root", images, *output],
                                capsys)
    missing = tmp_path / "missing.ckpt"
    assert str(missing) in _refusal(["--ckpt_path", str(missing), "--data.predict_root", images,
                                     *output], capsys)
    err = _refusal(["--ckpt_path", ckpt, "--data.predict_root", images, "--output", ckpt], capsys)
    assert "exists" in err
    err = _refusal(["--ckpt_path", ckpt, "--data.predict_root", images, "--data.bogus", "1",
                    *output], capsys)
    assert "bogus" in err
    assert not (tmp_path / "out.ckpt").exists()


def test_a_model_without_batch_norm_is_refused(setup: dict[str, Path], tmp_path: Path) -> None:
    ckpt = save_tiny_checkpoint(tmp_path / "convnext.ckpt", setup["data"], backbone="test_convnext")
    with pytest.raises(AdaptError, match="test_convnext.*no BatchNorm layer to adapt"):
        adapt_checkpoint(ckpt, setup["cast"], tmp_path / "out.ckpt", progress=False)
    assert not (tmp_path / "out.ckpt").exists()


def test_a_config_and_flags_override_the_checkpoint_data_settings(setup: dict[str, Path]) -> None:
    checkpoint = _state(setup["ckpt"])
    datamodule = build_datamodule(checkpoint, setup["cast"])
    assert (datamodule.image_size, datamodule.batch_size) == (IMAGE_SIZE, 8)
    datamodule = build_datamodule(checkpoint, setup["cast"], config=TINY,
                                  data_flags=["--data.image_size", "96"])
    assert datamodule.batch_size == 4 and datamodule.image_size == 96  # tiny.yaml, then the flag
    assert len(datamodule.predict_set) == NUM_IMAGES


def test_the_images_pixel_size_is_given_or_measured(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    checkpoint = _state(setup["ckpt"])
    scaled = {"pixel_size": {"working": 0.5}}  # a model that works at 0.5 um per pixel
    given = build_datamodule(checkpoint, setup["plain"], data=scaled, pixel_size_um=0.25)
    assert {r.pixel_size_um for r in given.predict_set.records} == {0.25}
    measured = build_datamodule(checkpoint, setup["plain"], data=scaled, pixel_size_um="auto")
    (estimate,) = measured.estimated_pixel_sizes.values()
    assert {r.pixel_size_um for r in measured.predict_set.records} == {estimate.pixel_size_um}
    out = adapt_checkpoint(
        setup["ckpt"], setup["plain"], tmp_path / "a.ckpt", data=scaled, pixel_size_um=0.25,
        progress=False,
    )
    assert _state(out)[ADAPTATION_KEY]["pixel_size_um"] == 0.25  # the scale it was adapted at
    with pytest.raises(AdaptError, match="no working resolution"):
        build_datamodule(checkpoint, setup["plain"], pixel_size_um=0.25)
    capsys.readouterr()  # what the measurement above printed
    err = _refusal(["--ckpt_path", str(setup["ckpt"]), "--data.predict_root", str(setup["plain"]),
                    "--data.pixel_size.working", "0.5", "--pixel_size_um", "big",
                    "--output", str(tmp_path / "b.ckpt")], capsys)
    assert "--pixel_size_um big" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["adapt", "--ckpt_path", str(setup["ckpt"]), "--data.predict_root",
              str(setup["plain"]), "--data.pixel_size.working", "0.5", "--pixel_size_um", "auto",
              "--output", str(tmp_path / "c.ckpt")])
    assert exit_info.value.code == 0
    assert "measured from" in capsys.readouterr().err
    assert _state(tmp_path / "c.ckpt")[ADAPTATION_KEY]["pixel_size_um"] > 0
