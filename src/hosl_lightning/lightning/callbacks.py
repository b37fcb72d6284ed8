"""Callbacks that report what a run achieved: the loss trend, and validation metrics before and after training."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
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
    """Scores the validation set before the first step and prints it beside the final scores.

    Before the first step of a fresh run the scores are zero-shot; a run resumed from a checkpoint starts from
    trained weights, so its first scores are labelled with the step it resumed at, never "zero-shot". Needs a
    module with ``evaluate(batches, stage)`` (HOSLModule) and validation batches; the final scores are the last
    ``val_*`` metrics Lightning's validation loop logged.
    """

    def __init__(self) -> None:
        self.zero_shot: dict[str, float] = {}
        self.label = "zero-shot"

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        evaluate = getattr(pl_module, "evaluate", None)
        datamodule = trainer.datamodule
        if evaluate is None or datamodule is None or not hasattr(datamodule, "val_dataloader"):
            return
        if trainer.limit_val_batches == 0:  # the fit validates nothing: neither does this report
            return
        batches = datamodule.val_dataloader()
        if isinstance(batches, list) and not batches:  # no validation split
            return
        self.label = "zero-shot" if trainer.global_step == 0 else f"resumed at step {trainer.global_step}"
        scores = evaluate(batches, stage="val")
        self.zero_shot = scores
        rank_zero_info(f"{self.label + ' validation:':<21} " + _format(scores))

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        final = {k: float(v) for k, v in trainer.callback_metrics.items() if k in self.zero_shot}
        if final:
            rank_zero_info("final validation:     " + _format(final))
            rank_zero_info(f"{self.label + ' -> final:':<21} " + ", ".join(
                f"{k} {self.zero_shot[k]:.4f} -> {final[k]:.4f}" for k in final))


def _format(scores: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in sorted(scores.items()))


class PredictionWriter(BasePredictionWriter):
    """Writes ``predict``'s label-word predictions to ``predictions.jsonl`` in the trainer's ``default_root_dir``.

    One line per example, in the order of the predict DataLoader: ``prediction`` (the class index), ``label``
    (its label value in the data, when the DataModule names its classes) and ``scores`` (every class's
    log-likelihood). Without it, ``hosl-lightning predict`` would compute the predictions and show none.
    """

    def __init__(self, filename: str = "predictions.jsonl") -> None:
        super().__init__(write_interval="epoch")
        self.filename = filename
        self.path: Path | None = None

    def write_on_epoch_end(self, trainer: Trainer, pl_module: LightningModule, predictions: Sequence[Any],
                           batch_indices: Sequence[Any]) -> None:
        names = getattr(trainer.datamodule, "class_names", None)
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions  # one loader
        self.path = Path(trainer.default_root_dir) / self.filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w") as out:
            for batch in batches:
                for index, scores in zip(batch["prediction"].tolist(), batch["scores"].tolist(), strict=True):
                    row = {"prediction": index, **({"label": names[index]} if names else {}), "scores": scores}
                    out.write(json.dumps(row) + "\n")
        rank_zero_info(f"predictions: {sum(len(b['prediction']) for b in batches)} examples written to {self.path}")
