"""A trained checkpoint and the images of one split, for the commands that measure a model
outside a `Trainer` (`lld_lightning.tools.score_thresholds`, `lld_lightning.tools.tune`).

The data comes from `lld`'s own arguments (``--config``, ``--data.*``), so it is built exactly as
``lld validate`` / ``lld test`` build it; the model comes from the checkpoint alone.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass
from typing import Literal
from unittest.mock import patch

from lld_lightning.callbacks.checkpoint import CheckpointError, read_checkpoint
from lld_lightning.module import LldModule

Split = Literal["val", "test", "train"]

#: The splits these commands read.
SPLITS: tuple[str, ...] = ("val", "test", "train")


class _Chained:
    """The test split's per-domain loaders read one after the other (with a length for progress)."""

    def __init__(self, loaders: list[Iterable]) -> None:
        self.loaders = loaders

    def __iter__(self):
        return itertools.chain.from_iterable(self.loaders)

    def __len__(self) -> int:
        return sum(len(loader) for loader in self.loaders if isinstance(loader, Sized))


@dataclass
class CheckpointSplit:
    """What a measuring command needs.

    Attributes:
        model: the checkpoint's `LldModule`, on the CPU, in eval mode.
        loader: the split's batches (the test split's domains one after the other).
        prepare: a batch on the model's device -> the batch as evaluation sees it (the data
            module's `on_after_batch_transfer`: the evaluation letterbox, or the training
            augmentation's view for ``train``).
        domains: the split's domain names (the scopes of its per-domain metrics).
    """

    model: LldModule
    loader: Iterable
    prepare: Callable[[dict], dict]
    domains: list[str]


def load_checkpoint_split(
    ckpt_path: str, lld_args: list[str], split: Split, prog: str
) -> CheckpointSplit:
    """Build the split's data from ``lld_args`` and load the model of ``ckpt_path``.

    Raises:
        SystemExit: naming ``prog``, when the checkpoint is missing or its classes are not the
            data's.
    """
    from lld_lightning.cli import LldCLI
    from lld_lightning.data.datamodule import LldDataModule

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    try:
        read_checkpoint(ckpt_path)
    except CheckpointError as error:
        raise SystemExit(f"{prog}: {error}") from None
    # The command's own argv is not LightningCLI's (it warns when it sees both).
    with patch.object(sys, "argv", sys.argv[:1]):
        cli = LldCLI(
            LldModule, LldDataModule, args=[*lld_args, "--trainer.logger", "false"], run=False
        )
    datamodule = cli.datamodule
    datamodule.setup("test" if split == "test" else "fit")
    if split == "test":
        loaders = datamodule.test_dataloader()
        loader: Iterable = _Chained(list(loaders.values()))
        domains = list(loaders)
    elif split == "val":
        loader, domains = datamodule.val_dataloader(), datamodule.val_domains
    else:
        loader = datamodule.train_dataloader(shuffle=False)
        domains = sorted({r.domain for r in datamodule.train_set.records})
    model = LldModule.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True).eval()
    if list(model.class_names) != list(datamodule.class_names):
        raise SystemExit(
            f"{prog}: the checkpoint's classes {list(model.class_names)} are not the "
            f"data's {list(datamodule.class_names)}"
        )
    return CheckpointSplit(
        model=model,
        loader=loader,
        prepare=lambda batch: datamodule.on_after_batch_transfer(batch, 0),
        domains=domains,
    )
