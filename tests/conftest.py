"""Shared fixtures: tiny models built from configs (no downloads) and a quiet Trainer factory."""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import pytest
import torch

from hosl_lightning import HOSLStrategy, SyntheticLMDataModule
from hosl_lightning.lightning.option_use import options_for as for_mode  # noqa: F401 - for the tests

TINY_LLAMA = dict(
    model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)

# Tiny matrices run fastest and, on a busy 2-core machine, most steadily on one thread.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Any:
    """Every test starts on one thread, whatever the one before it set: test_remote compares an in-process run in
    this process with two processes on one thread each, bit for bit, and a second thread changes float sums."""
    torch.set_num_threads(1)
    yield


warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")


def tiny_data(**overrides: Any) -> SyntheticLMDataModule:
    kwargs = dict(vocab_size=64, seq_len=16, batch_size=8, train_size=32, val_size=16, seed=0)
    kwargs.update(overrides)
    return SyntheticLMDataModule(**kwargs)


def quiet_trainer(strategy: HOSLStrategy, **overrides: Any) -> L.Trainer:
    kwargs: dict[str, Any] = dict(
        strategy=strategy, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, max_steps=3,
    )
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
