"""End to end on a prompt task: HOSLModule + HOSLStrategy + PromptClassificationDataModule, tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_LLAMA, quiet_trainer
from test_tasks import sentiment_dm, word_tokenizer

from hosl_lightning import HOSLModule, HOSLStrategy
from hosl_lightning.lightning.callbacks import ZeroShotReport


def _module(vocab: int) -> HOSLModule:
    torch.manual_seed(0)
    return HOSLModule(model_config=dict(TINY_LLAMA, vocab_size=vocab))


def test_zero_shot_validate_reports_accuracy_over_every_example(tmp_path: Path) -> None:
    tokenizer = word_tokenizer()
    dm = sentiment_dm(tmp_path, tokenizer, batch_size=2, eval_batch_size=2)
    trainer = quiet_trainer(HOSLStrategy(cut_layer=1), limit_val_batches=None)
    (scores,) = trainer.validate(_module(len(tokenizer)), dm)
    assert set(scores) == {"val_acc", "val_f1", "val_loss"}
    assert any(scores["val_acc"] == pytest.approx(i / 5) for i in range(6))  # 5 examples, each counted once


@pytest.mark.parametrize("loss", ["lm", "classification"])
def test_fit_on_prompts_with_each_loss_and_report_zero_shot_then_final(
    loss: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokenizer = word_tokenizer()
    dm = sentiment_dm(tmp_path, tokenizer, batch_size=2, eval_batch_size=2, loss=loss)
    report = ZeroShotReport()
    trainer = quiet_trainer(HOSLStrategy(cut_layer=1, q=2), max_steps=3, limit_val_batches=None,
                            callbacks=[report])
    module = _module(len(tokenizer))
    with caplog.at_level("INFO"):
        trainer.fit(module, dm)
    assert trainer.global_step == 3
    assert set(report.zero_shot) == {"val_acc", "val_f1", "val_loss"}
    assert "zero-shot -> final" in caplog.text
    assert float(trainer.callback_metrics["train_loss"]) > 0
