"""Client and server in separate processes (gloo on CPU): same weights as in-process, faults fail fast and clearly."""

from __future__ import annotations

import multiprocessing as mp
import re
import socket
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_LLAMA, for_mode, quiet_trainer, tiny_data
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoConfig, AutoModelForCausalLM

from hosl_lightning import HOSLModule, HOSLStrategy
from hosl_lightning.core.split_model import SplitCausalLM
from hosl_lightning.distributed.server import SplitServer, server_checkpoint_path
from hosl_lightning.distributed.wire import MalformedPayload, Message, Wire
from hosl_lightning.lightning.launcher import fit
from hosl_lightning.models import deferred_weights
from hosl_lightning.modes import ZOSettings

PROCESS_DEADLINE_S = 120  # a test never waits longer than this for its processes, and kills what is left


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama saved the Hugging Face way (safetensors), so each process can load only its half."""
    config = dict(TINY_LLAMA)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return path


def _strategy(mode: str, **kwargs: Any) -> HOSLStrategy:
    return HOSLStrategy(cut_layer=1, **for_mode(mode, q=2, zo_lr=1e-2, seed=3), memory_every_n_steps=0, **kwargs)


def _module(model_dir: Path, mode: str, lr: float = 1e-2) -> HOSLModule:
    return HOSLModule(model=str(model_dir), optimizer=lambda params: torch.optim.AdamW(params, lr=lr))


def _classification_loader() -> Any:
    """Three classification batches of one-token answers after shared prompts (each prompt forwarded once)."""
    from test_subsets import _classification_batch
    from torch.utils.data import DataLoader

    batches = [_classification_batch([[11], [12]], class_of=classes) for classes in ([1, 0, 1], [0, 0, 1], [1, 1, 0])]
    return DataLoader(batches, batch_size=None)


def _in_process(model_dir: Path, mode: str, steps: int, classification: bool = False,
                **options: Any) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    module = _module(model_dir, mode)
    trainer = quiet_trainer(_strategy(mode, **options), max_steps=steps)
    if classification:
        trainer.fit(module, train_dataloaders=_classification_loader())
    else:
        trainer.fit(module, datamodule=tiny_data())
    split = module.model
    return {**{f"client.{k}": v for k, v in split.client.state_dict().items()},
            **{f"server.{k}": v for k, v in split.server.state_dict().items()}}


def _process(rank: int, port: int, model_dir: str, mode: str, steps: int, out: str, options: dict[str, Any],
             world_size: int = 2) -> None:
    """One process of a distributed run; writes its half's weights (or its error) to ``out``."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        fault = options.pop("fault", None)
        ckpt_path = options.pop("ckpt_path", None)
        checkpoint_dir = options.pop("checkpoint_dir", None)
        server_lr = options.pop("server_lr", 1e-2)
        classification = options.pop("classification", False)
        with deferred_weights():
            module = _module(Path(model_dir), mode, server_lr)
        strategy = _strategy(mode, transport="distributed", rank=rank, world_size=world_size,
                             init_method=f"tcp://127.0.0.1:{port}", **options)
        extra: dict[str, Any] = {}
        if checkpoint_dir is not None:
            extra = {"enable_checkpointing": True,
                     "callbacks": [ModelCheckpoint(checkpoint_dir, every_n_train_steps=4, save_top_k=-1)]}
        trainer = quiet_trainer(strategy, max_steps=steps, **extra)
        if fault == "client_dies" and rank == 1:
            strategy._connect()
            raise SystemExit(3)  # exits without a word after joining the group
        if fault == "server_dies" and rank == 0:
            strategy._connect()
            raise SystemExit(3)
        if fault == "client_stalls" and rank == 1:
            strategy._connect()
            import time

            time.sleep(8)  # far past the server's timeout_s
            raise SystemExit(0)
        if fault == "nan" and rank == 1:
            original = module.training_step

            def poisoned(batch: dict[str, torch.Tensor], batch_idx: int) -> Any:
                split = module.model
                forward = split.client.forward

                def nan_forward(*args: Any, **kwargs: Any) -> Any:
                    up = forward(*args, **kwargs)
                    up.hidden = up.hidden.clone()
                    up.hidden[0, 0, 0] = float("nan")
                    return up

                split.client.forward = nan_forward
                return original(batch, batch_idx)

            module.training_step = poisoned  # type: ignore[method-assign]
        data = tiny_data() if world_size == 2 else tiny_data(seed=rank)  # several clients: each its own data
        if classification:
            fit(trainer, module, train_dataloaders=_classification_loader(), ckpt_path=ckpt_path)
        else:
            fit(trainer, module, datamodule=data, ckpt_path=ckpt_path)
        half = module.model.client if rank >= 1 else module.model.server
        side = "client" if rank >= 1 else "server"
        state = {f"{side}.{k}": v for k, v in half.state_dict().items()}
        if world_size > 2 and rank >= 1:
            sync = strategy._client_sync
            state["sync_bytes"] = torch.tensor([sync.bytes_up, sync.bytes_down])
        torch.save(state, out)
    except BaseException as error:  # noqa: BLE001 - the parent reads what happened from the file
        Path(out).write_text(f"{type(error).__name__}: {error}\n{traceback.format_exc()}")


def _run_pair(model_dir: Path, tmp_path: Path, mode: str, steps: int, **options: Any) -> tuple[Any, Any]:
    """Run server (rank 0) and client (rank 1) as two fresh processes; returns what each left behind."""
    server, client = _run_group(model_dir, tmp_path, mode, steps, 2, **options)
    return server, client


def _run_group(model_dir: Path, tmp_path: Path, mode: str, steps: int, world_size: int, **options: Any) -> list[Any]:
    """Run the server (rank 0) and its clients as fresh processes; returns what each left behind, by rank."""
    context = mp.get_context("spawn")
    port = _free_port()
    outs = [str(tmp_path / f"rank{rank}.out") for rank in range(world_size)]
    processes = [
        context.Process(target=_process, args=(rank, port, str(model_dir), mode, steps, outs[rank], dict(options), world_size))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(PROCESS_DEADLINE_S)
    alive = [p for p in processes if p.is_alive()]
    for process in alive:
        process.kill()
        process.join()
    assert not alive, f"{len(alive)} process(es) still running after {PROCESS_DEADLINE_S} s"
    results = []
    for out in outs:
        path = Path(out)
        if not path.exists():
            results.append(None)
        elif path.read_bytes()[:2] == b"PK":  # a torch.save zip
            results.append(torch.load(path, weights_only=True))
        else:
            results.append(path.read_text())
    return results


@pytest.mark.parametrize(("mode", "classification"), [(m, c) for c in (False, True) for m in ("hosl", "fo", "zo")],
                         ids=["hosl", "fo", "zo", "hosl-shared-prompts", "fo-shared-prompts", "zo-shared-prompts"])
def test_two_processes_end_with_the_in_process_weights(model_dir: Path, tmp_path: Path, mode: str,
                                                       classification: bool) -> None:
    steps = 3
    expected = _in_process(model_dir, mode, steps, classification)
    server, client = _run_pair(model_dir, tmp_path, mode, steps, classification=classification)
    assert isinstance(server, dict), server
    assert isinstance(client, dict), client
    got = {**client, **server}
    assert got.keys() == expected.keys()
    changed = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not changed, f"{mode}: {len(changed)} tensors differ from the in-process run, e.g. {changed[:3]}"
    initial = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not torch.equal(got["client.embeddings.embed_tokens.weight"], initial.model.embed_tokens.weight), "client did not train"


@pytest.mark.parametrize("mode", ["hosl", "zo"])
def test_a_frozen_client_module_trains_over_two_processes_as_in_one(model_dir: Path, tmp_path: Path, mode: str) -> None:
    """The server counts the client's ZO tensors with the same modules frozen (the handshake failed before)."""
    frozen = {"client_frozen": ["embeddings.embed_tokens"]}
    expected = _in_process(model_dir, mode, 3, **frozen)
    server, client = _run_pair(model_dir, tmp_path, mode, 3, **frozen)
    assert isinstance(server, dict), server
    assert isinstance(client, dict), client
    got = {**client, **server}
    assert got.keys() == expected.keys()
    changed = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not changed, f"{mode}: {len(changed)} tensors differ from the in-process run, e.g. {changed[:3]}"
    initial = AutoModelForCausalLM.from_pretrained(model_dir)
    assert torch.equal(got["client.embeddings.embed_tokens.weight"], initial.model.embed_tokens.weight)  # frozen
    assert not torch.equal(got["client.stack.blocks.0.mlp.up_proj.weight"], initial.model.layers[0].mlp.up_proj.weight)


def test_a_client_that_dies_fails_the_server_naming_it(model_dir: Path, tmp_path: Path) -> None:
    server, _ = _run_pair(model_dir, tmp_path, "hosl", 2, fault="client_dies", timeout_s=60)
    assert isinstance(server, str) and "client (rank 1)" in server, server
    assert "hello" in server


def test_a_server_that_dies_fails_the_client_naming_it(model_dir: Path, tmp_path: Path) -> None:
    _, client = _run_pair(model_dir, tmp_path, "hosl", 2, fault="server_dies", timeout_s=60)
    assert isinstance(client, str) and "server (rank 0)" in client, client


def test_a_stalled_client_times_out_the_server(model_dir: Path, tmp_path: Path) -> None:
    server, _ = _run_pair(model_dir, tmp_path, "hosl", 2, fault="client_stalls", timeout_s=3)
    assert isinstance(server, str), server
    assert "PeerTimeout" in server and "timeout_s=3 s" in server and "client (rank 1)" in server, server


def test_nan_activations_are_rejected_by_the_server(model_dir: Path, tmp_path: Path) -> None:
    server, client = _run_pair(model_dir, tmp_path, "hosl", 2, fault="nan", timeout_s=60)
    assert isinstance(server, str) and "MalformedPayload" in server and "NaN or inf" in server, server
    assert isinstance(client, str) and "server (rank 0) failed" in client and "NaN or inf" in client, client


def test_both_sides_resume_from_a_checkpoint_with_nothing_lost(model_dir: Path, tmp_path: Path) -> None:
    # 4 batches per epoch: the checkpoint after step 4 resumes exactly (as in-process, see tests/test_training.py)
    expected = _in_process(model_dir, "hosl", 8)
    first = tmp_path / "first"
    first.mkdir()
    server_dir = str(tmp_path / "server")
    server, client = _run_pair(model_dir, first, "hosl", 4, checkpoint_dir=str(tmp_path / "ckpt"), server_checkpoint_dir=server_dir)
    assert isinstance(server, dict) and isinstance(client, dict), (server, client)
    checkpoint = next((tmp_path / "ckpt").glob("*step=4.ckpt"))
    assert (tmp_path / "server" / f"{checkpoint.name}.server.pt").is_file(), "the server saved no half of the checkpoint"
    server, client = _run_pair(model_dir, tmp_path, "hosl", 8, ckpt_path=str(checkpoint), server_checkpoint_dir=server_dir)
    assert isinstance(server, dict) and isinstance(client, dict), (server, client)
    got = {**client, **server}
    changed = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not changed, f"resumed run differs from an uninterrupted one in {changed[:3]}"


# ---- payload checks, without processes -------------------------------------------------------------------


class _LoopbackDist:
    """torch.distributed's send/irecv over an in-memory queue, for a wire tested without processes."""

    def __init__(self, source: int) -> None:
        self.source, self.queue = source, []

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self.queue.append(tensor.clone())

    def irecv(self, tensor: torch.Tensor, src: int | None = None) -> Any:
        tensor.copy_(self.queue.pop(0))  # the receive lands in the very tensor passed here
        source = self.source

        class Work:
            def wait(self, timeout: Any = None) -> None:
                pass

            def _source_rank(self) -> int:
                return source

        return Work()


def test_a_message_from_any_peer_is_read_from_the_buffer_it_was_received_into(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU wire, moving a tensor to the device copies it; a receive into that copy must read the copy."""
    from hosl_lightning.distributed import wire as wire_module

    loopback = _LoopbackDist(source=2)
    monkeypatch.setattr(wire_module.dist, "send", loopback.send)
    monkeypatch.setattr(wire_module.dist, "irecv", loopback.irecv)
    to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: to(self, *a, **k).clone())  # every move copies
    wires = {rank: Wire(rank, f"client (rank {rank})", 1.0) for rank in (1, 2)}
    hidden = torch.arange(12, dtype=torch.float32).view(1, 3, 4)
    wires[2].send("act", {"hidden": hidden}, query=0)
    rank, message = wire_module.recv_from_any(wires, "act", "a probe")
    assert rank == 2 and message.kind == "act" and message.fields == {"query": 0}
    assert torch.equal(message.tensors["hidden"], hidden)
    wires[1].send("act", {"hidden": hidden + 1})
    assert torch.equal(wires[1].recv("act", "a probe").tensors["hidden"], hidden + 1)


def _server_for_checks() -> SplitServer:
    config = dict(TINY_LLAMA)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    split = SplitCausalLM(model, 1)
    split.client = None  # type: ignore[assignment]
    wire = Wire(1, "client (rank 1)", 1.0)
    return SplitServer(split, wire, "hosl", ZOSettings(), torch.optim.SGD(split.server.parameters(), lr=0.1))


def _act(hidden: torch.Tensor, **extra: torch.Tensor) -> Message:
    length = hidden.shape[1]
    return Message("act", tensors={"hidden": hidden, "position_ids": torch.arange(length)[None], **extra})


@pytest.mark.parametrize(
    ("hidden", "extra", "error"),
    [
        (torch.zeros(2, 5, 16), {}, "expected shape [2, 5, 32]"),  # the wrong width
        (torch.zeros(3, 5, 32), {}, "expected shape [2, 5, 32]"),  # rows that do not match the labels
        (torch.zeros(2, 5, 32, dtype=torch.int64), {}, "dtype torch.int64"),
        (torch.full((2, 5, 32), float("inf")), {}, "NaN or inf"),
        (torch.zeros(2, 5, 32), {"attention_mask": torch.ones(2, 4)}, "'attention_mask' of shape [2, 4]"),
    ],
)
def test_malformed_activations_are_rejected_with_what_was_wrong(hidden: torch.Tensor, extra: dict, error: str) -> None:
    server = _server_for_checks()
    with pytest.raises(MalformedPayload, match=re.escape(error)) as caught:
        server._checked_activations(_act(hidden, **extra), 2, 5, "probe 1 of 2")
    assert "client (rank 1)" in str(caught.value)


def test_a_well_formed_payload_passes_the_checks() -> None:
    server = _server_for_checks()
    up = server._checked_activations(_act(torch.zeros(2, 5, 32), attention_mask=torch.ones(2, 5, dtype=torch.int64)), 2, 5, "x")
    assert up.hidden.shape == (2, 5, 32) and up.position_ids.shape == (1, 5)


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ({"loss_weight": torch.ones(3)}, "per-example weights (SubsetSelection's granularity='per_class') run "
                                         "in-process only"),
        ({"source_rows": torch.tensor([0, 0, 2, 2, 3, 3])}, "source_rows that do not name each of 4 forwarded rows"),
        ({"source_rows": torch.tensor([0, 1])}, "'source_rows' of shape [2]"),
    ],
)
def test_malformed_training_targets_are_rejected_with_what_was_wrong(extra: dict, error: str) -> None:
    labels = torch.full((6, 5), -100)
    labels[:, -1] = 7
    request = Message("train", tensors={"labels": labels, "class_labels": torch.tensor([0, 1, 0]), **extra},
                      fields={"num_classes": 2})
    with pytest.raises((ValueError, MalformedPayload), match=re.escape(error)):
        _server_for_checks()._targets(request)


def test_shared_prompt_targets_pass_the_checks() -> None:
    labels = torch.full((6, 5), -100)
    labels[:, -1] = 7
    request = Message("train", tensors={"labels": labels, "class_labels": torch.tensor([0, 1, 0]),
                                        "source_rows": torch.tensor([0, 0, 1, 1, 2, 2])}, fields={"num_classes": 2})
    assert _server_for_checks()._targets(request)["source_rows"].tolist() == [0, 0, 1, 1, 2, 2]


def test_a_mismatched_hello_names_each_differing_setting() -> None:
    server = _server_for_checks()
    server.expected = {"mode": "hosl", "cut_layer": 1, "q": 2}

    class _Wire:
        peer_name = "client (rank 1)"

        def recv(self, *_: Any) -> Message:
            return Message("hello", fields={"mode": "hosl", "cut_layer": 2, "q": 2})

    server.wire = _Wire()  # type: ignore[assignment]
    with pytest.raises(ValueError, match=re.escape("cut_layer: client 2, server 1")):
        server._handshake()


# ---- several clients -------------------------------------------------------------------------------------


def _clients(results: list[Any]) -> list[dict[str, torch.Tensor]]:
    assert all(isinstance(r, dict) for r in results), [r for r in results if not isinstance(r, dict)]
    return results[1:]


def test_sequential_clients_hand_on_by_seeds_exactly_as_by_weights(model_dir: Path, tmp_path: Path) -> None:
    # two clients, each with its own data, turns of 2 steps, 4 steps each: turns 1, 2, 1, 2
    runs = {}
    for sync in ("seeds", "weights"):
        (tmp_path / sync).mkdir()
        runs[sync] = _clients(_run_group(model_dir, tmp_path / sync, "hosl", 4, 3, schedule="sequential",
                                         client_sync=sync, steps_per_turn=2))
    for sync, (first, second) in runs.items():
        for key in first:
            if key != "sync_bytes":
                assert torch.equal(first[key], second[key]), f"{sync}: the clients end with different {key}"
    seeds, weights = runs["seeds"][0], runs["weights"][0]
    assert all(torch.equal(seeds[k], weights[k]) for k in seeds if k != "sync_bytes"), "replayed seeds != handed weights"
    initial = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not torch.equal(seeds["client.embeddings.embed_tokens.weight"], initial.model.embed_tokens.weight)
    seed_bytes, weight_bytes = int(seeds["sync_bytes"].sum()), int(weights["sync_bytes"].sum())
    assert 0 < seed_bytes * 100 < weight_bytes, (seed_bytes, weight_bytes)


def test_parallel_clients_average_their_halves_by_seeds_as_by_weights(model_dir: Path, tmp_path: Path) -> None:
    # One round (2 steps each, then the average). Over several rounds the two runs drift apart further than
    # rounding: a ZO coefficient (L+ - L-)/(2 mu) of float32 losses moves by ~1e-4 when the weights move by 1e-8.
    # The server serves parallel clients' steps in the order they arrive, which differs from run to run; with
    # its learning rate at 0 its weights, and so the clients' losses, do not depend on that order.
    runs = {}
    for sync in ("seeds", "weights"):
        (tmp_path / sync).mkdir()
        runs[sync] = _clients(_run_group(model_dir, tmp_path / sync, "hosl", 2, 3, schedule="parallel",
                                         client_sync=sync, sync_every_n_steps=2, server_lr=0.0))
    first, second = runs["weights"]
    assert all(torch.equal(first[k], second[k]) for k in first if k != "sync_bytes"), "averaged weights differ"
    for key in first:
        if key == "sync_bytes" or not first[key].is_floating_point():
            continue
        assert torch.equal(runs["seeds"][0][key], runs["seeds"][1][key]), key  # the clients agree bit for bit
        for client in runs["seeds"]:  # a replayed average and an averaged one agree to rounding
            torch.testing.assert_close(client[key], first[key], rtol=1e-6, atol=1e-7)
    initial = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not torch.equal(first["client.embeddings.embed_tokens.weight"], initial.model.embed_tokens.weight)
    assert int(runs["seeds"][0]["sync_bytes"].sum()) * 100 < int(first["sync_bytes"].sum())


def test_first_order_clients_take_turns_by_weights(model_dir: Path, tmp_path: Path) -> None:
    first, second = _clients(_run_group(model_dir, tmp_path, "fo", 2, 3, schedule="sequential", client_sync="weights",
                                        steps_per_turn=1))
    assert all(torch.equal(first[k], second[k]) for k in first if k != "sync_bytes"), "the clients end apart"
    initial = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not torch.equal(first["client.embeddings.embed_tokens.weight"], initial.model.embed_tokens.weight)


@pytest.mark.parametrize("name", ["../x.ckpt", "/etc/passwd", "", ".hidden", "a/b.ckpt"])
def test_a_checkpoint_name_cannot_be_a_path(name: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="plain file name"):
        server_checkpoint_path(tmp_path, name)


def test_seed_sync_refuses_clients_that_start_from_different_weights() -> None:
    server = _server_for_checks()
    server.expected = {"mode": "hosl", "client_sync": "seeds"}

    class _Wire:
        def __init__(self, rank: int, digest: str) -> None:
            self.peer, self.peer_name, self.digest, self.sent = rank, f"client (rank {rank})", digest, []

        def recv(self, *_: Any) -> Message:
            return Message("hello", fields={"mode": "hosl", "client_sync": "seeds", "client_digest": self.digest})

        def send(self, kind: str, *_: Any, **__: Any) -> None:
            self.sent.append(kind)

    server.wires = {1: _Wire(1, "aaaa"), 2: _Wire(2, "bbbb")}  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="start from different weights"):
        server._greet()
    assert not any(w.sent for w in server.wires.values()), "no client may be told ready"
    server.wires = {1: _Wire(1, "aaaa"), 2: _Wire(2, "aaaa")}  # type: ignore[dict-item]
    server._greet()
    assert all(w.sent == ["ready"] for w in server.wires.values())


# ---- evaluation over the wire ------------------------------------------------------------------------------


class _Loopback:
    """A client's wire whose server answers each request at once, in this process (no process group)."""

    peer_name = "server (rank 0)"

    def __init__(self, server: SplitServer) -> None:
        self.server, self.replies = server, []
        answers = self

        class _ServerWire:
            peer_name = "client (rank 1)"

            def send(self, kind: str, tensors: dict | None = None, **fields: Any) -> int:
                answers.replies.append(Message(kind, tensors={k: v for k, v in (tensors or {}).items() if v is not None},
                                               fields=fields))
                return 0

        server.wire = _ServerWire()  # type: ignore[assignment]

    def send(self, kind: str, tensors: dict | None = None, **fields: Any) -> int:
        message = Message(kind, tensors={k: v for k, v in (tensors or {}).items() if v is not None}, fields=fields)
        getattr(self.server, f"_on_{kind}")(message)
        return message.payload_bytes

    def recv(self, kind: str, waiting_for: str) -> Message:
        return self.replies.pop(0)


@pytest.mark.parametrize("shared", [True, False])
def test_scores_over_the_wire_equal_in_process_scores_with_shared_prompts(shared: bool) -> None:
    from hosl_lightning.distributed.client import ClientSplitCausalLM, RemoteServer

    torch.manual_seed(0)
    config = dict(TINY_LLAMA)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    whole = SplitCausalLM(model, 1).eval()
    server_side = SplitCausalLM.from_halves(None, whole.server, model.config, 1)
    server = SplitServer(server_side, Wire(1, "client (rank 1)", 1.0), "hosl", ZOSettings(),
                         torch.optim.SGD(whole.server.parameters(), lr=0.0))
    client = ClientSplitCausalLM.from_halves(whole.client, None, model.config, 1).eval()
    client.remote = RemoteServer(_Loopback(server))  # type: ignore[arg-type]
    prompt = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(1))
    ids = prompt.repeat_interleave(2, dim=0)  # two one-token candidates per prompt, in its last position
    ids[:, -1] = torch.tensor([5, 9]).repeat(3)
    if not shared:
        ids[0, 2] = 11  # a row that differs before its answer: no prompt shares with it
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    expected = whole.sequence_log_likelihood(ids, torch.ones_like(ids), labels)
    got = client.sequence_log_likelihood(ids, torch.ones_like(ids), labels)
    torch.testing.assert_close(got, expected)
    sent = client.remote.traffic.bytes_up
    hidden_rows = (3 if shared else 4) * 7 * 32 * 4  # only the rows forwarded cross the cut
    assert sent >= hidden_rows and sent < hidden_rows + ids.numel() * 8 * 4


def test_seed_sync_refuses_clients_that_draw_directions_on_different_devices() -> None:
    server = _server_for_checks()
    server.expected = {"mode": "hosl", "client_sync": "seeds"}

    class _Wire:
        def __init__(self, rank: int, device: str) -> None:
            self.peer, self.peer_name, self.device, self.sent = rank, f"client (rank {rank})", device, []

        def recv(self, *_: Any) -> Message:
            return Message("hello", fields={"mode": "hosl", "client_sync": "seeds", "client_digest": "aaaa",
                                            "directions": {"direction_device": self.device, "direction_chunk": 16384}})

        def send(self, kind: str, *_: Any, **__: Any) -> None:
            self.sent.append(kind)

    server.wires = {1: _Wire(1, "cpu"), 2: _Wire(2, "cuda")}  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="the clients draw them differently"):
        server._greet()
    assert not any(w.sent for w in server.wires.values())


def test_a_scheduled_zo_lr_reaches_the_server_half_of_an_all_zo_run(model_dir: Path, tmp_path: Path) -> None:
    """zo's server half updates at the client's scheduled zo_lr: two processes end where one process does."""
    steps = 3
    torch.manual_seed(0)
    module = _module(model_dir, "zo")
    quiet_trainer(_strategy("zo", zo_lr_schedule="linear"), max_steps=steps).fit(module, datamodule=tiny_data())
    expected = {**{f"client.{k}": v for k, v in module.model.client.state_dict().items()},
                **{f"server.{k}": v for k, v in module.model.server.state_dict().items()}}
    constant = _in_process(model_dir, "zo", steps)
    assert any(not torch.equal(constant[k], expected[k]) for k in expected), "the schedule changed nothing"
    server, client = _run_pair(model_dir, tmp_path, "zo", steps, zo_lr_schedule="linear")
    assert isinstance(server, dict) and isinstance(client, dict), (server, client)
    got = {**client, **server}
    changed = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not changed, f"{len(changed)} tensors differ from the in-process run, e.g. {changed[:3]}"
