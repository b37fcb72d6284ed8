"""Processes: peak memory of the client and server processes of a two-process hosl run, beside the one-process
run, and the bytes that cross the wire.

    python -m benchmarks.processes            # SmolLM2-135M, cut 2, 4 steps of batch 8 x 64
    python -m benchmarks.processes --steps 2  # quicker

The GGUF model is first saved as a safetensors directory (each process of a split run loads only its half),
then runs of the same steps follow, each in fresh processes: in-process; server (rank 0) + client (rank 1)
over gloo on loopback; and server + two clients taking turns, keeping their halves in step by seeds and by
weights. Each process reports its own peak resident memory (VmHWM), which counts
everything the process ever held: Python, torch, the libraries, the model half, the work. Last, the bytes one
weight hand-off between clients moves (``client_sync: weights`` sends the client's trainable weights), for the
full client and for LoRA clients (``HANDOFF_CLIENTS``; adapters run in-process only, so these are counted on the
cut model, not sent). Writes ``results/processes.md``. ``spawn`` is the runner the claims study measures its client processes with.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from functools import partial
from pathlib import Path

from .common.environment import RESULTS
from .common.models import SMOLLM2, SMOLLM2_SHAPE, client_weights, exported, random_batch
from .common.spawned import spawned_reports

HANDOFF_CLIENTS = {  # a client's name and its peft adapter (None: the full client), as the retired adapters study
    "full client": None,
    "LoRA r=8 on q_proj, v_proj": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
}


def _batches(steps: int, batch: int, length: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        yield random_batch(SMOLLM2_SHAPE["vocab_size"], batch, length, generator=generator)


def run_process(role: str, model_dir: str, port: int, args: dict, out: str, rank: int = 0, world_size: int = 2,
                extra: dict | None = None) -> None:
    """One process of a run: ``args`` holds steps, batch, length, cut and, optionally, the module's ``optimizer`` (a
    picklable factory; AdamW by default); ``extra``, the strategy's options. Writes its report to ``out``."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from hosl_lightning import HOSLModule, HOSLStrategy
    from hosl_lightning.lightning.launcher import fit
    from hosl_lightning.measurement import process_peak_rss_mib
    from hosl_lightning.models import deferred_weights

    imports_mib = process_peak_rss_mib()  # Python, torch, Lightning, transformers
    torch.manual_seed(0)
    data = list(_batches(args["steps"], args["batch"], args["length"]))
    options = {} if role == "in_process" else {
        "transport": "distributed", "rank": rank, "world_size": world_size,
        "init_method": f"tcp://127.0.0.1:{port}", **(extra or {}),
    }
    optimizer = args.get("optimizer", torch.optim.AdamW)
    if role == "in_process":
        module = HOSLModule(model=model_dir, optimizer=optimizer)
    else:
        with deferred_weights():
            module = HOSLModule(model=model_dir, optimizer=optimizer)
    strategy = HOSLStrategy(cut_layer=args["cut"], memory_every_n_steps=0, **options)
    trainer = L.Trainer(strategy=strategy, max_steps=args["steps"], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    started = time.perf_counter()
    fit(trainer, module, train_dataloaders=DataLoader(data, batch_size=None))
    seconds = time.perf_counter() - started
    traffic = None if role == "server" else module.model.boundary.traffic
    sync_up, sync_down = strategy.sync_bytes or (None, None)  # its final hand-off included (the logged metric misses it)
    Path(out).write_text(json.dumps({
        "sync_bytes_up": sync_up, "sync_bytes_down": sync_down,
        "role": role, "imports_mib": imports_mib, "peak_rss_mib": process_peak_rss_mib(), "seconds": seconds,
        "bytes_up_last_step": None if traffic is None else traffic.bytes_up,
        "bytes_down_last_step": None if traffic is None else traffic.bytes_down,
    }))


def spawn(roles: list[str], model_dir: str, args: dict, tmp: Path, extra: dict | None = None) -> list[dict]:
    """Run one process per role (rank = position) on a free loopback port; each one's report (``tmp``'s
    ``{role}{rank}.json``), in rank order."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    jobs = {f"{role}{rank}": partial(run_process, role, model_dir, port, args, rank=rank, world_size=len(roles),
                                     extra=extra) for rank, role in enumerate(roles)}
    return spawned_reports(jobs, f"a run of {' + '.join(roles)}", folder=tmp)


def handoff_lines(model_dir: Path, cut: int) -> list[str]:
    """The bytes one weight hand-off moves per client kind: its trainable weights, in float32."""
    from hosl_lightning import load_causal_lm

    model = load_causal_lm(str(model_dir))
    counts = {name: client_weights(model, cut, adapter) for name, adapter in HANDOFF_CLIENTS.items()}
    full = counts["full client"]
    return ["", "## Weight hand-off between clients (`client_sync: weights`)", "",
            "| client | trainable weights | bytes per hand-off (float32) | smaller than the full client |",
            "|---|---:|---:|---:|",
            *[f"| {name} | {n:,} | {4 * n:,} | {full / n:.0f}x |" for name, n in counts.items()]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--cut", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    options = parser.parse_args()
    args = {"steps": options.steps, "batch": options.batch, "length": options.length, "cut": options.cut}
    tmp = Path(options.out) / "_processes_tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    model_dir = exported(tmp / SMOLLM2)
    started = time.perf_counter()
    (alone,) = spawn(["in_process"], str(model_dir), args, tmp)
    server, client = spawn(["server", "client"], str(model_dir), args, tmp)
    clients = {}
    for sync in ("seeds", "weights"):  # two clients taking turns of 2 steps
        clients[sync] = spawn(["server", "client", "client"], str(model_dir), args, tmp,
                               {"schedule": "sequential", "client_sync": sync, "steps_per_turn": 2})[1:]
    minutes = (time.perf_counter() - started) / 60
    lines = [
        "# Process memory: a two-process hosl run beside the one-process run",
        "",
        (f"Command: `python -m benchmarks.processes --steps {options.steps}` ({minutes:.1f} min). SmolLM2-135M "
         f"(safetensors, fp32), cut after block {options.cut}, {options.steps} hosl steps of batch {options.batch} x "
         f"{options.length}, Q=1, AdamW on the server. Peak resident memory of each process (VmHWM), which "
         "includes Python, torch and the libraries."),
        "",
        "| process | holds | peak RSS (MiB) | of which imports | peak - imports | fit seconds |",
        "|---|---|---:|---:|---:|---:|",
        *[f"| {name} | {holds} | {r['peak_rss_mib']:.0f} | {r['imports_mib']:.0f} | "
          f"{r['peak_rss_mib'] - r['imports_mib']:.0f} | {r['seconds']:.1f} |"
          for name, holds, r in [("one process", "both halves", alone), ("server (rank 0)", "server half", server),
                                 ("client (rank 1)", "client half", client)]],
        "",
        (f"- Bytes per step over the wire (client's count, last step): up {client['bytes_up_last_step']}, "
         f"down {client['bytes_down_last_step']}; in-process the same step counts up {alone['bytes_up_last_step']}, "
         f"down {alone['bytes_down_last_step']}."),
        "",
        f"## Two clients taking turns (sequential split learning, turns of 2 steps, {options.steps} steps each)",
        "",
        "How much keeping the two client halves in step cost, per client, all told:",
        "",
        "| client_sync | client | sync bytes up | sync bytes down | peak RSS (MiB) |",
        "|---|---|---:|---:|---:|",
        *[f"| {sync} | rank {i + 1} | {c['sync_bytes_up']:,} | {c['sync_bytes_down']:,} | {c['peak_rss_mib']:.0f} |"
          for sync, pair in clients.items() for i, c in enumerate(pair)],
        "",
        "- `of which imports`: the peak after importing Python, torch, Lightning and transformers, before the model.",
        "- The client's one message down per step is 4 bytes larger than in-process: the step's loss, for its log.",
        f"- Python {sys.version.split()[0]}.",
        *handoff_lines(model_dir, options.cut),
    ]
    (Path(options.out) / "processes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
