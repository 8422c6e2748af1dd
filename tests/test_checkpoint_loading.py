"""Checkpoints are checked before use and loaded safely: one line and exit status 2 for a missing,
cut, foreign or code-carrying checkpoint, and no evaluation on random weights by accident."""

from __future__ import annotations

import importlib
import pickle
import random
from pathlib import Path
from typing import Any

import lightning
import pytest
import torch

from lld_lightning.cli import LldCLI, main
from lld_lightning.data.datamodule import LldDataModule
from lld_lightning.module import LldModule
from tests.conftest import REPO

TINY = str(REPO / "configs" / "tiny.yaml")


def _args(work: Path) -> list[str]:
    return [
        "--config",
        TINY,
        "--data.synthetic.dir",
        str(work / "data"),
        "--trainer.default_root_dir",
        str(work / "runs"),
    ]


class Payload:
    """Unpickling it creates ``marker``: what a malicious checkpoint would do with any code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return open, (str(self.marker), "w")


def run_code(*args: Any, **kwargs: Any) -> None:
    """What a checkpoint's ``_instantiator`` could name; it must never be called."""
    raise AssertionError("a checkpoint's _instantiator ran")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with checkpoints of tiny.yaml's model, good and bad (no training needed)."""
    work = tmp_path_factory.mktemp("loading")
    model = LldCLI(
        LldModule, LldDataModule, run=False, args=[*_args(work), "--trainer.logger", "false"]
    ).model
    lightning_checkpoint = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 0,
    }
    folder = work / "ckpts"
    folder.mkdir()
    torch.save(lightning_checkpoint, folder / "weights.ckpt")
    (folder / "empty.ckpt").write_bytes(b"")
    whole = (folder / "weights.ckpt").read_bytes()
    (folder / "half.ckpt").write_bytes(whole[: len(whole) // 2])
    (folder / "random.ckpt").write_bytes(random.Random(0).randbytes(4096))
    torch.save(model.state_dict(), folder / "state_dict.ckpt")
    torch.save(
        {**lightning_checkpoint, "state_dict": {"layer.weight": torch.ones(2)}},
        folder / "other_model.ckpt",
    )
    torch.save(
        {**lightning_checkpoint, "payload": Payload(work / "ran_code")}, folder / "malicious.ckpt"
    )
    hparams = {
        **lightning_checkpoint["hyper_parameters"],
        "_instantiator": "tests.test_checkpoint_loading.run_code",
    }
    torch.save({**lightning_checkpoint, "hyper_parameters": hparams}, folder / "instantiator.ckpt")
    hparams = {
        **lightning_checkpoint["hyper_parameters"],
        "_class_path": "tests.test_checkpoint_loading.Payload",
    }
    torch.save({**lightning_checkpoint, "hyper_parameters": hparams}, folder / "class_path.ckpt")
    # The same payload, to show it does run when loaded unsafely.
    torch.save({"payload": Payload(work / "ran_code_unsafely")}, folder / "probe.ckpt")
    return work


def _refusal(capsys: pytest.CaptureFixture, argv: list[str], command: str) -> str:
    """Run ``lld argv``, expect exit status 2 and return its one line on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lld {command}: "), err
    return lines[0]


@pytest.mark.parametrize("command", ["validate", "test", "predict"])
def test_evaluating_without_a_checkpoint_is_refused(command: str, work: Path, capsys) -> None:
    line = _refusal(capsys, [command, *_args(work)], command)
    assert "random weights" in line and "--allow_random_weights true" in line


def test_random_weights_run_when_asked_for(work: Path) -> None:
    cli = main(
        [
            "validate",
            *_args(work),
            "--allow_random_weights",
            "true",
            "--trainer.enable_progress_bar",
            "false",
            "--data.synthetic.num_images",
            "8",
        ]
    )
    assert cli.trainer.state.finished and "val/map_50" in cli.trainer.callback_metrics


@pytest.mark.parametrize(
    ("name", "says", "command"),
    [
        ("missing", "no checkpoint at", "test"),
        ("empty", "is empty (0 bytes)", "test"),
        ("half", "not a readable checkpoint", "test"),
        ("random", "not a readable checkpoint", "test"),
        ("state_dict", "not a Lightning checkpoint", "test"),
        ("other_model", "checkpoint of another model", "test"),
        ("missing", "no checkpoint at", "fit"),
        ("half", "not a readable checkpoint", "fit"),
        ("state_dict", "not a Lightning checkpoint", "predict"),
    ],
)
def test_a_bad_checkpoint_is_one_line_naming_the_file(
    name: str, says: str, command: str, work: Path, capsys
) -> None:
    path = work / "ckpts" / f"{name}.ckpt"
    line = _refusal(capsys, [command, *_args(work), "--ckpt_path", str(path)], command)
    assert str(path) in line and says in line


def test_a_fit_does_not_resume_from_weights_alone(work: Path, capsys) -> None:
    path = work / "ckpts" / "weights.ckpt"
    line = _refusal(capsys, ["fit", *_args(work), "--ckpt_path", str(path)], "fit")
    assert str(path) in line and "cannot resume" in line


@pytest.mark.parametrize("command", ["test", "predict", "fit"])
def test_a_malicious_checkpoint_runs_no_code_in_lld(command: str, work: Path, capsys) -> None:
    with pytest.raises(pickle.UnpicklingError):
        torch.load(work / "ckpts" / "probe.ckpt", weights_only=True)
    path = work / "ckpts" / "malicious.ckpt"
    line = _refusal(capsys, [command, *_args(work), "--ckpt_path", str(path)], command)
    assert str(path) in line and "refused" in line and "io.open" in line
    assert not (work / "ran_code").exists()


@pytest.mark.parametrize(("name", "command"), [("instantiator", "test"), ("class_path", "predict")])
def test_a_checkpoint_naming_code_to_rebuild_the_model_is_refused(
    name: str, command: str, work: Path, capsys
) -> None:
    path = work / "ckpts" / f"{name}.ckpt"
    line = _refusal(capsys, [command, *_args(work), "--ckpt_path", str(path)], command)
    assert (
        str(path) in line
        and f"_{name} 'tests.test_checkpoint_loading." in line
        and "refused" in line
    )


def test_the_probe_payload_does_run_code_when_loaded_unsafely(work: Path) -> None:
    torch.load(work / "ckpts" / "probe.ckpt", weights_only=False)
    assert (work / "ran_code_unsafely").exists()


@pytest.mark.parametrize(
    ("tool", "name"),
    [
        ("tune", "malicious"),
        ("score_thresholds", "malicious"),
        ("score_thresholds", "instantiator"),
    ],
)
def test_a_malicious_checkpoint_runs_no_code_in_the_tools(tool: str, name: str, work: Path) -> None:
    run = importlib.import_module(f"lld_lightning.tools.{tool}").main
    # Refused, one way or another (`run_code` raises AssertionError, which is not among these).
    with pytest.raises((SystemExit, pickle.UnpicklingError, ValueError)):
        run(["--ckpt_path", str(work / "ckpts" / f"{name}.ckpt"), *_args(work)])
    assert not (work / "ran_code").exists()


@pytest.mark.parametrize(("tool", "name"), [("tune", "malicious"), ("score_thresholds", "half")])
def test_the_tools_refuse_a_bad_checkpoint_in_one_line(tool: str, name: str, work: Path) -> None:
    run = importlib.import_module(f"lld_lightning.tools.{tool}").main
    path = work / "ckpts" / f"{name}.ckpt"
    with pytest.raises(SystemExit) as exit_info:
        run(["--ckpt_path", str(path), *_args(work)])
    message = str(exit_info.value.code)
    assert message.startswith(f"{tool}: ") and str(path) in message and "\n" not in message


@pytest.mark.parametrize("command", ["fit", "test"])
def test_lightning_loads_checkpoints_with_weights_only(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--config", TINY, "--print_config"])
    assert exit_info.value.code == 0
    assert "weights_only: true" in capsys.readouterr().out
