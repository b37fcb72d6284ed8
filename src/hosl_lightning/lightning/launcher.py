"""Which process does what: rank 0 of a distributed run serves, every other process runs the Trainer's loop.

:class:`ServerLauncher` is Lightning's own plug-in point for this (``Strategy.launcher``): ``trainer.fit``,
``validate`` and ``test`` on the server process run the server's loop instead of the Trainer's, so one script
or config serves every process of ``torchrun --nproc_per_node 2``, and an in-process run simply trains.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies.launchers.launcher import _Launcher

from hosl_lightning.core.options import check_choice


class ServerLauncher(_Launcher):
    """Runs the Trainer's function, except on the server process, where it serves the clients."""

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy

    @property
    def is_interactive_compatible(self) -> bool:
        return True

    def launch(self, function: Callable, *args: Any, trainer: Trainer | None = None, **kwargs: Any) -> Any:
        self.strategy.check_launched()  # started without torchrun: say so before anything loads or waits
        if self.strategy.role == "server":
            module = self.strategy.lightning_module or (args[0] if args else None)
            return self.strategy.serve(module)
        return function(*args, **kwargs)

    def kill(self, signum: Any) -> None:
        """Nothing to kill: the other processes were started by torchrun (or the user), not by us."""


def run(trainer: Trainer, stage: str, model: LightningModule, **kwargs: Any) -> Any:
    """``trainer.<stage>(model, **kwargs)``: kept for scripts written before the launcher did this itself."""
    check_choice("stage", stage, ("fit", "validate", "test"))
    return getattr(trainer, stage)(model, **kwargs)


def fit(trainer: Trainer, model: LightningModule, **kwargs: Any) -> Any:
    """``trainer.fit(model, **kwargs)`` in every process (kept for older scripts)."""
    return run(trainer, "fit", model, **kwargs)
