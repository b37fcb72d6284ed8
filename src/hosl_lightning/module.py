"""HOSLModule: a manual-optimization LightningModule that fine-tunes a Hugging Face causal LM under HOSLStrategy.

It owns what is model- and task-specific (loading the model, the optimizer and scheduler of the
first-order side, logging); the strategy owns what is split-specific (the cut, the modes, ZO state).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def load_causal_lm(
    model: str | PreTrainedModel | None = None,
    model_config: dict[str, Any] | None = None,
    dtype: str = "float32",
    **from_pretrained_kwargs: Any,
) -> PreTrainedModel:
    """A causal LM from a hub id or local path, an instance, or a config dict (random weights, no download)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not valid: choose one of {', '.join(map(repr, DTYPES))}")
    if (model is None) == (model_config is None):
        raise ValueError("give exactly one of model= (hub id, local path or PreTrainedModel) or model_config= (a dict)")
    if isinstance(model, PreTrainedModel):
        return model
    if model_config is not None:
        config = dict(model_config)
        if "model_type" not in config:
            raise ValueError("model_config needs a 'model_type' key (e.g. 'llama', 'gpt2', 'opt', 'gpt_neox')")
        model_type = config.pop("model_type")
        built = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config), dtype=DTYPES[dtype])
        return built
    return AutoModelForCausalLM.from_pretrained(model, dtype=DTYPES[dtype], **from_pretrained_kwargs)


class HOSLModule(LightningModule):
    """Fine-tune a causal LM with the next-token loss on ``labels`` (-100 = ignored), split by HOSLStrategy.

    Args:
        model: a Hugging Face hub id, a local directory, or a ``PreTrainedModel`` instance.
        model_config: instead of ``model``, a config dict with ``model_type`` to build a randomly initialised
            model (tests, smoke runs, memory studies).
        dtype: weight dtype when loading (``"float32"`` is required for the zeroth-order side).
        optimizer: the first-order optimizer (the server in hosl mode, both halves in fo mode).
        lr_scheduler: optional scheduler of that optimizer, stepped once per batch.
    """

    def __init__(
        self,
        model: str | PreTrainedModel | None = None,
        model_config: dict[str, Any] | None = None,
        dtype: str = "float32",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        # optimizer factories are callables that do not pickle; the CLI records them in its config file
        ignored = ["optimizer", "lr_scheduler"] + (["model"] if isinstance(model, PreTrainedModel) else [])
        self.save_hyperparameters(ignore=ignored)
        self.model = load_causal_lm(model, model_config, dtype)
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler

    def configure_optimizers(self) -> Any:
        trainable = [p for p in self.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("no parameter trains by gradients: check requires_grad flags and the strategy's mode")
        optimizer = self.optimizer_factory(trainable)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}

    def on_fit_start(self) -> None:
        from hosl_lightning.strategy import HOSLStrategy

        if not isinstance(self.trainer.strategy, HOSLStrategy):
            raise TypeError(
                f"HOSLModule trains under HOSLStrategy, got {type(self.trainer.strategy).__name__}: "
                "use Trainer(strategy=HOSLStrategy(cut_layer=...)) or strategy: hosl in the config"
            )

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        output = self.trainer.strategy.run_step(batch)  # type: ignore[attr-defined]
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()  # type: ignore[union-attr]
        self.log("train_loss", output.loss, prog_bar=True, on_step=True, on_epoch=False)
        return output.loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.model(**batch).loss
        self.log("val_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss
