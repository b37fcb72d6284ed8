"""The GPU check: what CI (no GPU) never exercises, in one short run on one CUDA device.

    pytest -m gpu tests/test_gpu.py     # on a machine with a GPU: also writes benchmarks/results/gpu_check.md
    HOSL_GPU_CHECK_DEVICE=cpu pytest -m gpu tests/test_gpu.py   # a dry run of the same checks on CPU (no file)

Without CUDA (and without the dry-run variable) every test here is skipped. Each check is one test, and its line,
PASS or FAIL with its numbers, goes into ``gpu_check.md``:

1. memory: per-side peaks from the CUDA allocator counters equal the CPU tracker's, for hosl and fo
   (the same step measured both ways on the same model);
2. cpu client, cuda server: a hosl step with the halves on different devices ends with the weights of the
   same step with both halves on the CPU (the device-to-host copies of losses are blocking);
3. nccl: a two-process hosl run (server rank 0, client rank 1) over NCCL on the one GPU ends with the
   weights of the in-process run;
4. bf16-mixed: three hosl steps under precision='bf16-mixed' train both halves and stay finite;
5. batched probes: server time of Q=8 probes in one batched forward against one at a time, as a ratio.

Sized to finish in well under 8 minutes on an H100/H200: a 4-block model of hidden 256, batch 16 x 64.
"""

from __future__ import annotations

import copy
import multiprocessing as mp
import os
import socket
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import quiet_trainer, tiny_data

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "benchmarks" / "results" / "gpu_check.md"
DEVICE = os.environ.get("HOSL_GPU_CHECK_DEVICE", "cuda")  # "cpu": a dry run of the checks' logic
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                                  reason="needs a CUDA device (HOSL_GPU_CHECK_DEVICE=cpu: a dry run)")]
CONFIG = dict(model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128)
BATCH, LENGTH, STEPS = 16, 64, 3


def _model():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = dict(CONFIG)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))


def _batch(device: str = "cpu") -> dict[str, torch.Tensor]:
    ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": ids.to(device)}


def _hosl_split(client_device: str, server_device: str):
    from hosl_lightning import SplitCausalLM
    from hosl_lightning.core.zo import ZOSGD

    split = SplitCausalLM(_model(), 2)
    split.place(torch.device(client_device), torch.device(server_device))
    split.client.requires_grad_(False)
    return split, ZOSGD(split.client.named_parameters(), lr=1e-3, seed=1)


def check_memory(device: str) -> str:
    from hosl_lightning.measurement import SideSwitch, StepMemoryMeter
    from hosl_lightning.modes import ZOSettings
    from hosl_lightning.modes.in_process import hosl_step

    peaks = {}
    for method in ("tracker", "cuda"):
        if method == "cuda" and device != "cuda":
            peaks[method] = peaks["tracker"]  # the dry run has no allocator counters to compare
            continue
        split, zo = _hosl_split(device, device)
        server = torch.optim.AdamW(split.server.parameters())
        switch = SideSwitch()
        switch.install(split)
        batch = _batch(device)
        for step in range(2):  # the second step holds the optimizer state, as every later one does
            meter = StepMemoryMeter(split, switch, [server, zo], method=method)
            with meter:
                hosl_step(split, batch, zo, ZOSettings(queries=2), step, lambda loss: loss.backward())
                with switch.enter("server"):
                    server.step()
                    server.zero_grad(set_to_none=True)
        report = meter.report(1, "hosl")
        peaks[method] = (report.client.peak, report.server.peak)
    (ct, st), (cc, sc) = peaks["tracker"], peaks["cuda"]
    close = all(abs(a - b) <= 0.05 * max(a, b) for a, b in ((ct, cc), (st, sc)))
    return (f"{'PASS' if close else 'FAIL'} memory: client peak tracker {ct / 2**20:.1f} MiB vs cuda {cc / 2**20:.1f} MiB; "
            f"server {st / 2**20:.1f} vs {sc / 2**20:.1f} MiB (within 5%)")


def check_cpu_client_cuda_server(device: str) -> str:
    from hosl_lightning.modes import ZOSettings
    from hosl_lightning.modes.in_process import hosl_step

    results = []
    for server_device in ("cpu", device):
        split, zo = _hosl_split("cpu", server_device)
        losses = hosl_step(split, _batch("cpu"), zo, ZOSettings(queries=2), 0, lambda loss: loss.backward())
        results.append((losses.estimate.coefficients.cpu(), copy.deepcopy(split.client.state_dict())))
    (c1, w1), (c2, w2) = results
    coefficient_gap = float((c1 - c2).abs().max())
    weight_gap = max(float((w1[k] - w2[k].cpu()).abs().max()) for k in w1)
    ok = coefficient_gap < 1e-2 * max(float(c1.abs().max()), 1e-6) and weight_gap < 1e-5
    return (f"{'PASS' if ok else 'FAIL'} cpu client + {device} server: projected gradients differ by {coefficient_gap:.2e}, "
            f"client weights by {weight_gap:.2e} from an all-CPU step")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _nccl_process(rank: int, port: int, model_dir: str, backend: str, out: str) -> None:
    try:
        from hosl_lightning import HOSLModule, HOSLStrategy
        from hosl_lightning.models import deferred_weights

        torch.manual_seed(0)
        with deferred_weights():
            module = HOSLModule(model=model_dir)
        device = "cuda:0" if backend == "nccl" else "cpu"
        strategy = HOSLStrategy(cut_layer=2, q=2, zo_lr=1e-3, seed=3, memory_every_n_steps=0, transport="distributed",
                                rank=rank, world_size=2, backend=backend, init_method=f"tcp://127.0.0.1:{port}",
                                client_device=device, server_device=device)
        quiet_trainer(strategy, max_steps=STEPS, accelerator="gpu" if backend == "nccl" else "cpu").fit(
            module, datamodule=tiny_data(vocab_size=CONFIG["vocab_size"], seq_len=LENGTH, batch_size=BATCH,
                                         train_size=BATCH * STEPS))
        half = module.model.client if rank else module.model.server
        torch.save({f"{'client' if rank else 'server'}.{k}": v.cpu() for k, v in half.state_dict().items()}, out)
    except BaseException:  # noqa: BLE001 - the parent reads what happened from the file
        Path(out).write_text(traceback.format_exc())


def check_nccl(device: str, work: Path) -> str:
    from hosl_lightning import HOSLModule, HOSLStrategy
    from hosl_lightning.models import export_model

    model_dir = work / "model"
    export_model(_model(), model_dir)
    backend = "nccl" if device == "cuda" else "gloo"
    torch.manual_seed(0)
    module = HOSLModule(model=str(model_dir))
    quiet_trainer(HOSLStrategy(cut_layer=2, q=2, zo_lr=1e-3, seed=3, memory_every_n_steps=0,
                               client_device=device if device == "cuda" else "cpu",
                               server_device=device if device == "cuda" else "cpu"),
                  max_steps=STEPS, accelerator="gpu" if device == "cuda" else "cpu").fit(
        module, datamodule=tiny_data(vocab_size=CONFIG["vocab_size"], seq_len=LENGTH, batch_size=BATCH,
                                     train_size=BATCH * STEPS))
    expected = {**{f"client.{k}": v.cpu() for k, v in module.model.client.state_dict().items()},
                **{f"server.{k}": v.cpu() for k, v in module.model.server.state_dict().items()}}
    port, context = _free_port(), mp.get_context("spawn")
    outs = [str(work / f"rank{r}.pt") for r in range(2)]
    processes = [context.Process(target=_nccl_process, args=(r, port, str(model_dir), backend, outs[r])) for r in range(2)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(300)
    got: dict[str, torch.Tensor] = {}
    for out in outs:
        if not Path(out).exists() or Path(out).read_bytes()[:2] != b"PK":
            return f"FAIL {backend}: a process failed: {Path(out).read_text()[-600:] if Path(out).exists() else 'no output'}"
        got.update(torch.load(out, weights_only=True))
    gap = max(float((got[k] - expected[k]).abs().max()) for k in expected)
    exact = all(torch.equal(got[k], expected[k]) for k in expected)
    return f"{'PASS' if gap < 1e-5 else 'FAIL'} {backend} two processes vs in-process: bitwise {exact}, largest gap {gap:.2e}"


def check_bf16_mixed(device: str) -> str:
    from hosl_lightning import HOSLModule, HOSLStrategy

    module = HOSLModule(model_config=dict(CONFIG))
    embedding, head = module.model.model.embed_tokens.weight, module.model.lm_head.weight  # the halves keep these
    before = {"client": embedding.detach().clone(), "server": head.detach().clone()}
    trainer = quiet_trainer(HOSLStrategy(cut_layer=2, q=2, zo_lr=1e-3, memory_every_n_steps=0), max_steps=STEPS,
                            precision="bf16-mixed", accelerator="gpu" if device == "cuda" else "cpu")
    trainer.fit(module, datamodule=tiny_data(vocab_size=CONFIG["vocab_size"], seq_len=LENGTH, batch_size=BATCH,
                                             train_size=BATCH * STEPS))
    split = trainer.strategy.split_model
    moved = {"client": not torch.equal(embedding.detach().cpu(), before["client"].cpu()),
             "server": not torch.equal(head.detach().cpu(), before["server"].cpu())}
    finite = all(bool(torch.isfinite(p).all()) for p in split.parameters())
    loss = float(trainer.callback_metrics["train_loss"])
    dtypes = {str(p.dtype) for p in split.client.parameters()}
    ok = finite and dtypes == {"torch.float32"} and all(moved.values())
    return (f"{'PASS' if ok else 'FAIL'} bf16-mixed hosl: {STEPS} steps, last loss {loss:.4f}, all weights finite "
            f"{finite}, client weights {sorted(dtypes)} (ZO needs float32), halves moved {moved}")


def check_batched_probes(device: str) -> str:
    from hosl_lightning.modes import ZOSettings
    from hosl_lightning.modes.in_process import in_process_step

    times = {}
    for batched in (True, False, True, False):
        split, zo = _hosl_split(device, device)
        settings = ZOSettings(queries=8, batch_probes=batched)
        batch = _batch(device)
        in_process_step(split, "hosl", batch, settings, 0, lambda loss: loss.backward(), zo)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for step in range(1, 4):
            in_process_step(split, "hosl", batch, settings, step, lambda loss: loss.backward(), zo)
        if device == "cuda":
            torch.cuda.synchronize()
        times.setdefault(batched, []).append((time.perf_counter() - start) / 3)
    batched_s, looped_s = min(times[True]), min(times[False])
    return (f"PASS batched probes, Q=8: {batched_s * 1e3:.1f} ms per step batched, {looped_s * 1e3:.1f} ms one at a time "
            f"(one at a time / batched = {looped_s / batched_s:.2f}x)")


LINES: list[str] = []  # each check's line, in order, for the report


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    """After the module's checks on a GPU, write their lines to ``benchmarks/results/gpu_check.md``."""
    LINES.clear()
    yield
    if DEVICE == "cuda" and LINES:
        header = (f"# GPU check\n\n`pytest -m gpu tests/test_gpu.py` on {torch.cuda.get_device_name(0)}, "
                  f"torch {torch.__version__}.\n\n")
        REPORT.write_text(header + "\n".join(LINES) + "\n")


def _checked(check: object, *args: object) -> None:
    """Run one check, keep its line for the report (a raised error becomes a FAIL line), assert it passed."""
    start = time.perf_counter()
    try:
        line = check(*args)  # type: ignore[operator]
    except Exception as error:  # noqa: BLE001 - the report keeps what failed
        line = f"FAIL {getattr(check, '__name__', 'check')}: {type(error).__name__}: {error}"
    LINES.append(f"- {line} ({time.perf_counter() - start:.1f} s)")
    print(LINES[-1], flush=True)
    assert line.startswith("PASS"), line


def test_memory() -> None:
    _checked(check_memory, DEVICE)


def test_cpu_client_cuda_server() -> None:
    _checked(check_cpu_client_cuda_server, DEVICE)


def test_nccl(tmp_path: Path) -> None:
    _checked(check_nccl, DEVICE, tmp_path)


def test_bf16_mixed() -> None:
    _checked(check_bf16_mixed, DEVICE)


def test_batched_probes() -> None:
    _checked(check_batched_probes, DEVICE)
