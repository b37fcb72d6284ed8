"""The tuning diagnostics' model and data: SmolLM2-135M-Instruct cut to its first blocks, rotten_tomatoes, and the
fit configuration a trial of ``hosl-lightning tune`` would run (the retired tuning study's, at 16f2327)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..common.environment import RESULTS
from ..common.tasks import DEFAULT_DATA

DATA = DEFAULT_DATA / "rotten_tomatoes"
WORK = RESULTS / "_tuning_tmp"  # the cut-down model, as a directory each trial loads in about a second
FULL = {"layers": 4, "num_train": 480, "num_validation": 200, "num_test": 1000, "epochs": 3, "fraction": 0.1}
QUICK = {"layers": 2, "num_train": 64, "num_validation": 16, "num_test": 16, "epochs": 2, "fraction": 0.25}


def fit_config(model_dir: Path, size: dict[str, Any]) -> dict[str, Any]:
    """A trial's LightningCLI configuration: hosl at cut 2 on rotten_tomatoes with ``size``'s sample sizes."""
    return {
        "seed_everything": 0,
        "trainer": {"max_epochs": size["epochs"], "num_sanity_val_steps": 0, "logger": False,
                    "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "strategy": {"class_path": "hosl_lightning.HOSLStrategy",
                                 "init_args": {"cut_layer": 2, "mode": "hosl", "memory_every_n_steps": 0}}},
        "model": {"model": str(model_dir),
                  "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1.0e-4}}},
        "data": {"class_path": "hosl_lightning.PromptClassificationDataModule",
                 "init_args": {"tokenizer": str(model_dir), "task": "rotten_tomatoes", "data_dir": str(DATA),
                               "max_length": 48, "batch_size": 16, "eval_batch_size": 64, "seed": 0,
                               "num_train": size["num_train"], "num_validation": size["num_validation"],
                               "num_test": size["num_test"]}},
    }
