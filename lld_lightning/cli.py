"""The ``lld`` command: a small LightningCLI subclass (argument links and friendly errors)."""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lld_lightning.data.datamodule import LldDataModule
from lld_lightning.data.errors import DataError
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

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Trainer:
        root = config.get("default_root_dir") or "runs/default"
        if config.get("logger") in (None, True):
            config["logger"] = [TensorBoardLogger(root, name="tb"), CSVLogger(root, name="csv")]
        given = list(config.get("callbacks") or []) + list(callbacks)
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in given
        ):
            config["callbacks"] = [*(config.get("callbacks") or []), RichProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

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
