"""Callbacks that report what a run achieved: the loss trend, and validation metrics before and after training."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info


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


class ZeroShotReport(Callback):
    """Scores the validation set before the first step (zero-shot) and prints it beside the final scores.

    Needs a module with ``evaluate(batches, stage)`` (HOSLModule) and a validation dataloader; the final
    scores are the last ``val_*`` metrics Lightning's validation loop logged.
    """

    def __init__(self) -> None:
        self.zero_shot: dict[str, float] = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        evaluate = getattr(pl_module, "evaluate", None)
        datamodule = trainer.datamodule
        if evaluate is None or datamodule is None or not hasattr(datamodule, "val_dataloader"):
            return
        scores = evaluate(datamodule.val_dataloader(), stage="val")
        self.zero_shot = scores
        rank_zero_info("zero-shot validation: " + _format(scores))

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        final = {k: float(v) for k, v in trainer.callback_metrics.items() if k in self.zero_shot}
        if final:
            rank_zero_info("final validation:     " + _format(final))
            rank_zero_info("zero-shot -> final:   " + ", ".join(
                f"{k} {self.zero_shot[k]:.4f} -> {final[k]:.4f}" for k in final))


def _format(scores: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in sorted(scores.items()))
