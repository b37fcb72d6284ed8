"""The study's pruner: Hyperband that never prunes TPE's random start-up trials.

Its own module because it subclasses an optuna class, and optuna is an optional extra: ``search`` imports
this only once ``tune`` runs (after checking that optuna is installed).
"""

from __future__ import annotations

from typing import Any

from optuna.pruners import HyperbandPruner


class StartupCompletes(HyperbandPruner):
    """Hyperband, except that the first ``n_startup_trials`` trials always finish, so TPE models full-fidelity values.

    A subclass rather than a wrapper: TPE (and Hyperband's own bracket studies) check
    ``isinstance(study.pruner, HyperbandPruner)`` to model each bracket apart.
    """

    def __init__(self, n_startup_trials: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n_startup_trials = n_startup_trials

    def prune(self, study: Any, trial: Any) -> bool:
        return trial.number >= self.n_startup_trials and super().prune(study, trial)
