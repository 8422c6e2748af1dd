"""The ``lld`` command: a small LightningCLI subclass (argument links, run folders, friendly
errors)."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import (
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
    RichProgressBar,
)
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from lld_lightning.callbacks.checkpoint import (
    LATEST,
    TEST_RESULTS,
    CheckpointError,
    RunCheckpoint,
    RunCsvLogger,
    atomic_write,
    claim_run_folder,
    discard_unstarted_run,
    latest_run,
    point_latest,
    read_checkpoint,
    remove_stale_temp_files,
    run_folder_of,
)
from lld_lightning.callbacks.predict_writer import PredictionWriter
from lld_lightning.data.datamodule import LldDataModule
from lld_lightning.data.errors import DataError
from lld_lightning.data.red_cells import pixel_size_option
from lld_lightning.metrics import EvaluationDetails
from lld_lightning.metrics.results import (
    PLOTS_DIR,
    keep_earlier_test,
    tested_data,
    write_test_outputs,
)
from lld_lightning.models.backbone import BackboneError
from lld_lightning.module import LldModule
from lld_lightning.tools.machine import cpu_bf16_units

#: The commands that evaluate a trained model: they refuse to run without ``--ckpt_path``.
EVALUATING = ("validate", "test", "predict")
#: The flag that overrides the working resolution a checkpoint was trained at.
WORKING_FLAG = "--data.pixel_size.working"


class LldCLI(LightningCLI):
    """``lld fit|validate|test|predict`` with the data module's label space linked into the model.

    Each ``lld fit`` writes one run folder, ``<--trainer.default_root_dir>/version_N`` (the next
    free N; ``latest`` next to it names the newest): the resolved config, ``checkpoints/best.ckpt``
    (by ``--checkpoint.monitor``, val mAP@.5 unless a config says otherwise) and
    ``checkpoints/last.ckpt`` (the latest state, `RunCheckpoint`), TensorBoard and CSV logs with
    the learning rate; a fit resumed from a run's checkpoint continues in that run's folder, and
    ``lld test`` of a run's checkpoint writes ``test_results.json``, ``results.json`` and
    ``plots/`` there (`lld_lightning.metrics.results`). ``--ckpt_path last``
    (or ``best``) names that checkpoint of the latest run. Every checkpoint is checked before
    use and loaded with ``weights_only=True``; the evaluating commands refuse to run without one
    unless ``--allow_random_weights true``. A Rich progress bar is shown.
    """

    #: The run folder of this command: the fit's, or that of the evaluated checkpoint.
    run_dir: Path | None = None
    #: The run folder this fit created (removed again when the fit fails before it begins).
    _claimed_run: Path | None = None

    def add_arguments_to_parser(self, parser) -> None:
        for name in ("num_classes", "attribute_spec", "class_names"):
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults({
            "trainer.default_root_dir": "runs/default",
            # bf16 on GPUs and on CPUs with bf16 units (fp32 where it would be emulated, see
            # `cpu_bf16_is_emulated`); clipping guards the first steps of a from-scratch backbone.
            "trainer.precision": "bf16-mixed",
            "trainer.gradient_clip_val": 10.0,
            "trainer.log_every_n_steps": 10,
            "checkpoint.filename": "best",
            "checkpoint.monitor": "val/map_50",
            "checkpoint.mode": "max",
            "checkpoint.save_last": True,
            "checkpoint.enable_version_counter": False,
        })
        parser.add_lightning_class_args(PredictionWriter, "predict_writer")

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand in ("validate", "test"):
            # The module prints its own per-domain table; Lightning's would list every logged key.
            parser.set_defaults({"verbose": False})
        if subcommand in EVALUATING:
            parser.add_argument(
                "--allow_random_weights",
                type=bool,
                default=False,
                help="Run without --ckpt_path, on the model's random initial weights (smoke tests).",
            )
        if subcommand == "predict":
            parser.add_argument(
                "--pixel_size_um",
                type=float | Literal["auto"] | None,
                default=None,
                help="Micrometres per pixel of the images (a new microscope): they are resampled "
                "to the model's working resolution. 'auto': measured from the red cells of each "
                "domain whose size the data does not give. Needs a model trained with "
                "data.pixel_size.working.",
            )
        if "weights_only" in self._subcommand_method_arguments.get(subcommand, []):
            # torch < 2.6 loads unsafely by default; a checkpoint of lld needs no Python objects.
            parser.set_defaults({"weights_only": True})
        return parser

    def parse_arguments(self, parser, args) -> None:
        # Kept for `_parse_ckpt_path`: which model arguments the user typed.
        self._explicit_model_keys = explicit_model_keys(args if args is not None else sys.argv[1:])
        typed = [str(a) for a in (args if isinstance(args, (list, tuple)) else sys.argv[1:])]
        self._typed_working = any(a.startswith(WORKING_FLAG) for a in typed)
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """The checkpoint's hyperparameters, as Lightning loads them, except the model arguments
        the command line names (``--model.*`` flags, nested ones such as
        ``--model.postprocess.nms_iou`` included, or a whole ``--model`` mapping or file), which
        win.

        Lightning (2.6) replaces the whole model config with the checkpoint's hyperparameters, so
        ``lld test --ckpt_path C --model.postprocess.nms_iou 0.7`` would silently test at the
        checkpoint's NMS IoU (Lightning-AI/pytorch-lightning#21455 proposes the same precedence).
        Values from ``--config`` files still lose to the checkpoint: a config whose architecture
        differs from the checkpoint's cannot load its weights.
        """
        self._check_ckpt_path()
        subcommand = self.config.get("subcommand")
        model = self.config[subcommand].get("model") if subcommand else None
        typed = {}
        for path in getattr(self, "_explicit_model_keys", []):
            found, value = _get_path(model, path.split("."))
            if found:
                typed[path] = value
        super()._parse_ckpt_path()
        model = self.config[subcommand].get("model") if subcommand else None
        for path, value in typed.items():
            _set_path(model, path.split("."), value)
        self._restore_working_resolution()

    def _restore_working_resolution(self) -> None:
        """Evaluate a checkpoint at the working resolution it was trained at.

        The data settings come from ``--config``, not the checkpoint; a config without (or with
        another) ``data.pixel_size.working`` would show the model cells of the wrong size. The
        checkpoint's value wins unless the command line names ``--data.pixel_size.working``.
        """
        subcommand = self.config.get("subcommand")
        if subcommand not in EVALUATING or getattr(self, "_typed_working", False):
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=True)
        saved_data = checkpoint.get("datamodule_hyper_parameters")
        if saved_data is None:  # not written by a fit: nothing says how it was trained
            return
        # A checkpoint from before pixel sizes existed was trained letterboxing (working null).
        working = (saved_data.get("pixel_size") or {}).get("working")
        data = self.config[subcommand].get("data")
        found, current = _get_path(data, ["pixel_size", "working"])
        if found and current != working:
            rank_zero_info(
                f"lld {subcommand}: data.pixel_size.working {working}, as the checkpoint was "
                f"trained (the config says {current})"
            )
            _set_path(data, ["pixel_size", "working"], working)

    def _check_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path last|best`` to the latest run's checkpoint, and end with one line
        (exit status 2) when an evaluating command has no checkpoint (and no
        ``--allow_random_weights``) or the checkpoint is missing, unreadable, unsafe or not an
        `LldModule` one (`read_checkpoint`)."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path in ("last", "best"):
            root = Path(config.get("trainer", {}).get("default_root_dir") or "runs/default")
            run = latest_run(root)
            if run is None:
                missing = f"no run in {root} ({root / LATEST} is missing)"
                _refuse(subcommand, f"--ckpt_path {ckpt_path}: {missing}")
            ckpt_path = config["ckpt_path"] = str(run / "checkpoints" / f"{ckpt_path}.ckpt")
        if ckpt_path is None:
            if subcommand in EVALUATING and not config.get("allow_random_weights"):
                _refuse(
                    subcommand,
                    "no --ckpt_path: the model would have random weights (pass a checkpoint, e.g. "
                    "--ckpt_path <run>/checkpoints/best.ckpt, or --allow_random_weights true for a "
                    "smoke test)",
                )
            return
        source = str(ckpt_path)
        if source in ("hpc", "registry") or source.startswith("registry:") or "://" in source:
            return  # Lightning's own sources, loaded with weights_only too
        try:
            read_checkpoint(ckpt_path, resume=subcommand == "fit")
        except CheckpointError as error:
            _refuse(subcommand, str(error))

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Trainer:
        if cpu_bf16_is_emulated(config):
            rank_zero_warn(
                f"lld: --trainer.precision {config['precision']} on a CPU without bf16 units (no "
                "AVX512-BF16 or AMX), where torch emulates bf16: a training step is about ten times "
                "slower than in fp32 (docs/results.md). Running in 32-true instead; set "
                f"{KEEP_CPU_BF16}=1 to keep bf16."
            )
            config["precision"] = "32-true"
        root = Path(config.get("default_root_dir") or "runs/default")
        ckpt_path = self.config[self.subcommand].get("ckpt_path") if self.subcommand else None
        self.run_dir = None
        if self.subcommand == "fit" and ckpt_path is not None:
            self.model.resume()  # the checkpoint restores every weight: no --model.init_from
        if self.subcommand == "fit" and not config.get("fast_dev_run"):
            self.run_dir = self._fit_run_folder(root, ckpt_path)
            config["default_root_dir"] = str(self.run_dir)
            for callback in [*(config.get("callbacks") or []), *callbacks]:
                if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                    callback.dirpath = os.path.realpath(self.run_dir / "checkpoints")
        elif self.subcommand in EVALUATING:
            self.run_dir = run_folder_of(ckpt_path)
        if config.get("logger") in (None, True):
            # Only a fit logs to files; the other commands print their results.
            config["logger"] = False
            if self.subcommand == "fit" and self.run_dir is not None:
                run = {"save_dir": str(self.run_dir.parent), "name": "", "version": self.run_dir.name}
                # CSV rows are written as they are logged: a killed fit keeps them.
                csv_logger = RunCsvLogger(**run, flush_logs_every_n_steps=1)
                config["logger"] = [TensorBoardLogger(**run), csv_logger]
        given = list(config.get("callbacks") or []) + list(callbacks)
        added = []
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
            added.append(RichProgressBar())
        if config["logger"] and not any(isinstance(c, LearningRateMonitor) for c in given):
            added.append(LearningRateMonitor(logging_interval="step"))
        config["callbacks"] = [*(config.get("callbacks") or []), *added]
        save_config_callback = self.save_config_callback
        if self.subcommand != "fit":  # the config of a run is the fit's
            self.save_config_callback = None
        try:
            return super()._instantiate_trainer(config, callbacks)
        except BaseException:
            self._discard_claimed_run()
            raise
        finally:
            self.save_config_callback = save_config_callback

    def _fit_run_folder(self, root: Path, ckpt_path: str | None) -> Path:
        """The folder of this fit: the resumed checkpoint's run, else a new ``version_N``; rank 0
        points ``latest`` at it (the other ranks follow that link; Lightning broadcasts the
        checkpoint folder from rank 0)."""
        resumed = run_folder_of(ckpt_path)
        if rank_zero_only.rank != 0:
            return resumed or latest_run(root) or root / "version_0"
        run = resumed or claim_run_folder(root)
        if resumed is None:
            self._claimed_run = run
        for folder in (run.parent, run):  # temp files of a killed fit's link or results
            remove_stale_temp_files(folder)
        point_latest(run.parent, run)
        rank_zero_info(f"lld fit: run folder {run}" + (" (resumed)" if resumed else ""))
        return run

    def _discard_claimed_run(self) -> None:
        """Remove the run folder this fit created if the fit failed before it began."""
        if self._claimed_run is not None and rank_zero_only.rank == 0:
            discard_unstarted_run(self._claimed_run, self._claimed_run.parent)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            with warnings.catch_warnings():
                if subcommand in EVALUATING:  # the fit's callbacks are not needed to evaluate
                    warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`")
                super()._run_subcommand(subcommand)
        except BaseException:
            self._discard_claimed_run()
            raise

    def before_predict(self) -> None:
        """Apply ``--pixel_size_um`` to every predicted image."""
        value = self.config["predict"].get("pixel_size_um")
        if value is None:
            return
        try:
            checked = pixel_size_option(value, self.datamodule.pixel_size.working)
        except ValueError as error:
            _refuse("predict", f"--pixel_size_um {value}: {error}")
        self.datamodule.predict_pixel_size_um = checked

    def after_test(self) -> None:
        """Write the test results into the run folder of the tested checkpoint."""
        if self.run_dir is None or not self.trainer.is_global_zero:
            return
        datamodule = self.datamodule
        data = tested_data(datamodule.data_root, datamodule.splits.test, datamodule.domains.test)
        kept = keep_earlier_test(self.run_dir, data, [TEST_RESULTS])
        if kept is not None:
            rank_zero_info(f"lld test: the results of a test on other data moved to {kept}")
        path = self.run_dir / TEST_RESULTS
        text = json.dumps(self.model.test_results, indent=2, sort_keys=True, default=float) + "\n"
        atomic_write(path, lambda handle: handle.write(text.encode()))
        details = self.model.test_details or EvaluationDetails()
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        written = write_test_outputs(
            self.run_dir,
            self.model.test_results,
            details,
            self.model.class_names,
            self.model.attribute_spec,
            None if ckpt_path is None else os.path.realpath(ckpt_path),
            data,
        )
        rank_zero_info(
            f"lld test: results written to {path}, {written[0].name} and {len(written) - 1} "
            f"plots in {written[0].parent / PLOTS_DIR}"
        )


def _refuse(subcommand: str, message: str) -> None:
    """End the command with one line on stderr and exit status 2."""
    print(f"lld {subcommand}: {message}", file=sys.stderr)
    raise SystemExit(2)


#: Environment variable that keeps a bf16 precision on a CPU without bf16 units.
KEEP_CPU_BF16 = "LLD_CPU_BF16"


def cpu_bf16_is_emulated(trainer_config: dict[str, Any]) -> bool:
    """Whether the trainer config asks for bf16 on a CPU that would emulate it (`cpu_bf16_units`
    is False) and ``LLD_CPU_BF16=1`` does not ask to keep it. The configs say ``bf16-mixed`` for
    GPUs and bf16-capable CPUs; on an AVX2-only CPU it is an order of magnitude slower."""
    precision = str(trainer_config.get("precision"))
    if not precision.startswith("bf16") or os.environ.get(KEEP_CPU_BF16) == "1":
        return False
    accelerator = trainer_config.get("accelerator")
    if accelerator in (None, "auto"):
        on_cpu = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    else:
        on_cpu = accelerator == "cpu"
    return on_cpu and cpu_bf16_units() is False


def explicit_model_keys(args: Any) -> list[str]:
    """The model arguments a command line names itself, in order, once each: the dotted path of
    each ``--model.<key>[.<sub>...][=value]`` flag (``init_args`` left out), and the top-level
    keys of a whole ``--model VALUE`` (a YAML or JSON mapping, or a file holding one); none for a
    dict or namespace of arguments."""
    if not isinstance(args, (list, tuple)):
        return []
    args = [str(a) for a in args]
    keys: list[str] = []
    for index, arg in enumerate(args):
        if arg.startswith("--model."):
            parts = arg[len("--model."):].split("=", 1)[0].split(".")
            keys.append(".".join(p for p in parts if p and p != "init_args"))
        elif arg.startswith("--model="):
            keys.extend(_mapping_keys(arg[len("--model="):]))
        elif arg == "--model" and index + 1 < len(args):
            keys.extend(_mapping_keys(args[index + 1]))
    return list(dict.fromkeys(k for k in keys if k))


def _child(node: Any, key: str) -> tuple[bool, Any]:
    """``node[key]``, looking inside a component's ``init_args`` when the key is not its own."""
    for candidate in (node, _child(node, "init_args")[1] if key != "init_args" else None):
        if candidate is None:
            continue
        try:
            if key in candidate:
                return True, candidate[key]
        except TypeError:
            pass
    return False, None


def _get_path(node: Any, parts: list[str]) -> tuple[bool, Any]:
    for part in parts:
        found, node = _child(node, part)
        if not found:
            return False, None
    return True, node


def _set_path(node: Any, parts: list[str], value: Any) -> None:
    found, parent = _get_path(node, parts[:-1])
    if not found or parent is None:
        return
    init_args = _child(parent, "init_args")[1]
    if parts[-1] not in parent and init_args is not None and parts[-1] in init_args:
        parent = init_args
    parent[parts[-1]] = value


def _mapping_keys(value: str) -> list[str]:
    """Top-level keys of a ``--model`` value: a mapping written out, or a YAML/JSON file of one
    (``init_args`` of a ``class_path`` form); none for anything else, which the parser reports."""
    try:
        path = Path(value)
        text = path.read_text() if path.is_file() else value
        mapping = yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError):
        return []
    if isinstance(mapping, dict) and "class_path" in mapping:
        mapping = mapping.get("init_args") or {}
    return [str(key) for key in mapping] if isinstance(mapping, dict) else []


def main(args: list[str] | None = None) -> LldCLI:
    """Run the CLI; a data error, a backbone timm cannot serve or a non-finite loss ends with a
    one-paragraph message (exit 2). ``lld export ...`` and ``lld adapt ...`` run
    `lld_lightning.tools.export` and `lld_lightning.tools.adapt`."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["export"]:
        from lld_lightning.tools.export import main as export_main

        raise SystemExit(export_main(argv[1:]))
    if argv[:1] == ["adapt"]:
        from lld_lightning.tools.adapt import main as adapt_main

        raise SystemExit(adapt_main(argv[1:]))
    try:
        return LldCLI(
            LldModule,
            LldDataModule,
            args=args,
            save_config_kwargs={"overwrite": True},
        )
    except (DataError, FloatingPointError) as error:
        from lld_lightning.data.errors import error_message

        kind = "data error" if isinstance(error, DataError) else "training stopped"
        # error_message: a DataLoader worker's error arrives wrapped in its traceback.
        print(f"lld: {kind}: {error_message(error)}", file=sys.stderr)
        raise SystemExit(2) from None
    except BackboneError as error:
        print(f"lld: backbone error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def console() -> None:
    """The ``lld`` command: `main` without its return value.

    A console script passes whatever its function returns to `sys.exit`, which turns a returned
    object into exit status 1; the command must end with 0 after a successful run.
    """
    main()


if __name__ == "__main__":
    console()
