"""The ``lld`` command: a small LightningCLI subclass (argument links and friendly errors)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from lld_lightning.data.datamodule import LldDataModule
from lld_lightning.data.errors import DataError
from lld_lightning.machine import cpu_bf16_units
from lld_lightning.module import LldModule
from lld_lightning.predict_writer import PredictionWriter


class LldCLI(LightningCLI):
    """``lld fit|validate|test|predict`` with the data module's label space linked into the model.

    Unless the config says otherwise, runs log to TensorBoard and CSV under
    ``--trainer.default_root_dir`` and show a Rich progress bar.
    """

    def add_arguments_to_parser(self, parser) -> None:
        for name in ("num_classes", "attribute_spec", "class_names"):
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")
        parser.add_lightning_class_args(PredictionWriter, "predict_writer")
        parser.set_defaults({"trainer.default_root_dir": "runs/default"})

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
        the command line names (``--model.*`` flags, or a whole ``--model`` mapping or file),
        which win.

        Lightning (2.6) replaces the whole model config with the checkpoint's hyperparameters, so
        ``lld test --ckpt_path C --model.nms_iou 0.7`` would silently test at the checkpoint's
        NMS IoU (Lightning-AI/pytorch-lightning#21455 proposes the same precedence). Values from
        ``--config`` files still lose to the checkpoint: a config whose architecture differs from
        the checkpoint's cannot load its weights.
        """
        subcommand = self.config.get("subcommand")
        model = self.config[subcommand].get("model") if subcommand else None
        typed = {key: model[key] for key in getattr(self, "_explicit_model_keys", []) if model and key in model}
        super()._parse_ckpt_path()
        model = self.config[subcommand].get("model") if subcommand else None
        for key, value in typed.items():
            model[key] = value

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Trainer:
        if cpu_bf16_is_emulated(config):
            rank_zero_warn(
                f"lld: --trainer.precision {config['precision']} on a CPU without bf16 units (no "
                "AVX512-BF16 or AMX), where torch emulates bf16: the training step measured 11.5x "
                "slower than in fp32 (docs/benchmarks.md). Running in 32-true instead; set "
                f"{KEEP_CPU_BF16}=1 to keep bf16."
            )
            config["precision"] = "32-true"
        root = config.get("default_root_dir") or "runs/default"
        if config.get("logger") in (None, True):
            config["logger"] = [TensorBoardLogger(root, name="tb"), CSVLogger(root, name="csv")]
        given = list(config.get("callbacks") or []) + list(callbacks)
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in given
        ):
            config["callbacks"] = [*(config.get("callbacks") or []), RichProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

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
    """The model arguments a command line names itself (top-level keys, in order, once each):
    ``--model.<key>[.<sub>][=value]`` flags, and the keys of a whole ``--model VALUE`` (a YAML or
    JSON mapping, or a file holding one); none for a dict or namespace of arguments."""
    if not isinstance(args, (list, tuple)):
        return []
    args = [str(a) for a in args]
    keys: list[str] = []
    for index, arg in enumerate(args):
        if arg.startswith("--model."):
            keys.append(arg[len("--model."):].split("=", 1)[0].split(".", 1)[0])
        elif arg.startswith("--model="):
            keys.extend(_mapping_keys(arg[len("--model="):]))
        elif arg == "--model" and index + 1 < len(args):
            keys.extend(_mapping_keys(args[index + 1]))
    return list(dict.fromkeys(k for k in keys if k))


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
