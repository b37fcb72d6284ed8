"""The diagnostic: the loss decrease each half's update predicts to first order, against the measured decrease."""

from __future__ import annotations

import copy
import logging
from typing import Any

import pytest
import torch
from conftest import TINY_LLAMA, quiet_trainer, tiny_data
from test_zo_client import _batch, _split

from hosl_lightning import HOSLModule, HOSLStrategy, SplitCausalLM
from hosl_lightning.core.zo import ZOSGD
from hosl_lightning.lightning.decrease import PredictedDecrease
from hosl_lightning.modes import ZOSettings
from hosl_lightning.modes.in_process import in_process_step
from hosl_lightning.zo_optimizers import ForwardGradient


def _loss(split: SplitCausalLM, batch: dict[str, torch.Tensor]) -> float:
    """The next-token loss in float64 (server_losses takes its logits in float32): small changes stay visible."""
    with torch.no_grad():
        up = split.client_forward(batch["input_ids"], batch["attention_mask"])
        logits = split.server.logits(split.server(up)[:, :-1])
        return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten()))


@pytest.mark.parametrize(("client", "settings"), [
    (ForwardGradient, ZOSettings(queries=2, estimator="forward")),
    (ZOSGD, ZOSettings(queries=2, mu=1e-4)),  # the two-point estimate: c_q to O(mu^2)
], ids=["forward_gradient", "zo_sgd"])
def test_each_halfs_prediction_matches_the_loss_change_of_its_update_alone(client: type[ZOSGD],
                                                                           settings: ZOSettings) -> None:
    split, batch = _split(cut=1).double(), _batch()
    client_optimizer = client(split.client.named_parameters(), lr=5e-4, seed=3)
    server_optimizer = torch.optim.AdamW(split.server.parameters(), lr=1e-5, weight_decay=0.1)
    predicted = PredictedDecrease()
    predicted.watch_server(server_optimizer)
    start = _loss(split, batch)
    output = in_process_step(split, "hosl", batch, settings, 0, lambda loss: loss.backward(), client_optimizer)
    server_before = copy.deepcopy(split.server.state_dict())
    server_optimizer.step()  # the server's update alone
    server_alone = _loss(split, batch)
    split.server.load_state_dict(server_before)
    client_optimizer.step(estimate=output.estimate)  # the client's update alone
    client_alone = _loss(split, batch)
    metrics = predicted.step_metrics(client_optimizer)
    measured = {"server": start - server_alone, "client": start - client_alone}
    assert measured["server"] > 1e-4 and measured["client"] > 1e-4, measured  # both updates matter here
    # first order against the real change: their difference is the second-order term, a few percent at these rates
    assert metrics["predicted_decrease_server"] == pytest.approx(measured["server"], rel=0.05)
    assert metrics["predicted_decrease_client"] == pytest.approx(measured["client"], rel=0.05)


def test_a_fit_logs_both_predictions_each_step_and_says_the_clients_share_at_the_end(
        caplog: pytest.LogCaptureFixture) -> None:
    logged: list[dict[str, float]] = []

    class Recorder(HOSLModule):
        def log_dict(self, metrics: Any, *args: Any, **kwargs: Any) -> None:
            logged.append({k: float(v) for k, v in metrics.items() if "predicted_decrease" in k})
            super().log_dict(metrics, *args, **kwargs)

    strategy = HOSLStrategy(cut_layer=1, q=2, zo_lr=1e-3, zo_optimizer="forward_gradient", memory_every_n_steps=0)
    with caplog.at_level(logging.INFO):
        quiet_trainer(strategy, max_steps=3).fit(
            Recorder(model_config=TINY_LLAMA, optimizer=lambda p: torch.optim.SGD(p, lr=1e-2)), tiny_data())
    steps = [m for m in logged if m]
    assert len(steps) == 3 and all(set(m) == {"hosl/predicted_decrease_server", "hosl/predicted_decrease_client"}
                                   for m in steps)
    assert all(m["hosl/predicted_decrease_client"] > 0 for m in steps)  # lr (1/Q) sum c_q^2
    totals = {half: sum(m[f"hosl/predicted_decrease_{half}"] for m in steps) for half in ("server", "client")}
    share = 100 * totals["client"] / (totals["server"] + totals["client"])
    assert f"the client contributed {share:.3g}% of the predicted decrease" in caplog.text
    assert "over 3 steps" in caplog.text


def test_a_client_whose_coefficients_are_no_projected_gradients_logs_no_prediction(
        caplog: pytest.LogCaptureFixture) -> None:
    strategy = HOSLStrategy(cut_layer=1, q=2, zo_lr=1e-3, zo_optimizer="fzoo", memory_every_n_steps=0)
    trainer = quiet_trainer(strategy, max_steps=2)
    with caplog.at_level(logging.INFO):
        trainer.fit(HOSLModule(model_config=TINY_LLAMA), tiny_data())
    assert "hosl/predicted_decrease_server" in trainer.logged_metrics
    assert "hosl/predicted_decrease_client" not in trainer.logged_metrics
    assert "contributed" not in caplog.text


def test_in_float32_the_server_prediction_equals_the_float64_product_of_its_gradient_and_update() -> None:
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(3000, 100) * 0.05), torch.nn.Parameter(torch.randn(700))]
    for w in weights:
        w.grad = torch.randn_like(w) * 1e-3
    optimizer = torch.optim.AdamW(weights, lr=1e-6)  # an update of about 1e-6 on weights of about 5e-2
    predicted = PredictedDecrease()
    predicted.watch_server(optimizer)
    before = [w.detach().double().clone() for w in weights]
    optimizer.step()
    exact = -sum(float((w.grad.double() * (w.detach().double() - b)).sum()) for w, b in zip(weights, before))
    metrics = predicted.step_metrics(None)
    assert metrics == {"predicted_decrease_server": pytest.approx(exact, rel=1e-3)}
