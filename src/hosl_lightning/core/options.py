"""Checks of user options, with one message format: ``name=value is not valid: <what is valid>``.

Constructors check their arguments up front with these, so a bad value fails at once and names the option, the
bad value and the valid ones, instead of failing deep inside a training step. ``bool`` is never taken for a
number, though Python counts it as one: ``q=True`` is a mistake, not ``q=1``.

They raise :class:`UserError`, as does every check of what a user gave (options, files, checkpoints), so that
the command line reports all of them in one style (one line, exit status 2) and keeps a traceback for bugs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Integral, Real


class UserError(ValueError):
    """Something the user gave is wrong (an option, a file, a checkpoint), and the message says what to change.

    A ``ValueError``, so ``except ValueError`` callers keep working; ``hosl-lightning`` prints its message as one
    line and exits with status 2, where any other exception is a bug and keeps its traceback.
    """


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named does not exist (a ``FileNotFoundError`` too)."""


def check_choice(name: str, value: object, choices: Iterable[object]) -> None:
    """``value`` must be one of ``choices``."""
    allowed = tuple(choices)
    if value not in allowed:
        raise UserError(f"{name}={value!r} is not valid: choose one of {', '.join(map(repr, allowed))}")


def check_int(name: str, value: object, low: int | None = None, *, none: str | None = None) -> None:
    """``value`` must be an integer ``>= low``; ``none`` (what None stands for) also allows None."""
    if value is None and none is not None:
        return
    if not isinstance(value, Integral) or isinstance(value, bool) or (low is not None and value < low):
        bound = "" if low is None else f" >= {low}"
        alternative = "" if none is None else f", or None for {none}"
        raise UserError(f"{name}={value!r} is not valid: it must be an integer{bound}{alternative}")


def check_number(name: str, value: object, low: float, high: float | None = None, *, strict: bool = False) -> None:
    """``value`` must be a finite real number ``>= low`` (``> low`` when ``strict``) and, if ``high`` is given,
    ``<= high``: an infinite learning rate or radius is as much a mistake as a negative one."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)  # never NaN or inf
    ok = ok and (value > low if strict else value >= low) and (high is None or value <= high)  # type: ignore[operator]
    if not ok:
        if high is None:
            bound = f"> {low}" if strict else f">= {low}"
        else:
            bound = f"in {'(' if strict else '['}{low}, {high}]"
        finite = "" if not isinstance(value, Real) or math.isfinite(value) else " and finite"
        raise UserError(f"{name}={value!r} is not valid: it must be a number {bound}{finite}")


def check_bool(name: str, value: object) -> None:
    """``value`` must be True or False (not 0, 1 or a string)."""
    if not isinstance(value, bool):
        raise UserError(f"{name}={value!r} is not valid: choose True or False")
