"""The frontier: what a client costs in memory, time and bytes, by how it trains, at every cut (issue 39, item 3).

    python -m benchmarks.frontier                          # 6 client options x cuts 1, 2, 4, 8, 16, 24
    python -m benchmarks.frontier --cuts 2 --steps 1       # a check: one cut, one step
    python -m benchmarks.frontier --no-rss                 # without the two-process runs (client RSS)
    python -m benchmarks.frontier --budget-min 60          # start no new record after 60 minutes
    python -m benchmarks.frontier --report-only            # rebuild frontier.md / .csv from the cache

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
  ``--rss-steps`` steps (``benchmarks.processes.spawn``, as the claims study's; the model exported once as
  safetensors to ``results/_processes_tmp/``, so each process loads only its half), which also counts Python and
  the libraries.

Client options: fo (AdamW, as today); fo + ``client_checkpointing``; fo + checkpointing + ``fused_client_update``
with plain SGD (the token-embedding table's gradient then is row-sparse) and with AdamW; hosl (the library's
default client); frozen. The module's optimizer is the option's (fo trains both halves with it; hosl and frozen
train the server with it). Memory does not depend on the learning rate, nor on the weights' values.

Each (option, cut) is one record in ``results/frontier/`` (with its commit and date), so a later sitting adds
what is missing; ``results/frontier.md`` and ``frontier.csv`` are rebuilt from them, with a verdict on each of
issue 39's targets. Timings depend on the machine's load: each record keeps the load average it started under.
"""

from __future__ import annotations

import copy
import csv
import json
import statistics
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from hosl_lightning import HOSLModule, HOSLStrategy, SplitCausalLM, load_causal_lm
from hosl_lightning.measurement import MIB, measure_client_step
from hosl_lightning.modes import MODES

from .common.cache import digest, load_cache, save, sitting_parser
from .common.environment import RESULTS, code_state, command_line, load_average, machine, quiet_lightning
from .common.memory import measure_client
from .common.models import SMOLLM2, SMOLLM2_SHAPE, exported, random_batch
from .common.spawned import spawned_reports
from .processes import spawn

CUTS = (1, 2, 4, 8, 16, 24)
BATCH, LENGTH = 8, 64
STEPS = 3  # of each timed fit: the first warms up, the others are timed
RSS_STEPS = 2
CACHE = RESULTS / "frontier"
# issue 39's targets
FROZEN_FLOOR = ("frozen", 1.05)  # frozen's client peak within 1.05x the floor, at every cut
FROZEN_STEP = ("frozen", "hosl (default client)", 2, 0.75)  # frozen's step at most 0.75x hosl's at cut 2
TARGET = ("fo + checkpointing + fused SGD", 2, 1.5)  # client peak within 1.5x the floor at cut 2


@dataclass(frozen=True)
class FrontierOption:
    """One row of the frontier: the mode, the module's optimizer (fo's client optimizer; the server's otherwise)
    and fo's memory options. Every other option is the library's default. Its fields are part of a record's key
    (not the memory study's ``common.memory.ClientOption``, whose options are hosl's)."""

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
    FrontierOption("fo (AdamW)", "fo"),
    FrontierOption("fo + checkpointing", "fo", client_checkpointing=True),
    FrontierOption("fo + checkpointing + fused SGD", "fo", client_optimizer="sgd", client_checkpointing=True,
                   fused_client_update=True),
    FrontierOption("fo + checkpointing + fused AdamW", "fo", client_checkpointing=True, fused_client_update=True),
    FrontierOption("hosl (default client)", "hosl"),
    FrontierOption("frozen", "frozen"),
)


def module_optimizer(name: str) -> Any:
    """The module's optimizer by name (picklable, for the two-process runs); the rates are placeholders (memory
    and time do not depend on them)."""
    return {"adamw": partial(torch.optim.AdamW, lr=1e-5), "sgd": partial(torch.optim.SGD, lr=1e-3)}[name]


def random_tokens() -> dict[str, torch.Tensor]:
    """Random tokens, no padding, one label per row (the last position, as a prompt's label word)."""
    return random_batch(SMOLLM2_SHAPE["vocab_size"], BATCH, LENGTH)


def key(choice: FrontierOption | None, cut: int, steps: int) -> str:
    """A record's file stem. Records from earlier sittings are found by it: change nothing it hashes."""
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


def measure_peak(base: Any, choice: FrontierOption | None, cut: int) -> dict[str, int]:
    """The client's tracker peak over two steps of ``choice`` (its own optimizer step, fused or not, is the
    client's work), or its inference floor for None, by category at the peak."""
    split = SplitCausalLM(copy.deepcopy(base), cut)
    if choice is None:
        return asdict(measure_client(split, random_tokens(), None))
    return asdict(measure_client_step(split, random_tokens(), choice.mode,  # type: ignore[arg-type]
                                      client_optimizer=module_optimizer(choice.client_optimizer),
                                      client_checkpointing=choice.client_checkpointing,
                                      fused_client_update=choice.fused_client_update))


def measure_costs(base: Any, choice: FrontierOption, cut: int, steps: int) -> dict[str, Any]:
    """An in-process fit of ``steps`` steps with the option, unmeasured: each half's seconds a step and the bytes."""
    module = HOSLModule(model=copy.deepcopy(base), optimizer=module_optimizer(choice.client_optimizer))
    recorder = StepRecorder()
    strategy = HOSLStrategy(cut_layer=cut, memory_every_n_steps=0, **choice.strategy_options())
    trainer = L.Trainer(strategy=strategy, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[recorder])
    trainer.fit(module, train_dataloaders=DataLoader([random_tokens()] * steps, batch_size=None))
    timed = recorder.steps[1:] or recorder.steps  # the first step warms up allocators and kernels
    return {"per_step": recorder.steps, "timed_first_step": len(recorder.steps) == 1,
            "client_sec": statistics.median(s["client_sec"] for s in timed),
            "server_sec": statistics.median(s["server_sec"] for s in timed),
            "bytes_up": recorder.steps[-1]["bytes_up"], "bytes_down": recorder.steps[-1]["bytes_down"]}


def measure_rss(choice: FrontierOption, cut: int, model_dir: Path, steps: int) -> dict[str, Any]:
    """Peak resident memory of the client process (and its server) of a two-process run of ``steps`` steps."""
    args = {"steps": steps, "batch": BATCH, "length": LENGTH, "cut": cut,
            "optimizer": module_optimizer(choice.client_optimizer)}
    server, client = spawn(["server", "client"], str(model_dir), args, model_dir.parent, choice.strategy_options())
    return {"client_rss_mib": client["peak_rss_mib"], "client_imports_mib": client["imports_mib"],
            "server_rss_mib": server["peak_rss_mib"], "rss_steps": steps}


def measure_in_child(choice: FrontierOption | None, cut: int, steps: int, out: str, model: str | dict) -> None:
    """The client's peak and, for an option, its in-process costs, in a process of their own: the Trainers and
    memory trackers of a long sitting otherwise pile up in one process (20 GiB by cut 2, then the OOM killer)."""
    quiet_lightning()
    base = (load_causal_lm(model) if isinstance(model, str) else load_causal_lm(model_config=model)).eval()
    result: dict[str, Any] = {"client": measure_peak(base, choice, cut)}
    if choice is not None:
        result |= measure_costs(base, choice, cut, steps)
    Path(out).write_text(json.dumps(result))


def measured(choice: FrontierOption | None, cut: int, steps: int, model: str | dict) -> dict[str, Any]:
    """``measure_in_child``'s result, from a spawned process that exits when done. ``model``: a name for
    ``load_causal_lm``, or a config dict (the tests' tiny model)."""
    (result,) = spawned_reports({"measured": partial(measure_in_child, choice, cut, steps, model=model)},
                                f"measuring {choice.name if choice else 'the floor'} at cut {cut}")
    return result


def run(cuts: tuple[int, ...], choices: tuple[FrontierOption, ...], steps: int, rss: bool, rss_steps: int,
        budget_min: float, model: str | dict = SMOLLM2) -> None:
    """Measure every (option, cut) not in the cache, the floor of each cut first; start none after ``budget_min``.
    Each record is measured in fresh processes, so one record's leftovers cannot move the next one's figures."""
    cache = load_cache(CACHE)
    code = code_state()
    started_sitting = time.perf_counter()
    for cut in cuts:
        for choice in [c for c in (None, *choices) if key(c, cut, steps) not in cache]:
            if (time.perf_counter() - started_sitting) / 60 > budget_min:
                print(f"budget of {budget_min:g} min spent; stopping", flush=True)
                return
            started = time.perf_counter()
            record: dict[str, Any] = {"choice": None if choice is None else asdict(choice), "cut": cut, "batch": BATCH,
                                      "length": LENGTH, "steps": steps, "commit": code,
                                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                      "load_before": load_average()}
            record |= measured(choice, cut, steps, model)
            if choice is not None and rss:
                record |= measure_rss(choice, cut, exported(RESULTS / "_processes_tmp" / SMOLLM2), rss_steps)
            record["seconds"] = time.perf_counter() - started
            save(key(choice, cut, steps), record, CACHE)
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


def margin(value: float, bound: float) -> str:
    """``value`` against an upper ``bound``: met or missed, and by how much."""
    if value <= bound:
        return f"met, {bound - value:.2f} under the bound"
    return f"**missed**, {value - bound:.2f} over the bound ({value / bound - 1:.0%})"


def verdicts(table: list[dict[str, Any]]) -> list[str]:
    """Issue 39's targets, each judged from the records: a line each, saying met or missed and by how much."""
    by = {(r["option"], r["cut"]): r for r in table}
    lines = []
    name, bound = FROZEN_FLOOR
    frozen = [r for r in table if r["option"] == name]
    if not frozen:
        lines.append(f"- **{name} within {bound}x of the floor at every cut**: not measured yet.")
    else:
        worst = max(frozen, key=lambda r: r["over_floor"])
        within = sum(r["over_floor"] <= bound for r in frozen)
        missing = [c for c in CUTS if (name, c) not in by]
        lines.append(f"- **{name} within {bound}x of the floor at every cut**: within at {within} of {len(frozen)} "
                     f"cuts measured; the worst, {worst['over_floor']:.2f}x at cut {worst['cut']}: "
                     f"{margin(worst['over_floor'], bound)}"
                     + (f" (not measured yet at cut{'s' * (len(missing) > 1)} {', '.join(map(str, missing))})"
                        if missing else "") + ".")
    name, other, cut, bound = FROZEN_STEP
    fast, slow = by.get((name, cut)), by.get((other, cut))
    if fast is None or slow is None:
        lines.append(f"- **{name}'s step at most {bound}x {other}'s at cut {cut}**: not measured yet.")
    else:
        seconds = [r["client_sec"] + r["server_sec"] for r in (fast, slow)]
        ratio = seconds[0] / seconds[1]
        where = (f"both at {fast['commit']}" if fast["commit"] == slow["commit"] else
                 f"at different commits: {name} {fast['commit']}, {other} {slow['commit']}")
        warm = " (a fit of one step: its warm-up was timed)" if fast["timed_first_step"] or slow["timed_first_step"] \
            else ""
        lines.append(f"- **{name}'s step (client s + server s) at most {bound}x {other}'s at cut {cut}**: "
                     f"{seconds[0]:.2f} s against {seconds[1]:.2f} s, {ratio:.2f}x: {margin(ratio, bound)}; "
                     f"{where}, 1-min load {fast['load'].split()[0]} and {slow['load'].split()[0]}{warm}.")
    name, cut, bound = TARGET
    hit = by.get((name, cut))
    lines.append(f"- **{name} within {bound}x of the floor at cut {cut}**: "
                 + ("not measured yet." if hit is None else f"{hit['over_floor']:.2f}x: "
                                                            f"{margin(hit['over_floor'], bound)}."))
    return lines


def pivot(table: list[dict[str, Any]]) -> list[str]:
    """The client peak over the floor with options as rows and cuts as columns ("-": not measured)."""
    cuts = sorted({r["cut"] for r in table})
    order = {c.name: i for i, c in enumerate(OPTIONS)}
    names = sorted({r["option"] for r in table}, key=lambda n: (order.get(n, len(order)), n))
    cell = {(r["option"], r["cut"]): r["over_floor"] for r in table}
    return ["| client option | " + " | ".join(f"cut {c}" for c in cuts) + " |",
            "|---|" + "---:|" * len(cuts),
            *[f"| {n} | " + " | ".join("-" if (n, c) not in cell else f"{cell[(n, c)]:.2f}" for c in cuts) + " |"
              for n in names]]


def report(cache: dict[str, dict[str, Any]], command: str, out: Path) -> None:
    """Write ``frontier.md`` and ``frontier.csv`` to ``out`` from the records."""
    table = rows(cache)
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
        "Targets (issue 39):",
        "",
        *verdicts(table),
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
    lines += ["", "Floors (MiB): " + ", ".join(f"cut {c}: {f:.1f}" for c, f in floors), "",
              "Client peak over the floor, by option and cut:", "", *pivot(table), ""]
    (out / "frontier.md").write_text("\n".join(lines))
    print(f"wrote {out / 'frontier.md'} and frontier.csv")


def main(argv: list[str] | None = None) -> None:
    parser = sitting_parser(__doc__, unit="record")
    parser.add_argument("--cuts", type=int, nargs="+", default=list(CUTS))
    parser.add_argument("--options", nargs="+", default=None, help="client options by name (default: all)")
    parser.add_argument("--steps", type=int, default=STEPS, help="steps of each timed in-process fit")
    parser.add_argument("--rss-steps", type=int, default=RSS_STEPS)
    parser.add_argument("--no-rss", action="store_true", help="skip the two-process runs")
    args = parser.parse_args(argv)
    choices = tuple(c for c in OPTIONS if (args.options is None or c.name in args.options) and c.mode in MODES)
    if not args.report_only:
        quiet_lightning()
        run(tuple(args.cuts), choices, args.steps, not args.no_rss, args.rss_steps, args.budget_min)
    report(load_cache(CACHE), command_line("frontier", argv), args.out)


if __name__ == "__main__":
    main()
