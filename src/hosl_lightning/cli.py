"""The ``hosl-lightning`` command: LightningCLI over HOSLModule, any LightningDataModule and HOSLStrategy.

``hosl-lightning fit --config configs/quickstart.yaml`` trains; ``--print_config`` prints a config that
runs as is; invalid options fail while the config is parsed, before any model is loaded.
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

import hosl_lightning  # noqa: F401  (registers the "hosl" strategy)
from hosl_lightning.module import HOSLModule


class LossSummary(Callback):
    """Prints the mean training loss of the first and last ``window`` steps when fitting ends."""

    def __init__(self, window: int = 10) -> None:
        self.window = window
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = trainer.callback_metrics.get("train_loss")
        if loss is not None:
            self.losses.append(float(loss))

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if len(self.losses) < 2:
            return
        window = max(1, min(self.window, len(self.losses) // 2))
        first = sum(self.losses[:window]) / window
        last = sum(self.losses[-window:]) / window
        rank_zero_info(
            f"train_loss: mean of first {window} steps {first:.4f} -> mean of last {window} steps {last:.4f} "
            f"({len(self.losses)} steps)"
        )


class HOSLCLI(LightningCLI):
    """LightningCLI with HOSLStrategy as the default strategy and a loss summary at the end of fit."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.set_defaults({"trainer.strategy": "hosl"})


def main(args: list[str] | None = None) -> None:
    HOSLCLI(
        HOSLModule,
        subclass_mode_data=True,
        trainer_defaults={"callbacks": [LossSummary()]},
        save_config_kwargs={"overwrite": True},
        args=args if args is not None else sys.argv[1:],
    )


if __name__ == "__main__":
    main()
