"""Images that fail to decode only when a loader reads them: ``on_error`` holds wherever they are
found (in the main process or a DataLoader worker, in training, evaluation or prediction)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lld_lightning.cli import main
from lld_lightning.data.dataset import UNREADABLE_IMAGE, LldDataset, SkipCountingLoader
from lld_lightning.data.errors import DataError, DataReport, error_message
from lld_lightning.data.records import ImageRecord
from lld_lightning.data.sample import SKIPPED_KEY, collate
from tests.conftest import REPO

TINY = str(REPO / "configs" / "tiny.yaml")
NUM_ATTRIBUTES = 7


def noise_png(path: Path, size: tuple[int, int] = (32, 24)) -> Path:
    """A PNG of noise (incompressible, so that half of the file cuts into the pixels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.effect_noise(size, 60).convert("RGB").save(path)
    return path


def truncate(path: Path) -> Path:
    """Keep the first half of the file: the header still reads, the pixels do not."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def record(path: Path, size: tuple[int, int] = (32, 24)) -> ImageRecord:
    return ImageRecord(
        path=path,
        width=size[0],
        height=size[1],
        attributes=np.zeros((0, NUM_ATTRIBUTES), dtype=np.int64),
    )


def dataset(tmp_path: Path, names: str, **kwargs) -> LldDataset:
    """One image per letter of ``names``: ``g`` readable, ``b`` truncated."""
    records = []
    for i, kind in enumerate(names):
        path = noise_png(tmp_path / f"{i}_{kind}.png")
        records.append(record(truncate(path) if kind == "b" else path))
    return LldDataset(records, NUM_ATTRIBUTES, 10**6, **kwargs)


def test_raise_names_the_undecodable_file(tmp_path: Path) -> None:
    data = dataset(tmp_path, "gb")
    assert data[0]["image"].shape == (3, 24, 32)
    with pytest.raises(DataError, match="truncated") as info:
        data[1]
    assert str(data.records[1].path) in str(info.value)


def test_skip_in_evaluation_drops_the_image_from_its_batch(tmp_path: Path) -> None:
    data = dataset(tmp_path, "gbg", on_error="skip")
    bad = str(data.records[1].path)
    assert set(data[1]) == {SKIPPED_KEY}
    batch = collate([data[0], data[1], data[2]])
    assert batch["image"].shape[0] == 2 and batch["path"] == [
        str(data.records[0].path),
        str(data.records[2].path),
    ]
    assert [s.path for s in batch[SKIPPED_KEY]] == [bad]
    # A batch of skipped images only: no image key, only the list of what was skipped.
    assert collate([data[1]]) == {SKIPPED_KEY: data[1][SKIPPED_KEY]}
    # Nothing skipped: the batch has no skipped key (unchanged contract).
    assert SKIPPED_KEY not in collate([data[0]])


def test_skip_in_training_fills_in_the_next_readable_image(tmp_path: Path) -> None:
    data = dataset(tmp_path, "gbbg", on_error="skip", fill_skipped=True)
    sample = data[1]
    assert sample["path"] == str(data.records[3].path)
    assert [s.path for s in sample[SKIPPED_KEY]] == [str(r.path) for r in data.records[1:3]]
    assert SKIPPED_KEY not in data[0]
    with pytest.raises(DataError, match="none of the 2 images"):
        dataset(tmp_path / "all_bad", "bb", on_error="skip", fill_skipped=True)[0]


def test_loader_counts_skips_found_in_workers_once_and_yields_no_empty_batch(
    tmp_path: Path,
) -> None:
    data = dataset(tmp_path, "bbgg", on_error="skip")
    report = DataReport(on_error="skip")
    loader = SkipCountingLoader(
        data, batch_size=2, num_workers=2, collate_fn=collate, report=report
    )
    for _ in range(2):  # a second epoch meets the same files again: still counted once each
        batches = list(loader)
        assert len(batches) == 1 and batches[0]["image"].shape[0] == 2
        assert SKIPPED_KEY not in batches[0]
    assert report.skipped == {UNREADABLE_IMAGE: 2}
    assert sorted(report.files) == [str(r.path) for r in data.records[:2]]


def test_a_worker_error_gives_back_its_own_message(tmp_path: Path) -> None:
    data = dataset(tmp_path, "gb")
    loader = SkipCountingLoader(data, batch_size=1, num_workers=1, collate_fn=collate)
    with pytest.raises(DataError) as info:
        list(loader)
    assert "Traceback" in str(info.value)  # torch wraps the worker's traceback into the message
    message = error_message(info.value)
    assert message.startswith(f"{data.records[1].path}: corrupt or truncated image")
    assert "\n" not in message
    assert error_message(DataError("x.png: plain")) == "x.png: plain"


@pytest.fixture
def dataset_with_a_truncated_training_image(
    tiny_synthetic: Path, tmp_path: Path
) -> tuple[Path, Path]:
    """A copy of the tiny synthetic set whose first training image is truncated."""
    root = tmp_path / "data"
    shutil.copytree(tiny_synthetic, root)
    bad = sorted(root.rglob("images/train/*.png"))[0]
    truncate(bad)
    return root, bad


def _fit(root: Path, run: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", TINY, "--data.root", str(root), "--trainer.default_root_dir", str(run),
        # Two worker processes; the tiny config's two batches of 4 read all 8 training images.
        "--data.num_workers", "2", *extra,
    ]  # fmt: skip


def test_fit_under_skip_skips_an_image_found_truncated_in_a_worker_and_says_so(
    dataset_with_a_truncated_training_image: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    root, bad = dataset_with_a_truncated_training_image
    monkeypatch.chdir(tmp_path)
    cli = main(_fit(root, tmp_path / "run", "--data.reading.on_error", "skip"))
    assert cli.trainer.state.finished
    assert list((tmp_path / "run").rglob("last.ckpt"))
    err = capsys.readouterr().err
    assert "lld fit: skipped 1 file(s)" in err and f"(unreadable image), e.g. {bad}:" in err


def test_fit_under_raise_stops_with_one_line_naming_the_file(
    dataset_with_a_truncated_training_image: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    root, bad = dataset_with_a_truncated_training_image
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(_fit(root, tmp_path / "run"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lld: data error:")]
    assert len(lines) == 1
    assert lines[0].startswith(f"lld: data error: {bad}: corrupt or truncated image")
    assert "Traceback" not in err and "worker process" not in err
