"""A first-order client at its memory floor: activation checkpointing of the client's blocks and the client's optimizer
step fused into the backward pass (``client_checkpointing``, ``fused_client_update``): fo's results, less memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import TINY_LLAMA, quiet_trainer, tiny_data
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from test_remote import _in_process, _run_pair, model_dir  # noqa: F401 - model_dir is a fixture
from torch import nn

from hosl_lightning import HOSLModule, HOSLStrategy, SplitCausalLM, load_causal_lm
from hosl_lightning.core.fused_update import FusedUpdate
from hosl_lightning.lightning.precision_checks import check_precision
from hosl_lightning.measurement import measure_client_inference, measure_client_step
from hosl_lightning.modes.in_process import fo_step

TINY_GPT2 = {"model_type": "gpt2", "vocab_size": 64, "n_embd": 32, "n_layer": 3, "n_head": 4, "n_positions": 64,
             "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}
OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2),
}


def _batch(vocab: int = 64, rows: int = 4, seq: int = 16) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (rows, seq), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _client_grads(config: dict[str, Any], checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
    """Client gradients of one fo step in training mode (dropout on), and how many block forwards ran."""
    torch.manual_seed(0)
    split = SplitCausalLM(load_causal_lm(model_config=config), 2).train()
    split.client.stack.checkpointing = checkpointing
    calls = []
    for block in split.client.stack.blocks:
        block.register_forward_pre_hook(lambda module, args: calls.append(1))
    torch.manual_seed(3)  # the same dropout masks in both runs
    fo_step(split, _batch(), backward=lambda loss: loss.backward())
    return {n: p.grad.clone() for n, p in split.client.named_parameters()}, len(calls)


@pytest.mark.parametrize("config", [TINY_LLAMA, TINY_GPT2], ids=["llama", "gpt2-dropout"])
def test_checkpointed_client_has_plain_fo_gradients_and_runs_each_block_again_in_backward(config: dict) -> None:
    plain, plain_calls = _client_grads(config, checkpointing=False)
    checkpointed, checkpointed_calls = _client_grads(config, checkpointing=True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert plain[name].abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-6, atol=1e-7, msg=name)
    assert (plain_calls, checkpointed_calls) == (2, 4)  # 2 client blocks, each recomputed once in the backward


def _module(optimizer: str, scheduled: bool = False) -> HOSLModule:
    torch.manual_seed(0)  # the same initial weights in every run of a test
    schedule = (lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0 / (1 + step))) if scheduled else None
    return HOSLModule(model_config=TINY_LLAMA, optimizer=OPTIMIZERS[optimizer], lr_scheduler=schedule)


def _fit(optimizer: str, steps: int = 4, scheduled: bool = False, ckpt_path: str | None = None,
         callbacks: tuple = (), **options: Any) -> L.Trainer:
    L.seed_everything(0)
    trainer = quiet_trainer(HOSLStrategy(cut_layer=2, mode="fo", **options), max_steps=steps,
                            enable_checkpointing=bool(callbacks), callbacks=list(callbacks))
    trainer.fit(_module(optimizer, scheduled), tiny_data(), ckpt_path=ckpt_path)
    return trainer


def _assert_same_weights(a: L.Trainer, b: L.Trainer) -> None:
    before, after = a.strategy.split_model.state_dict(), b.strategy.split_model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_fused_client_update_gives_the_unfused_optimizers_weights(optimizer: str) -> None:
    unfused = _fit(optimizer)
    fused = _fit(optimizer, fused_client_update=True, client_checkpointing=True)
    _assert_same_weights(unfused, fused)
    start = _module(optimizer).model.state_dict()
    client = fused.strategy.split_model.client
    assert not torch.equal(client.stack.blocks[1].mlp.up_proj.weight, start["model.layers.1.mlp.up_proj.weight"])
    assert not torch.equal(client.embeddings.embed_tokens.weight, start["model.embed_tokens.weight"])
    assert fused.strategy.fused_update is None  # detached at teardown: a later backward steps nothing


def test_fused_client_update_follows_the_lr_schedule() -> None:
    _assert_same_weights(_fit("sgd_momentum", scheduled=True),
                         _fit("sgd_momentum", scheduled=True, fused_client_update=True))


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adamw"])
def test_fused_and_checkpointed_fo_resumes_exactly(optimizer: str, tmp_path: Path) -> None:
    # 4 batches per epoch: the checkpoint after step 4 ends the first epoch; resumed to step 8.
    options = {"fused_client_update": True, "client_checkpointing": True}
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    uninterrupted = _fit(optimizer, steps=8, callbacks=(checkpoint,), **options)
    resumed = _fit(optimizer, steps=8, ckpt_path=str(tmp_path / "step=4.ckpt"), **options)
    assert resumed.global_step == 8
    _assert_same_weights(uninterrupted, resumed)
    saved = torch.load(tmp_path / "step=4.ckpt", weights_only=False)["optimizer_states"][0]["state"]
    assert len(saved) == len(list(uninterrupted.strategy.split_model.parameters()))  # the client's state included


def _embedding_gradient_kinds(optimizer: str) -> tuple[list[bool], bool]:
    """Whether each step's token-embedding gradient was sparse, and the table's sparse flag after the fit."""
    seen: list[bool] = []

    class Record(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            table = trainer.strategy.split_model.client.embeddings.embed_tokens
            self.table = table
            trainer.strategy.fused_update.detach()  # the recorder's hook runs first, then the fused step
            table.weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.is_sparse))
            trainer.strategy.fused_update.attach()

    record = Record()
    L.seed_everything(0)
    trainer = quiet_trainer(HOSLStrategy(cut_layer=1, mode="fo", fused_client_update=True), max_steps=2,
                            callbacks=[record])
    trainer.fit(_module(optimizer), tiny_data())
    return seen, record.table.sparse


@pytest.mark.parametrize(("optimizer", "sparse"), [("sgd", True), ("sgd_momentum", False), ("adamw", False)])
def test_token_embedding_gradient_is_row_sparse_only_for_plain_sgd(optimizer: str, sparse: bool) -> None:
    seen, flag_after = _embedding_gradient_kinds(optimizer)
    assert seen == [sparse, sparse]
    assert flag_after is False  # the user's embedding is left as it was


VOCAB = 65536  # a table (16 MiB) large against a block's working set, as a real LM's is


def _large_vocab_split() -> SplitCausalLM:
    torch.manual_seed(0)
    config = {**TINY_LLAMA, "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3}
    return SplitCausalLM(load_causal_lm(model_config=config), 2)


def test_fused_sgd_with_checkpointing_sits_near_the_floor_without_a_dense_table_gradient() -> None:
    batch = _batch(vocab=VOCAB, rows=8, seq=32)
    floor = measure_client_inference(_large_vocab_split(), batch)
    plain = measure_client_step(_large_vocab_split(), batch, "fo", client_optimizer=OPTIMIZERS["sgd"])
    lean = measure_client_step(_large_vocab_split(), batch, "fo", client_optimizer=OPTIMIZERS["sgd"],
                               client_checkpointing=True, fused_client_update=True)
    table = VOCAB * 64 * 4
    assert plain.grads == floor.params  # unfused: a full gradient, the table's included, is held
    assert lean.grads == 0 and lean.peak < plain.peak
    assert lean.peak < floor.peak + table / 4, (lean, floor)  # a dense table gradient alone would exceed this


@pytest.mark.parametrize("option", ["client_checkpointing", "fused_client_update"])
@pytest.mark.parametrize("mode", ["hosl", "zo", "frozen"])
def test_memory_options_are_refused_where_the_client_does_not_learn_by_backprop(option: str, mode: str) -> None:
    with pytest.raises(ValueError, match=rf"{option}=True is not valid with mode='{mode}', which does not use it: "
                                         rf"remove {option}, or choose a mode that uses it \('fo'\)"):
        HOSLStrategy(mode=mode, **{option: True})


@pytest.mark.parametrize("option", ["client_checkpointing", "fused_client_update"])
def test_memory_options_must_be_booleans(option: str) -> None:
    with pytest.raises(ValueError, match=rf"{option}=1 is not valid: choose True or False"):
        HOSLStrategy(mode="fo", **{option: 1})


def test_fused_update_refuses_an_optimizer_that_couples_parameters() -> None:
    trainer = quiet_trainer(HOSLStrategy(cut_layer=1, mode="fo", fused_client_update=True), max_steps=1)
    module = HOSLModule(model_config=TINY_LLAMA, optimizer=lambda p: torch.optim.Adagrad(p, lr=0.1))
    with pytest.raises(ValueError, match=r"fused_client_update=True is not valid with optimizer Adagrad: .*use one of "
                                         r"torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW"):
        trainer.fit(module, tiny_data())


class _DropIn(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = load_causal_lm(model_config=TINY_LLAMA)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_fused_update_refuses_a_drop_in_module() -> None:
    trainer = quiet_trainer(HOSLStrategy(cut_layer=1, mode="fo", fused_client_update=True), max_steps=1)
    with pytest.raises(ValueError, match=r"fused_client_update=True is not valid with a drop-in module \(automatic "
                                         r"optimization\)"):
        trainer.fit(_DropIn(), tiny_data())


def test_checkpointing_works_for_a_drop_in_module() -> None:
    def weights(**options: Any) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        module = _DropIn()
        quiet_trainer(HOSLStrategy(cut_layer=2, mode="fo", **options), max_steps=2).fit(module, tiny_data())
        return module.model.state_dict()

    plain, checkpointed = weights(), weights(client_checkpointing=True)
    for key in plain:
        assert torch.equal(plain[key], checkpointed[key]), key


def test_fused_update_refuses_a_grad_scaler() -> None:
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match=r"precision='16-mixed' uses a GradScaler.*fused_client_update=True"):
        check_precision(plugin, "fo", "in_process", fused_client_update=True)
    check_precision(plugin, "fo", "in_process")  # unfused fo takes it


def test_fused_update_refuses_parameters_its_optimizer_does_not_hold() -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="the fused update steps parameters its optimizer does not hold"):
        FusedUpdate(torch.optim.SGD([model.weight], lr=0.1), model.parameters())


def test_a_frozen_client_is_measured_at_its_floor() -> None:
    batch = _batch(rows=8, seq=32)
    floor = measure_client_inference(_small_split(), batch)
    model = _small_split()
    frozen = measure_client_step(model, batch, "frozen")
    assert frozen.grads == frozen.optimizer_state == 0
    assert all(p.grad is None for p in model.client.parameters())
    assert floor.peak <= frozen.peak <= 1.05 * floor.peak


def _small_split() -> SplitCausalLM:
    torch.manual_seed(0)
    return SplitCausalLM(load_causal_lm(model_config=TINY_LLAMA), 2)


def test_a_client_process_with_both_options_ends_with_fos_weights(model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    expected = _in_process(model_dir, "fo", 3)  # AdamW, unfused, not checkpointed
    server, client = _run_pair(model_dir, tmp_path, "fo", 3, fused_client_update=True, client_checkpointing=True)
    assert isinstance(server, dict), server
    assert isinstance(client, dict), client
    got = {**client, **server}
    assert got.keys() == expected.keys()
    assert [k for k in expected if not torch.equal(got[k], expected[k])] == []
