"""HOSLModule under HOSLStrategy: the three modes, step counting, resume, options and their errors."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import TINY_LLAMA, for_mode, quiet_trainer, tiny_data
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import StrategyRegistry

from hosl_lightning import HOSLModule, HOSLStrategy
from hosl_lightning.lightning.settings import STRATEGY_NAME


def _module(lr: float = 1e-2) -> HOSLModule:
    torch.manual_seed(0)  # the same initial weights in every run of a test
    return HOSLModule(model_config=TINY_LLAMA, optimizer=lambda p: torch.optim.AdamW(p, lr=lr))


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class _SnapshotAtStart(L.Callback):
    """Weights of both halves right after the cut, before the first step."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        split = trainer.strategy.split_model
        self.client, self.server = _snapshot(split.client), _snapshot(split.server)


def _fit(mode: str = "hosl", steps: int = 3, lr: float = 1e-2, zo_lr: float = 1e-3, **strategy: Any):
    start = _SnapshotAtStart()
    trainer = quiet_trainer(HOSLStrategy(cut_layer=1, **for_mode(mode, q=2, zo_lr=zo_lr), **strategy), max_steps=steps,
                            callbacks=[start])
    trainer.fit(_module(lr), tiny_data())
    return trainer, start


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> list[bool]:
    after = module.state_dict()
    return [not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point() and before[k].ndim]


@pytest.mark.parametrize("mode", ["hosl", "fo", "zo"])
def test_each_mode_trains_both_halves_with_one_counted_step_per_batch(mode: str) -> None:
    trainer, start = _fit(mode, steps=3)
    split = trainer.strategy.split_model
    assert trainer.global_step == 3
    assert all(_changed(start.client, split.client))
    assert all(_changed(start.server, split.server))
    if mode in ("hosl", "zo"):
        assert all(p.grad is None and not p.requires_grad for p in split.client.parameters())
    if mode == "zo":
        assert all(p.grad is None for p in split.server.parameters())
    if mode == "fo":
        assert all(p.grad is None or not p.grad.any() for p in split.client.parameters())  # zeroed after step


def test_hosl_client_moves_only_by_zo() -> None:
    trainer, start = _fit("hosl", steps=2, zo_lr=0.0)
    split = trainer.strategy.split_model
    assert not any(_changed(start.client, split.client))
    assert all(_changed(start.server, split.server))


def test_hosl_server_moves_only_by_its_optimizer() -> None:
    trainer, start = _fit("hosl", steps=2, lr=0.0)
    split = trainer.strategy.split_model
    assert not any(_changed(start.server, split.server))
    assert all(_changed(start.client, split.client))


@pytest.mark.parametrize("server_grad", ["perturbed", "mean", "clean"])
def test_batched_probes_match_one_at_a_time(server_grad: str) -> None:
    batched, _ = _fit("hosl", steps=2, batch_probes=True, server_grad=server_grad)
    looped, _ = _fit("hosl", steps=2, batch_probes=False, server_grad=server_grad)
    a, b = batched.strategy.split_model.state_dict(), looped.strategy.split_model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_logged_metrics_and_bytes_per_step() -> None:
    trainer, _ = _fit("hosl", steps=1)
    metrics = trainer.callback_metrics
    for key in ("train_loss", "hosl/zo_grad_abs", "hosl/lr_client", "hosl/lr_server", "hosl/bytes_up", "hosl/bytes_down"):
        assert key in metrics, key
    assert metrics["hosl/server_sec"] > 0 and metrics["hosl/client_sec"] > 0
    batch, seq, hidden, q = 8, 16, TINY_LLAMA["hidden_size"], 2
    activation = batch * seq * hidden * 4 + batch * seq * 8 + seq * 8  # fp32 hidden, int64 mask, shared positions
    labels = batch * seq * 8
    assert metrics["hosl/bytes_up"] == 2 * q * activation + labels
    assert metrics["hosl/bytes_down"] == 2 * q * 4  # 2Q float32 losses
    fo, _ = _fit("fo", steps=1)
    assert fo.callback_metrics["hosl/bytes_up"] == activation + labels
    assert fo.callback_metrics["hosl/bytes_down"] == batch * seq * hidden * 4


def test_checkpoints_every_n_train_steps_follow_batches(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer = quiet_trainer(HOSLStrategy(cut_layer=1, q=1), max_steps=4, enable_checkpointing=True,
                            callbacks=[checkpoint])
    trainer.fit(_module(), tiny_data())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step=2.ckpt", "step=4.ckpt"]


@pytest.mark.parametrize("mode", ["hosl", "fo", "zo"])
def test_resume_from_checkpoint_reproduces_uninterrupted_run_bitwise(mode: str, tmp_path: Path) -> None:
    # 4 batches per epoch; the checkpoint is taken after step 4 (the end of the first epoch), resumed to step 8.
    def run(max_steps: int, ckpt_path: str | None = None, callbacks=()):
        L.seed_everything(0)
        trainer = quiet_trainer(HOSLStrategy(cut_layer=1, **for_mode(mode, q=2, zo_lr=1e-3, seed=7)), max_steps=max_steps,
                                enable_checkpointing=bool(callbacks), callbacks=list(callbacks))
        module = _module()
        trainer.fit(module, tiny_data(), ckpt_path=ckpt_path)
        return trainer

    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    uninterrupted = run(8, callbacks=[checkpoint])
    resumed = run(8, ckpt_path=str(tmp_path / "step=4.ckpt"))
    assert resumed.global_step == uninterrupted.global_step == 8
    assert resumed.strategy.zo_steps == 8
    a, b = uninterrupted.strategy.split_model.state_dict(), resumed.strategy.split_model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_with_other_seed_is_refused(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, filename="last")
    trainer = quiet_trainer(HOSLStrategy(cut_layer=1, seed=1), max_steps=1, enable_checkpointing=True,
                            callbacks=[checkpoint])
    trainer.fit(_module(), tiny_data())
    other = quiet_trainer(HOSLStrategy(cut_layer=1, seed=2), max_steps=2)
    with pytest.raises(ValueError, match="seed=1.*seed=2"):
        other.fit(_module(), tiny_data(), ckpt_path=str(tmp_path / "last.ckpt"))


def test_registered_by_name_and_registration_is_idempotent() -> None:
    assert STRATEGY_NAME in StrategyRegistry
    HOSLStrategy.register_strategies(StrategyRegistry)  # a second import must not raise
    trainer = L.Trainer(strategy="hosl", accelerator="cpu", logger=False)
    assert isinstance(trainer.strategy, HOSLStrategy)
    assert trainer.strategy.root_device == torch.device("cpu")


def test_halves_are_placed_on_their_devices() -> None:
    trainer = quiet_trainer(HOSLStrategy(cut_layer=1, client_device="cpu", server_device="cpu"), max_steps=1)
    trainer.fit(_module(), tiny_data())
    split = trainer.strategy.split_model
    assert split.boundary.client_device == torch.device("cpu") == split.boundary.server_device
    assert {p.device.type for p in split.parameters()} == {"cpu"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "hsol"}, r"mode='hsol' is not valid: choose one of 'hosl', 'fo', 'zo'"),
        ({"q": 0}, r"q=0 is not valid: it must be an integer >= 1"),
        ({"q": 1.5}, r"q=1.5 is not valid"),
        ({"mu": 0.0}, r"mu=0.0 is not valid: it must be a number > 0"),
        ({"mu": -1e-3}, r"mu=-0.001 is not valid"),
        ({"zo_lr": -1.0}, r"zo_lr=-1.0 is not valid"),
        ({"direction": "uniform"}, r"direction='uniform' is not valid: choose one of 'gaussian', 'rademacher'"),
        ({"server_grad": "all"}, r"server_grad='all' is not valid: choose one of 'perturbed', 'mean', 'clean'"),
        ({"cut_layer": -1}, r"cut_layer=-1 is not valid"),
    ],
)
def test_invalid_options_fail_when_the_strategy_is_built(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HOSLStrategy(**kwargs)


def test_cut_beyond_the_model_fails_before_training() -> None:
    trainer = quiet_trainer(HOSLStrategy(cut_layer=9), max_steps=1)
    with pytest.raises(ValueError, match=r"cut_layer=9 is out of range .* 3 decoder blocks: choose an integer in \[0, 3\]"):
        trainer.fit(_module(), tiny_data())


@pytest.mark.parametrize("mode", ["hosl", "zo"])
def test_half_precision_weights_are_rejected_for_zeroth_order_modes(mode: str) -> None:
    trainer = quiet_trainer(HOSLStrategy(cut_layer=1, mode=mode), max_steps=1, precision="bf16-true")
    with pytest.raises(ValueError, match=r"precision='bf16-true'.*float32"):
        trainer.fit(_module(), tiny_data())


@pytest.mark.parametrize("mode", ["hosl", "zo"])
def test_bf16_weights_fail_before_training_naming_dtype(mode: str) -> None:
    module = HOSLModule(model_config=TINY_LLAMA, dtype="bfloat16")
    trainer = quiet_trainer(HOSLStrategy(cut_layer=1, mode=mode), max_steps=1)
    with pytest.raises(ValueError, match=rf"^dtype='bfloat16' loads the model's weights in torch.bfloat16 \(e.g. "
                                         rf"'.*'\), but mode='{mode}' updates them by zeroth-order steps.*: use "
                                         rf"dtype='float32' \(the default\), or use mode='fo'"):
        trainer.fit(module, tiny_data())
    assert trainer.global_step == 0  # refused at setup, before any step


def test_bf16_weights_train_in_fo() -> None:
    trainer = quiet_trainer(HOSLStrategy(cut_layer=1, mode="fo"), max_steps=1)
    trainer.fit(HOSLModule(model_config=TINY_LLAMA, dtype="bfloat16"), tiny_data())
    assert trainer.global_step == 1


def test_hosl_module_needs_the_hosl_strategy() -> None:
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    with pytest.raises(TypeError, match="HOSLModule trains under HOSLStrategy"):
        trainer.fit(_module(), tiny_data())


@pytest.mark.parametrize("mode", ["hosl", "zo"])
def test_resume_where_the_directions_would_be_drawn_differently_is_refused(mode: str, tmp_path: Path) -> None:
    """A generator draws other numbers on another device type: resuming there would silently change the run."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, filename="last")
    quiet_trainer(HOSLStrategy(cut_layer=1, mode=mode), max_steps=1, enable_checkpointing=True,
                  callbacks=[checkpoint]).fit(_module(), tiny_data())
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert state["hosl"]["directions"] == {"direction_device": "cpu", "direction_chunk": 1 << 14,
                                           "embedding_directions": "dense"}
    state["hosl"]["directions"]["direction_device"] = "cuda"  # as if saved by a client on a GPU
    torch.save(state, tmp_path / "moved.ckpt")
    with pytest.raises(ValueError, match=r"the checkpoint drew its directions with .*'cuda'.* this run draws them"):
        quiet_trainer(HOSLStrategy(cut_layer=1, mode=mode), max_steps=2).fit(
            _module(), tiny_data(), ckpt_path=str(tmp_path / "moved.ckpt"))


@pytest.mark.parametrize("mode", ["hosl", "zo"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_a_scheduled_zo_lr_decays_to_zero_and_resumes_bitwise(mode: str, schedule: str, tmp_path: Path) -> None:
    def run(max_steps: int, ckpt_path: str | None = None, callbacks=(), zo_lr_schedule: str = schedule):
        L.seed_everything(0)
        strategy = HOSLStrategy(cut_layer=1, mode=mode, q=2, zo_lr=1e-3, seed=7, zo_lr_schedule=zo_lr_schedule)
        trainer = quiet_trainer(strategy, max_steps=max_steps, enable_checkpointing=bool(callbacks),
                                callbacks=list(callbacks))
        trainer.fit(_module(), tiny_data(), ckpt_path=ckpt_path)
        return trainer

    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    uninterrupted = run(8, callbacks=[checkpoint])
    zo = uninterrupted.strategy._drawing_optimizer()
    assert zo.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # decayed to 0 over the 8 steps
    resumed = run(8, ckpt_path=str(tmp_path / "step=4.ckpt"))
    a, b = uninterrupted.strategy.split_model.state_dict(), resumed.strategy.split_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    constant = run(8, zo_lr_schedule="constant")
    c = constant.strategy.split_model.state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a if "embed" in k), "the schedule changed nothing"


def test_zo_mode_refuses_a_module_lr_scheduler_it_would_drop() -> None:
    module = HOSLModule(model_config=dict(TINY_LLAMA), lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1))
    with pytest.raises(ValueError, match=r"lr_scheduler is not valid in mode='zo'.*zo_lr_schedule"):
        quiet_trainer(HOSLStrategy(cut_layer=1, mode="zo")).fit(module, tiny_data())


def test_a_decaying_zo_lr_needs_a_fit_with_an_end() -> None:
    from hosl_lightning.core.zo import ZOSGD, zo_lr_scheduler

    optimizer = ZOSGD([("w", torch.nn.Parameter(torch.zeros(2)))], lr=1.0)
    with pytest.raises(ValueError, match=r"zo_lr_schedule='linear' is not valid for a fit without an end"):
        zo_lr_scheduler(optimizer, "linear", float("inf"))
    with pytest.raises(ValueError, match=r"zo_lr_schedule='step' is not valid: choose one of"):
        HOSLStrategy(zo_lr_schedule="step")


@pytest.mark.parametrize("mode", ["hosl", "fo", "zo"])
def test_frozen_client_modules_stay_bit_identical_while_the_rest_trains(mode: str) -> None:
    trainer, start = _fit(mode, client_frozen=["embeddings.embed_tokens"])
    split = trainer.strategy.split_model
    after = split.client.state_dict()
    embedding = "embeddings.embed_tokens.weight"
    assert torch.equal(after[embedding], start.client[embedding])  # frozen
    assert any(not torch.equal(after[k], start.client[k]) for k in after if k != embedding)  # the blocks trained
    head = split.server.lm_head.weight  # TINY_LLAMA ties it to the embedding: the server's copy still trains
    assert not torch.equal(head, start.server["lm_head.weight"])


def test_a_frozen_name_the_client_does_not_have_fails_listing_its_modules() -> None:
    with pytest.raises(ValueError, match=r"client_frozen names 'embed_tokens', which the client half does not have; "
                                         r"its modules: \['embeddings', 'embeddings.embed_tokens'"):
        _fit(client_frozen=["embed_tokens"])
    with pytest.raises(ValueError, match="client_frozen='embeddings' is not valid: give a list of module names"):
        HOSLStrategy(client_frozen="embeddings")  # type: ignore[arg-type]
    for bad in (3, True, ["embeddings", 1]):
        with pytest.raises(ValueError, match=re.escape(f"client_frozen={bad!r} is not valid")):
            HOSLStrategy(client_frozen=bad)  # type: ignore[arg-type]


def test_a_client_frozen_whole_is_refused_in_hosl_naming_the_option() -> None:
    with pytest.raises(ValueError, match=re.escape("client_frozen=['embeddings', 'stack'] freezes every weight of "
                                                   "the client half")):
        _fit(client_frozen=["embeddings", "stack"])
