"""fo's ``fused_client_update`` for :class:`~.strategy.HOSLStrategy`: the client's parameters step inside the backward
pass (:mod:`hosl_lightning.core.fused_update`), with the module's one optimizer, attached for a fit and detached after."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule
from torch import nn

from hosl_lightning.core.fused_update import FusedUpdate


class FusedClientUpdate:
    """The strategy's fused client update. The strategy provides ``fused_client_update``, ``split_model``,
    ``optimizers``, ``parallel_devices`` and ``check_trainer``."""

    fused_update: FusedUpdate | None
    fused_client_update: bool
    optimizers: list[Any]
    parallel_devices: list[Any] | None
    split_model: Any
    check_trainer: Any

    def _fuse_client_update(self, module: LightningModule) -> None:
        """With ``fused_client_update``: the client's parameters step inside the backward pass (``core.fused_update``)."""
        self._unfuse_client_update()
        client = self.split_model.client
        if not self.fused_client_update or client is None:
            return
        self.check_trainer(len(self.parallel_devices or [None]), 1, module.automatic_optimization)  # before any hook
        if len(self.optimizers) != 1:
            raise ValueError(f"fused_client_update=True steps the client with the module's one optimizer, but it "
                             f"configures {len(self.optimizers)}: configure one, or set fused_client_update=False")
        self.fused_update = FusedUpdate(self.optimizers[0], client.parameters(),
                                        [m for m in client.modules() if isinstance(m, nn.Embedding)]).attach()

    def _unfuse_client_update(self) -> None:
        if self.fused_update is not None:
            self.fused_update.detach()
            self.fused_update = None
