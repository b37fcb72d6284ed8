"""A plain automatic-optimization LightningModule trains unchanged under HOSLStrategy.

The module under test is ``examples/dropin_finetune.py``'s ``PlainFineTuner``, which knows nothing of
hosl_lightning. Under ``HOSLStrategy(cut_layer=2)`` its client weights must move only by the zeroth-order
update built from its own losses, and its server weights only by its own optimizer.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torchmetrics import Metric
from transformers import LlamaConfig, LlamaForCausalLM

from hosl_lightning import DirectionSampler, HOSLStrategy, SyntheticLMDataModule

_spec = importlib.util.spec_from_file_location(
    "dropin_finetune", Path(__file__).resolve().parents[1] / "examples" / "dropin_finetune.py"
)
_example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_example)
PlainFineTuner = _example.PlainFineTuner

VOCAB, STEPS, Q, MU = 64, 3, 2, 1e-3


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


class RecordingFineTuner(PlainFineTuner):
    """PlainFineTuner that records every loss its training_step computes and every train_loss it logs."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.step_losses: list[float] = []  # every training_step call: 2Q probes + 1 clean call per step
        self.logged: list[float] = []  # every self.log("train_loss", ...) that reached Lightning
        self.clean_losses: list[float] = []  # unperturbed loss of each batch, computed before the step
        self.batches: list[dict[str, torch.Tensor]] = []
        self.states: list[dict[str, torch.Tensor]] = []  # split-model weights at the start of each step

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.step_losses.append(loss.item())
        return loss

    def log(self, name, value, *args, **kwargs):
        if name == "train_loss":
            self.logged.append(float(value.detach()) if torch.is_tensor(value) else float(value))
        return super().log(name, value, *args, **kwargs)

    def on_train_batch_start(self, batch, batch_idx):
        with torch.no_grad():
            self.clean_losses.append(self.model(**batch).loss.item())
        self.batches.append({k: v.clone() for k, v in batch.items()})
        self.states.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})


def fit(module: LightningModule, steps: int = STEPS, **strategy_kwargs) -> Trainer:
    strategy = HOSLStrategy(**{"cut_layer": 2, "q": Q, "mu": MU, "zo_lr": 1e-3, **strategy_kwargs})
    trainer = Trainer(
        strategy=strategy, max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    data = SyntheticLMDataModule(vocab_size=VOCAB, seq_len=12, train_size=64, batch_size=4)
    trainer.fit(module, datamodule=data)
    return trainer


def snapshot(half: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in half.named_parameters()}


def halves_before_training() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Initial client and server weights, keyed as in the split model the strategy builds."""
    from hosl_lightning import SplitCausalLM

    split = SplitCausalLM(tiny_llama(), 2)
    return snapshot(split.client), snapshot(split.server)


def changed(before: dict[str, torch.Tensor], half: nn.Module) -> dict[str, bool]:
    return {name: not torch.equal(before[name], param) for name, param in half.named_parameters()}


def test_plain_module_trains_client_by_zo_and_server_by_its_optimizer():
    client_before, server_before = halves_before_training()
    module = PlainFineTuner(tiny_llama(), lr=1e-3)
    trainer = fit(module)
    split = trainer.strategy.split_model
    assert module.model is split  # the strategy swapped the user's model for the split one
    assert trainer.global_step == STEPS
    assert set(client_before) == {n for n, _ in split.client.named_parameters()}
    assert all(changed(client_before, split.client).values())
    assert all(p.grad is None and not p.requires_grad for p in split.client.parameters())
    assert all(changed(server_before, split.server).values())
    assert all(p.requires_grad for p in split.server.parameters())


def test_client_update_is_exactly_the_zo_step_from_the_modules_own_losses():
    """Probe losses are the module's loss at theta_c +- mu u(t, q); the client moves by -lr/Q sum_q c_q u(t, q)."""
    client_before, _ = halves_before_training()
    zo_lr = 1e-2
    module = RecordingFineTuner(tiny_llama(), lr=1e-3)
    trainer = fit(module, zo_lr=zo_lr, seed=7)
    losses = torch.tensor(module.step_losses, dtype=torch.float32).view(STEPS, 2 * Q + 1)
    sampler = DirectionSampler("gaussian", 7)

    # 1. each probe loss, recomputed on an independent copy perturbed by hand (order +1, -1 per query)
    from hosl_lightning import SplitCausalLM

    reference = SplitCausalLM(tiny_llama(), 2).eval()
    for step, (state, batch) in enumerate(zip(module.states, module.batches)):
        for query in range(Q):
            for column, sign in ((2 * query, 1.0), (2 * query + 1, -1.0)):
                reference.load_state_dict(state)
                with torch.no_grad():
                    for key, param in enumerate(reference.client.parameters()):
                        param.add_(sampler.direction(step, query, key, param), alpha=sign * MU)
                    expected_loss = reference(**batch).loss.item()
                assert losses[step, column].item() == pytest.approx(expected_loss, rel=0, abs=2e-6), (step, query, sign)
    # the check above can tell +- apart: every pair differs by more than twice its tolerance
    assert (losses[:, 0 : 2 * Q : 2] - losses[:, 1 : 2 * Q : 2]).abs().min() > 4e-6

    # 2. the client weights after training, rebuilt from those losses and the seeded directions
    expected = {name: weight.clone() for name, weight in client_before.items()}
    for step in range(STEPS):
        coefficients = ((losses[step, 0 : 2 * Q : 2] - losses[step, 1 : 2 * Q : 2]) / (2 * MU)).tolist()
        for key, weight in enumerate(expected.values()):
            for query, c in enumerate(coefficients):
                weight.add_(sampler.direction(step, query, key, weight), alpha=-zo_lr / Q * c)
    client = dict(trainer.strategy.split_model.client.named_parameters())
    for name, weight in expected.items():
        torch.testing.assert_close(client[name] - client_before[name], weight - client_before[name],
                                   rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_zero_zo_lr_freezes_client_bitwise_while_server_trains():
    client_before, server_before = halves_before_training()
    trainer = fit(PlainFineTuner(tiny_llama(), lr=1e-3), zo_lr=0.0)
    split = trainer.strategy.split_model
    assert not any(changed(client_before, split.client).values())
    assert all(changed(server_before, split.server).values())


def test_zero_user_lr_freezes_server_bitwise_while_client_trains():
    client_before, server_before = halves_before_training()
    trainer = fit(PlainFineTuner(tiny_llama(), lr=0.0))
    split = trainer.strategy.split_model
    assert not any(changed(server_before, split.server).values())
    assert all(changed(client_before, split.client).values())


def test_log_runs_once_per_step_with_the_unperturbed_loss():
    module = RecordingFineTuner(tiny_llama(), lr=1e-3)
    trainer = fit(module)
    assert len(module.step_losses) == STEPS * (2 * Q + 1)  # the probes did call the user's training_step
    assert len(module.logged) == STEPS  # ... but only the clean call reached self.log
    # each logged value is the loss at the weights the step started from, not a perturbed one
    assert module.logged == pytest.approx(module.clean_losses, rel=1e-6, abs=0)
    probes = torch.tensor(module.step_losses).view(STEPS, 2 * Q + 1)
    assert module.logged == probes[:, -1].tolist()
    assert all(abs(p - clean) > 1e-7 for row, clean in zip(probes[:, :-1].tolist(), module.logged) for p in row)
    assert float(trainer.callback_metrics["train_loss"]) == pytest.approx(module.logged[-1])


def test_zo_mode_rejects_automatic_optimization():
    with pytest.raises(ValueError, match="HOSLModule"):
        fit(PlainFineTuner(tiny_llama()), mode="zo")


class EvalModeFineTuner(PlainFineTuner):
    """Turns its model's dropout off for good, as MeZO does, and records the model's flags before each step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.flags_before_step: list[set[bool]] = []

    def on_train_start(self) -> None:
        self.model.eval()

    def on_train_batch_start(self, batch, batch_idx):
        self.flags_before_step.append({sub.training for sub in self.model.modules()})


def test_a_model_the_module_put_in_eval_mode_stays_there_after_the_probes():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, attention_dropout=0.1,
    ))
    module = EvalModeFineTuner(model, lr=1e-3)
    fit(module)
    assert module.flags_before_step == [{False}] * STEPS  # dropout stayed off after every step's probes


class NoLanguageModel(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Embedding(VOCAB, 8)

    def training_step(self, batch, batch_idx):
        return self.net(batch["input_ids"]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_module_without_hf_model_fails_with_a_helpful_message():
    with pytest.raises(ValueError, match=r"no Hugging Face model inside NoLanguageModel.*self\.model ="):
        fit(NoLanguageModel())


class CountingMetric(Metric):
    """Counts its updates in its own state, as any torchmetrics metric accumulates."""

    def __init__(self) -> None:
        super().__init__()
        self.add_state("updates", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("losses", default=[], dist_reduce_fx="cat")

    def update(self, loss: torch.Tensor) -> None:
        self.updates += 1
        self.losses.append(loss.detach().reshape(1))

    def compute(self) -> torch.Tensor:
        return self.updates


class MetricFineTuner(RecordingFineTuner):
    """Updates a torchmetrics metric in its training_step, by forward and by update."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.by_forward, self.by_update = CountingMetric(), CountingMetric()

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.by_forward(loss)
        self.by_update.update(loss)
        return loss


def test_a_dropin_modules_torchmetrics_update_once_per_batch() -> None:
    module = MetricFineTuner(tiny_llama())
    fit(module)
    assert len(module.step_losses) == STEPS * (2 * Q + 1)  # the training_step ran for every probe
    for metric in (module.by_forward, module.by_update):
        assert metric.update_count == STEPS and int(metric.compute()) == STEPS
        clean = module.step_losses[2 * Q::2 * Q + 1]  # each step's last call is the clean one
        assert torch.cat(metric.losses).tolist() == pytest.approx(clean)
