"""A clean first run: the model trains in train mode, the summary counts what trains and claims no FLOPs it did not
measure, and what the libraries print that is neither ours nor actionable is silenced (nothing else)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLAMA, quiet_trainer, tiny_data
from lightning.pytorch.callbacks import ModelSummary, RichModelSummary
from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count
from transformers import AutoConfig, AutoModelForCausalLM

from hosl_lightning import HOSLModule, HOSLStrategy
from hosl_lightning.cli import main
from hosl_lightning.lightning.summary import RichSplitModelSummary, SplitModelSummary

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_a_pretrained_model_is_loaded_in_train_mode(tmp_path: Path) -> None:
    config = dict(TINY_LLAMA)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config)).save_pretrained(tmp_path)
    module = HOSLModule(model=str(tmp_path))
    assert all(m.training for m in module.model.modules())  # from_pretrained alone gives eval mode


@pytest.mark.parametrize("summary", [ModelSummary, RichModelSummary])
def test_the_summary_counts_zeroth_order_weights_as_trainable_and_no_unmeasured_flops(
    summary: type, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    module = HOSLModule(model_config=TINY_LLAMA)
    total = sum(p.numel() for p in module.parameters())
    trainer = quiet_trainer(HOSLStrategy(cut_layer=1), max_steps=1, enable_model_summary=True,
                            callbacks=[summary(max_depth=2)])
    with caplog.at_level(logging.INFO):
        trainer.fit(module, tiny_data())
    split = [cb for cb in trainer.callbacks if isinstance(cb, ModelSummary)]
    assert [type(cb) for cb in split] == [{ModelSummary: SplitModelSummary, RichModelSummary: RichSplitModelSummary}[summary]]
    assert split[0]._max_depth == 2
    zo = sum(p.numel() for p in trainer.strategy.split_model.client.parameters())
    assert zo > 0 and not any(p.requires_grad for p in trainer.strategy.split_model.client.parameters())
    printed = caplog.text + capsys.readouterr().out
    flat, count = " ".join(printed.split()), get_human_readable_count(total)
    assert f"{count} Trainable params" in flat or f"Trainable params: {count}" in flat  # plain, rich
    assert "0 Non-trainable params" in flat or "Non-trainable params: 0" in flat
    assert "FLOPs" not in printed and "Flops" not in printed


def test_measuring_memory_raises_no_false_alarm_from_torchs_module_tracker() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(HOSLStrategy(cut_layer=1, memory_every_n_steps=1), max_steps=2).fit(
            HOSLModule(model_config=TINY_LLAMA), tiny_data())
    assert not [w for w in caught if "module hierarchy tracking" in str(w.message)]


def test_the_command_prints_no_library_advert(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO):
        main(["fit", "--config", str(CONFIGS / "synthetic.yaml"), "--trainer.max_steps=1",
              "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false", "--data.init_args.train_size=32"])
    assert "GPU available" in caplog.text  # Lightning's own information still shows
    assert "litlogger" not in caplog.text
