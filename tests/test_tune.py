"""`lld_lightning.tools.tune`: post-processing settings measured on kept detector outputs."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import pytest
import torch

from lld_lightning.cli import main as lld
from lld_lightning.models import Detector, PostProcess
from lld_lightning.module import LldModule
from lld_lightning.tools.tune import EvaluatedBatch, evaluate, flags, grid
from lld_lightning.tools.tune import main as tune
from tests.conftest import REPO

TINY = str(REPO / "configs" / "tiny.yaml")


def _logit(probability: float) -> float:
    return math.log(probability / (1.0 - probability))


def _hand_worked() -> tuple[LldModule, list[EvaluatedBatch]]:
    """One 100 px image, two cells whose boxes overlap at IoU 0.538, three stride-8 locations:
    ``a`` finds cell 1 exactly (class 0.4, quality 0.9), ``c`` finds cell 2 exactly (0.5, 0.8) and
    ``b`` is a false positive away from both (0.9, 0.1)."""
    detector = functools.partial(Detector, backbone="test_resnet", fpn_channels=16, readout=None)
    model = LldModule(num_classes=1, class_names=["cell"], attribute_spec={}, detector=detector)
    cells = torch.tensor([[10.0, 10.0, 30.0, 30.0], [16.0, 10.0, 36.0, 30.0]])
    points = torch.tensor([[20.0, 20.0], [70.0, 70.0], [26.0, 20.0]])  # a, b, c
    outputs = {
        "cls_logits": torch.tensor([[[_logit(0.4)], [_logit(0.9)], [_logit(0.5)]]]),
        "box_deltas": torch.full((1, 3, 4), 10.0 / 8.0),  # 20 px boxes centred on the points
        "quality_logits": torch.tensor([[_logit(0.9), _logit(0.1), _logit(0.8)]]),
        "attr_logits": {},
        "points": points,
        "strides": torch.full((3,), 8.0),
    }
    target = {
        "boxes": cells,
        "labels": torch.zeros(2, dtype=torch.int64),
        "attributes": torch.zeros((2, 0), dtype=torch.int64),
        "regions": torch.tensor([[0.0, 0.0, 100.0, 100.0]]),
    }
    return model, [EvaluatedBatch(outputs, torch.zeros(1, 3, 100, 100), [target], ["d0"])]


@pytest.mark.parametrize(
    ("quality_weight", "nms_iou", "expected"),
    [
        # scores a .9, c .8, b .1: both cells first, then the false positive
        (1.0, 0.6, 1.0),
        # ... but NMS at 0.5 drops c under a: recall 0.5 at precision 1 (51 of COCO's 101 points)
        (1.0, 0.5, 51 / 101),
        # scores b .9, c .5, a .4: precision 1/2 at recall 1/2, 2/3 at recall 1
        (0.0, 0.6, 2 / 3),
        # ... and c drops a: recall 1/2 at precision 1/2
        (0.0, 0.5, 0.5 * 51 / 101),
    ],
)
def test_evaluate_scores_each_setting_as_coco_does(
    quality_weight: float, nms_iou: float, expected: float
) -> None:
    model, batches = _hand_worked()
    settings = PostProcess(
        score_threshold=0.05,
        nms_iou=nms_iou,
        quality_weight=quality_weight,
        max_detections=100,
        max_containment=None,
    )
    results = evaluate(model, batches, ["d0"], settings)
    assert results["all/map"] == pytest.approx(expected, abs=1e-4)
    assert results["d0/map"] == pytest.approx(expected, abs=1e-4)
    # at quality weight 1 a threshold of 0.2 drops only b (0.1), which ranked last: same AP
    if quality_weight == 1.0:
        strict = evaluate(
            model, batches, ["d0"], dataclasses.replace(settings, score_threshold=0.2)
        )
        assert strict["all/map"] == pytest.approx(expected, abs=1e-4)


def test_evaluate_uses_the_settings_given_not_the_models() -> None:
    # The model's own NMS IoU (0.5) drops c under a; the settings' 0.6 keeps both cells.
    model, batches = _hand_worked()
    model.settings = PostProcess(nms_iou=0.5, quality_weight=1.0, max_containment=None)
    assert evaluate(model, batches, ["d0"], model.settings)["all/map"] == pytest.approx(
        51 / 101, abs=1e-4
    )
    other = dataclasses.replace(model.settings, nms_iou=0.6)
    assert evaluate(model, batches, ["d0"], other)["all/map"] == pytest.approx(1.0, abs=1e-4)


def test_grid_is_every_combination_and_keeps_the_current_settings() -> None:
    current = PostProcess(
        score_threshold=0.05,
        nms_iou=0.6,
        quality_weight=0.5,
        max_detections=100,
        max_containment=None,
        classes_per_box=2,
    )
    points = grid({"nms_iou": [0.5, 0.7], "quality_weight": [0.0, 1.0, 1.0]}, current)
    assert points[0] == current  # not among the combinations: measured first, as the baseline
    assert len(points) == 5
    assert {(p.nms_iou, p.quality_weight) for p in points[1:]} == {
        (0.5, 0.0),
        (0.5, 1.0),
        (0.7, 0.0),
        (0.7, 1.0),
    }
    assert all(p.score_threshold == 0.05 and p.max_detections == 100 for p in points)
    # the fields that are not tuned stay the checkpoint's
    assert all(p.max_containment is None and p.classes_per_box == 2 for p in points)
    assert grid({"nms_iou": [0.6, 0.7]}, current)[0] == current
    assert len(grid({"nms_iou": [0.6, 0.7]}, current)) == 2


def test_flags_name_only_what_changed_in_the_cli_form() -> None:
    current = PostProcess(nms_iou=0.6, max_containment=0.5)
    assert flags(current, current) == "(the checkpoint's settings)"
    changed = dataclasses.replace(current, nms_iou=0.7, max_containment=None)
    assert (
        flags(changed, current)
        == "--model.postprocess.nms_iou 0.7 --model.postprocess.max_containment null"
    )


def test_bad_post_processing_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="quality_weight"):
        PostProcess(quality_weight=1.5)


@pytest.fixture(scope="module")
def dense_fit(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A tiny fit without the region read-out (its outputs are all the post-processing reads),
    fitted at NMS IoU 0.55; the returned arguments do not say so. Two box bins: boxes start at
    about a stride a side, so four steps already find cells (17 bins start at whole-image boxes)
    and the settings change the metrics."""
    workdir = tmp_path_factory.mktemp("tune")
    args = [
        "--config",
        TINY,
        "--data.synthetic.dir",
        str(workdir / "data"),
        "--trainer.default_root_dir",
        str(workdir / "run"),
        "--model.detector.readout",
        "null",
        "--model.detector.box_bins",
        "2",
        "--trainer.limit_train_batches",
        "4",
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        lld(
            ["fit", *args, "--model.postprocess.nms_iou", "0.55"]
        )  # a setting only the checkpoint knows
    return workdir, args


def test_tune_rows_match_lld_validate(
    dense_fit: tuple[Path, list[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    workdir, args = dense_fit
    monkeypatch.chdir(workdir)
    ckpt = str(workdir / "run" / "latest" / "checkpoints" / "last.ckpt")
    out = workdir / "tune.json"
    report = tune(
        [
            "--ckpt_path",
            ckpt,
            "--score-threshold",
            "0.001",
            "--nms-iou",
            "0.6",
            "0.5",
            "--quality-weight",
            "0.5",
            "0",
            "--max-containment",
            "none",
            "0.5",
            "--out",
            str(out),
            *args,
        ]
    )
    rows = report["rows"]
    assert len(rows) == 8 + 1  # the checkpoint's threshold (0.05) is not on the grid
    assert sum(row["current"] for row in rows) == 1
    maps = [row["results"]["all/map"] for row in rows]
    assert maps == sorted(maps, reverse=True)
    ties = [row for row in rows if row["results"]["all/map"] == maps[0]]
    assert rows[0] is min(
        ties, key=lambda row: (not row["current"], row["flags"].count("--model."))
    )
    assert all(row["flags"].count("--model.postprocess.") == row["changes"] for row in rows)
    assert json.loads(out.read_text())["rows"][0]["settings"] == rows[0]["settings"]
    printed = " ".join(capsys.readouterr().out.split())
    assert "ranked by map" in printed and "the best row, per domain" in printed

    # The checkpoint's own row is what `lld validate` logs (over every validation batch; tiny.yaml
    # limits it to one), and an override row is what it logs with the row's --model flags.
    current = next(row for row in rows if row["current"])
    assert current["settings"]["nms_iou"] == 0.55
    assert current["settings"]["max_containment"] == 0.5  # the recipe's
    other = next(
        row
        for row in rows
        if row["settings"]
        == {
            "score_threshold": 0.001,
            "nms_iou": 0.5,
            "quality_weight": 0.0,
            "max_detections": 100,
            "max_containment": 0.5,
        }
    )
    uncontained = next(
        row for row in rows if row["settings"] == {**other["settings"], "max_containment": None}
    )
    assert "--model.postprocess.max_containment null" in uncontained["flags"]
    assert "max_containment" not in other["flags"]
    for row, typed in (
        (current, []),
        (other, other["flags"].split()),
        (uncontained, uncontained["flags"].split()),
    ):
        cli = lld(
            ["validate", *args, "--ckpt_path", ckpt, "--trainer.limit_val_batches", "1.0", *typed]
        )
        logged = cli.trainer.callback_metrics
        for key in ("map", "map_50", "map_75", "attr/mean_f1"):
            assert float(logged[f"val/{key}"]) == pytest.approx(
                row["results"][f"all/{key}"], abs=1e-6
            )
    detections_differ = current["results"] != other["results"]
    assert detections_differ


def test_tune_reads_the_test_split_and_refuses_bad_weights(
    dense_fit: tuple[Path, list[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    workdir, args = dense_fit
    monkeypatch.chdir(workdir)
    ckpt = str(workdir / "run" / "latest" / "checkpoints" / "last.ckpt")
    report = tune(
        [
            "--ckpt_path",
            ckpt,
            "--split",
            "test",
            "--score-threshold",
            "0.05",
            "--nms-iou",
            "0.55",
            "--quality-weight",
            "0.5",
            *args,
        ]
    )
    assert len(report["rows"]) == 1 and report["rows"][0]["current"]
    domains = {key.split("/")[0] for key in report["rows"][0]["results"]} - {"all"}
    assert len(domains) >= 2  # every test domain's loader was read
    assert "optimistic" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="quality-weight"):
        tune(["--ckpt_path", ckpt, "--quality-weight", "1.5", *args])
    with pytest.raises(SystemExit, match="no checkpoint at"):
        tune(["--ckpt_path", str(workdir / "missing.ckpt"), *args])
    with pytest.raises(SystemExit):  # argparse: not a fraction
        tune(["--ckpt_path", ckpt, "--max-containment", "2", *args])


def test_typed_model_flags_win_over_the_checkpoint(
    dense_fit: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Lightning replaces the model config with the checkpoint's hyperparameters; `lld` keeps the
    # --model.* flags typed on the command line (what `tune` tells the user to pass).
    workdir, args = dense_fit
    monkeypatch.chdir(workdir)
    ckpt = str(workdir / "run" / "latest" / "checkpoints" / "last.ckpt")
    plain = lld(["validate", *args, "--ckpt_path", ckpt])
    assert plain.model.settings.nms_iou == 0.55  # the checkpoint's, not tiny.yaml's default 0.6
    overlay = workdir / "nms.yaml"
    overlay.write_text("model:\n  postprocess:\n    nms_iou: 0.65\n")
    from_file = lld(["validate", *args, "--config", str(overlay), "--ckpt_path", ckpt])
    assert from_file.model.settings.nms_iou == 0.55  # a --config file's value still loses
    typed = lld(
        [
            "validate",
            *args,
            "--ckpt_path",
            ckpt,
            "--model.postprocess.nms_iou=0.7",
            "--model.postprocess.quality_weight",
            "0.25",
        ]
    )
    assert typed.model.settings.nms_iou == 0.7 and typed.model.settings.quality_weight == 0.25
    assert typed.model.detector.readout is None  # the rest is still the checkpoint's
    whole = lld(
        ["validate", *args, "--ckpt_path", ckpt, "--model", '{"postprocess": {"nms_iou": 0.75}}']
    )
    assert whole.model.settings.nms_iou == 0.75  # a whole --model mapping typed there wins too
    assert whole.model.detector.readout is None
