"""The forward-gradient client: exact projected gradients <dL/dh, J u_q> from forward-mode tangents, ZO-SGD's update."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_LLAMA, quiet_trainer, tiny_data
from test_remote import _module, _run_pair, _strategy, model_dir  # noqa: F401 - model_dir is a fixture
from test_zo_client import TINY_GPT2, TINY_OPT, WIDE_VOCAB, _batch, _split

from hosl_lightning import HOSLModule, HOSLStrategy, SplitCausalLM
from hosl_lightning.core.tangents import forward_with_tangent
from hosl_lightning.core.zo import ZOSGD
from hosl_lightning.distributed.sync import ZOUpdate, replay
from hosl_lightning.modes import ZOSettings
from hosl_lightning.modes.in_process import hosl_step
from hosl_lightning.zo_optimizers import ForwardGradient

FORWARD = ZOSettings(queries=3, estimator="forward")


def _forward_gradient(split: SplitCausalLM, lr: float = 1e-2, **kwargs: Any) -> ForwardGradient:
    return ForwardGradient(split.client.named_parameters(), lr=lr, seed=3, **kwargs)


def _step(split: SplitCausalLM, optimizer: ZOSGD, batch: dict[str, torch.Tensor], step: int = 0,
          settings: ZOSettings = FORWARD) -> Any:
    return hosl_step(split, batch, optimizer, settings, step, lambda loss: loss.backward())


def _direction(optimizer: ZOSGD, param: torch.Tensor, step: int, query: int, queries: int,
               rows: torch.Tensor | None) -> torch.Tensor:
    """u_q over ``param`` as the update draws it (zeros off a sparse direction's rows)."""
    one_hot = [float(queries) if q == query else 0.0 for q in range(queries)]  # directions() averages over Q
    dense = torch.zeros_like(param)
    for index, total in optimizer.directions(param, optimizer.sampler, step, one_hot, rows):
        dense[index] += total
    return dense


def _autograd_directional_derivatives(split: SplitCausalLM, optimizer: ZOSGD, batch: dict[str, torch.Tensor],
                                      step: int, queries: int, rows: dict[int, torch.Tensor]) -> torch.Tensor:
    params = list(split.client.parameters())
    for p in params:
        p.requires_grad_(True)
    loss = split.server_losses(split.client_forward(batch["input_ids"], batch["attention_mask"]), batch)[0]
    grads = torch.autograd.grad(loss, params)
    for p in params:
        p.requires_grad_(False)
    return torch.stack([
        sum((g.double() * _direction(optimizer, p, step, q, queries, rows.get(optimizer.keys[id(p)])).double()).sum()
            for g, p in zip(grads, params))
        for q in range(queries)
    ])


# ------------------------------------------------------------------------------------------ the estimate
@pytest.mark.parametrize("config", [WIDE_VOCAB, TINY_GPT2, TINY_OPT], ids=["llama", "gpt2", "opt"])
@pytest.mark.parametrize("directions", ["dense", "sparse"])
def test_each_coefficient_is_the_autograd_directional_derivative(config: dict, directions: str) -> None:
    split, batch = _split(config, cut=2), _batch()
    # OPT's padding row (id 1) gets no gradient from torch's autograd by convention, while the forward derivative
    # (like the two-point probes) sees the row's real effect: keep it out of the batch to compare the two.
    batch["input_ids"] = batch["labels"] = batch["input_ids"].clamp(min=2)
    optimizer = _forward_gradient(split, lr=0.0, embedding_directions=directions)
    output = _step(split, optimizer, batch, step=5)
    truth = _autograd_directional_derivatives(split, optimizer, batch, 5, FORWARD.queries, output.estimate.rows)
    assert (directions == "sparse") == bool(output.estimate.rows)
    # fp32 forwards: the two differ by rounding only, far below the 1e-4 relative tolerance stated here
    torch.testing.assert_close(output.estimate.coefficients.double(), truth, rtol=1e-4, atol=1e-6)
    assert len(set(output.estimate.coefficients.tolist())) == FORWARD.queries  # Q different directions


def test_the_two_point_estimate_converges_to_it_as_mu_shrinks() -> None:
    split, batch = _split(cut=2), _batch()
    split.double()
    optimizer = _forward_gradient(split, lr=0.0)
    ids, mask = batch["input_ids"], batch["attention_mask"]

    def loss(up: Any) -> torch.Tensor:  # the next-token loss in fp64 (server_losses takes its logits in fp32)
        logits = split.server.logits(split.server(up)[:, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten())

    up, tangent = forward_with_tangent(optimizer.parameter_directions, split.client, 0, 0,
                                       lambda: split.client_forward(ids, mask))
    hidden = up.hidden.detach().requires_grad_(True)
    loss(replace(up, hidden=hidden)).backward()
    exact = float((hidden.grad * tangent).sum())  # fp64 throughout

    def two_point(mu: float) -> float:
        losses = []
        for sign in (1.0, -1.0):
            with torch.no_grad(), optimizer.perturbed([split.client], 0, 0, sign * mu):
                losses.append(float(loss(split.client_forward(ids, mask))))
        return (losses[0] - losses[1]) / (2 * mu)

    # Down to mu = 1e-4: below it, the fp32 inside HF's attention (softmax upcast, rotary tables) sets the floor.
    errors = [abs(two_point(mu) - exact) for mu in (1e-2, 1e-3, 1e-4)]
    assert all(larger > 50 * smaller for larger, smaller in itertools.pairwise(errors)), errors  # O(mu^2): 100x a decade
    assert errors[-1] < 1e-5 * abs(exact), (errors, exact)


def test_the_server_runs_one_forward_and_one_backward_whatever_q(monkeypatch: pytest.MonkeyPatch) -> None:
    def counted(calls: dict[str, int], name: str, forward: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return forward(*args, **kwargs)
        return call

    counts = []
    for queries in (1, 4):
        split = _split()
        calls = {"server_forward": 0, "client_forward": 0}
        monkeypatch.setattr(split.server, "forward", counted(calls, "server_forward", split.server.forward))
        monkeypatch.setattr(split.client, "forward", counted(calls, "client_forward", split.client.forward))
        split.boundary.traffic.reset()
        _step(split, _forward_gradient(split), _batch(), settings=ZOSettings(queries=queries, estimator="forward"))
        counts.append((calls, split.boundary.traffic.messages_up, split.boundary.traffic.bytes_down))
    assert counts[0][0] == {"server_forward": 1, "client_forward": 1}
    assert counts[1][0] == {"server_forward": 1, "client_forward": 4}
    rows, length, width = 4, 8, TINY_LLAMA["hidden_size"]
    assert counts[0][1:] == counts[1][1:] == (1, rows * length * width * 4)  # one h up, one fp32 dL/dh down


# ------------------------------------------------------------------------------------------ the update
def test_rows_a_sparse_direction_does_not_cover_are_untouched() -> None:
    split, batch = _split(), _batch()
    table = split.client.embeddings.embed_tokens.weight
    before = table.detach().clone()
    _step(split, _forward_gradient(split, embedding_directions="sparse"), batch)
    read = torch.zeros(table.shape[0], dtype=torch.bool)
    read[batch["input_ids"].unique()] = True
    assert torch.equal(table[~read], before[~read])
    assert (table[read] != before[read]).any(dim=1).all()


@pytest.mark.parametrize("directions", ["dense", "sparse"])
def test_updates_replayed_from_their_seeds_equal_the_weights_handed_over(directions: str) -> None:
    trained, replica = _split(), _split()
    optimizer = _forward_gradient(trained, embedding_directions=directions)
    updates = []
    for step in range(3):
        output = _step(trained, optimizer, _batch(seed=step), step=step)
        updates.append(ZOUpdate.from_json(json.loads(json.dumps(ZOUpdate.of(optimizer, output.estimate).to_json()))))
    replay(_forward_gradient(replica, embedding_directions=directions), updates)
    for (name, a), b in zip(trained.client.state_dict().items(), replica.client.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(trained.client.state_dict()["embeddings.embed_tokens.weight"],
                           _split().client.state_dict()["embeddings.embed_tokens.weight"])


def test_two_processes_end_with_the_in_process_weights(model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    steps, options = 3, {"zo_optimizer": "forward_gradient", "embedding_directions": "sparse"}
    torch.manual_seed(0)
    module = _module(model_dir, "hosl")
    quiet_trainer(_strategy("hosl", **options), max_steps=steps).fit(module, datamodule=tiny_data())
    expected = {**{f"client.{k}": v for k, v in module.model.client.state_dict().items()},
                **{f"server.{k}": v for k, v in module.model.server.state_dict().items()}}
    server, client = _run_pair(model_dir, tmp_path, "hosl", steps, **options)
    assert isinstance(server, dict), server
    assert isinstance(client, dict), client
    got = {**client, **server}
    assert got.keys() == expected.keys()
    changed = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not changed, f"{len(changed)} tensors differ from the in-process run, e.g. {changed[:3]}"


# ------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(("options", "message"), [
    ({"mode": "zo"}, "zo_optimizer 'forward_gradient' is not valid with mode='zo': it needs dL/dh"),
    ({"server_grad": "mean"}, "server_grad='mean' is not valid with zo_optimizer 'forward_gradient', which does"),
    ({"batch_probes": False}, "batch_probes=False is not valid with zo_optimizer 'forward_gradient'"),
    ({"pair_probes": True}, "pair_probes=True is not valid with zo_optimizer 'forward_gradient'"),
    ({"mu": 1e-3}, "mu=0.001 is not valid with zo_optimizer 'forward_gradient', which does not use it"),
])
def test_options_it_cannot_honour_are_refused_naming_them(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HOSLStrategy(zo_optimizer="forward_gradient", **options)


def test_a_scaled_loss_is_refused() -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    from hosl_lightning.lightning.precision_checks import check_precision

    scaled = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))  # as 16-mixed on a GPU
    with pytest.raises(ValueError, match="precision='16-mixed' scales the server's loss by its GradScaler"):
        check_precision(scaled, "hosl", "in_process", estimator="forward")
    check_precision(scaled, "hosl", "in_process", estimator="two_point")  # probe losses are never scaled


def test_a_drop_in_module_is_refused_before_training() -> None:
    from test_dropin import PlainFineTuner, fit, tiny_llama

    with pytest.raises(ValueError, match="'forward_gradient' is not valid with a drop-in module .*HOSLModule"):
        fit(PlainFineTuner(tiny_llama()), zo_optimizer="forward_gradient", q=1, mu=None)


def test_it_trains_from_a_config_in_process() -> None:
    strategy = HOSLStrategy(cut_layer=1, q=2, zo_lr=1e-3, zo_optimizer={"name": "forward_gradient"})
    trainer = quiet_trainer(strategy, max_steps=2)
    module = HOSLModule(model_config=TINY_LLAMA, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    trainer.fit(module, tiny_data())
    assert type(strategy.client_optimizer) is ForwardGradient
    assert strategy.settings.estimator == "forward"
    assert float(trainer.logged_metrics["hosl/bytes_down"]) == 8 * 16 * TINY_LLAMA["hidden_size"] * 4  # dL/dh


def test_it_is_chosen_from_the_command_line_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml
    from test_cli import CONFIGS, FAST

    from hosl_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(CONFIGS / "synthetic.yaml"), *FAST,
          "--trainer.strategy.init_args.zo_optimizer={name: forward_gradient}"])
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["trainer"]["strategy"]["init_args"]["zo_optimizer"] == {"name": "forward_gradient"}
