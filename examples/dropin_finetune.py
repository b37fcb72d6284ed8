"""Drop HOSLStrategy into an existing fine-tuning project: the LightningModule does not change.

``PlainFineTuner`` below is an ordinary Lightning module for causal-LM fine-tuning: automatic optimization,
``self.log``, its own ``configure_optimizers``, and no hosl_lightning import. Passing
``strategy=HOSLStrategy(cut_layer=2)`` to the Trainer is the only change. The strategy cuts the model after
block 2: the client half (embeddings + blocks 0-1) then learns by zeroth-order estimates built from the
module's own ``training_step`` losses, with no backward pass through it, and the server half (blocks 2+,
final norm, LM head) learns from gradients through the module's own AdamW.

    python examples/dropin_finetune.py
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule
from transformers import PreTrainedModel


class PlainFineTuner(LightningModule):
    """Fine-tune any Hugging Face causal LM on batches of input_ids / attention_mask / labels."""

    def __init__(self, model: PreTrainedModel, lr: float = 1e-3) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


if __name__ == "__main__":
    from lightning.pytorch import Callback, Trainer
    from transformers import LlamaConfig, LlamaForCausalLM

    from hosl_lightning import HOSLStrategy, SyntheticLMDataModule

    class LossHistory(Callback):
        """Collects the loss the module logged at every step."""

        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.losses.append(float(trainer.callback_metrics["train_loss"]))

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    module = PlainFineTuner(LlamaForCausalLM(config), lr=3e-3)  # random weights: nothing is downloaded
    data = SyntheticLMDataModule(vocab_size=128, seq_len=32, train_size=2048, batch_size=16)

    history = LossHistory()
    trainer = Trainer(
        strategy=HOSLStrategy(cut_layer=2, q=2, zo_lr=1e-4),  # the only HOSL-specific line
        max_steps=40,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[history],
    )
    trainer.fit(module, datamodule=data)

    split = trainer.strategy.split_model
    n_client = sum(p.numel() for p in split.client.parameters())
    n_server = sum(p.numel() for p in split.server.parameters())
    print(f"client (zeroth-order): {n_client:,} parameters   server (AdamW): {n_server:,} parameters")
    print(f"first loss {history.losses[0]:.4f}   last loss {history.losses[-1]:.4f}   ({trainer.global_step} steps)")
