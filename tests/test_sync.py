"""Replaying ZO updates from (seed, step, lr, coefficients): exact hand-on, undo to rounding, bad input refused."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hosl_lightning.core.zo import ZOSGD, ZOEstimate
from hosl_lightning.distributed.sync import ZOUpdate, client_seed, replay
from hosl_lightning.distributed.wire import MalformedPayload


def _optimizer(module: nn.Module, seed: int = 7, weight_decay: float = 0.0) -> ZOSGD:
    return ZOSGD(list(module.named_parameters()), lr=1e-2, weight_decay=weight_decay, seed=seed)


def _module() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 4))


def test_replaying_a_clients_updates_gives_its_weights_bit_for_bit() -> None:
    trained, follower = _module(), _module()
    optimizer = _optimizer(trained)
    updates = []
    for step in range(3):
        estimate = ZOEstimate(step, torch.tensor([0.7, -1.3]) * (step + 1))
        optimizer.step(estimate=estimate)
        updates.append(ZOUpdate(optimizer.sampler.seed, step, 1e-2, tuple(estimate.coefficients.tolist())))
    replay(_optimizer(follower, seed=123), updates)  # the follower's own seed does not matter: the update names its own
    for a, b in zip(trained.parameters(), follower.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(next(trained.parameters()), next(_module().parameters()))


def test_replaying_negated_updates_undoes_them_to_rounding() -> None:
    module, original = _module(), _module()
    optimizer = _optimizer(module)
    update = ZOUpdate(7, 0, 1e-2, (2.0, -0.5))
    replay(optimizer, [update])
    replay(optimizer, [update], scale=-1.0)
    for a, b in zip(module.parameters(), original.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # one ulp of values near 1


def test_seed_sync_refuses_weight_decay() -> None:
    with pytest.raises(ValueError, match="zo_weight_decay=0"):
        replay(_optimizer(_module(), weight_decay=0.1), [ZOUpdate(7, 0, 1e-2, (1.0,))])


@pytest.mark.parametrize("item", [[1, 2, 0.1, [math.nan]], [1, 2, math.inf, [1.0]], [1, 2, 0.1, []], [1, 2], "x"])
def test_malformed_updates_are_refused(item: object) -> None:
    with pytest.raises(MalformedPayload):
        ZOUpdate.from_json(item)  # type: ignore[arg-type]


def test_update_round_trips_through_json_exactly() -> None:
    update = ZOUpdate(2**62 + 5, 17, 1e-6 / 3, (float(torch.tensor(0.1)), -3.25))
    assert ZOUpdate.from_json(update.to_json()) == update


def test_each_of_several_clients_draws_its_own_directions() -> None:
    assert client_seed(5, 1, 1) == 5  # one client: the run's seed, as in-process
    assert len({client_seed(5, rank, 3) for rank in (1, 2, 3)}) == 3


def test_parallel_clients_hold_the_same_weights_after_every_round() -> None:
    """Two clients in split-federated rounds of seed sync, through the server's real bookkeeping: after each of
    300 rounds their halves have the same weights digest (undoing their own updates at scale -1 drifted)."""
    import queue
    import threading

    from hosl_lightning.distributed.clients import ClientSync, TurnKeeper
    from hosl_lightning.distributed.sync import weights_digest
    from hosl_lightning.distributed.wire import Message

    ranks, rounds, steps_per_round = [1, 2], 300, 2
    inboxes: dict[int, queue.Queue] = {rank: queue.Queue() for rank in ranks}
    lock = threading.Lock()
    keeper = TurnKeeper(ranks, "parallel", lambda rank, kind, tensors, fields: inboxes[rank].put(
        Message(kind, fields, tensors or {})))

    class LoopbackWire:  # the client's end of the wire, its far end the server's TurnKeeper
        def __init__(self, rank: int) -> None:
            self.rank, self.peer_name = rank, "server (rank 0)"

        def send(self, kind: str, tensors: dict | None = None, **fields: object) -> None:
            assert kind == "sync"
            with lock:
                keeper.sync(self.rank, Message(kind, fields, tensors or {}))

        def recv(self, kind: str, waiting_for: str, timeout_s: float) -> Message:
            message = inboxes[self.rank].get(timeout=timeout_s)
            assert message.kind == kind
            return message

    digests: dict[int, list[str]] = {rank: [] for rank in ranks}
    halves = {rank: _module() for rank in ranks}  # built here: _module seeds the global RNG, which threads would race on

    def client(rank: int) -> None:
        half = halves[rank]
        optimizer = ZOSGD(list(half.named_parameters()), lr=0.05, seed=client_seed(7, rank, len(ranks)))
        sync = ClientSync(LoopbackWire(rank), half, optimizer, "parallel", "seeds", 1, steps_per_round)
        coefficients = torch.Generator().manual_seed(rank)
        for step in range(rounds * steps_per_round):
            sync.before_step(10.0)
            estimate = ZOEstimate(step, torch.randn(2, generator=coefficients))
            optimizer.step(estimate=estimate)
            sync.after_step(ZOUpdate.of(optimizer, estimate), 10.0)
            if sync.steps == 0:  # a round just closed
                digests[rank].append(weights_digest(half))

    threads = [threading.Thread(target=client, args=(rank,)) for rank in ranks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert all(len(d) == rounds for d in digests.values()), {rank: len(d) for rank, d in digests.items()}
    differ = [index for index, (a, b) in enumerate(zip(digests[1], digests[2])) if a != b]
    assert not differ, f"the clients' weights differ after {len(differ)} of {rounds} rounds, first after round {differ[0]}"
    assert len(set(digests[1])) == rounds  # and they did move every round


def test_the_strategy_reads_out_what_keeping_clients_in_step_cost() -> None:
    """``HOSLStrategy.sync_bytes``: the public read of the clients' sync bytes (benchmarks/processes.py reads it after
    fit, when the final hand-off is counted too); None where nothing syncs, and not writable."""
    from hosl_lightning import HOSLStrategy
    from hosl_lightning.distributed.clients import ClientSync

    strategy = HOSLStrategy()
    assert strategy.sync_bytes is None  # in-process: no other client to keep in step with
    sync = ClientSync(None, _module(), None, "sequential", "weights", 1, 1)  # type: ignore[arg-type]  # no wire used
    sync.bytes_up, sync.bytes_down = 3, 5
    strategy._client_sync = sync  # as setup does in a client process of a run with several clients
    assert strategy.sync_bytes == (3, 5)
    with pytest.raises(AttributeError):
        strategy.sync_bytes = (0, 0)  # type: ignore[misc]
