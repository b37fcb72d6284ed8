"""One call that runs either side of a split run: the server's loop on the server process, the Trainer elsewhere.

The same script (or config) then serves every process of ``torchrun --nproc_per_node 2``: rank 0 serves,
rank 1 trains, and an in-process run simply trains.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer

from hosl_lightning.options import check_choice
from hosl_lightning.strategy import HOSLStrategy


def is_server(trainer: Trainer) -> bool:
    """Whether this process is the server of a distributed HOSL run (it then runs no Trainer loop)."""
    strategy = trainer.strategy
    return isinstance(strategy, HOSLStrategy) and strategy.transport == "distributed" and strategy.role == "server"


def run(trainer: Trainer, stage: str, model: LightningModule, **kwargs: Any) -> Any:
    """``trainer.<stage>(model, **kwargs)`` on the client (or in-process); the server's loop on the server."""
    check_choice("stage", stage, ("fit", "validate", "test"))
    if is_server(trainer):
        return trainer.strategy.serve(model)  # type: ignore[attr-defined]
    return getattr(trainer, stage)(model, **kwargs)


def fit(trainer: Trainer, model: LightningModule, **kwargs: Any) -> Any:
    """:func:`run` for ``fit``: ``hosl_lightning.launch.fit(trainer, module, datamodule=dm)`` in every process."""
    return run(trainer, "fit", model, **kwargs)
