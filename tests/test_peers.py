"""A distributed run's processes: rank and role from torchrun's variables or arguments, and the settings that
are refused before any process group is joined (a wrong setting must fail at once, not after every peer has
started), and joins that fail within their bound, naming the peer and the address (no server, a port held by
another program, clients that never come). Real runs are exercised by tests/test_remote.py."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import torch.distributed as dist

from hosl_lightning import HOSLStrategy
from hosl_lightning.core.options import UserError
from hosl_lightning.distributed import joining
from hosl_lightning.distributed.peers import Peers, PeerUnreachable


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
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match=r"needs this process's rank, but RANK is not set: launch every process with "
                                        r"torchrun, .* or give the strategy's rank \(rank 0 is the server"):
        _peers().rank()


@pytest.mark.parametrize(("init_method", "options", "env", "missing"), [
    ("env://", {}, {}, "RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are not set"),
    ("env://", {"rank": 1, "world_size": 2}, {}, "MASTER_ADDR and MASTER_PORT are not set"),
    ("env://", {"rank": 1, "world_size": 2}, {"MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT is not set"),
    ("tcp://127.0.0.1:1", {}, {"RANK": "1"}, "WORLD_SIZE is not set"),
])
def test_a_process_started_without_torchrun_names_what_it_lacks(init_method: str, options: dict, env: dict,
                                                                 missing: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """It was torch's ValueError about MASTER_ADDR once the half had loaded, or ours about the rank alone."""
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    for name in torchrun:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    peers = Peers(None, 1.0, init_method, **options)
    with pytest.raises(UserError, match=f"transport='distributed' needs .*, but {missing}: launch every process with "
                                        "torchrun"):
        peers.check_launched()
    for name, value in torchrun.items():
        monkeypatch.setenv(name, value)
    peers.check_launched()  # torchrun's variables are all it needs


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


# Joining: every connect or join ends within join_bound_s(timeout_s) + JOIN_REPORT_S, naming the peer and the address.
JOIN_TIMEOUT_S = 2.0
PROBE_AND_START_S = 4.0  # beyond the documented bound: the port probe (2 s at most) and a loaded machine


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def short_join(monkeypatch: pytest.MonkeyPatch) -> float:
    """No 60 s floor: joining waits JOIN_TIMEOUT_S; returns the longest a failed join may take."""
    monkeypatch.setattr(joining, "JOIN_GRACE_S", 0.0)
    return joining.join_bound_s(JOIN_TIMEOUT_S) + joining.JOIN_REPORT_S + PROBE_AND_START_S


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A port held by a plain socket server that accepts connections and never answers; its port.

    It lets go of its connections after 40 s whatever happens, so a join that hangs fails its test instead of
    hanging the suite."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    release = threading.Timer(40.0, stop.set)
    release.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        release.cancel()
        thread.join()
        for sock in held:
            sock.close()
        server.close()


def _join_fails(peers: Peers, limit_s: float) -> str:
    start = time.monotonic()
    with pytest.raises(PeerUnreachable) as caught:
        peers.connect()
    elapsed = time.monotonic() - start
    assert elapsed < limit_s, f"joining failed after {elapsed:.1f} s, past its bound of {limit_s:.1f} s"
    assert not dist.is_initialized() and peers.wire is None
    return str(caught.value)


@pytest.mark.parametrize("env", [False, True], ids=["tcp", "env"])
def test_a_client_with_no_server_fails_within_the_bound_naming_server_and_address(
        short_join: float, monkeypatch: pytest.MonkeyPatch, env: bool) -> None:
    port = _free_port()
    init_method = f"tcp://127.0.0.1:{port}"
    if env:
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(port))
        init_method = "env://"
    message = _join_fails(Peers(None, JOIN_TIMEOUT_S, init_method, 1, 2), short_join)
    address = f"127.0.0.1:{port} (MASTER_ADDR:MASTER_PORT)" if env else f"127.0.0.1:{port}"
    assert message.startswith(f"client (rank 1) found no server (rank 0) at {address}: nothing accepted"), message
    assert "within the join bound of 2 s = max(timeout_s=2, 0)" in message, message
    assert "Is the server started" in message, message


def test_a_client_whose_port_is_held_by_another_program_fails_within_the_bound(
        short_join: float, silent_listener: int) -> None:
    """Before, torch's store handshake waited for an answer forever (past 250 s with the default timeout)."""
    message = _join_fails(Peers(None, JOIN_TIMEOUT_S, f"tcp://127.0.0.1:{silent_listener}", 1, 2), short_join)
    assert message.startswith(f"client (rank 1) reached 127.0.0.1:{silent_listener}, but what listens there did "
                              "not answer as the server (rank 0)"), message
    assert "within the join bound of 2 s" in message and "Is another program using the port?" in message, message


@pytest.mark.parametrize(("world_size", "awaited"), [(2, "client (rank 1)"), (3, "clients (ranks 1..2)")])
def test_a_server_whose_clients_never_come_fails_within_the_bound_naming_them(
        short_join: float, world_size: int, awaited: str) -> None:
    port = _free_port()
    message = _join_fails(Peers(None, JOIN_TIMEOUT_S, f"tcp://127.0.0.1:{port}", 0, world_size), short_join)
    assert message.startswith(f"server (rank 0): {awaited} did not join at 127.0.0.1:{port} within the join "
                              f"bound of 2 s = max(timeout_s=2, 0) (0 of {world_size - 1} joined;"), message
    assert f"Are the clients started, with the same address and world_size={world_size}?" in message, message


def test_a_server_whose_port_is_taken_says_so_at_once(short_join: float, silent_listener: int) -> None:
    message = _join_fails(Peers(None, JOIN_TIMEOUT_S, f"tcp://127.0.0.1:{silent_listener}", 0, 2), 5.0)
    assert message.startswith(f"server (rank 0) cannot listen on 127.0.0.1:{silent_listener}: the port is in use"), message


def test_the_join_bound_is_timeout_s_with_a_floor_of_a_minute() -> None:
    assert joining.JOIN_GRACE_S == 60.0
    assert (joining.join_bound_s(5), joining.join_bound_s(300)) == (60.0, 300.0)
