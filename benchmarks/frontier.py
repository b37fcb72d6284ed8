"""The frontier: what a client costs in memory, time and bytes, by how it trains, at every cut (issue 39, item 3).

    python benchmarks/frontier.py                          # 6 client options x cuts 1, 2, 4, 8, 16, 24
    python benchmarks/frontier.py --cuts 2 --steps 1       # a check: one cut, one step
    python benchmarks/frontier.py --no-rss                 # without the two-process runs (client RSS)
    python benchmarks/frontier.py --report-only            # rebuild frontier.md / .csv from the cache

A stand-alone module that imports only the library (the benchmarks package, ``python -m benchmarks.<study>``, with
its shared memory, model and process code, is not on main yet: move it there when it is).

SmolLM2-135M-Instruct (``load_causal_lm("smollm2-135m")``), batch 8 x 64 random tokens (one label per row, the
last position, as a prompt's label word). For each cut and each client option:

- **client peak** (``hosl_lightning.measurement.measure_client_step``: torch's tracker, measured, not estimated)
  over two steps of the option (the second holds any optimizer state; the client's own optimizer
  step, fused into its backward pass or not, counts as the client's), and its ratio to the **inference floor**
  (the client's weights plus one no-grad forward);
- **client and server seconds per step**: an in-process ``trainer.fit`` of ``--steps`` steps with the option,
  unmeasured, and the strategy's ``hosl/client_sec`` and ``hosl/server_sec`` (each half's share of a step's wall
  time; fo's one optimizer step over both halves counts as the client's), the median of the steps after the first
  (or the first, marked, when a fit has one step);
- **bytes up and down** per step across the cut (``hosl/bytes_up``, ``hosl/bytes_down``);
- **client process RSS**: the peak resident memory (VmHWM) of the client process of a two-process run of
  ``--rss-steps`` steps (the model saved once as safetensors, so each process loads only its half), which also
  counts Python and the libraries.

Client options: fo (AdamW, as today); fo + ``client_checkpointing``; fo + checkpointing + ``fused_client_update``
with plain SGD (the token-embedding table's gradient then is row-sparse) and with AdamW; hosl (the library's
default client); frozen. The module's optimizer is the option's (fo trains both halves with it; hosl and frozen
train the server with it). Memory does not depend on the learning rate, nor on the weights' values.

Each (option, cut) is one record in ``results/frontier/`` (with its commit and date), so a later sitting adds
what is missing; ``results/frontier.md`` and ``frontier.csv`` are rebuilt from them. Timings depend on the
machine's load: the report says how loaded it was.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import multiprocessing as mp
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from hosl_lightning import HOSLModule, HOSLStrategy, SplitCausalLM, load_causal_lm
from hosl_lightning.measurement import MIB, measure_client_inference, measure_client_step
from hosl_lightning.modes import MODES

CUTS = (1, 2, 4, 8, 16, 24)
BATCH, LENGTH = 8, 64
STEPS = 3  # of each timed fit: the first warms up, the others are timed
RSS_STEPS = 2
TARGET = ("fo + checkpointing + fused SGD", 2, 1.5)  # issue 39: client peak <= 1.5x the floor at cut 2
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CACHE = RESULTS / "frontier"
SMOLLM2 = "smollm2-135m"
VOCAB, LAYERS = 49152, 30  # SmolLM2-135M's


@dataclass(frozen=True)
class ClientOption:
    """One row of the frontier: the mode, the module's optimizer (fo's client optimizer; the server's otherwise)
    and fo's memory options. Every other option is the library's default."""

    name: str
    mode: str
    client_optimizer: str = "adamw"
    client_checkpointing: bool = False
    fused_client_update: bool = False

    def strategy_options(self) -> dict[str, Any]:
        if self.mode != "fo":
            return {"mode": self.mode}
        return {"mode": self.mode, "client_checkpointing": self.client_checkpointing,
                "fused_client_update": self.fused_client_update}


OPTIONS = (  # the frontier's rows: how the client trains
    ClientOption("fo (AdamW)", "fo"),
    ClientOption("fo + checkpointing", "fo", client_checkpointing=True),
    ClientOption("fo + checkpointing + fused SGD", "fo", client_optimizer="sgd", client_checkpointing=True,
                 fused_client_update=True),
    ClientOption("fo + checkpointing + fused AdamW", "fo", client_checkpointing=True, fused_client_update=True),
    ClientOption("hosl (default client)", "hosl"),
    ClientOption("frozen", "frozen"),
)


def module_optimizer(name: str) -> Any:
    """The module's optimizer by name; the rates are placeholders (memory and time do not depend on them)."""
    return {"adamw": partial(torch.optim.AdamW, lr=1e-5), "sgd": partial(torch.optim.SGD, lr=1e-3)}[name]


def random_batch() -> dict[str, torch.Tensor]:
    """Random tokens, no padding, one label per row (the last position, as a prompt's label word)."""
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def digest(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def load_cache() -> dict[str, dict[str, Any]]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(CACHE.glob("*.json"))} if CACHE.exists() else {}


def save(key: str, record: dict[str, Any]) -> None:
    """One record, written whole or not at all."""
    CACHE.mkdir(parents=True, exist_ok=True)
    temporary = CACHE / f"{key}.tmp"
    temporary.write_text(json.dumps(record, indent=1))
    temporary.replace(CACHE / f"{key}.json")


def code_state() -> str:
    try:
        return "commit " + subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                          text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    import transformers

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, lightning {L.__version__}")


def key(choice: ClientOption | None, cut: int, steps: int) -> str:
    fields = {"choice": None if choice is None else asdict(choice), "cut": cut, "batch": BATCH, "length": LENGTH,
              "steps": steps}
    name = "floor" if choice is None else choice.name.replace(" ", "").replace("+", "_").replace("(", "-").replace(")", "")
    return f"{name}-cut{cut}-{digest(fields)}"


class StepRecorder(L.Callback):
    """Each step's logged cost: seconds per half and bytes each way."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        metrics = trainer.callback_metrics
        self.steps.append({name: float(metrics[f"hosl/{name}"])
                           for name in ("client_sec", "server_sec", "bytes_up", "bytes_down")})


def measure_peak(base: Any, choice: ClientOption | None, cut: int) -> dict[str, int]:
    """The client's tracker peak over two steps of ``choice`` (its own optimizer step, fused or not, is the
    client's work), or its inference floor for None, by category at the peak."""
    split = SplitCausalLM(copy.deepcopy(base), cut)
    if choice is None:
        return asdict(measure_client_inference(split, random_batch()))
    return asdict(measure_client_step(split, random_batch(), choice.mode,  # type: ignore[arg-type]
                                      client_optimizer=module_optimizer(choice.client_optimizer),
                                      client_checkpointing=choice.client_checkpointing,
                                      fused_client_update=choice.fused_client_update))


def measure_costs(base: Any, choice: ClientOption, cut: int, steps: int) -> dict[str, Any]:
    """An in-process fit of ``steps`` steps with the option, unmeasured: each half's seconds a step and the bytes."""
    batch = random_batch()
    module = HOSLModule(model=copy.deepcopy(base), optimizer=module_optimizer(choice.client_optimizer))
    recorder = StepRecorder()
    strategy = HOSLStrategy(cut_layer=cut, memory_every_n_steps=0, **choice.strategy_options())
    trainer = L.Trainer(strategy=strategy, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[recorder])
    trainer.fit(module, train_dataloaders=DataLoader([batch] * steps, batch_size=None))
    timed = recorder.steps[1:] or recorder.steps  # the first step warms up allocators and kernels
    return {"per_step": recorder.steps, "timed_first_step": len(recorder.steps) == 1,
            "client_sec": statistics.median(s["client_sec"] for s in timed),
            "server_sec": statistics.median(s["server_sec"] for s in timed),
            "bytes_up": recorder.steps[-1]["bytes_up"], "bytes_down": recorder.steps[-1]["bytes_down"]}


def client_process(role: str, rank: int, port: int, model_dir: str, choice: ClientOption, cut: int, steps: int,
                   out: str) -> None:
    """One process of a two-process run (rank 0 the server, 1 the client); writes its peak RSS to ``out``."""
    from hosl_lightning.lightning.launcher import fit
    from hosl_lightning.measurement import process_peak_rss_mib
    from hosl_lightning.models import deferred_weights

    imports_mib = process_peak_rss_mib()  # Python, torch, Lightning, transformers
    with deferred_weights():
        module = HOSLModule(model=model_dir, optimizer=module_optimizer(choice.client_optimizer))
    strategy = HOSLStrategy(cut_layer=cut, memory_every_n_steps=0, transport="distributed", rank=rank, world_size=2,
                            init_method=f"tcp://127.0.0.1:{port}", **choice.strategy_options())
    trainer = L.Trainer(strategy=strategy, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    fit(trainer, module, train_dataloaders=DataLoader([random_batch()] * steps, batch_size=None))
    Path(out).write_text(json.dumps({"role": role, "peak_rss_mib": process_peak_rss_mib(), "imports_mib": imports_mib}))


def measure_rss(choice: ClientOption, cut: int, model_dir: Path, steps: int) -> dict[str, Any]:
    """Peak resident memory of the client process (and its server) of a two-process run."""
    context = mp.get_context("spawn")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    outs = [model_dir.parent / f"{role}.json" for role in ("server", "client")]
    processes = [context.Process(target=client_process, args=(role, rank, port, str(model_dir), choice, cut, steps,
                                                              str(out)))
                 for rank, (role, out) in enumerate(zip(("server", "client"), outs))]
    for process in processes:
        process.start()
    for process in processes:
        process.join(1800)
        if process.exitcode != 0:
            raise SystemExit(f"a process of the two-process run failed (exit code {process.exitcode})")
    server, client = (json.loads(out.read_text()) for out in outs)
    return {"client_rss_mib": client["peak_rss_mib"], "client_imports_mib": client["imports_mib"],
            "server_rss_mib": server["peak_rss_mib"]}


def prepare_model(directory: Path) -> Path:
    """SmolLM2-135M as safetensors (made once), so that each process of a split run loads only its half."""
    if not (directory / "model.safetensors").exists():
        from hosl_lightning.models import export_model

        export_model(load_causal_lm(SMOLLM2), directory)
    return directory


def load_average() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} logical cores"


def run(cuts: tuple[int, ...], choices: tuple[ClientOption, ...], steps: int, rss: bool, rss_steps: int) -> None:
    cache = load_cache()
    code = code_state()
    base = None
    for cut in cuts:
        todo = [c for c in (None, *choices) if key(c, cut, steps) not in cache]
        if not todo:
            continue
        if base is None:
            base = load_causal_lm(SMOLLM2).eval()
        for choice in todo:
            started = time.perf_counter()
            record: dict[str, Any] = {"choice": None if choice is None else asdict(choice), "cut": cut, "batch": BATCH,
                                      "length": LENGTH, "steps": steps, "commit": code,
                                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                      "load_before": load_average()}
            record["client"] = measure_peak(base, choice, cut)
            if choice is not None:
                record |= measure_costs(base, choice, cut, steps)
                if rss:
                    model_dir = prepare_model(RESULTS / "_frontier_tmp" / "smollm2")
                    record |= measure_rss(choice, cut, model_dir, rss_steps) | {"rss_steps": rss_steps}
            record["seconds"] = time.perf_counter() - started
            save(key(choice, cut, steps), record)
            cache[key(choice, cut, steps)] = record
            name = "floor" if choice is None else choice.name
            print(f"cut {cut} {name}: client peak {record['client']['peak'] / MIB:.1f} MiB "
                  f"({record['seconds']:.0f} s)", flush=True)


def rows(cache: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest record of each (option, cut), with its ratio to the floor of the same cut and steps."""
    floors = {(r["cut"], r["steps"]): r for r in cache.values() if r["choice"] is None}
    newest: dict[tuple[str, int], dict[str, Any]] = {}
    for record in sorted(cache.values(), key=lambda r: r["date"]):
        if record["choice"] is not None and (record["cut"], record["steps"]) in floors:
            newest[(record["choice"]["name"], record["cut"])] = record
    order = {c.name: i for i, c in enumerate(OPTIONS)}
    out = []
    for (name, cut), record in sorted(newest.items(), key=lambda item: (item[0][1], order.get(item[0][0], 99))):
        floor = floors[(cut, record["steps"])]["client"]["peak"]
        out.append({"cut": cut, "option": name, "peak_mib": record["client"]["peak"] / MIB,
                    "floor_mib": floor / MIB, "over_floor": record["client"]["peak"] / floor,
                    **{f"{k}_mib": record["client"][k] / MIB for k in ("params", "grads", "optimizer_state",
                                                                         "activations", "temporaries")},
                    "client_rss_mib": record.get("client_rss_mib"), "client_sec": record["client_sec"],
                    "server_sec": record["server_sec"], "timed_first_step": record["timed_first_step"],
                    "bytes_up": int(record["bytes_up"]), "bytes_down": int(record["bytes_down"]),
                    "steps": record["steps"],
                    "commit": record["commit"], "date": record["date"], "load": record["load_before"]})
    return out


def report(command: str, out: Path) -> None:
    table = rows(load_cache())
    if not table:
        print("nothing measured yet")
        return
    out.mkdir(parents=True, exist_ok=True)
    with (out / "frontier.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)

    def number(value: float | None, digits: int = 0) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    name, cut, bound = TARGET
    hit = [r for r in table if r["option"] == name and r["cut"] == cut]
    verdict = ("not measured yet" if not hit else
               f"{hit[0]['over_floor']:.2f}x: {'met' if hit[0]['over_floor'] <= bound else '**missed**'}")
    lines = [
        "# The frontier: client memory, time and bytes by how the client trains",
        "",
        f"Generated by `{command}`. Machine: {machine()}. Each row's commit, date and the machine's load average when",
        "it started are in `frontier.csv`: memory figures do not depend on load, timings do (these were taken on a",
        "shared machine unless the load says otherwise).",
        "",
        (f"SmolLM2-135M-Instruct, batch {BATCH} x {LENGTH} random tokens. Peak: the client's tracker peak over two "
         "steps (`measure_client_step`); floor: its weights plus one no-grad forward; RSS: the client "
         "process's peak resident memory in a two-process run (Python and the libraries included). Seconds: the "
         "median of each half's share of a step after the first (`*`: of the first, a warm-up). Bytes: one "
         "step across the cut."),
        "",
        f"Target (issue 39): {name} at cut {cut} within {bound}x of the floor: {verdict}.",
        "",
        ("| cut | client option | peak MiB | x floor | grads | opt. state | activ. | temp. | client RSS MiB | "
         "client s | server s | bytes up | bytes down |"),
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        star = "*" if r["timed_first_step"] else ""
        lines.append(f"| {r['cut']} | {r['option']} | {r['peak_mib']:.1f} | {r['over_floor']:.2f} | "
                     f"{r['grads_mib']:.1f} | {r['optimizer_state_mib']:.1f} | {r['activations_mib']:.1f} | "
                     f"{r['temporaries_mib']:.1f} | {number(r['client_rss_mib'])} | {r['client_sec']:.2f}{star} | "
                     f"{r['server_sec']:.2f}{star} | {r['bytes_up']} | {r['bytes_down']} |")
    floors = sorted({(r["cut"], r["floor_mib"]) for r in table})
    lines += ["", "Floors (MiB): " + ", ".join(f"cut {c}: {f:.1f}" for c, f in floors), ""]
    (out / "frontier.md").write_text("\n".join(lines))
    print(f"wrote {out / 'frontier.md'} and frontier.csv")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuts", type=int, nargs="+", default=list(CUTS))
    parser.add_argument("--options", nargs="+", default=None, help="client options by name (default: all)")
    parser.add_argument("--steps", type=int, default=STEPS, help="steps of each timed in-process fit")
    parser.add_argument("--rss-steps", type=int, default=RSS_STEPS)
    parser.add_argument("--no-rss", action="store_true", help="skip the two-process runs")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    choices = tuple(c for c in OPTIONS if (args.options is None or c.name in args.options) and c.mode in MODES)
    if not args.report_only:
        run(tuple(args.cuts), choices, args.steps, not args.no_rss, args.rss_steps)
    report("python benchmarks/frontier.py" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:])), args.out)


if __name__ == "__main__":
    main()
