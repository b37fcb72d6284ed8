"""A user's own CheckpointIO works under HOSLStrategy: the split one wraps it, and it does the storing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import TINY_LLAMA, quiet_trainer, tiny_data
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from hosl_lightning import HOSLModule, HOSLStrategy
from hosl_lightning.lightning.checkpoint_io import SplitCheckpointIO


class CountingIO(TorchCheckpointIO):
    """torch's CheckpointIO that records every call and tags what it saves."""

    def __init__(self) -> None:
        super().__init__()
        self.saved: list[str] = []
        self.loaded: list[str] = []

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        self.saved.append(Path(path).name)
        super().save_checkpoint({**checkpoint, "saved_by": "CountingIO"}, path, storage_options)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        self.loaded.append(Path(path).name)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def _run(max_steps: int, io: CountingIO, via: str, ckpt_path: str | None = None, callbacks=()) -> L.Trainer:
    L.seed_everything(0)
    strategy = HOSLStrategy(cut_layer=1, q=2, zo_lr=1e-3, seed=7, **({"checkpoint_io": io} if via == "strategy" else {}))
    trainer = quiet_trainer(strategy, max_steps=max_steps, enable_checkpointing=bool(callbacks),
                            callbacks=list(callbacks), plugins=[io] if via == "plugins" else None)
    torch.manual_seed(0)
    module = HOSLModule(model_config=TINY_LLAMA, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    trainer.fit(module, tiny_data(), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("via", ["strategy", "plugins"])
def test_a_users_checkpoint_io_saves_and_loads_and_resume_is_exact(via: str, tmp_path: Path) -> None:
    io = CountingIO()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    uninterrupted = _run(8, io, via, callbacks=[checkpoint])
    assert io.saved == ["step=4.ckpt", "step=8.ckpt"]
    assert isinstance(uninterrupted.strategy.checkpoint_io, SplitCheckpointIO)
    assert uninterrupted.strategy.checkpoint_io.inner is io
    assert torch.load(tmp_path / "step=4.ckpt", weights_only=False)["saved_by"] == "CountingIO"

    resumed_io = CountingIO()
    resumed = _run(8, resumed_io, via, ckpt_path=str(tmp_path / "step=4.ckpt"))
    assert resumed_io.loaded == ["step=4.ckpt"]
    assert resumed.strategy.zo_steps == resumed.global_step == 8
    a, b = uninterrupted.strategy.split_model.state_dict(), resumed.strategy.split_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_without_a_checkpoint_io_torchs_is_used() -> None:
    strategy = HOSLStrategy()
    assert isinstance(strategy.checkpoint_io, SplitCheckpointIO)
    assert type(strategy.checkpoint_io.inner) is TorchCheckpointIO
