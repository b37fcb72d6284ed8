"""Client options and the one client-memory measurement every study makes (``hosl_lightning.measurement``: torch's
tracker, measured, not estimated). A ``ClientOption`` is one row of the memory and speed studies' option tables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hosl_lightning import SplitCausalLM
from hosl_lightning.core.zo import ZOSGD
from hosl_lightning.measurement import ClientMemory, measure_client_inference, measure_client_step
from hosl_lightning.modes import ZOSettings
from hosl_lightning.zo_optimizers import build_zo_optimizer, zo_optimizer_spec


@dataclass(frozen=True)
class ClientOption:
    """How the client trains: fo (backprop, AdamW), or zo / hosl with a ZO optimizer and its probe options."""

    name: str
    mode: str = "hosl"
    zo_optimizer: str = "zo_sgd"
    embedding_directions: str = "dense"
    pair_probes: bool = False
    queries: int = 1
    direction: str = "gaussian"
    batch_probes: bool = True  # the 2Q server losses in one batched forward (the server's side: speed only)
    mu: float = 1e-3

    def settings(self) -> ZOSettings:
        estimator = zo_optimizer_spec(self.zo_optimizer)[0].estimator
        return ZOSettings(queries=self.queries, mu=self.mu, estimator=estimator, pair_probes=self.pair_probes,
                          batch_probes=self.batch_probes)

    def build(self, named: list[tuple[str, Any]], lr: float = 0.0) -> ZOSGD:
        """The client's ZO optimizer over ``named`` parameters (lr 0 by default: a measurement, not training)."""
        return build_zo_optimizer(self.zo_optimizer, named, lr=lr, direction=self.direction,
                                  embedding_directions=self.embedding_directions)


def measure_client(split: SplitCausalLM, batch: dict[str, torch.Tensor], option: ClientOption | None) -> ClientMemory:
    """The client's memory at its peak over two training steps of ``option`` (fo's second step holds AdamW's
    state), or, with ``option`` None, its inference floor: weights plus one no-grad forward. A step changes the
    weights and their ``requires_grad`` flags: measure a throwaway split, the floor before any step."""
    if option is None:
        return measure_client_inference(split, batch)
    return measure_client_step(split, batch, option.mode, option.settings(),  # type: ignore[arg-type]
                               zo_optimizer=option.build)


def measure_client_peak(split: SplitCausalLM, batch: dict[str, torch.Tensor], option: ClientOption | None) -> int:
    """``measure_client``'s peak in bytes."""
    return measure_client(split, batch, option).peak


CLIENT_OPTIONS = (  # hosl's client options, the first the paper's: rows of the memory and speed studies
    ClientOption("zo_sgd, dense, one at a time (the paper's)"),
    ClientOption("zo_sgd, dense, paired", pair_probes=True),
    ClientOption("zo_sgd, sparse, one at a time", embedding_directions="sparse"),
    ClientOption("zo_sgd, sparse, paired", embedding_directions="sparse", pair_probes=True),
    ClientOption("zo_sgd, sparse, one at a time, rademacher", embedding_directions="sparse", direction="rademacher"),
    ClientOption("zo_sgd, sparse, paired, rademacher", embedding_directions="sparse", pair_probes=True,
                 direction="rademacher"),
    ClientOption("fzoo (Q=2), sparse, rademacher", zo_optimizer="fzoo", embedding_directions="sparse", queries=2,
                 direction="rademacher"),
    ClientOption("zo_momentum, sparse, paired", zo_optimizer="zo_momentum", embedding_directions="sparse",
                 pair_probes=True),
)
