"""Client and server in separate processes (gloo on CPU): same weights as in-process, faults fail fast and clearly."""

from __future__ import annotations

import multiprocessing as mp
import socket
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import TINY_LLAMA, quiet_trainer, tiny_data
from hosl_lightning import HOSLModule, HOSLStrategy
from hosl_lightning.launch import fit
from hosl_lightning.models import deferred_weights

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
    return HOSLStrategy(cut_layer=1, mode=mode, q=2, zo_lr=1e-2, seed=3, memory_every_n_steps=0, **kwargs)


def _module(model_dir: Path, mode: str) -> HOSLModule:
    return HOSLModule(model=str(model_dir), optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))


def _in_process(model_dir: Path, mode: str, steps: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    module = _module(model_dir, mode)
    quiet_trainer(_strategy(mode), max_steps=steps).fit(module, datamodule=tiny_data())
    split = module.model
    return {**{f"client.{k}": v for k, v in split.client.state_dict().items()},
            **{f"server.{k}": v for k, v in split.server.state_dict().items()}}


def _process(rank: int, port: int, model_dir: str, mode: str, steps: int, out: str, options: dict[str, Any]) -> None:
    """One process of a distributed run; writes its half's weights (or its error) to ``out``."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        fault = options.pop("fault", None)
        with deferred_weights():
            module = _module(Path(model_dir), mode)
        strategy = _strategy(mode, transport="distributed", rank=rank, world_size=2,
                             init_method=f"tcp://127.0.0.1:{port}", **options)
        trainer = quiet_trainer(strategy, max_steps=steps)
        if fault == "client_dies" and rank == 1:
            strategy._connect()
            raise SystemExit(3)  # exits without a word after joining the group
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
        fit(trainer, module, datamodule=tiny_data())
        half = module.model.client if rank == 1 else module.model.server
        side = "client" if rank == 1 else "server"
        torch.save({f"{side}.{k}": v for k, v in half.state_dict().items()}, out)
    except BaseException as error:  # noqa: BLE001 - the parent reads what happened from the file
        Path(out).write_text(f"{type(error).__name__}: {error}\n{traceback.format_exc()}")


def _run_pair(model_dir: Path, tmp_path: Path, mode: str, steps: int, **options: Any) -> tuple[Any, Any]:
    """Run server (rank 0) and client (rank 1) as two fresh processes; returns what each left behind."""
    context = mp.get_context("spawn")
    port = _free_port()
    outs = [str(tmp_path / f"rank{rank}.out") for rank in (0, 1)]
    processes = [context.Process(target=_process, args=(rank, port, str(model_dir), mode, steps, outs[rank], dict(options)))
                 for rank in (0, 1)]
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
    return results[0], results[1]


@pytest.mark.parametrize("mode", ["hosl", "fo", "zo"])
def test_two_processes_end_with_the_in_process_weights(model_dir: Path, tmp_path: Path, mode: str) -> None:
    steps = 3
    expected = _in_process(model_dir, mode, steps)
    server, client = _run_pair(model_dir, tmp_path, mode, steps)
    assert isinstance(server, dict), server
    assert isinstance(client, dict), client
    got = {**client, **server}
    assert got.keys() == expected.keys()
    changed = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not changed, f"{mode}: {len(changed)} tensors differ from the in-process run, e.g. {changed[:3]}"
    initial = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not torch.equal(got["client.embeddings.embed_tokens.weight"], initial.model.embed_tokens.weight), "client did not train"


def test_a_client_that_dies_fails_the_server_naming_it(model_dir: Path, tmp_path: Path) -> None:
    server, _ = _run_pair(model_dir, tmp_path, "hosl", 2, fault="client_dies", timeout_s=60)
    assert isinstance(server, str) and "client (rank 1)" in server, server
    assert "hello" in server


def test_a_stalled_client_times_out_the_server(model_dir: Path, tmp_path: Path) -> None:
    server, _ = _run_pair(model_dir, tmp_path, "hosl", 2, fault="client_stalls", timeout_s=3)
    assert isinstance(server, str), server
    assert "PeerTimeout" in server and "timeout_s=3 s" in server and "client (rank 1)" in server, server


def test_nan_activations_are_rejected_by_the_server(model_dir: Path, tmp_path: Path) -> None:
    server, client = _run_pair(model_dir, tmp_path, "hosl", 2, fault="nan", timeout_s=60)
    assert isinstance(server, str) and "MalformedPayload" in server and "NaN or inf" in server, server
    assert isinstance(client, str) and "server (rank 0) failed" in client and "NaN or inf" in client, client
