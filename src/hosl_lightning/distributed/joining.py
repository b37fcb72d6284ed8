"""Joining a distributed run's process group within a stated bound, or failing with an error that says who and where.

torch's rendezvous bounds most of its waits by the timeout it is given, but not all: a client whose port is held
by a program that accepts the connection and never answers waits for torch's store handshake forever, and a
client with no server retries connecting for two to three times the timeout. Here the whole join (rendezvous
and process group) runs in a watchdog thread, so it ends within :func:`join_bound_s` + :data:`JOIN_REPORT_S`
whatever the other end does, and every failure is a :class:`PeerUnreachable` that names the peer awaited, the
address, the bound and what to check.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from datetime import timedelta
from typing import Any
from urllib.parse import urlparse

import torch.distributed as dist
from torch.distributed.rendezvous import rendezvous

JOIN_GRACE_S = 60.0  # the least time processes wait for each other to join, whatever timeout_s is
JOIN_REPORT_S = 5.0  # past the bound, how long torch may take to report its own (more precise) error first


class PeerUnreachable(ConnectionError):
    """The run's other processes could not be joined within the bound: absent, elsewhere, or not torch."""


def join_bound_s(timeout_s: float) -> float:
    """How long joining waits for the other processes: ``max(timeout_s, JOIN_GRACE_S)``."""
    return max(float(timeout_s), JOIN_GRACE_S)


def address(init_method: str) -> str:
    """Where the processes meet, as a user would write it: ``host:port`` (from ``tcp://`` or ``env://``)."""
    parsed = urlparse(init_method)
    if parsed.scheme == "env":
        host, port = os.environ.get("MASTER_ADDR", "<MASTER_ADDR unset>"), os.environ.get("MASTER_PORT", "<unset>")
        return f"{host}:{port} (MASTER_ADDR:MASTER_PORT)"
    return parsed.netloc if parsed.scheme == "tcp" else init_method


def _host_port(init_method: str) -> tuple[str, int] | None:
    parsed = urlparse(init_method)
    try:
        if parsed.scheme == "env":
            return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        if parsed.scheme == "tcp" and parsed.hostname and parsed.port:
            return parsed.hostname, parsed.port
    except (KeyError, ValueError):
        pass
    return None


def _listening(init_method: str) -> bool | None:
    """Whether something accepts TCP connections at the meeting address (None: not a host:port address)."""
    target = _host_port(init_method)
    if target is None:
        return None
    try:
        with socket.create_connection(target, timeout=2.0):
            return True
    except OSError:
        return False


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0].rstrip(".") if lines else type(error).__name__


def join_process_group(backend: str, init_method: str, rank: int, world_size: int, timeout_s: float) -> None:
    """``dist.init_process_group`` that ends within ``join_bound_s(timeout_s) + JOIN_REPORT_S`` seconds.

    The group's timeout (and its store's) is the bound, as before; a failure or the deadline raises
    :class:`PeerUnreachable`. A join given up on is abandoned: should it complete later, it is undone.
    """
    bound = join_bound_s(timeout_s)
    timeout = timedelta(seconds=bound)
    state: dict[str, Any] = {"phase": "rendezvous"}
    lock, done = threading.Lock(), threading.Event()

    def join() -> None:
        try:
            store, _, _ = next(rendezvous(init_method, rank, world_size, timeout=timeout))
            store.set_timeout(timeout)
            with lock:
                if state.get("abandoned"):
                    return
                state["phase"] = "group"
            # as init_process_group(init_method=...) does: its keys under "default_pg" in a multi-tenant store
            dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=rank,
                                    world_size=world_size, timeout=timeout)
            with lock:
                if state.get("abandoned"):
                    dist.destroy_process_group()
                    return
                state["joined"] = True
        except BaseException as error:  # noqa: BLE001 - handed to the waiting thread, which raises it
            state["error"] = error
        finally:
            done.set()

    start = time.monotonic()
    threading.Thread(target=join, name=f"hosl-join-rank{rank}", daemon=True).start()
    try:
        done.wait(bound + JOIN_REPORT_S)
    finally:  # also when interrupted: a join left behind must not complete unseen
        with lock:
            state["abandoned"] = not state.get("joined")
            error, phase = state.get("error"), state["phase"]
    if not state["abandoned"]:
        return
    if error is not None and not isinstance(error, RuntimeError):  # a setting torch refused (ValueError, ...)
        raise error
    raise PeerUnreachable(_explain(init_method, rank, world_size, timeout_s, phase, error,
                                   time.monotonic() - start)) from error


def _explain(init_method: str, rank: int, world_size: int, timeout_s: float, phase: str,
             error: BaseException | None, elapsed_s: float) -> str:
    """The message of a failed join: who waited for whom, where, how long, what torch said, what to check."""
    where, bound, clients = address(init_method), join_bound_s(timeout_s), world_size - 1
    me = "server (rank 0)" if rank == 0 else f"client (rank {rank})"
    within = f"within the join bound of {bound:g} s = max(timeout_s={timeout_s:g}, {JOIN_GRACE_S:g})"
    torch_said = f"; torch: {_first_line(error)}" if error is not None else ""
    same = f"with the same address and world_size={world_size}"
    message = str(error or "")
    if rank == 0 and ("EADDRINUSE" in message or "address already in use" in message):
        return (f"{me} cannot listen on {where}: the port is in use by another program (or an earlier run still "
                f"alive) (torch: {_first_line(error)}). Give every process of the run a free port (init_method / "
                f"MASTER_PORT)")
    if rank == 0:
        awaited = "client (rank 1)" if clients == 1 else f"clients (ranks 1..{clients})"
        count = re.search(r"(\d+)/(\d+) clients joined", message)  # torch counts the server's own connection
        joined = f"{int(count.group(1)) - 1} of {clients} joined; " if count and phase == "rendezvous" else ""
        detail = f" ({joined}gave up after {elapsed_s:.1f} s{torch_said})"
        return f"{me}: {awaited} did not join at {where} {within}{detail}. Are the clients started, {same}?"
    detail = f" (gave up after {elapsed_s:.1f} s{torch_said})"
    if phase == "group":
        others = "server (rank 0)" if clients == 1 else "server (rank 0) and the other clients"
        return (f"{me} reached the server at {where}, but the {world_size} processes did not form their group "
                f"{within}{detail}: waiting for the {others}. Are all {world_size} processes started, {same}?")
    listening = _listening(init_method)
    if listening is False:
        return (f"{me} found no server (rank 0) at {where}: nothing accepted a connection there {within}{detail}. "
                f"Is the server started, on that host and port (init_method / MASTER_ADDR:MASTER_PORT)?")
    if listening:
        return (f"{me} reached {where}, but what listens there did not answer as the server (rank 0) of a "
                f"torch.distributed run {within}{detail}. Is another program using the port? Give every process "
                f"of the run a free port (init_method / MASTER_PORT)")
    return f"{me} could not join the server (rank 0) at {where} {within}{detail}. Is the server started?"
