"""A run never lies: a diverged step stops the run naming the step and the quantity, no checkpoint with
non-finite weights is written, evaluation never reports accuracy over NaN scores, and options refuse inf."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY_LLAMA, for_mode, quiet_trainer, tiny_data
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision

from hosl_lightning import HOSLModule, HOSLStrategy
from hosl_lightning.modes import DivergenceError, ensure_finite


def _module(lr: float = 1e-3) -> HOSLModule:
    return HOSLModule(model_config=dict(TINY_LLAMA), optimizer=lambda params: torch.optim.SGD(params, lr=lr))


def _checkpoints(tmp_path: Path) -> ModelCheckpoint:
    return ModelCheckpoint(tmp_path, every_n_train_steps=1, save_top_k=-1)


@pytest.mark.parametrize(("mode", "strategy_options", "server_lr", "quantity"), [
    ("hosl", {"zo_lr": 1e10}, 1e-3, r"(a probe loss|the training loss|a projected gradient)"),
    ("hosl", {"zo_lr": 1e-6}, 1e10, r"(a probe loss|the training loss|weight)"),
    ("zo", {"zo_lr": 1e10}, 1e-3, r"(a probe loss|a projected gradient)"),
    ("fo", {}, 1e10, r"(the training loss|the gradient at the cut|weight)"),
])
def test_a_diverged_run_stops_naming_the_step_and_writes_no_nan_checkpoint(
    tmp_path: Path, mode: str, strategy_options: dict, server_lr: float, quantity: str
) -> None:
    strategy = HOSLStrategy(cut_layer=1, **for_mode(mode, q=2), memory_every_n_steps=0, **strategy_options)
    trainer = quiet_trainer(strategy, max_steps=30, enable_checkpointing=True, callbacks=[_checkpoints(tmp_path)])
    with pytest.raises(DivergenceError, match=rf"step \d+: {quantity} .*not finite.*learning rate"):
        trainer.fit(_module(server_lr), datamodule=tiny_data(train_size=256))
    for path in tmp_path.glob("*.ckpt"):  # what was written before the divergence is all finite
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        assert all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point()), path


def test_evaluation_refuses_nan_scores_instead_of_an_argmax_over_them() -> None:
    module = _module()
    with torch.no_grad():
        next(module.model.parameters()).fill_(float("nan"))
    trainer = quiet_trainer(HOSLStrategy(cut_layer=1, memory_every_n_steps=0), limit_val_batches=1)
    with pytest.raises(DivergenceError, match=r"a val score is not finite"):
        trainer.validate(module, datamodule=tiny_data())


def test_a_checkpoint_of_non_finite_weights_is_not_written(tmp_path: Path) -> None:
    strategy = HOSLStrategy(cut_layer=1, memory_every_n_steps=0)
    path = tmp_path / "bad.ckpt"
    with pytest.raises(DivergenceError, match=r"weight 'model.w' is not finite, so checkpoint .*bad.ckpt was not written"):
        strategy.save_checkpoint({"state_dict": {"model.w": torch.tensor([1.0, float("inf")])}}, path)
    assert not path.exists()


@pytest.mark.parametrize("option", ["mu", "zo_lr", "zo_weight_decay", "timeout_s"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_options_refuse_inf_and_nan(option: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"{option}={value!r} is not valid: it must be a number .* and finite"):
        HOSLStrategy(**{option: value})


def test_ensure_finite_passes_numbers_and_names_what_is_not() -> None:
    values = torch.tensor([1.0, -2.0])
    assert ensure_finite(3, "a probe loss", values) is values
    with pytest.raises(DivergenceError, match=r"^step 3: a probe loss is not finite \(1, nan\)"):
        ensure_finite(3, "a probe loss", torch.tensor([1.0, float("nan")]))


def test_trainer_settings_the_strategy_cannot_honour_are_refused() -> None:
    from lightning.pytorch import Trainer

    with pytest.raises(ValueError, match=r"devices=2 is not valid with HOSLStrategy: it runs one process per side"):
        Trainer(strategy=HOSLStrategy(cut_layer=1), accelerator="cpu", devices=2, logger=False,
                enable_checkpointing=False, max_steps=1).fit(_module(), datamodule=tiny_data())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a torch without CUDA")
@pytest.mark.parametrize("option", ["client_device", "server_device"])
def test_a_cuda_device_on_a_cpu_only_torch_is_refused_before_loading(option: str) -> None:
    with pytest.raises(ValueError, match=rf"{option}='cuda:0' is not valid: this torch .* sees no CUDA device"):
        HOSLStrategy(**{option: "cuda:0"})
    with pytest.raises(ValueError, match=rf"{option}='gpu7' is not valid"):
        HOSLStrategy(**{option: "gpu7"})


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04truncated"])
def test_an_unreadable_checkpoint_is_named(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.ckpt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"ckpt_path='.*broken.ckpt' is not valid: it cannot be read as a checkpoint"):
        quiet_trainer(HOSLStrategy(cut_layer=1, memory_every_n_steps=0)).fit(_module(), tiny_data(), ckpt_path=str(path))


def _fo_16_mixed(init_scale: float, max_steps: int = 3) -> tuple[L.Trainer, torch.amp.GradScaler]:
    """fo under 16-mixed with a real GradScaler: CPU's own 16-mixed has none, so the test passes one."""
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    strategy = HOSLStrategy(cut_layer=1, mode="fo", memory_every_n_steps=0)
    return quiet_trainer(strategy, plugins=[MixedPrecision("16-mixed", "cpu", scaler)], max_steps=max_steps), scaler


def test_fo_under_16_mixed_lets_the_grad_scaler_skip_an_fp16_overflow() -> None:
    """A scale of 2^40 overflows fp16 at the cut on every step: each step is skipped and the scale halves."""
    module = _module()
    model = module.model  # the split model the strategy swaps in holds these very tensors
    before = {name: value.clone() for name, value in model.state_dict().items()}
    trainer, scaler = _fo_16_mixed(2.0**40)
    trainer.fit(module, datamodule=tiny_data())  # raised DivergenceError at step 0 (dL/dh) before
    assert trainer.global_step == 3 and scaler.get_scale() == 2.0**37
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_fo_under_16_mixed_still_stops_on_what_the_grad_scaler_cannot_skip() -> None:
    module = _module()
    with torch.no_grad():
        module.model.model.norm.weight.fill_(float("nan"))  # a non-finite loss: skipping it would skip forever
    trainer, _ = _fo_16_mixed(2.0**40)
    with pytest.raises(DivergenceError, match=r"step 0: the training loss is not finite"):
        trainer.fit(module, datamodule=tiny_data())


@pytest.mark.parametrize(("scale", "raises"), [(2.0**16, False), (1.0, True)])
def test_a_non_finite_gradient_at_the_cut_is_a_divergence_once_the_scale_cannot_back_off(
        scale: float, raises: bool) -> None:
    from hosl_lightning import SplitCausalLM
    from hosl_lightning.modes import ZOSettings
    from hosl_lightning.modes.in_process import in_process_step

    split = SplitCausalLM(HOSLModule(model_config=dict(TINY_LLAMA)).model, 1)
    ids = torch.randint(0, 64, (2, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def overflowing(loss: torch.Tensor) -> None:  # what fp16 does to a scaled loss
        (loss * float("inf")).backward()

    def step() -> None:
        in_process_step(split, "fo", batch, ZOSettings(), 0, overflowing,
                        grad_scaler=torch.amp.GradScaler("cpu", init_scale=scale))

    if raises:
        with pytest.raises(DivergenceError, match=r"step 0: the gradient at the cut \(dL/dh\) is not finite"):
            step()
    else:
        step()
        assert not all(bool(torch.isfinite(p.grad).all()) for p in split.client.parameters())  # the scaler skips it
