"""Where a process of a distributed run learns its rank: Lightning's ClusterEnvironment plug-in point.

:class:`SplitEnvironment` reads the rank and world size given to the strategy, or else the ``RANK`` /
``WORLD_SIZE`` variables that ``torchrun`` sets. Any other Lightning environment (SLURM, LSF, ...) can stand
in for it: :class:`~hosl_lightning.distributed.peers.Peers` asks only ``global_rank()`` and ``world_size()``.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

from lightning.fabric.plugins.environments import ClusterEnvironment


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

    def world_size(self) -> int:
        return self._world_size if self._world_size is not None else int(os.environ.get("WORLD_SIZE", "0"))

    def set_world_size(self, size: int) -> None:
        self._world_size = size

    def global_rank(self) -> int:
        if self._rank is not None:
            return self._rank
        if "RANK" not in os.environ:
            raise ValueError(
                "transport='distributed' needs this process's rank: launch with torchrun (which sets RANK and "
                "WORLD_SIZE), or pass rank= and world_size= (rank 0 is the server, rank 1 the client)"
            )
        return int(os.environ["RANK"])

    def set_global_rank(self, rank: int) -> None:
        self._rank = rank

    def local_rank(self) -> int:
        return int(os.environ.get("LOCAL_RANK", "0"))

    def node_rank(self) -> int:
        return int(os.environ.get("GROUP_RANK", "0"))
