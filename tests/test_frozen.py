"""mode frozen: the client never learns, the server learns as fo's does, and only the loss comes back."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY_LLAMA, quiet_trainer, tiny_data
from lightning.pytorch.callbacks import ModelCheckpoint
from test_modes import batch, tiny
from test_remote import _in_process, _run_pair, model_dir  # noqa: F401 - model_dir is a fixture
from test_training import _fit, _module

from hosl_lightning import HOSLModule, HOSLStrategy, SplitCausalLM
from hosl_lightning.modes import MODES, Mode, ZOSettings
from hosl_lightning.modes.frozen import NoUpdate
from hosl_lightning.modes.in_process import in_process_step


def test_frozen_is_a_registered_mode_that_trains_no_half_by_zo() -> None:
    frozen = MODES["frozen"]
    assert frozen.frozen_halves == ("client",) and frozen.zo_halves == () and frozen.reply == "loss"
    with pytest.raises(ValueError, match="trained by ZO or frozen, not both"):
        Mode("both", ("client",), frozen.client_step, frozen.server_step, "loss", frozen.probes, ("client",))


def test_client_weights_stay_bit_identical_while_the_server_trains() -> None:
    trainer, start = _fit("frozen", steps=3)
    split = trainer.strategy.split_model
    assert trainer.global_step == 3
    after = split.client.state_dict()
    assert all(torch.equal(start.client[k], after[k]) for k in start.client)
    server_after = split.server.state_dict()
    assert any(not torch.equal(start.server[k], server_after[k]) for k in start.server), "the server did not train"
    assert all(p.grad is None and not p.requires_grad for p in split.client.parameters())
    assert trainer.strategy.client_optimizer is None, "a frozen client draws no directions"
    client = {id(p) for p in split.client.parameters()}
    optimizer = trainer.optimizers[0]
    assert not any(id(p) in client for g in optimizer.param_groups for p in g["params"])
    assert not any(id(p) in client for p in optimizer.state), "the client holds optimizer state"


def test_one_activation_goes_up_and_only_the_loss_comes_down() -> None:
    trainer, _ = _fit("frozen", steps=1, memory_every_n_steps=1)
    metrics = trainer.callback_metrics
    batch_size, seq, hidden = 8, 16, TINY_LLAMA["hidden_size"]
    activation = batch_size * seq * hidden * 4 + batch_size * seq * 8 + seq * 8  # as in test_training
    labels = batch_size * seq * 8
    assert metrics["hosl/bytes_up"] == activation + labels
    assert metrics["hosl/bytes_down"] == 4  # one float32 loss
    report = trainer.strategy.memory_report
    assert report is not None and report.mode == "frozen"
    assert report.client.grads == 0 and report.client.optimizer_state == 0
    assert report.server.grads > 0


def test_the_server_update_equals_fos_on_the_same_batch() -> None:
    model, data = tiny(), batch()
    updated = {}
    for mode in ("fo", "frozen"):
        split = SplitCausalLM(copy.deepcopy(model), 1).train()
        if mode == "frozen":
            split.client.requires_grad_(False)
        optimizer = torch.optim.SGD(split.server.parameters(), lr=0.1, momentum=0.9)
        output = in_process_step(split, mode, data, ZOSettings(), 0, lambda loss: loss.backward())
        assert torch.isfinite(output.loss)
        optimizer.step()
        updated[mode] = split.server.state_dict()
        if mode == "frozen":
            assert all(p.grad is None for p in split.client.parameters())
    assert updated["fo"].keys() == updated["frozen"].keys()
    for key in updated["fo"]:
        assert torch.equal(updated["fo"][key], updated["frozen"][key]), key
    assert any(not torch.equal(updated["fo"][k], v) for k, v in SplitCausalLM(model, 1).server.state_dict().items())


def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_run_bitwise(tmp_path: Path) -> None:
    def run(max_steps: int, ckpt_path: str | None = None, callbacks=()):
        L.seed_everything(0)
        trainer = quiet_trainer(HOSLStrategy(cut_layer=1, mode="frozen"), max_steps=max_steps,
                                enable_checkpointing=bool(callbacks), callbacks=list(callbacks))
        trainer.fit(_module(), tiny_data(), ckpt_path=ckpt_path)
        return trainer

    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    uninterrupted = run(8, callbacks=[checkpoint])
    resumed = run(8, ckpt_path=str(tmp_path / "step=4.ckpt"))
    assert resumed.global_step == uninterrupted.global_step == 8
    a, b = uninterrupted.strategy.split_model.state_dict(), resumed.strategy.split_model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
    interrupted = run(4)  # the server keeps learning after step 4: a resume that restarted it would show
    assert any(not torch.equal(a[k], v) for k, v in interrupted.strategy.split_model.state_dict().items())


def test_a_drop_in_module_trains_only_its_server(tmp_path: Path) -> None:
    """Lightning's own backward through the whole model: the client's weights take no gradient."""

    class DropIn(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = HOSLModule(model_config=TINY_LLAMA).model

        def training_step(self, data: dict, batch_idx: int) -> torch.Tensor:
            return self.model(**data).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    module = DropIn()
    trainer = quiet_trainer(HOSLStrategy(cut_layer=1, mode="frozen"), max_steps=2)
    client_before = copy.deepcopy(module.model.model.embed_tokens.state_dict())
    trainer.fit(module, tiny_data())
    split = trainer.strategy.split_model
    assert all(torch.equal(v, split.client.state_dict()[f"embeddings.embed_tokens.{k}"]) for k, v in client_before.items())
    assert all(p.grad is None for p in split.client.parameters())
    assert not any(id(p) in {id(q) for q in split.client.parameters()} for p in trainer.optimizers[0].state)


def test_two_processes_end_with_the_in_process_weights(model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    steps = 3
    expected = _in_process(model_dir, "frozen", steps)
    server, client = _run_pair(model_dir, tmp_path, "frozen", steps)
    assert isinstance(server, dict), server
    assert isinstance(client, dict), client
    got = {**client, **server}
    assert got.keys() == expected.keys()
    changed = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not changed, f"{len(changed)} tensors differ from the in-process run, e.g. {changed[:3]}"
    initial = SplitCausalLM(HOSLModule(model=str(model_dir)).model, 1).client.state_dict()
    assert all(torch.equal(client[f"client.{k}"], v) for k, v in initial.items()), "the client's weights moved"


def test_the_client_process_optimizer_updates_nothing_and_keeps_no_state() -> None:
    optimizer = NoUpdate()
    assert optimizer.step(lambda: 3) == 3
    assert optimizer.state_dict() == {"state": {}, "param_groups": [{"params": [], "lr": 0.0}]}


def test_half_precision_weights_are_allowed_since_no_zo_update_runs() -> None:
    from lightning.pytorch.plugins.precision import HalfPrecision

    from hosl_lightning.lightning.precision_checks import check_precision

    check_precision(HalfPrecision("16-true"), "frozen", "in_process")  # refused for hosl and zo, not here
    with pytest.raises(ValueError, match="zeroth-order"):
        check_precision(HalfPrecision("16-true"), "hosl", "in_process")


def test_both_processes_resume_from_a_checkpoint_with_nothing_lost(model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    expected = _in_process(model_dir, "frozen", 8)
    first = tmp_path / "first"
    first.mkdir()
    server_dir = str(tmp_path / "server")
    server, client = _run_pair(model_dir, first, "frozen", 4, checkpoint_dir=str(tmp_path / "ckpt"),
                               server_checkpoint_dir=server_dir)
    assert isinstance(server, dict) and isinstance(client, dict), (server, client)
    checkpoint = next((tmp_path / "ckpt").glob("*step=4.ckpt"))
    server, client = _run_pair(model_dir, tmp_path, "frozen", 8, ckpt_path=str(checkpoint),
                               server_checkpoint_dir=server_dir)
    assert isinstance(server, dict) and isinstance(client, dict), (server, client)
    got = {**client, **server}
    changed = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not changed, f"the resumed run differs from an uninterrupted one in {changed[:3]}"
