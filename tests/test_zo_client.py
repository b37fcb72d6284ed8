"""The zeroth-order client: sparse embedding directions, paired probes, and the registered client optimizers."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import TINY_LLAMA, quiet_trainer, tiny_data
from lightning.pytorch.callbacks import ModelCheckpoint

from hosl_lightning import HOSLModule, HOSLStrategy, SplitCausalLM, load_causal_lm
from hosl_lightning.core.directions import DirectionSampler
from hosl_lightning.core.zo import ZOSGD
from hosl_lightning.distributed.sync import ZOUpdate, check_replayable, replay
from hosl_lightning.modes import ZOSettings
from hosl_lightning.modes.in_process import hosl_step
from hosl_lightning.zo_optimizers import FZOO, ZO_OPTIMIZERS, ZOMomentum, build_zo_optimizer

WIDE_VOCAB = dict(TINY_LLAMA, vocab_size=512)  # the table dominates d_c, as in a real model


def _split(config: dict[str, Any] = WIDE_VOCAB, cut: int = 1) -> SplitCausalLM:
    torch.manual_seed(0)
    split = SplitCausalLM(load_causal_lm(model_config=config), cut).eval()
    for p in split.client.parameters():
        p.requires_grad_(False)
    return split


def _batch(vocab: int = 512, rows: int = 4, length: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab // 4, (rows, length), generator=generator)  # reads at most a quarter of the rows
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _client_optimizer(split: SplitCausalLM, cls: type[ZOSGD] = ZOSGD, **kwargs: Any) -> ZOSGD:
    return cls(split.client.named_parameters(), lr=kwargs.pop("lr", 1e-2), seed=3, **kwargs)


def _step(split: SplitCausalLM, optimizer: ZOSGD, batch: dict[str, torch.Tensor], step: int = 0,
          **settings: Any) -> Any:
    settings = {"queries": 2, "estimator": optimizer.estimator, **settings}
    return hosl_step(split, batch, optimizer, ZOSettings(**settings), step, lambda loss: loss.backward())


# ------------------------------------------------------------------------------- sparse embedding directions
def test_a_sparse_step_leaves_every_row_the_batch_did_not_read_bit_identical() -> None:
    split = _split()
    table = split.client.embeddings.embed_tokens.weight
    before = table.detach().clone()
    batch = _batch()
    _step(split, _client_optimizer(split, embedding_directions="sparse"), batch)
    read = torch.zeros(table.shape[0], dtype=torch.bool)
    read[batch["input_ids"].unique()] = True
    assert torch.equal(table[~read], before[~read])
    assert (table[read] != before[read]).any(dim=1).all()  # and every row it read moved


def test_a_dense_step_moves_the_whole_table() -> None:
    split = _split()
    table = split.client.embeddings.embed_tokens.weight
    before = table.detach().clone()
    _step(split, _client_optimizer(split), _batch())
    assert (table != before).any(dim=1).all()


def _true_gradient(split: SplitCausalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    params = list(split.client.parameters())
    for p in params:
        p.requires_grad_(True)
    loss = split.server_losses(split.client_forward(batch["input_ids"], batch["attention_mask"]), batch)[0]
    gradient = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
    for p in params:
        p.requires_grad_(False)
    return gradient


def _estimate(split: SplitCausalLM, optimizer: ZOSGD, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor:
    """The step's ZO gradient estimate (1/Q) sum_q c_q u_q over every client weight, zeros where it is sparse."""
    output = _step(split, optimizer, batch, step=step, queries=1)
    optimizer.param_groups[0]["lr"] = 0.0  # the estimate only: keep the weights where they were
    parts = []
    coefficients = output.estimate.coefficients.tolist()
    for p in split.client.parameters():
        dense = torch.zeros_like(p)
        for index, total in optimizer.directions(p, optimizer.sampler, step, coefficients,
                                                 output.estimate.rows.get(optimizer.keys[id(p)])):
            dense[index] += total
        parts.append(dense.reshape(-1))
    return torch.cat(parts)


def test_sparse_directions_point_closer_to_the_true_gradient_than_dense_ones() -> None:
    split, batch = _split(dict(TINY_LLAMA, vocab_size=2048)), _batch()
    truth = _true_gradient(split, batch)
    cosines = {}
    for kind in ("dense", "sparse"):
        optimizer = _client_optimizer(split, lr=0.0, embedding_directions=kind)
        values = [torch.nn.functional.cosine_similarity(_estimate(split, optimizer, batch, step), truth, dim=0)
                  for step in range(64)]
        cosines[kind] = torch.stack(values).mean().item()
    # E[cos] ~ sqrt(2 / (pi d)). d_c is ~75k weights here, 65k of them in the table; the batch reads <= 32 rows
    # (<= 1k weights), so the sparse direction spans ~10k: a ratio of ~2.7.
    assert cosines["dense"] > 0 and cosines["sparse"] > 2.0 * cosines["dense"], cosines


def test_sparse_updates_replayed_from_their_seeds_equal_the_weights_handed_over() -> None:
    trained, replica = _split(), _split()
    optimizer = _client_optimizer(trained, embedding_directions="sparse")
    updates = []
    for step in range(3):
        output = _step(trained, optimizer, _batch(seed=step), step=step)
        updates.append(ZOUpdate.from_json(json.loads(json.dumps(ZOUpdate.of(optimizer, output.estimate).to_json()))))
    assert all(update.rows for update in updates)
    replay(_client_optimizer(replica, embedding_directions="sparse"), updates)
    for (name, a), b in zip(trained.client.state_dict().items(), replica.client.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_sparse_rows_direction_does_not_depend_on_the_other_rows_read() -> None:
    sampler, like = DirectionSampler("gaussian", 5), torch.empty(100, 8)
    alone = sampler.sparse_rows(2, 1, 0, torch.tensor([7]), like)
    together = sampler.sparse_rows(2, 1, 0, torch.tensor([3, 7, 50]), like)
    assert torch.equal(together[1:2], alone) and not torch.equal(together[0], together[2])


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_sparse_rows_are_the_same_on_the_probe_the_update_and_the_replay(kind: str) -> None:
    table = torch.nn.Embedding(300, 16)
    before = table.weight.detach().clone()
    optimizer = ZOSGD([("table", table.weight)], lr=0.1, seed=3, direction=kind, embedding_directions="sparse")
    ids, step, mu = torch.tensor([[5, 17, 5, 250], [17, 40, 41, 0]]), 4, 1e-3
    drawn = optimizer.sampler.sparse_rows(step, 0, 0, torch.tensor([0, 5, 17, 40, 41, 250]), table.weight)
    with torch.no_grad(), optimizer.perturbed([table], step, 0, mu):  # the probe: u's rows added to the lookup
        probe = table(ids)
    by_row = dict(zip([0, 5, 17, 40, 41, 250], drawn))
    for position, row in enumerate(ids.reshape(-1).tolist()):
        assert torch.equal(probe.reshape(-1, 16)[position], before[row] + mu * by_row[row])
    optimizer.step(estimate=optimizer.estimate(step, torch.tensor([2.0])))  # the update: -lr * c * u on those rows
    read = torch.zeros(300, dtype=torch.bool)
    read[ids.unique()] = True
    assert torch.equal(table.weight[~read], before[~read])  # untouched rows untouched, bit for bit
    torch.testing.assert_close(table.weight[read], before[read] - 0.1 * 2.0 * drawn, rtol=0, atol=1e-6)
    replica = torch.nn.Embedding(300, 16)
    replica.weight.data.copy_(before)
    ZOSGD([("table", replica.weight)], lr=0.1, seed=3, direction=kind, embedding_directions="sparse").add_directions(
        replica.weight, DirectionSampler(kind, 3), step, [2.0], 0.1, rows=ids.unique())  # the replay
    assert torch.equal(replica.weight, table.weight)


def test_sparse_rows_are_drawn_in_a_fixed_number_of_vectorised_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """No generator per row: the calls a draw makes do not grow with the number of rows it draws."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from hosl_lightning.core import directions

    class CountCalls(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += 1
            return func(*args, **(kwargs or {}))

    generators = []
    monkeypatch.setattr(directions.torch, "Generator", lambda *a, **k: generators.append(1))
    sampler, like = DirectionSampler("gaussian", 5), torch.empty(5000, 8)
    sampler.sparse_rows(0, 0, 0, torch.tensor([1]), like)  # the gaussian levels, computed once per device
    calls = []
    for rows in (torch.tensor([7]), torch.arange(0, 5000, 3)):
        with CountCalls() as counter:
            sampler.sparse_rows(1, 0, 0, rows, like)
        calls.append(counter.calls)
    assert calls[0] == calls[1] < 100 and not generators, calls


def test_the_sparse_support_is_every_row_the_steps_probes_read() -> None:
    """A module may look the table up twice in one probe (a drop-in module's chosen and rejected inputs)."""
    split = _split()
    table = split.client.embeddings.embed_tokens
    optimizer = ZOSGD([("table", table.weight)], lr=1e-2, seed=3, embedding_directions="sparse")
    with torch.no_grad(), optimizer.perturbed([table], 0, 0, 1e-3):
        first = table(torch.tensor([[1, 2, 3]]))
        second = table(torch.tensor([[3, 9]]))
    clean = table.weight.detach()
    assert torch.equal(first[0, 2] - clean[3], second[0, 0] - clean[3])  # row 3: one direction in both lookups
    rows = optimizer.estimate(0, torch.tensor([1.0])).rows[optimizer.keys[id(table.weight)]]
    assert rows.tolist() == [1, 2, 3, 9]
    assert optimizer.estimate(1, torch.tensor([1.0])).rows == {}  # another step: none read yet


# ------------------------------------------------------------------------------------------ paired probes
TINY_GPT2 = dict(model_type="gpt2", vocab_size=512, n_embd=32, n_layer=2, n_head=4, n_positions=64)
TINY_OPT = dict(model_type="opt", vocab_size=512, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)


@pytest.mark.parametrize("config", [WIDE_VOCAB, TINY_GPT2, TINY_OPT], ids=["llama", "gpt2", "opt"])
@pytest.mark.parametrize("directions", ["dense", "sparse"])
def test_paired_probes_give_the_losses_and_update_of_one_at_a_time_probes(directions: str, config: dict) -> None:
    results = []
    for pair in (False, True):
        split = _split(config)
        optimizer = _client_optimizer(split, embedding_directions=directions)
        output = _step(split, optimizer, _batch(), pair_probes=pair)
        results.append((output.estimate.coefficients, split.client.state_dict()))
    (c_one, w_one), (c_pair, w_pair) = results
    torch.testing.assert_close(c_pair, c_one, rtol=1e-4, atol=1e-4)
    for key in w_one:
        torch.testing.assert_close(w_pair[key], w_one[key], rtol=1e-5, atol=1e-6, msg=key)


def test_paired_probes_draw_each_direction_once_per_query(monkeypatch: pytest.MonkeyPatch) -> None:
    draws: list[int] = []
    original = DirectionSampler._draw

    def counted(self, step, query, key, chunk, shape, like):
        draws.append(key)
        return original(self, step, query, key, chunk, shape, like)

    monkeypatch.setattr(DirectionSampler, "_draw", counted)
    counts = {}
    for pair in (False, True):
        split = _split()
        optimizer = _client_optimizer(split, lr=0.0)
        draws.clear()
        _step(split, optimizer, _batch(), pair_probes=pair)
        counts[pair] = len(draws)
    update_draws = sum(len(list(optimizer.sampler.chunks(0, 0, k, p))) for p, k in
                       ((p, optimizer.keys[id(p)]) for p in split.client.parameters())) * 2  # Q = 2 in the update
    assert counts[True] - update_draws < 0.6 * (counts[False] - update_draws), counts


# ------------------------------------------------------------------------------------- client optimizers
class _ClientAtStart(L.Callback):
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.client = {k: v.clone() for k, v in trainer.strategy.split_model.client.state_dict().items()}


def test_every_registered_optimizer_is_selectable_and_trains_the_client() -> None:
    assert {"zo_sgd", "fzoo", "zo_momentum", "forward_gradient"} <= set(ZO_OPTIMIZERS)
    for name in ZO_OPTIMIZERS:
        L.seed_everything(0)
        strategy = HOSLStrategy(cut_layer=1, q=2, zo_lr=1e-3, zo_optimizer={"name": name})
        start = _ClientAtStart()
        trainer = quiet_trainer(strategy, max_steps=2, callbacks=[start])
        trainer.fit(HOSLModule(model_config=TINY_LLAMA, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2)), tiny_data())
        assert type(strategy.client_optimizer) is ZO_OPTIMIZERS[name]
        after = strategy.split_model.client.state_dict()
        assert all(not torch.equal(after[k], v) for k, v in start.client.items() if v.ndim == 2), name


def test_fzoo_probes_the_clean_point_and_q_directions_and_divides_by_their_spread() -> None:
    split = _split()
    optimizer = _client_optimizer(split, FZOO, direction="rademacher")
    settings = ZOSettings(queries=3, estimator="one_sided")
    assert settings.points() == [(0, 0.0), (0, 1.0), (1, 1.0), (2, 1.0)]
    losses = torch.tensor([2.0, 2.003, 1.998, 2.001])
    expected = (losses[1:] - losses[0]) / losses[1:].std()
    torch.testing.assert_close(optimizer.coefficients(losses, 1e-3), expected)
    assert torch.equal(optimizer.coefficients(torch.tensor([2.0, 2.5, 2.5]), 1e-3), torch.zeros(2))
    output = _step(split, optimizer, _batch(), queries=3)
    assert output.estimate.coefficients.shape == (3,)


def test_momentum_follows_its_buffer_and_resumes_from_its_state() -> None:
    param = torch.nn.Parameter(torch.zeros(6))
    optimizer = ZOMomentum([("w", param)], lr=0.5, momentum=0.5, seed=1)
    directions = [optimizer.sampler.direction(t, 0, 0, param) for t in range(2)]
    from hosl_lightning.core.zo import ZOEstimate
    optimizer.step(estimate=ZOEstimate(0, torch.tensor([2.0])))
    state = copy.deepcopy(optimizer.state_dict())  # state_dict holds the live buffer
    optimizer.step(estimate=ZOEstimate(1, torch.tensor([-1.0])))
    m1 = 2.0 * directions[0]
    m2 = 0.5 * m1 - 1.0 * directions[1]
    torch.testing.assert_close(param.detach(), -0.5 * (m1 + m2))
    again = torch.nn.Parameter(-0.5 * m1)
    resumed = ZOMomentum([("w", again)], lr=0.5, momentum=0.5, seed=1)
    resumed.load_state_dict(state)
    resumed.step(estimate=ZOEstimate(1, torch.tensor([-1.0])))
    assert torch.equal(again.detach(), param.detach())


@pytest.mark.parametrize("spec", [{"name": "fzoo"}, {"name": "zo_momentum", "momentum": 0.8},
                                  {"name": "forward_gradient"}])
def test_a_run_with_a_stateful_or_one_sided_optimizer_resumes_bitwise(spec: dict[str, Any], tmp_path: Path) -> None:
    def run(max_steps: int, ckpt_path: str | None = None, callbacks=()):
        L.seed_everything(0)
        strategy = HOSLStrategy(cut_layer=1, q=2, zo_lr=1e-5, seed=7, zo_optimizer=dict(spec),
                                embedding_directions="sparse")
        trainer = quiet_trainer(strategy, max_steps=max_steps, enable_checkpointing=bool(callbacks),
                                callbacks=list(callbacks))
        torch.manual_seed(0)
        trainer.fit(HOSLModule(model_config=TINY_LLAMA, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2)),
                    tiny_data(), ckpt_path=ckpt_path)
        return trainer

    # 4 batches an epoch: the checkpoint at the epoch's end, as in test_training's resume test
    uninterrupted = run(8, callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1,
                                                      filename="{step}")])
    resumed = run(8, ckpt_path=str(tmp_path / "step=4.ckpt"))
    assert resumed.strategy.client_optimizer.state_dict()["state"].keys() == (
        uninterrupted.strategy.client_optimizer.state_dict()["state"].keys())
    a, b = uninterrupted.strategy.split_model.state_dict(), resumed.strategy.split_model.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resuming_with_another_optimizer_is_refused(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, filename="last")
    trainer = quiet_trainer(HOSLStrategy(cut_layer=1), max_steps=1, enable_checkpointing=True, callbacks=[checkpoint])
    trainer.fit(HOSLModule(model_config=TINY_LLAMA), tiny_data())
    other = quiet_trainer(HOSLStrategy(cut_layer=1, zo_optimizer="zo_momentum"), max_steps=2)
    with pytest.raises(ValueError, match=r"zo_optimizer=\{'name': 'zo_sgd'\}, this run has "
                                         r"zo_optimizer=\{'name': 'zo_momentum', 'momentum': 0.9\}"):
        other.fit(HOSLModule(model_config=TINY_LLAMA), tiny_data(), ckpt_path=str(tmp_path / "last.ckpt"))


def test_a_registered_optimizer_needs_its_own_name_and_never_replaces_another() -> None:
    from hosl_lightning.zo_optimizers import register_zo_optimizer

    class Unnamed(ZOSGD):
        pass

    class Impostor(ZOSGD):
        name = "fzoo"

    with pytest.raises(ValueError, match="must set its own `name`"):
        register_zo_optimizer(Unnamed)
    with pytest.raises(ValueError, match="'fzoo' is already registered to FZOO"):
        register_zo_optimizer(Impostor)
    assert ZO_OPTIMIZERS["zo_sgd"] is ZOSGD and ZO_OPTIMIZERS["fzoo"] is FZOO


def test_a_checkpoint_saved_before_the_client_options_existed_still_resumes(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, filename="last")
    trainer = quiet_trainer(HOSLStrategy(cut_layer=1), max_steps=1, enable_checkpointing=True, callbacks=[checkpoint])
    trainer.fit(HOSLModule(model_config=TINY_LLAMA), tiny_data())
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)
    del state["hosl"]["zo_optimizer"], state["hosl"]["directions"]["embedding_directions"]  # as an older release saved
    torch.save(state, tmp_path / "old.ckpt")
    resumed = quiet_trainer(HOSLStrategy(cut_layer=1), max_steps=2)
    resumed.fit(HOSLModule(model_config=TINY_LLAMA), tiny_data(), ckpt_path=str(tmp_path / "old.ckpt"))
    assert resumed.global_step == 2
    with pytest.raises(ValueError, match="embedding_directions='dense' there, 'sparse' here"):
        quiet_trainer(HOSLStrategy(cut_layer=1, embedding_directions="sparse"), max_steps=2).fit(
            HOSLModule(model_config=TINY_LLAMA), tiny_data(), ckpt_path=str(tmp_path / "old.ckpt"))


def test_seed_sync_is_refused_for_an_optimizer_with_state() -> None:
    split = _split()
    with pytest.raises(ValueError, match="zo_optimizer 'zo_momentum': it keeps state.*client_sync='weights'"):
        check_replayable(build_zo_optimizer("zo_momentum", split.client.named_parameters()))
    check_replayable(build_zo_optimizer("fzoo", split.client.named_parameters()))  # stateless: fine


@pytest.mark.parametrize(("options", "message"), [
    ({"zo_optimizer": "adam"}, "zo_optimizer name='adam' is not valid: choose one of zo_sgd, fzoo, zo_momentum"),
    ({"zo_optimizer": {"momentum": 0.9}}, "give a name"),
    ({"zo_optimizer": {"name": "zo_momentum", "beta": 0.9}}, "has no option 'beta': its options are momentum"),
    ({"zo_optimizer": {"name": "zo_momentum", "momentum": 1.0}}, r"momentum=1.0 is not valid"),
    ({"zo_optimizer": "fzoo", "q": 1}, "q=1 is not valid with zo_optimizer 'fzoo': it needs q >= 2"),
    ({"embedding_directions": "rows"}, "embedding_directions='rows' is not valid: choose one of 'dense', 'sparse'"),
    ({"pair_probes": 1}, "pair_probes=1 is not valid: choose True or False"),
    ({"zo_optimizer": "zo_momentum", "world_size": 3}, "client_sync='seeds' is not valid with zo_optimizer"),
])
def test_bad_client_optimizer_options_fail_naming_the_option(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HOSLStrategy(**options)
