"""The ``lld`` command: a small LightningCLI subclass (argument links and friendly errors)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

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
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from lld_lightning.callbacks.predict_writer import PredictionWriter
from lld_lightning.data.datamodule import LldDataModule
from lld_lightning.data.errors import DataError
from lld_lightning.module import LldModule
from lld_lightning.tools.machine import cpu_bf16_units


class LldCLI(LightningCLI):
    """``lld fit|validate|test|predict`` with the data module's label space linked into the model.

    Every run keeps ``best.ckpt`` (by ``--checkpoint.monitor``, val mAP@.5 unless a config says
    otherwise) and ``last.ckpt`` in ``<--trainer.default_root_dir>/checkpoints``, logs to
    TensorBoard and CSV under ``--trainer.default_root_dir`` with the learning rate, and shows a
    Rich progress bar, so configs do not repeat these.
    """

    def add_arguments_to_parser(self, parser) -> None:
        for name in ("num_classes", "attribute_spec", "class_names"):
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
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
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=checkpoint_folder)
        parser.add_lightning_class_args(PredictionWriter, "predict_writer")

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand in ("validate", "test"):
            # The module prints its own per-domain table; Lightning's would list every logged key.
            parser.set_defaults({"verbose": False})
        return parser

    def parse_arguments(self, parser, args) -> None:
        # Kept for `_parse_ckpt_path`: which model arguments the user typed.
        self._explicit_model_keys = explicit_model_keys(args if args is not None else sys.argv[1:])
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

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Trainer:
        if cpu_bf16_is_emulated(config):
            rank_zero_warn(
                f"lld: --trainer.precision {config['precision']} on a CPU without bf16 units (no "
                "AVX512-BF16 or AMX), where torch emulates bf16: a training step is about ten times "
                "slower than in fp32 (docs/results.md). Running in 32-true instead; set "
                f"{KEEP_CPU_BF16}=1 to keep bf16."
            )
            config["precision"] = "32-true"
        root = config.get("default_root_dir") or "runs/default"
        if config.get("logger") in (None, True):
            config["logger"] = [TensorBoardLogger(root, name="tb"), CSVLogger(root, name="csv")]
        given = list(config.get("callbacks") or []) + list(callbacks)
        added = []
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
            added.append(RichProgressBar())
        if config["logger"] and not any(isinstance(c, LearningRateMonitor) for c in given):
            added.append(LearningRateMonitor(logging_interval="step"))
        config["callbacks"] = [*(config.get("callbacks") or []), *added]
        return super()._instantiate_trainer(config, callbacks)

def checkpoint_folder(default_root_dir: str | None) -> str:
    """Where a run's checkpoints go: ``<default_root_dir>/checkpoints``."""
    return str(Path(default_root_dir or "runs/default") / "checkpoints")


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
    """Run the CLI; a data error or a non-finite loss ends with a one-paragraph message (exit 2)."""
    try:
        return LldCLI(
            LldModule,
            LldDataModule,
            args=args,
            save_config_kwargs={"overwrite": True},
        )
    except (DataError, FloatingPointError) as error:
        kind = "data error" if isinstance(error, DataError) else "training stopped"
        print(f"lld: {kind}: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def console() -> None:
    """The ``lld`` command: `main` without its return value.

    A console script passes whatever its function returns to `sys.exit`, which turns a returned
    object into exit status 1; the command must end with 0 after a successful run.
    """
    main()


if __name__ == "__main__":
    console()
