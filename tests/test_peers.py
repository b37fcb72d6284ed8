"""A distributed run's processes: rank and role from torchrun's variables or arguments, and the settings that
are refused before any process group is joined (a wrong setting must fail at once, not after every peer has
started). Real connections are exercised by tests/test_remote.py."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from hosl_lightning import HOSLStrategy
from hosl_lightning.distributed.peers import Peers


def _peers(rank: int | None = None, world_size: int | None = None) -> Peers:
    return Peers(None, 1.0, "tcp://127.0.0.1:1", rank, world_size)


def test_rank_and_world_size_come_from_torchrun_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    peers = _peers()
    assert (peers.rank(), peers.role, peers.clients()) == (2, "client", 2)
    monkeypatch.setenv("RANK", "0")
    assert _peers().role == "server"
    assert _peers(rank=1, world_size=4).clients() == 3  # arguments win over the variables


def test_a_missing_rank_names_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="needs this process's rank: launch with torchrun"):
        _peers().rank()


@pytest.mark.parametrize(("rank", "world_size", "message"), [
    (0, 1, r"world_size=1: a distributed HOSL run has the server \(rank 0\) and at least one client"),
    (3, 3, r"rank=3 is not valid: choose 0 \(the server\) or 1..2 \(the clients\)"),
])
def test_bad_rank_or_world_size_fails_before_joining(rank: int, world_size: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _peers(rank, world_size).connect()
    assert not dist.is_initialized()


@pytest.mark.parametrize(("options", "message"), [
    ({"mode": "zo"}, "mode='zo' runs with one client"),
    ({"mode": "fo", "client_sync": "seeds"}, "client_sync='seeds' replays zeroth-order updates"),
    ({"backend": "nccl"}, "several clients need backend='gloo'"),
])
def test_settings_that_cannot_serve_several_clients_fail_before_joining(options: dict, message: str) -> None:
    strategy = HOSLStrategy(transport="distributed", rank=1, world_size=3, **options)
    with pytest.raises(ValueError, match=message):
        strategy._connect()
    assert strategy.clients == 2
    assert not dist.is_initialized() and strategy._wire is None


def test_one_client_accepts_every_mode() -> None:
    for mode in ("hosl", "fo", "zo"):
        strategy = HOSLStrategy(transport="distributed", rank=1, world_size=2, mode=mode)
        strategy._accept_clients(1)
        assert strategy.clients == 1


def test_a_client_process_is_rank_zero_for_logging_and_checkpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun gives the client RANK=1; it runs the only Trainer, so its logs and checkpoints must not be muted."""
    from conftest import quiet_trainer
    from lightning_utilities.core.rank_zero import rank_zero_only

    strategy = HOSLStrategy(transport="distributed", rank=1, world_size=2)
    quiet_trainer(strategy)  # attaches the accelerator
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    strategy.setup_environment()
    assert rank_zero_only.rank == 0


def test_teardown_after_a_failed_start_leaves_the_meta_model_where_it_is() -> None:
    """A client that cannot reach its server still holds a meta-device model; teardown must not try to move it
    (NotImplementedError: Cannot copy out of meta tensor), which hid the connection error behind it."""
    import torch
    from conftest import TINY_LLAMA, quiet_trainer

    from hosl_lightning import HOSLModule
    from hosl_lightning.models import deferred_weights

    with deferred_weights():
        module = HOSLModule(model_config=dict(TINY_LLAMA))
    assert any(p.is_meta for p in module.parameters())
    strategy = HOSLStrategy(transport="distributed", rank=1, world_size=2)
    quiet_trainer(strategy)
    strategy._lightning_module = module
    strategy.teardown()
    assert strategy.lightning_module is module and next(module.parameters()).device == torch.device("meta")
