"""Hyperparameter tuning on weighted data subsets (AUTOMATA): GradMatch, the ``SubsetSelection`` callback, the study.

Modules: ``matching`` (matching pursuit, random subsets), ``batches`` (candidate batches, the weighted loader),
``features`` (the gradient-feature pass over the split model), ``selection`` (the callback), ``space`` (search
spaces), ``limits`` (the space checked against the config and the model before a study), ``results`` (trial
records and their reports), ``pruning`` (the study's pruner), ``search`` (the Optuna study, ``hosl-lightning tune``).

The names below load on first use (PEP 562): ``import hosl_lightning.tuning`` loads none of these modules, and
optuna is imported only when ``tune`` runs (it is an optional extra).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {  # public name -> the module of this package that defines it
    "Selection": "matching",
    "gradmatch": "matching",
    "nnls": "matching",
    "orthogonal_matching_pursuit": "matching",
    "random_subset": "matching",
    "SelectedBatches": "batches",
    "WeightedCollate": "batches",
    "WeightedDataset": "batches",
    "WeightedIndex": "batches",
    "class_labels": "batches",
    "partition": "batches",
    "subset_length": "batches",
    "batch_feature": "features",
    "candidate_features": "features",
    "classification_row_features": "features",
    "example_lengths": "features",
    "row_features": "features",
    "vocabulary_projection": "features",
    "FEATURES": "selection",
    "METHODS": "selection",
    "Feature": "selection",
    "Method": "selection",
    "SelectionCache": "selection",
    "SubsetSelection": "selection",
    "check_points": "limits",
    "check_space": "limits",
    "Parameter": "space",
    "load_space": "space",
    "override_args": "space",
    "parse_parameter": "space",
    "TrialRecord": "results",
    "TuneResult": "results",
    "write_results": "results",
    "build_trial_cli": "search",
    "tune": "search",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
