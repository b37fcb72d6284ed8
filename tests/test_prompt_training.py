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


@pytest.mark.parametrize("mode", ["fo", "hosl", "zo"])
@pytest.mark.parametrize("pair_probes", [False, True])
def test_one_token_answers_forward_each_prompt_once_and_train_the_same(
    mode: str, pair_probes: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from test_subsets import _classification_batch, _split

    from hosl_lightning.core.zo import ZOSGD
    from hosl_lightning.modes import ZOSettings, base
    from hosl_lightning.modes.in_process import fo_step, hosl_step, zo_step

    if mode == "fo" and pair_probes:
        pytest.skip("fo has no probes")
    settings = ZOSettings(queries=2, pair_probes=pair_probes)

    def step(share: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[int]]:
        if not share:
            monkeypatch.setattr(base, "forwarded_inputs", lambda ids, mask, labels: (ids, mask, None))
        model = _split()
        batch = _classification_batch([[11], [12], [13]], class_of=[2, 0, 1, 0])
        rows: list[int] = []
        model.client.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
        if mode == "fo":
            output = fo_step(model, batch, lambda loss: loss.backward())
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
        elif mode == "hosl":
            output = hosl_step(model, batch, ZOSGD(list(model.client.named_parameters()), lr=1e-2, seed=3),
                               settings, 0, lambda loss: loss.backward())
        else:
            optimizer = ZOSGD(list(model.named_parameters()), lr=1e-2, seed=3)
            output = zo_step(model, batch, optimizer, settings, 0, lambda e: optimizer.step(estimate=e))
        monkeypatch.undo()
        return output.loss.detach(), {k: v.detach().clone() for k, v in model.state_dict().items()}, rows

    shared_loss, shared_weights, shared_rows = step(True)
    plain_loss, plain_weights, plain_rows = step(False)
    assert set(shared_rows) == {4 * (2 if pair_probes else 1)} and set(plain_rows) == {12 * (2 if pair_probes else 1)}
    assert torch.allclose(shared_loss, plain_loss, atol=1e-6)
    assert all(torch.allclose(shared_weights[k], plain_weights[k], atol=1e-6) for k in plain_weights)
    moved = [k for k in plain_weights if not torch.equal(plain_weights[k], _split().state_dict()[k])]
    assert moved  # the step trained something, the same way in both


def test_a_resumed_run_never_calls_its_first_scores_zero_shot(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from conftest import tiny_data
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(max_steps: int, ckpt_path: str | None = None) -> str:
        checkpoint = ModelCheckpoint(tmp_path, every_n_train_steps=2, filename="last")
        trainer = quiet_trainer(HOSLStrategy(cut_layer=1), max_steps=max_steps, limit_val_batches=1, val_check_interval=2,
                                enable_checkpointing=True, callbacks=[ZeroShotReport(), checkpoint])
        caplog.clear()
        with caplog.at_level("INFO"):
            trainer.fit(HOSLModule(model_config=TINY_LLAMA), tiny_data(), ckpt_path=ckpt_path)
        return caplog.text

    fresh = fit(2)
    assert "zero-shot validation: " in fresh and "zero-shot -> final: " in fresh
    resumed = fit(4, str(tmp_path / "last.ckpt"))
    assert "zero-shot" not in resumed
    assert "resumed at step 2 validation: " in resumed and "resumed at step 2 -> final: " in resumed
