"""Where a process of a distributed run learns its rank: Lightning's ClusterEnvironment plug-in point.

:class:`SplitEnvironment` reads the rank and world size given to the strategy, or else the ``RANK`` /
``WORLD_SIZE`` variables that ``torchrun`` sets. Any other Lightning environment (SLURM, LSF, ...) can stand
in for it: :class:`~hosl_lightning.distributed.peers.Peers` asks only ``global_rank()`` and ``world_size()``.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

from lightning.fabric.plugins.environments import ClusterEnvironment

from hosl_lightning.core.options import UserError

#: What a process of a distributed run must be given, each as a torchrun variable (what it is, the strategy's
#: option that gives it instead); the meeting address only where ``init_method`` is ``env://``.
_LAUNCH = {"RANK": ("this process's rank", "rank"), "WORLD_SIZE": ("the number of processes", "world_size"),
           "MASTER_ADDR": ("where the processes meet", "init_method='tcp://<server host>:<port>'"),
           "MASTER_PORT": ("where the processes meet", "init_method='tcp://<server host>:<port>'")}


def _and(items: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``: each once."""
    items = list(dict.fromkeys(items))
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else items[0]


class SplitEnvironment(ClusterEnvironment):
    """Rank and world size from the strategy's arguments, else from torchrun's variables; rank 0 serves."""

    def __init__(self, rank: int | None = None, world_size: int | None = None, init_method: str = "env://") -> None:
        self._rank, self._world_size, self.init_method = rank, world_size, init_method

    @property
    def creates_processes_externally(self) -> bool:
        return True  # torchrun (or the user) starts every process; nothing here spawns any

    @property
    def main_address(self) -> str:
        parsed = urlparse(self.init_method)
        return parsed.hostname or os.environ.get("MASTER_ADDR", "127.0.0.1")

    @property
    def main_port(self) -> int:
        parsed = urlparse(self.init_method)
        return parsed.port or int(os.environ.get("MASTER_PORT", "0"))

    @staticmethod
    def detect() -> bool:
        return "RANK" in os.environ

    def check_launched(self) -> None:
        """Refuse a process that was not told its rank, the world size or where to meet (started without torchrun),
        naming what is missing and how to launch it, before it loads or waits for anything."""
        given = {"RANK": self._rank, "WORLD_SIZE": self._world_size}
        missing = [name for name in _LAUNCH if given.get(name) is None and name not in os.environ]
        if urlparse(self.init_method).scheme != "env":  # tcp:// or file:// says where to meet
            missing = [name for name in missing if name not in ("MASTER_ADDR", "MASTER_PORT")]
        if not missing:
            return
        needs, options = (_and([_LAUNCH[name][i] for name in missing]) for i in (0, 1))
        them = "them" if len(missing) > 1 else "it"
        raise UserError(
            f"transport='distributed' needs {needs}, but {_and(missing)} {'are' if len(missing) > 1 else 'is'} not "
            f"set: launch every process with torchrun, which sets {them} (torchrun --nproc_per_node 2 --no-python "
            f"hosl-lightning fit ...), or set {them} yourself, or give the strategy's {options} (rank 0 is the "
            "server, 1.. the clients)")

    def world_size(self) -> int:
        return self._world_size if self._world_size is not None else int(os.environ.get("WORLD_SIZE", "0"))

    def set_world_size(self, size: int) -> None:
        self._world_size = size

    def global_rank(self) -> int:
        if self._rank is not None:
            return self._rank
        if "RANK" not in os.environ:
            self.check_launched()  # raises: RANK (and whatever else is missing) named
        return int(os.environ["RANK"])

    def set_global_rank(self, rank: int) -> None:
        self._rank = rank

    def local_rank(self) -> int:
        return int(os.environ.get("LOCAL_RANK", "0"))

    def node_rank(self) -> int:
        return int(os.environ.get("GROUP_RANK", "0"))
