"""`--model.init_from`: a new fit starts from a trained detector's weights."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from lld_lightning.callbacks.checkpoint import CheckpointError
from lld_lightning.cli import main
from lld_lightning.models import Detector, Readout
from lld_lightning.module import LldModule, load_detector_weights
from tests.conftest import REPO

TINY = str(REPO / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("init_from")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        main(["fit", "--config", TINY, "--data.synthetic.dir", str(work / "data"),
              "--trainer.default_root_dir", str(work / "first")])
    return work


def _checkpoint(work: Path) -> Path:
    return work / "first" / "latest" / "checkpoints" / "last.ckpt"


def test_matching_weights_load_and_another_label_space_keeps_its_heads(trained: Path) -> None:
    source = torch.load(_checkpoint(trained), weights_only=True)["state_dict"]
    detector = Detector(3, {"size": 2}, backbone="test_resnet", fpn_channels=32, box_bins=2,
                        readout=Readout(pixel_crop=16))
    fresh_cls = detector.head.cls_pred.weight.detach().clone()
    with pytest.warns(UserWarning, match="kept their fresh initialisation"):
        kept = load_detector_weights(detector, str(_checkpoint(trained)))
    torch.testing.assert_close(detector.backbone.body.conv1[0].weight,
                               source["detector.backbone.body.conv1.0.weight"])
    assert "head.cls_pred.weight" in kept and "backbone.body.conv1.0.weight" not in kept
    torch.testing.assert_close(detector.head.cls_pred.weight, fresh_cls)  # 3 classes, not 14


def test_a_fit_with_init_from_starts_from_the_checkpoint_and_a_resume_ignores_it(
    trained: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(trained)
    seen: list[torch.Tensor] = []
    setup = LldModule.setup

    def record(module: LldModule, stage: str) -> None:
        setup(module, stage)
        seen.append(module.detector.backbone.body.conv1[0].weight.detach().clone())

    monkeypatch.setattr(LldModule, "setup", record)
    args = ["--config", TINY, "--data.synthetic.dir", str(trained / "data"),
            "--trainer.default_root_dir", str(trained / "second"),
            "--model.init_from", str(_checkpoint(trained))]
    main(["fit", *args])
    source = torch.load(_checkpoint(trained), weights_only=True)["state_dict"]
    # The same seed builds the same initial weights: equal to the trained ones only if loaded.
    torch.testing.assert_close(seen[-1], source["detector.backbone.body.conv1.0.weight"])
    # A resume restores its own checkpoint; init_from pointing nowhere is then not read.
    resumed = trained / "second" / "latest" / "checkpoints" / "last.ckpt"
    args[-1] = str(trained / "gone.ckpt")
    main(["fit", *args, "--ckpt_path", str(resumed), "--trainer.max_epochs", "2"])
    with pytest.raises(CheckpointError):
        load_detector_weights(Detector(14, {"a": 2}, backbone="test_resnet", readout=None),
                              str(trained / "gone.ckpt"))


def test_init_from_is_a_plain_hyperparameter() -> None:
    module = LldModule(detector=functools.partial(Detector, backbone="test_resnet", readout=None),
                       init_from="runs/x/checkpoints/best.ckpt")
    assert module.hparams.init_from == "runs/x/checkpoints/best.ckpt"
