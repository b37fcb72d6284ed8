"""HOSLModule: a manual-optimization LightningModule that fine-tunes a Hugging Face causal LM under HOSLStrategy.

It owns what is model- and task-specific (loading the model, the first-order optimizer and scheduler,
evaluation and logging); the strategy owns what is split-specific (the cut, the modes, ZO state).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from transformers import PreTrainedModel

from hosl_lightning.core.options import UserError
from hosl_lightning.models import load_causal_lm
from hosl_lightning.modes import DIVERGENCE_HINT, ensure_finite, eval_mode

_PREDICT_HINT = ("predict is not valid for this data: it predicts label words of a classification DataModule "
                 "(PromptClassificationDataModule); for a language model use validate or test (val_loss, val_ppl), "
                 "or hosl-lightning export and transformers' generate")


class HOSLModule(LightningModule):
    """Fine-tune a causal LM on batches with ``labels`` (-100 = ignored), split by HOSLStrategy.

    Evaluation follows the batch: with ``class_labels`` (C candidate sequences per example), each class
    is scored by the log-likelihood of its label word and ``{stage}_acc``, ``{stage}_f1`` (macro) and
    ``{stage}_loss`` (cross-entropy over the classes' scores: it moves before accuracy does, so short runs
    can be ranked by it) are logged; otherwise ``{stage}_loss`` and ``{stage}_ppl`` (perplexity over labelled
    tokens).

    Args:
        model: a Hugging Face hub id, a local directory, a ``.gguf`` file, an alias (``smollm2-135m``), or a
            ``PreTrainedModel`` instance.
        model_config: instead of ``model``, a config dict with ``model_type`` to build a randomly initialised
            model (tests, smoke runs, memory studies).
        dtype: weight dtype when loading (``"float32"`` is required for the zeroth-order side).
        gguf_file: the GGUF file inside ``model``'s directory, when loading one.
        optimizer: the first-order optimizer (the server in hosl mode, both halves in fo mode).
        lr_scheduler: optional scheduler of that optimizer, stepped once per batch.
    """

    def __init__(
        self,
        model: str | PreTrainedModel | None = None,
        model_config: dict[str, Any] | None = None,
        dtype: str = "float32",
        gguf_file: str | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        # optimizer factories are callables that do not pickle; the CLI records them in its config file
        ignored = ["optimizer", "lr_scheduler"] + (["model"] if isinstance(model, PreTrainedModel) else [])
        self.save_hyperparameters(ignore=ignored)
        # from_pretrained returns a model in eval mode and Lightning keeps each submodule's mode (and warns that it
        # found them in eval mode): fine-tune in training mode, as transformers' Trainer does (the modes decide where
        # dropout applies: modes/base.py); evaluation switches to eval mode and back.
        self.model = load_causal_lm(model, model_config, dtype, gguf_file).train()
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.metrics = nn.ModuleDict()  # built on first use: the number of classes comes with the data
        self._updated: set[str] = set()  # metric keys updated since their last compute

    def configure_optimizers(self) -> Any:
        trainable = [p for p in self.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("no parameter trains by gradients: check requires_grad flags and the strategy's mode")
        optimizer = self.optimizer_factory(trainable)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}

    def on_fit_start(self) -> None:
        from hosl_lightning.lightning.strategy import HOSLStrategy

        if not isinstance(self.trainer.strategy, HOSLStrategy):
            raise TypeError(
                f"HOSLModule trains under HOSLStrategy, got {type(self.trainer.strategy).__name__}: "
                "use Trainer(strategy=HOSLStrategy(cut_layer=...)) or strategy: hosl in the config"
            )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        output = self.trainer.strategy.run_step(batch)  # type: ignore[attr-defined]
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()  # type: ignore[union-attr]
        self.log("train_loss", output.loss, prog_bar=True, on_step=True, on_epoch=False)  # see StepOutput.loss
        if output.clean_loss is not None:
            self.log("train_loss_clean", output.clean_loss, on_step=True, on_epoch=False)
        return output.loss

    # ---- evaluation -------------------------------------------------------------------------------------
    def _stage_metrics(self, stage: str, num_classes: int | None, kind: str = "") -> MetricCollection | MeanMetric:
        key = f"{stage}_{num_classes or 'lm'}{kind}"
        if key not in self.metrics:
            # Never synced across processes: in a distributed HOSL run the other process is the server, which
            # keeps no metrics (torchmetrics would wait for it at a barrier forever).
            local = {"sync_on_compute": False}
            if num_classes is None or kind:
                metric: nn.Module = MeanMetric(**local)
            else:
                metric = MetricCollection(
                    {"acc": MulticlassAccuracy(num_classes, average="micro", **local),
                     "f1": MulticlassF1Score(num_classes, average="macro", **local)},
                    prefix=f"{stage}_",
                )
            self.metrics[key] = metric.to(self.device)
        self._updated.add(key)
        return self.metrics[key]  # type: ignore[return-value]

    def _evaluate_batch(self, batch: dict[str, Any], stage: str) -> None:
        """Score one batch and update the stage's metrics (logits only at the label-word positions)."""
        scores = self.model.sequence_log_likelihood(batch["input_ids"], batch.get("attention_mask"), batch["labels"])
        # An argmax over NaN picks class 0: never report an accuracy of scores that are not numbers.
        ensure_finite(self.trainer.global_step if self._trainer is not None else 0, f"a {stage} score", scores,
                      "the model's weights or activations are not finite; " + DIVERGENCE_HINT)
        if "class_labels" in batch:
            num_classes = int(batch["num_classes"])
            class_scores, class_labels = scores.view(-1, num_classes), batch["class_labels"].to(scores.device)
            self._stage_metrics(stage, num_classes).update(class_scores.argmax(dim=-1), class_labels)
            losses = F.cross_entropy(class_scores.float(), class_labels, reduction="none")
            self._stage_metrics(stage, num_classes, "_loss").update(losses)
        else:
            tokens = (batch["labels"][:, 1:] != -100).sum().to(scores.device)
            self._stage_metrics(stage, None).update(-scores.sum() / tokens, weight=tokens)

    def _compute_and_reset(self, stage: str) -> dict[str, float]:
        results: dict[str, float] = {}
        for key in sorted(k for k in self._updated if k.startswith(f"{stage}_")):
            metric = self.metrics[key]
            self._updated.discard(key)
            if key.endswith("_loss"):
                results[f"{stage}_loss"] = float(metric.compute())
            elif isinstance(metric, MeanMetric):
                loss = float(metric.compute())
                results |= {f"{stage}_loss": loss, f"{stage}_ppl": math.exp(min(loss, 80.0))}
            else:
                results |= {name: float(value) for name, value in metric.compute().items()}
            metric.reset()
        return results

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate_batch(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate_batch(batch, "test")

    def setup(self, stage: str) -> None:
        if stage == "predict":  # before Lightning asks a DataModule without predict batches for them
            from lightning.pytorch.utilities.model_helpers import is_overridden

            datamodule = self._trainer.datamodule if self._trainer is not None else None
            if datamodule is not None and not is_overridden("predict_dataloader", datamodule):
                raise UserError(_PREDICT_HINT)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        """Label-word predictions of a classification batch: each example's class index (``prediction``) and the
        log-likelihood of every class's label word (``scores``, examples x classes), as evaluation scores them."""
        if "class_labels" not in batch:
            raise UserError(_PREDICT_HINT)
        scores = self.model.sequence_log_likelihood(batch["input_ids"], batch.get("attention_mask"), batch["labels"])
        class_scores = scores.view(-1, int(batch["num_classes"])).float()
        return {"prediction": class_scores.argmax(dim=-1), "scores": class_scores}

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self._compute_and_reset("val"), prog_bar=True)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self._compute_and_reset("test"))

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, Any]], stage: str = "eval") -> dict[str, float]:
        """Score ``batches`` outside Lightning's loops (e.g. zero-shot before training) and return the metrics."""
        count = 0
        with eval_mode(self):
            for batch in batches:
                self._evaluate_batch(move_data_to_device(batch, self.device), stage)
                count += 1
        if count == 0:
            raise ValueError("evaluate() got no batches: refusing to report metrics over zero examples")
        return self._compute_and_reset(stage)
