"""A run's folder and its checkpoints: one folder per fit, atomic writes, a resume that continues.

``lld fit`` writes everything of one run into its own folder under ``--trainer.default_root_dir``
(``ROOT``); a second fit gets the next one, and nothing of an earlier run is overwritten::

    ROOT/version_N/
        config.yaml                  the resolved config
        checkpoints/best.ckpt        best by --checkpoint.monitor
        checkpoints/last.ckpt        the run's latest state (see `RunCheckpoint`)
        metrics.csv, hparams.yaml    CSV logs
        events.out.tfevents.*        TensorBoard logs
        test_results.json            what the latest `lld test` of one of its checkpoints measured
        results.json, plots/         the same, structured, with PR curves and confusion matrices
        tests/<date>/                an earlier test on other data, kept when a new one replaces it
    ROOT/latest -> version_N         the run the latest fit wrote to

A fit resumed from a run's checkpoint (``--ckpt_path ROOT/version_N/checkpoints/last.ckpt``)
continues in that run's folder.
"""

from __future__ import annotations

import contextlib
import csv
import os
import random
import re
import secrets
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

#: ``ROOT/latest``: a link to the folder of the latest fit (a text file naming it where links are
#: not allowed).
LATEST = "latest"
#: The resolved config LightningCLI writes into a run's folder; it marks the folder as a run's.
RUN_CONFIG = "config.yaml"
#: Where `lld test` writes the flat metrics of a run's checkpoint (``LldModule.test_results``).
TEST_RESULTS = "test_results.json"
#: Top-level checkpoint key of the random states a resumed fit restores.
RNG_STATES_KEY = "lld_rng_states"

#: The only code a checkpoint's hyperparameters may name: LightningCLI's instantiator and the model.
TRUSTED_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"
MODEL_CLASS_PATH = "lld_lightning.module.LldModule"

_VERSION = re.compile(r"version_(\d+)")
#: Temp files of `atomic_write`: ``.<name>.<12 hex digits>.tmp`` next to the destination.
_TEMP = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line and names the file."""


# --------------------------------------------------------------------------------- loading
def read_checkpoint(path: str | os.PathLike, resume: bool = False) -> dict[str, Any]:
    """The checkpoint at ``path``, loaded without running any code from it (``weights_only=True``,
    on the CPU), once it is known to be a Lightning checkpoint of an `LldModule` (and, with
    ``resume``, one a fit can continue from).

    Raises:
        CheckpointError: the file is missing or unreadable (empty, cut short, not a PyTorch file),
            holds Python objects that only an unsafe load would rebuild, or is not a Lightning
            checkpoint of an `LldModule`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch reports a bad file with many error types
        text = str(error)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found is not None or "Unsupported global" in text:
            name = found.group(1) if found else "an object"
            raise CheckpointError(
                f"{path} holds a Python object ({name}) that loading it would run; refused (lld "
                "loads checkpoints with weights_only=True: tensors and plain values only)"
            ) from None
        raise CheckpointError(
            f"{path} is not a readable checkpoint (cut short or not a PyTorch file): "
            f"{_reason(error)}"
        ) from None
    if (
        not isinstance(checkpoint, dict)
        or not isinstance(checkpoint.get("state_dict"), dict)
        or "pytorch-lightning_version" not in checkpoint
    ):
        raise CheckpointError(
            f"{path} is not a Lightning checkpoint (no state_dict and pytorch-lightning_version; "
            "a plain state dict or another file?)"
        )
    if not any(str(key).startswith("detector.") for key in checkpoint["state_dict"]):
        raise CheckpointError(
            f"{path} is a Lightning checkpoint of another model (no LldModule detector weights)"
        )
    # Lightning imports and calls these names when it rebuilds the model (before 2.6.6 without an
    # allowlist): code a checkpoint must not choose.
    hparams = checkpoint.get("hyper_parameters")
    hparams = hparams if isinstance(hparams, dict) else {}
    named = {key: hparams.get(key) for key in ("_instantiator", "_class_path")}
    if named["_instantiator"] not in (None, TRUSTED_INSTANTIATOR) or named["_class_path"] not in (
        None,
        MODEL_CLASS_PATH,
    ):
        shown = ", ".join(f"{key} {value!r}" for key, value in named.items() if value is not None)
        raise CheckpointError(
            f"{path} names code to run when the model is rebuilt ({shown}); refused"
        )
    if resume and ("loops" not in checkpoint or not checkpoint.get("optimizer_states")):
        raise CheckpointError(
            f"{path} holds weights only (save_weights_only): a fit cannot resume from it"
        )
    return checkpoint


def _reason(error: Exception, limit: int = 160) -> str:
    """torch's own reason, in one line: the safe unpickler's detail rather than its preamble
    (which suggests the unsafe load)."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    line = (
        next((part.strip() for part in text.splitlines() if part.strip()), "")
        or type(error).__name__
    )
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ---------------------------------------------------------------------------------- writing
def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` so that a reader, a crash or a ``kill -9`` finds the old file or the new one,
    never a part: ``write`` fills a temp file in the destination folder (a rename never crosses
    filesystems), which is flushed and fsynced, renamed onto ``path``, and the folder is fsynced
    so that the rename survives a power cut. The temp file is removed when ``write`` fails; one
    left by a killed process is removed by `remove_stale_temp_files`."""
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    temp = folder / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        with open(temp, "xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    _fsync_folder(folder)


def atomic_save(checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """``torch.save(checkpoint)`` to ``path`` through `atomic_write`."""
    atomic_write(path, lambda handle: torch.save(checkpoint, handle))


def _fsync_folder(folder: Path) -> None:
    if os.name != "posix":  # a folder cannot be opened on Windows; NTFS journals the rename
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp files `atomic_write` left in ``folder`` when its process was killed;
    returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if _TEMP.fullmatch(p.name) and p.is_file()]
    for path in stale:
        with contextlib.suppress(OSError):
            path.unlink()
    return stale


def _is_local(path: Any) -> bool:
    return "://" not in str(path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save``/``torch.load`` plugin with local checkpoints written by
    `atomic_save`.

    Lightning itself writes to a temp file in the system's temp folder and moves it into place,
    which is a copy, not a rename, when that folder is on another filesystem (a tmpfs ``/tmp``):
    a kill during the copy leaves a cut checkpoint, and temp files of killed runs stay behind.
    Remote paths (``s3://...``) keep Lightning's writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_save(checkpoint, path)


# ---------------------------------------------------------------------------- random state
def rng_states() -> dict[str, Any]:
    """The global random states a training step draws from: torch (CPU, and every CUDA device
    once CUDA is in use), numpy and Python, as tensors and plain values (``weights_only``
    loadable). The training sampler's shuffle is drawn from torch's state when an epoch's
    iterator is made, so it is part of it."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the global random states `rng_states` returned (CUDA ones for the devices present)."""
    torch.set_rng_state(states["torch"].cpu())
    for device, state in enumerate(states.get("cuda", [])[: torch.cuda.device_count()]):
        torch.cuda.set_rng_state(state.cpu(), device)
    numpy_state = states["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ------------------------------------------------------------------------------- callback
class RunCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` for runs that lose nothing (the arguments are `ModelCheckpoint`'s).

    - With ``save_last`` true, ``last.ckpt`` holds the run's latest state: it is written at the
      end of every training epoch, after every validation that does not end an epoch, and at the
      end of fit, whether or not the monitored metric improved (Lightning alone rewrites it only
      with a new best). The top-k files (``best.ckpt``) follow the monitor as in Lightning.
      Under ``fast_dev_run`` nothing is written (Lightning 2.6 still writes ``last.ckpt`` there).
    - Every local checkpoint is written atomically and durably (`AtomicCheckpointIO`, installed on
      the trainer's strategy unless it has its own plugin); under DDP only global rank 0 writes,
      as in Lightning. Temp files of a killed run are removed when the folder's next fit starts.
    - Every checkpoint carries the global random states (`rng_states`); a fit resumed from it
      restores them, so with the same seed it continues exactly as the uninterrupted run from a
      checkpoint at an epoch end (one written inside an epoch, e.g. by a mid-epoch validation,
      restarts that epoch's data: Lightning warns). Under DDP every rank restores rank 0's states.
    """

    #: How many times ``last.ckpt`` was written, and at which global step the latest time.
    _last_saves: int = 0
    _last_step: int = -1
    #: Whether the checkpoint being loaded resumes a fit.
    _resuming: bool = True

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()
        own_run = (
            self.dirpath is not None
            and _is_local(self.dirpath)
            and _is_run_folder(Path(self.dirpath).parent)
        )
        with warnings.catch_warnings():
            if own_run:  # a resumed fit continues in its own folder by design
                warnings.filterwarnings(
                    "ignore", message="Checkpoint directory .* exists and is not empty"
                )
            super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.is_global_zero and self.dirpath and _is_local(self.dirpath):
            remove_stale_temp_files(self.dirpath)

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[RNG_STATES_KEY] = rng_states()

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._resuming = trainer.state.fn == TrainerFn.FITTING
        # Restored before the first training iterator of the resumed fit is made (its shuffle).
        if self._resuming and RNG_STATES_KEY in checkpoint:
            restore_rng_states(checkpoint[RNG_STATES_KEY])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks for every command; only a resumed fit continues the
        # checkpoint's best-so-far bookkeeping (an evaluation has no checkpoint folder of its own).
        if self._resuming:
            super().load_state_dict(state_dict)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        saves = self._last_saves
        super().on_train_epoch_end(trainer, pl_module)
        if self._last_saves == saves:
            self._save_last(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        saves = self._last_saves
        super().on_validation_end(trainer, pl_module)
        # A validation on an epoch's last batch is followed by the epoch end, which saves.
        ends_epoch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if self._last_saves == saves and not ends_epoch and self._last_step != trainer.global_step:
            self._save_last(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.fast_dev_run:  # Lightning (2.6) writes last.ckpt here even under fast_dev_run
            return
        super().on_train_end(trainer, pl_module)
        if self._last_step != trainer.global_step:
            self._save_last(trainer)

    def _save_last_checkpoint(
        self, trainer: Trainer, monitor_candidates: dict[str, torch.Tensor]
    ) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_saves += 1
            self._last_step = trainer.global_step

    def _save_last(self, trainer: Trainer) -> None:
        if (
            not self.save_last
            or trainer.fast_dev_run
            or trainer.sanity_checking
            or trainer.state.fn != TrainerFn.FITTING
            or trainer.global_step == 0
        ):
            return
        # A last.ckpt alone is no top-k decision: the monitor may still save at this step.
        saved_step = self._last_global_step_saved
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._last_global_step_saved = saved_step


# ------------------------------------------------------------------------------ run folder
def _is_run_folder(folder: Path) -> bool:
    return (folder / RUN_CONFIG).is_file()


def run_folder_of(ckpt_path: str | os.PathLike | None) -> Path | None:
    """The run folder a checkpoint belongs to (``<run>/checkpoints/<name>.ckpt`` next to the
    run's ``config.yaml``), through links such as ``latest``; None for any other path."""
    if not ckpt_path or not _is_local(ckpt_path):
        return None
    path = Path(ckpt_path).resolve()
    run = path.parent.parent
    return run if path.parent.name == "checkpoints" and _is_run_folder(run) else None


def claim_run_folder(root: str | os.PathLike) -> Path:
    """Create ``<root>/version_N``, N one above the highest there, and return it (a folder made
    meanwhile by another fit is skipped, so two fits never share one)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    numbers = [
        int(m.group(1)) for p in root.iterdir() if (m := _VERSION.fullmatch(p.name)) and p.is_dir()
    ]
    number = max(numbers, default=-1) + 1
    while True:
        folder = root / f"version_{number}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            number += 1


def point_latest(root: str | os.PathLike, run: str | os.PathLike) -> None:
    """Point ``<root>/latest`` at ``run`` with one rename, so it always names a whole run: a
    relative link, or a text file holding the relative path where links are not allowed."""
    root, run = Path(root), Path(run)
    link = root / LATEST
    temp = root / f".{LATEST}.{secrets.token_hex(6)}.tmp"
    target = os.path.relpath(run, root)
    try:
        os.symlink(target, temp, target_is_directory=True)
    except OSError:  # e.g. Windows without the right to make links
        temp.write_text(f"{target}\n")
    try:
        os.replace(temp, link)
    except OSError as error:  # e.g. a folder named latest
        with contextlib.suppress(OSError):
            temp.unlink()
        rank_zero_warn(f"lld: could not point {link} at {run}: {error}")


def latest_run(root: str | os.PathLike) -> Path | None:
    """The run folder ``<root>/latest`` names, or None."""
    link = Path(root) / LATEST
    if link.is_symlink():
        return link.resolve() if link.exists() else None
    if link.is_file():
        folder = (Path(root) / link.read_text().strip()).resolve()
        return folder if folder.is_dir() else None
    return None


def discard_unstarted_run(run: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Remove ``run`` when its fit failed before it began (no config written, no checkpoint: a
    logger's empty event file at most), and point ``latest`` back at the newest remaining run;
    returns whether it was removed."""
    run, root = Path(run), Path(root)
    if not run.is_dir() or (run / RUN_CONFIG).exists() or any(run.rglob("*.ckpt")):
        return False
    was_latest = latest_run(root) == run.resolve()
    shutil.rmtree(run, ignore_errors=True)
    if was_latest:
        runs = [p for p in root.iterdir() if _VERSION.fullmatch(p.name) and p.is_dir()]
        if runs:
            point_latest(root, max(runs, key=lambda p: int(p.name.split("_")[1])))
        else:
            with contextlib.suppress(OSError):
                (root / LATEST).unlink()
    return True


class _RunCsvWriter(ExperimentWriter):
    """Lightning's CSV writer, continuing the run folder's ``metrics.csv``: the folder holds the
    config and the checkpoints too (no warning), and a resumed fit appends to its file instead of
    deleting it."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                self.metrics_keys = next(csv.reader(handle), [])


class RunCsvLogger(CSVLogger):
    """`CSVLogger` writing ``metrics.csv`` into a run's folder and continuing it on resume."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _RunCsvWriter(log_dir=self.log_dir)
        return self._experiment
