"""Training modes, by name: each one module holding a client half and a server half (see :mod:`.base`).

Adding a mode is one module that defines a :class:`~hosl_lightning.modes.base.Mode` and one
:func:`register_mode` call; every path (in-process, distributed, drop-in) then runs it.
"""

from __future__ import annotations

from hosl_lightning.modes import fo, frozen, hosl, zo
from hosl_lightning.modes.base import (
    DIVERGENCE_HINT,
    READ_BY_THE_MODULE,
    SERVER_GRADS,
    ZO_OPTIONS,
    ClientContext,
    DivergenceError,
    Mode,
    ModeName,
    ServerContext,
    ServerGrad,
    StepInputs,
    StepOutput,
    ZOSettings,
    batch_tensors,
    dropout_active,
    ensure_finite,
    eval_mode,
)

MODES: dict[str, Mode] = {}


def register_mode(mode: Mode) -> Mode:
    """Make ``mode`` selectable by name (``HOSLStrategy(mode=...)``); a name is registered once."""
    if mode.name in MODES and MODES[mode.name] is not mode:
        raise ValueError(f"a mode named {mode.name!r} is registered already")
    MODES[mode.name] = mode
    return mode


def get_mode(name: str) -> Mode:
    if name not in MODES:
        raise ValueError(f"mode={name!r} is not valid: choose one of {', '.join(repr(m) for m in MODES)}")
    return MODES[name]


for _module in (hosl, fo, zo, frozen):
    register_mode(_module.MODE)

__all__ = [
    "MODES",
    "READ_BY_THE_MODULE",
    "SERVER_GRADS",
    "ZO_OPTIONS",
    "DIVERGENCE_HINT", "ClientContext", "DivergenceError",
    "Mode",
    "ModeName",
    "ServerContext",
    "ServerGrad",
    "StepInputs",
    "StepOutput",
    "ZOSettings",
    "batch_tensors",
    "dropout_active", "ensure_finite",
    "eval_mode",
    "get_mode",
    "register_mode",
]
