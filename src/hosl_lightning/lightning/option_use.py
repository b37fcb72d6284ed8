"""Which options each mode and zo_optimizer reads, so that one a user sets and the run would ignore is refused.

Each mode declares the strategy options it reads among those some mode ignores (``Mode.options``), and each
zo_optimizer its own (``ZOSGD.strategy_options``): a new mode or optimizer declares its own, and nothing here
changes. Those options default to None ("unset", standing for :data:`UNSET`'s value), which is how a user's
choice is told from a default.
"""

from __future__ import annotations

from typing import Any

from hosl_lightning.core.options import UserError
from hosl_lightning.modes import MODES
from hosl_lightning.zo_optimizers import ZO_OPTIMIZERS, zo_optimizer_spec

# What an option that only some modes read stands for when left unset (None). Unset is how the strategy tells
# a user's choice from a default, so that an option the chosen mode does not read is refused only when set.
UNSET: dict[str, Any] = {"q": 1, "mu": 1e-3, "zo_lr": 1e-6, "zo_weight_decay": 0.0, "zo_lr_schedule": "constant",
                         "zo_optimizer": "zo_sgd", "embedding_directions": "dense", "pair_probes": False,
                         "direction": "gaussian", "seed": 0, "client_checkpointing": False,
                         "fused_client_update": False}


def options_for(mode: str, **options: Any) -> dict[str, Any]:
    """``mode`` and those of ``options`` that it and its zo_optimizer read (and the ones every mode reads): for a sweep
    that runs several modes or optimizers from one set of options, where the strategy would refuse ``q`` in ``fo``."""
    dependent = {name for other in MODES.values() for name in other.options}
    kept = {k: v for k, v in options.items() if k not in dependent or k in MODES[mode].options}
    if MODES[mode].zo_halves:  # and those that its zo_optimizer reads
        optimizer, _ = zo_optimizer_spec(kept.get("zo_optimizer"))
        dependent = {name for cls in ZO_OPTIMIZERS.values() for name in cls.strategy_options}
        kept = {k: v for k, v in kept.items() if k not in dependent or k in optimizer.strategy_options}
    return {"mode": mode, **kept}


def refuse_unused(options: dict[str, Any]) -> None:
    """Refuse an option the user set (not None) that the chosen mode or zo_optimizer does not read, naming both.

    Data-driven: each mode declares the options it reads (``Mode.options``) and each zo_optimizer its own
    (``ZOSGD.strategy_options``); an option some of them read and the chosen one does not is the user's mistake.
    A zo_optimizer that needs dL/dh (``estimator == "forward"``) is refused in a mode whose server learns by probes.
    """
    mode = MODES.get(options["mode"])
    if mode is None:
        return  # the mode's own check names the valid ones
    readers: dict[str, list[str]] = {}
    for other in MODES.values():
        for name in other.options:
            readers.setdefault(name, []).append(other.name)
    for name, users in readers.items():
        if options.get(name) is not None and name not in mode.options:
            raise UserError(f"{name}={options[name]!r} is not valid with mode={mode.name!r}, which does not use it: "
                             f"remove {name}, or choose a mode that uses it ({', '.join(map(repr, users))})")
    if not mode.zo_halves:
        return
    optimizer, _ = zo_optimizer_spec(options.get("zo_optimizer"))
    if optimizer.estimator == "forward" and "server" in mode.zo_halves:
        raise UserError(f"zo_optimizer {optimizer.name!r} is not valid with mode={mode.name!r}: it needs dL/dh from a "
                        f"first-order server, and mode {mode.name!r} trains the server by zeroth-order probes too; use "
                        "mode 'hosl', or another zo_optimizer")
    for name in {name for cls in ZO_OPTIMIZERS.values() for name in cls.strategy_options} - set(
            optimizer.strategy_options):
        if options.get(name) is not None:
            users = [cls.name for cls in ZO_OPTIMIZERS.values() if name in cls.strategy_options]
            raise UserError(f"{name}={options[name]!r} is not valid with zo_optimizer {optimizer.name!r}, which does "
                             f"not use it: remove {name}, or choose a zo_optimizer that uses it "
                             f"({', '.join(map(repr, users))})")
