"""Data for hosl-lightning: tasks, where their rows come from, tokenising, batching and the DataModules.

Modules: ``tasks`` (templates, label words, the built-in tasks), ``sources`` (local files, bundled assets,
the hub), ``sampling`` (seeded samples, the epoch shuffle), ``partition`` (each client's share of a training
split), ``encoding`` (tokenizer, prompt and label-word ids, truncation), ``collation`` (padded batches),
``tokenized`` (what the DataModules below share), ``classification`` and ``text_lm`` (the DataModules),
``synthetic`` (data without download).

The names below are imported on first use (PEP 562), so that e.g. the synthetic data, which needs only
torch and Lightning, loads without ``datasets``, pandas, pyarrow or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hosl_lightning.data.classification import PromptClassificationDataModule
    from hosl_lightning.data.collation import IGNORE_INDEX
    from hosl_lightning.data.encoding import resolve_tokenizer, special_prefix
    from hosl_lightning.data.partition import PARTITIONS, Partition
    from hosl_lightning.data.sampling import EpochShuffle, sample_train, seeded_order
    from hosl_lightning.data.sources import ASSETS_DIR, SPLITS, HubSource
    from hosl_lightning.data.synthetic import ProgressionDataset, SyntheticLMDataModule
    from hosl_lightning.data.tasks import (
        TASK_NAMES,
        TASKS,
        ClassificationTask,
        Prompt,
        generic_task,
        get_task,
    )
    from hosl_lightning.data.text_lm import TextLMDataModule
    from hosl_lightning.data.tokenized import tokenized_once

#: The module under ``hosl_lightning.data`` that defines each exported name.
_HOME: dict[str, str] = {
    "PromptClassificationDataModule": "classification",
    "IGNORE_INDEX": "collation",
    "resolve_tokenizer": "encoding",
    "special_prefix": "encoding",
    "PARTITIONS": "partition",
    "Partition": "partition",
    "EpochShuffle": "sampling",
    "sample_train": "sampling",
    "seeded_order": "sampling",
    "ASSETS_DIR": "sources",
    "SPLITS": "sources",
    "HubSource": "sources",
    "ProgressionDataset": "synthetic",
    "SyntheticLMDataModule": "synthetic",
    "TASK_NAMES": "tasks",
    "TASKS": "tasks",
    "ClassificationTask": "tasks",
    "Prompt": "tasks",
    "generic_task": "tasks",
    "get_task": "tasks",
    "TextLMDataModule": "text_lm",
    "tokenized_once": "tokenized",
}

__all__ = [
    "ASSETS_DIR",
    "IGNORE_INDEX",
    "PARTITIONS",
    "SPLITS",
    "TASKS",
    "TASK_NAMES",
    "ClassificationTask",
    "EpochShuffle",
    "HubSource",
    "Partition",
    "ProgressionDataset",
    "Prompt",
    "PromptClassificationDataModule",
    "SyntheticLMDataModule",
    "TextLMDataModule",
    "generic_task",
    "get_task",
    "resolve_tokenizer",
    "sample_train",
    "seeded_order",
    "special_prefix",
    "tokenized_once",
]


def __getattr__(name: str) -> Any:
    """Imports the module that defines ``name`` on first access, then caches the name here."""
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
