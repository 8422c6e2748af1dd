"""`lld predict` on a messy folder: every readable image gets results, every other file is listed
with its reason, overlay names never collide, and images shrunk a lot are named."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from lld_lightning.callbacks.predict_writer import SKIPPED_FILE, overlay_names
from lld_lightning.callbacks.report import COUNTS_FILE, REPORT_FILE
from lld_lightning.cli import main
from tests.conftest import REPO
from tests.test_bad_data import noise_png, truncate

TINY = str(REPO / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def checkpoint(tiny_synthetic: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-step tiny model."""
    run = tmp_path_factory.mktemp("predict_writer") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(run.parent)
        main(["fit", "--config", TINY, "--data.root", str(tiny_synthetic),
              "--trainer.default_root_dir", str(run)])  # fmt: skip
    return next(run.rglob("last.ckpt"))


@pytest.fixture
def messy_folder(tiny_synthetic: Path, tmp_path: Path) -> Path:
    """Images with the same name in two folders and with two suffixes, a large image, a text
    file named like an image, an image truncated after its header and a note."""
    folder = tmp_path / "photos"
    first, second = sorted(tiny_synthetic.rglob("images/test/*.png"))[:2]
    for name, source in (("a/cell.png", first), ("b/cell.png", second), ("b/cell.jpg", first)):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.open(source).save(folder / name)
    Image.new("RGB", (640, 480), (230, 200, 210)).save(folder / "big.png")
    (folder / "fake.png").write_text("not an image")
    truncate(noise_png(folder / "cut.png", (160, 160)))
    (folder / "notes.txt").write_text("slides 1-4")
    return folder


def _predict(checkpoint: Path, data: Path, folder: Path, out: Path, *extra: str) -> list[str]:
    # --data.root: an existing data set, so that no synthetic one is generated for nothing.
    return [
        "predict", "--config", TINY, "--ckpt_path", str(checkpoint), "--data.root", str(data),
        "--data.predict_root", str(folder), "--predict_writer.output_dir", str(out),
        "--predict_writer.min_score", "0.0", "--trainer.default_root_dir", str(out.parent / "run"),
        *extra,
    ]  # fmt: skip


def test_predict_writes_every_readable_image_and_lists_the_rest(
    checkpoint: Path,
    tiny_synthetic: Path,
    messy_folder: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    # Two workers: the truncated image is found inside a worker process.
    with pytest.warns(UserWarning, match=r"1 image\(s\) shrunk more than 2x") as warned:
        main(_predict(checkpoint, tiny_synthetic, messy_folder, out, "--data.num_workers", "2",
                      "--data.batch_size", "2"))  # fmt: skip
    shrink = next(str(w.message) for w in warned if "shrunk" in str(w.message))
    assert f"{messy_folder / 'big.png'} (640x480, 5.0x)" in shrink and "cell." not in shrink

    readable = ["a/cell.png", "b/cell.jpg", "b/cell.png", "big.png"]
    coco = json.loads((out / "detections.json").read_text())
    assert (
        sorted(Path(i["file_name"]).relative_to(messy_folder).as_posix() for i in coco["images"])
        == readable
    )
    with open(out / SKIPPED_FILE, newline="") as handle:
        skipped = {Path(row["file"]).name: row for row in csv.DictReader(handle)}
    assert {name: row["reason"] for name, row in skipped.items()} == {
        "cut.png": "unreadable image",
        "fake.png": "unreadable image",
        "notes.txt": "not an image",
    }
    for name, row in skipped.items():
        assert row["message"].startswith(str(messy_folder / name))
    assert "truncated" in skipped["cut.png"]["message"]
    overlays = sorted(
        p.relative_to(out / "overlays").as_posix() for p in (out / "overlays").rglob("*.png")
    )
    assert overlays == ["a/cell.png", "b/cell.jpg.png", "b/cell.png.png", "big.png"]
    printed = capsys.readouterr().out
    assert f"in 4 images -> {out}; skipped 3 files, listed in {SKIPPED_FILE}" in printed
    # The report and the counts cover every readable image, with every class.
    with open(out / COUNTS_FILE, newline="") as handle:
        counted = Counter(row["image"] for row in csv.DictReader(handle))
    assert sorted(counted) == sorted(i["file_name"] for i in coco["images"])
    assert set(counted.values()) == {len(coco["categories"])}
    assert (out / REPORT_FILE).read_text(encoding="utf-8").count('<section class="image"') == 4


def test_predict_on_a_folder_without_a_readable_image_is_one_line(
    checkpoint: Path,
    tiny_synthetic: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "fake.png").write_text("not an image")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(_predict(checkpoint, tiny_synthetic, folder, tmp_path / "out"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"lld: data error: {folder}: no readable images: skipped 1 (unreadable image)" in err
    assert "Traceback" not in err


def test_overlay_names_keep_folders_and_never_collide(tmp_path: Path) -> None:
    paths = [tmp_path / p for p in ("a/x.png", "b/x.png", "b/X.jpg", "b/y.tif", "z.png")]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    names = overlay_names([str(p) for p in paths], tmp_path)
    assert [names[str(p)] for p in paths] == [
        "a/x.png",
        "b/x.png.png",
        "b/X.jpg.png",
        "b/y.png",
        "z.png",
    ]
    # One image given as the root: its own name.
    assert overlay_names([str(paths[0])], paths[0]) == {str(paths[0]): "x.png"}
