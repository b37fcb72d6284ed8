"""Which half of the split model is working: how memory made by shared-process work is attributed to a side."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Literal

from hosl_lightning.core.options import check_choice

if TYPE_CHECKING:
    from hosl_lightning.core.split_model import SplitCausalLM

Side = Literal["client", "server"]
SIDES: tuple[Side, Side] = ("client", "server")
WORK_SIDES = ("client", "server", "shared")  # "shared": a fused step over both halves, counted for neither


class SideSwitch:
    """Which half of the split model is working now: the innermost open :meth:`enter` wins.

    Outside every ``enter`` the work is the client's. Listeners are called as ``listener(old, new)`` at every
    change of side. :meth:`install` makes a model's ``client_side`` / ``server_side`` factories enter it.
    """

    DEFAULT = "client"

    def __init__(self) -> None:
        self._open: list[str] = []
        self.listeners: list[Callable[[str, str], None]] = []

    @property
    def current(self) -> str:
        return self._open[-1] if self._open else self.DEFAULT

    @contextmanager
    def enter(self, side: str) -> Iterator[None]:
        check_choice("side", side, WORK_SIDES)
        before = self.current
        self._open.append(side)
        if side != before:
            self._notify(before, side)
        try:
            yield
        finally:
            self._open.pop()
            if self.current != side:
                self._notify(side, self.current)

    def _notify(self, old: str, new: str) -> None:
        for listener in list(self.listeners):
            listener(old, new)

    def install(self, model: SplitCausalLM) -> None:
        model.client_side = partial(self.enter, "client")
        model.server_side = partial(self.enter, "server")
