"""The robustness protocols end to end on tiny data: ``shifts`` (a 4-image YOLO set and a tiny
checkpoint) and ``loso`` (the tiny synthetic config)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from lld_lightning.cli import main as lld_main
from lld_lightning.data.records import ImageRecord
from lld_lightning.data.shifts import SCALE_FACTORS, SEVERITIES, SHIFTS
from lld_lightning.metrics.domains import DomainMetrics, EvaluationDetails
from lld_lightning.metrics.results import results_document
from lld_lightning.tools.robustness import (
    CLEAN,
    LOSO_JSON,
    MANIFEST,
    ROBUSTNESS_JSON,
    ROBUSTNESS_PNG,
    main,
    write_shifted_dataset,
)
from tests.conftest import REPO

TINY = str(REPO / "configs" / "tiny.yaml")
PIXEL_SIZE_UM = 0.5


def _draw_field(path: Path, rng: np.random.Generator, size: int = 128) -> list[str]:
    """A pink field with one dark WBC and two pale RBCs; returns its YOLO label lines."""
    image = Image.new("RGB", (size, size), (236, 214, 220))
    draw = ImageDraw.Draw(image)
    lines = []
    for label, radius, colour in (
        (0, 18, (90, 50, 140)),
        (1, 10, (210, 130, 140)),
        (1, 10, (210, 130, 140)),
    ):
        x, y = rng.uniform(radius + 8, size - radius - 8, size=2)
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
        side = 2 * radius / size
        lines.append(f"{label} {x / size:.6f} {y / size:.6f} {side:.6f} {side:.6f}")
    image.save(path)
    return lines


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_ap50_per_class_is_ap_at_iou_one_half(backend: str) -> None:
    pytest.importorskip(backend)
    metrics = DomainMetrics(["a"], 3, ["WBC", "RBC", "Platelets"], {}, backend=backend)
    # WBC: one box found at IoU 100/190 = 0.53, a hit at IoU 0.5 only: AP@.5 is 1, AP@[.5:.95]
    # is 1/10. RBC: two of three cells found exactly, one missed. Platelets: one found where
    # there is none, so no AP.
    preds = {
        "boxes": torch.tensor(
            [[0.0, 0, 10, 19], [50, 50, 60, 60], [100, 100, 110, 110], [20, 20, 24, 24]]
        ),
        "scores": torch.tensor([0.9, 0.8, 0.7, 0.6]),
        "labels": torch.tensor([0, 1, 1, 2]),
    }
    targets = {
        "boxes": torch.tensor(
            [[0.0, 0, 10, 10], [50, 50, 60, 60], [80, 80, 90, 90], [100, 100, 110, 110]]
        ),
        "labels": torch.tensor([0, 1, 1, 1]),
    }
    metrics.update([preds], [targets], ["a"])
    flat, _ = metrics.compute_with_details()
    for scope in ("all", "a"):
        assert flat[f"{scope}/ap50/WBC"] == pytest.approx(1.0)
        assert flat[f"{scope}/ap/WBC"] == pytest.approx(0.1)
        assert flat[f"{scope}/ap50/RBC"] == pytest.approx(flat[f"{scope}/ap/RBC"])
        assert flat[f"{scope}/ap50/RBC"] == pytest.approx(67 / 101)  # recall points up to 2/3
        assert f"{scope}/ap50/Platelets" not in flat
    mean_ap50 = (flat["all/ap50/WBC"] + flat["all/ap50/RBC"]) / 2
    assert flat["all/map_50"] == pytest.approx(mean_ap50)
    document = results_document(flat, EvaluationDetails(), metrics.class_names, {}, None)
    assert document["overall"]["ap50_per_class"] == {
        "WBC": flat["all/ap50/WBC"],
        "RBC": flat["all/ap50/RBC"],
    }
    assert document["domains"]["a"]["ap_per_class"]["WBC"] == pytest.approx(0.1)
    metrics.reset()
    metrics.update([preds], [targets], ["a"])
    assert metrics.compute() == flat  # the same numbers without the details


@pytest.fixture(scope="module")
def yolo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A 4-image YOLO set (2 train, 2 test, one source) and a tiny fit on it: (workdir, the
    lld arguments that build its data)."""
    work = tmp_path_factory.mktemp("robustness")
    data = work / "data"
    rng = np.random.default_rng(0)
    rows = []
    for index, split in enumerate(("train", "train", "test", "test")):
        (data / "images" / split).mkdir(parents=True, exist_ok=True)
        (data / "labels" / split).mkdir(parents=True, exist_ok=True)
        name = f"field{index}.png"
        lines = _draw_field(data / "images" / split / name, rng)
        (data / "labels" / split / f"field{index}.txt").write_text("\n".join(lines) + "\n")
        rows.append(f"{split},{name},lab,{PIXEL_SIZE_UM}")
    (data / "manifest.csv").write_text("split,file,source,pixel_size_um\n" + "\n".join(rows) + "\n")
    overlay = work / "yolo.yaml"
    overlay.write_text(
        f"data:\n  root: {data}\n  format: yolo\n  class_names: [WBC, RBC]\n"
        "  reading:\n    manifest: manifest.csv\n    domain_column: source\n"
    )
    args = [
        "--config",
        TINY,
        "--config",
        str(overlay),
        "--trainer.default_root_dir",
        str(work / "train"),
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        lld_main(["fit", *args])
    return work, args


def _check_shifted_run(work: Path, out: Path, document: dict, shifts, severities) -> None:
    """What every ``shifts`` run must leave in ``out`` (see the test names)."""
    with open(out / MANIFEST, newline="") as handle:
        rows = list(csv.DictReader(handle))
    domains = {f"{s}-{v}" for s in shifts for v in severities} | {CLEAN}
    assert {row["source"] for row in rows} == domains
    assert len(rows) == 2 * len(domains)  # the two test images under each
    for row in rows:
        image = out / "images" / "test" / row["file"]
        assert image.suffix == (".jpg" if row["source"].startswith(("jpeg", "all")) else ".png")
        with Image.open(image) as opened:
            assert opened.size == (128, 128)
        assert (out / "labels" / "test" / row["file"]).with_suffix(".txt").is_file()
        zoomed = row["source"].startswith(("scale", "all"))
        factor = SCALE_FACTORS[int(row["source"][-1])] if zoomed else 1.0
        assert float(row["pixel_size_um"]) == pytest.approx(PIXEL_SIZE_UM / factor, rel=0.02)

    saved = json.loads((out / ROBUSTNESS_JSON).read_text())
    assert saved == json.loads(json.dumps(document))
    assert saved["class_name"] == "WBC"
    assert saved[CLEAN]["num_images"] == 2
    assert set(saved["shifts"]) == set(shifts)
    for shift in shifts:
        assert set(saved["shifts"][shift]) == {str(v) for v in severities}
        for severity in severities:
            entry = saved["shifts"][shift][str(severity)]
            assert entry["num_images"] == 2, (shift, severity)
            assert 0.0 <= entry["map_50"] <= 1.0
            assert entry["class_ap50"] is None or 0.0 <= entry["class_ap50"] <= 1.0
    results = json.loads((out / "run" / "results.json").read_text())
    assert set(results["domains"]) == domains
    assert saved[CLEAN]["class_ap50"] == results["domains"][CLEAN]["ap50_per_class"].get("WBC")
    # The training run's own folder keeps no test results of the shifted data.
    assert not (work / "train" / "version_0" / "results.json").exists()
    with Image.open(out / ROBUSTNESS_PNG) as chart:
        assert chart.format == "PNG" and chart.width >= 500


def test_shifts_writes_the_dataset_tests_it_and_summarises(yolo_run) -> None:
    work, args = yolo_run
    out = work / "shifted"
    argv = ["--ckpt_path", "last", "--out", str(out)]
    document = main(["shifts", *args, *argv, "--shifts", "scale", "jpeg", "--severities", "1", "3"])
    _check_shifted_run(work, out, document, ["scale", "jpeg"], [1, 3])


@pytest.mark.slow
def test_shifts_summarises_every_shift_and_severity_and_replaces_an_earlier_run(yolo_run) -> None:
    work, args = yolo_run
    out = work / "every_shift"
    argv = ["--ckpt_path", "last", "--out", str(out)]
    main(["shifts", *args, *argv, "--shifts", "colour", "--severities", "2"])
    document = main(["shifts", *args, *argv])
    _check_shifted_run(work, out, document, SHIFTS, SEVERITIES)


def test_unknown_pixel_size_leaves_the_manifest_column_empty(tmp_path: Path) -> None:
    image = tmp_path / "field.png"
    _draw_field(image, np.random.default_rng(1))
    record = ImageRecord(image, 128, 128, np.array([[10, 10, 40, 40]], np.float32),
                         np.array([0]), pixel_size_um=PIXEL_SIZE_UM)  # fmt: skip
    # 0.4x of 128 px is 51 px: the pixel size follows the factor applied.
    for known, expected in ((True, ["0.5", f"{PIXEL_SIZE_UM * 128 / 51:.6g}"]), (False, ["", ""])):
        out = tmp_path / str(known)
        write_shifted_dataset([record], out, ["scale"], [3], pixel_size_known=known)
        with open(out / MANIFEST, newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert [row["source"] for row in rows] == [CLEAN, "scale-3"]
        assert [row["pixel_size_um"] for row in rows] == expected


def test_shifts_refuses_a_foreign_folder_and_an_unknown_class(yolo_run, capsys) -> None:
    work, args = yolo_run
    foreign = work / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        main(["shifts", *args, "--ckpt_path", "last", "--out", str(foreign), "--shifts", "jpeg"])
    assert exit_info.value.code == 2
    assert "not empty" in capsys.readouterr().err
    assert (foreign / "precious.txt").read_text() == "keep me"
    with pytest.raises(SystemExit):
        main(
            [
                "shifts",
                *args,
                "--ckpt_path",
                "last",
                "--out",
                str(work / "x"),
                "--class_name",
                "Blast",
            ]
        )
    assert "--class_name 'Blast'" in capsys.readouterr().err


@pytest.mark.slow
def test_loso_fits_without_each_source_and_tests_on_all(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["--config", TINY, "--data.synthetic.dir", str(tmp_path / "data"),
            "--trainer.limit_test_batches", "1.0"]  # fmt: skip
    out = tmp_path / "loso"
    document = main(["loso", *args, "--out", str(out), "--sources", "H_100x_C1", "L_100x_C1"])
    saved = json.loads((out / LOSO_JSON).read_text())
    assert saved == json.loads(json.dumps(document))
    assert list(saved["results"]) == ["H_100x_C1", "L_100x_C1"]
    for source, row in saved["results"].items():
        run = Path(saved["runs"][source])
        assert run.parent == out / source
        domains = yaml.safe_load((run / "config.yaml").read_text())["data"]["domains"]
        assert source not in domains["train"] and source not in domains["val"]
        assert len(domains["train"]) == 3 and domains["test"] is None
        results = json.loads((run / "results.json").read_text())
        assert row["held_out"]["map"] == results["domains"][source]["map"]
        others = [d for d in results["domains"] if d != source]
        assert others
        expected = sum(results["domains"][d]["map"] for d in others) / len(others)
        assert row["in_source"]["map"] == pytest.approx(expected)


def test_shifts_with_adapt_tests_each_domain_with_its_own_adapted_checkpoint(yolo_run) -> None:
    work, args = yolo_run
    out = work / "adapted"
    argv = ["--ckpt_path", "last", "--out", str(out), "--adapt"]
    document = main(["shifts", *args, *argv, "--shifts", "colour", "--severities", "2"])
    assert document["adapted"] is True
    for domain in (CLEAN, "colour-2"):
        checkpoint = torch.load(out / "adapt" / f"{domain}.ckpt", weights_only=True)
        assert checkpoint["lld_adaptation"]["num_images"] == 2
        tested = json.loads((out / "adapt" / f"{domain}_run" / "results.json").read_text())
        assert set(tested["domains"]) == {domain}  # each adapted model saw only its domain
    assert document[CLEAN]["num_images"] == 2
    assert document["shifts"]["colour"]["2"]["num_images"] == 2


def test_pixel_size_measures_each_test_domain_as_given_resized_and_shifted(tmp_path: Path) -> None:
    from tests.test_red_cells import _film

    data = tmp_path / "data"
    rows = []
    for index, split in enumerate(("train", "test", "test")):
        (data / "images" / split).mkdir(parents=True, exist_ok=True)
        (data / "labels" / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(_film(40.0, seed=index)).save(data / "images" / split / f"f{index}.png")
        (data / "labels" / split / f"f{index}.txt").write_text("")
        rows.append(f"{split},f{index}.png,lab,{7.5 / 41:.6f}")  # drawn discs fill 41 px
    (data / "manifest.csv").write_text("split,file,source,pixel_size_um\n" + "\n".join(rows) + "\n")
    overlay = tmp_path / "drawn.yaml"
    overlay.write_text(
        f"data:\n  root: {data}\n  format: yolo\n  class_names: [WBC, RBC]\n"
        "  reading:\n    manifest: manifest.csv\n    domain_column: source\n"
    )
    out = tmp_path / "out"
    document = main([
        "pixel_size", "--config", TINY, "--config", str(overlay), "--out", str(out),
        "--shifts", "colour", "--severities", "1",
    ])  # fmt: skip
    pooled = document["pooled"]["lab"]
    assert list(pooled) == ["as given", "resized 0.5x", "resized 2x", "colour-1"]
    for variant, row in pooled.items():
        assert row["images"] == 2 and row["cells"] > 10, variant
        assert abs(row["error"]) < 0.1, variant
    assert pooled["resized 2x"]["truth_um"] == pytest.approx(7.5 / 41 / 2, rel=1e-4)
    assert document["single_image"]["lab"]["images"] == 2
    assert json.loads((out / "pixel_size.json").read_text()) == document
