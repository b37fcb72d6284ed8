"""Client optimizers for the zeroth-order side, as registered plug-ins (selected by ``zo_optimizer``).

Every one is a :class:`~hosl_lightning.core.zo.ZOSGD` (a ``torch.optim.Optimizer`` that never reads ``.grad``)
and says, as class attributes, its ``estimator`` (which probes a step sends), whether an update can be
``replayable`` from its seed (seed sync), the least number of queries it needs, its extra client memory and its
own options. Add one with :func:`register_zo_optimizer`.

| name | estimator | forwards / step | extra client memory | seed sync |
|---|---|---|---|---|
| ``zo_sgd`` (the paper's) | two-point | 2Q | none | yes |
| ``fzoo`` | one-sided, normalised: (L_q - L_0) / std(L) | Q + 1 (Q >= 2) | none | yes |
| ``zo_momentum`` | two-point, heavy-ball momentum | 2Q | d_c floats | no |
| ``forward_gradient`` | exact: <dL/dh, J u_q> from forward-mode tangents | Q tangent forwards, 1 server fwd+bwd | none | yes |
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from hosl_lightning.core.zo import ZOSGD
from hosl_lightning.zo_optimizers.forward_gradient import ForwardGradient
from hosl_lightning.zo_optimizers.fzoo import FZOO
from hosl_lightning.zo_optimizers.momentum import ZOMomentum

ZO_OPTIMIZERS: dict[str, type[ZOSGD]] = {}


def register_zo_optimizer(cls: type[ZOSGD]) -> type[ZOSGD]:
    """Make ``cls`` selectable as ``zo_optimizer: {name: cls.name, ...}``; usable as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, ZOSGD)):
        raise TypeError(f"a zo_optimizer must be a ZOSGD subclass, got {cls!r}")
    if "name" not in vars(cls):
        raise ValueError(f"{cls.__name__} must set its own `name` to be registered (it would inherit "
                         f"{cls.name!r} and replace that optimizer)")
    if ZO_OPTIMIZERS.get(cls.name, cls) is not cls:
        raise ValueError(f"zo_optimizer name {cls.name!r} is already registered to {ZO_OPTIMIZERS[cls.name].__name__}")
    ZO_OPTIMIZERS[cls.name] = cls
    return cls


for _cls in (ZOSGD, FZOO, ZOMomentum, ForwardGradient):
    register_zo_optimizer(_cls)


def zo_optimizer_spec(spec: str | dict[str, Any] | None) -> tuple[type[ZOSGD], dict[str, Any]]:
    """The class and options a ``zo_optimizer`` value names (a name, or ``{name: ..., <option>: ...}``)."""
    if spec is None:
        spec = "zo_sgd"
    fields = {"name": spec} if isinstance(spec, str) else dict(spec) if isinstance(spec, dict) else None
    if fields is None or "name" not in fields:
        raise ValueError(f"zo_optimizer={spec!r} is not valid: give a name ({', '.join(ZO_OPTIMIZERS)}) or "
                         "{name: ..., <option>: ...}")
    name = fields.pop("name")
    if name not in ZO_OPTIMIZERS:
        raise ValueError(f"zo_optimizer name={name!r} is not valid: choose one of {', '.join(ZO_OPTIMIZERS)}")
    cls = ZO_OPTIMIZERS[name]
    options = getattr(cls, "options", {})
    unknown = sorted(set(fields) - set(options))
    if unknown:
        valid = ", ".join(options) or "none"
        raise ValueError(f"zo_optimizer {name!r} has no option {unknown[0]!r}: its options are {valid} (the learning "
                         "rate, weight decay and directions are zo_lr, zo_weight_decay and direction)")
    cls.check_options(**fields)
    return cls, {**options, **fields}  # with its defaults: one spelling of each choice


def build_zo_optimizer(spec: str | dict[str, Any] | None, named: Iterable[tuple[str, nn.Parameter]],
                       **common: Any) -> ZOSGD:
    """The ``zo_optimizer`` over ``named``; ``common``: lr, weight_decay, direction, seed, first_key, ..."""
    cls, options = zo_optimizer_spec(spec)
    return cls(named, **common, **options)


__all__ = ["FZOO", "ZOSGD", "ZO_OPTIMIZERS", "ForwardGradient", "ZOMomentum", "build_zo_optimizer",
           "register_zo_optimizer", "zo_optimizer_spec"]
