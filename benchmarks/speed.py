"""Speed by option, Q and batch: seconds per training step of fo and of hosl with each client option, batched vs
one-at-a-time probe losses, and the zeroth-order client's own cost (probes and update) per client option.

    python -m benchmarks.speed [--quick] [--out benchmarks/results] [--no-client]

Everything runs in one process, on the same model, batch and seed, so the ratios compare like with like.
The model has SmolLM2-135M's shape (Llama, 30 blocks, hidden 576, vocab 49152) with random weights:
speed does not depend on the weight values, and no download or package is needed.

- **Steps** (``step_plan``): each row (a ``ClientOption`` with its Q and probe batching, at a batch size) is timed
  over ``--repeats`` steps after one warm-up step and reported as the median. A new option is one line.
- **The client** (issue 20, item 2; ``CLIENT_OPTIONS``), on a 4-block model cut after block 2 (blocks past the cut
  only matter to the server): for each client option, the client's share of a step's probes (perturbing, drawing
  directions, forwarding) per probe as a ratio to a plain no-grad client forward, and its update. Every option is
  timed once per round, for ``--client-repeats`` rounds after a warm-up, so drift on a shared machine hits all of
  them alike; each ratio is taken within a round. Targets: probe time at most 1.5x a plain forward per probe, and an
  update that costs the rows it touches. The client's peak per option is the memory study's.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hosl_lightning import SplitCausalLM
from hosl_lightning.core.zo import ZOSGD
from hosl_lightning.modes import ClientContext, StepInputs
from hosl_lightning.modes.base import send_probes
from hosl_lightning.modes.in_process import fo_step, hosl_step

from .common.environment import RESULTS, code_state, command_line, machine
from .common.memory import CLIENT_OPTIONS, ClientOption
from .common.models import SMOLLM2_SHAPE, random_batch, smollm2_shaped
from .common.plotting import pyplot

FO = ClientOption("fo", "fo")
CLIENT_CUT, CLIENT_BATCH, CLIENT_LENGTH, CLIENT_LAYERS = 2, 8, 64, 4


def step_plan(batch: int, small_batch: int) -> list[tuple[ClientOption, int]]:
    """The step-time rows: (option, batch). fo; the paper's hosl at Q 1, 4 and 8, its probe losses batched and one
    at a time, at ``batch`` and at Q=8 at ``small_batch``; then hosl with each other client option at ``batch``."""
    def hosl(q: int, batched: bool) -> ClientOption:
        return ClientOption("hosl", queries=q, batch_probes=batched)

    return ([(FO, batch)] + [(hosl(q, batched), batch) for q in (1, 4, 8) for batched in (True, False)]
            + [(hosl(8, batched), small_batch) for batched in (True, False)]
            + [(option, batch) for option in CLIENT_OPTIONS[1:]])


def build(option: ClientOption, cut: int, layers: int) -> tuple[SplitCausalLM, ZOSGD | None, torch.optim.Optimizer]:
    split = SplitCausalLM(smollm2_shaped(layers), cut).eval()
    zo = None
    if option.mode == "hosl":
        for p in split.client.parameters():
            p.requires_grad_(False)
        zo = option.build(list(split.client.named_parameters()), lr=1e-6)
    first_order = torch.optim.AdamW([p for p in split.parameters() if p.requires_grad], lr=1e-5)
    return split, zo, first_order


PHASES = ("client forward", "server forward", "backward", "zo update", "first-order update")


class PhaseClock:
    """Wall time per phase of a step, by wrapping the calls that make up each phase."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)

    def wrap(self, owner: object, name: str, phase: str) -> None:
        call = getattr(owner, name)

        def timed(*args, **kwargs):  # type: ignore[no-untyped-def]
            started = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - started

        setattr(owner, name, timed)


def time_steps(option: ClientOption, batch: dict, cut: int, layers: int,
               repeats: int) -> tuple[float, dict[str, float]]:
    """Median seconds per step over ``repeats`` steps after a warm-up, and the mean seconds per phase."""
    split, zo, optimizer = build(option, cut, layers)
    mode, settings = option.mode, option.settings()
    clock = PhaseClock()
    clock.wrap(split.client, "forward", "client forward")
    clock.wrap(split.server, "forward", "server forward")
    clock.wrap(optimizer, "step", "first-order update")
    if zo is not None:
        clock.wrap(zo, "step", "zo update")

    def backward(loss: torch.Tensor) -> None:
        started = time.perf_counter()
        loss.backward()
        clock.seconds["backward"] += time.perf_counter() - started

    seconds = []
    for step in range(repeats + 1):
        if step == 1:  # the first step warms up allocators and kernels
            clock.seconds = dict.fromkeys(PHASES, 0.0)
        started = time.perf_counter()
        if mode == "hosl":
            assert zo is not None
            hosl_step(split, batch, zo, settings, step, backward)
        else:
            fo_step(split, batch, backward)  # the client's backward runs inside fo_step, after the server's
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), {phase: value / repeats for phase, value in clock.seconds.items()}


class _Discard:
    """A link that runs the client's forwards and drops their activations: the client's share alone."""

    def start(self, *args: Any) -> None: ...

    def up(self, forward: Callable[[], Any], **fields: Any) -> None:
        forward()


def client_costs(repeats: int) -> tuple[list[dict[str, Any]], float]:
    """Per client option: the client's probe seconds (and per probe, as a ratio to a plain no-grad forward, taken
    within each round) and its update seconds; and the plain forward's seconds. Medians over ``repeats`` rounds."""
    split = SplitCausalLM(smollm2_shaped(CLIENT_LAYERS), CLIENT_CUT).eval()
    split.requires_grad_(False)
    batch = random_batch(SMOLLM2_SHAPE["vocab_size"], CLIENT_BATCH, CLIENT_LENGTH, labels="all")
    inputs = StepInputs.of(batch)

    def forward() -> None:
        with torch.no_grad():
            split.client_forward(batch["input_ids"], batch["attention_mask"])

    timed: dict[str, Callable[[], Any]] = {"plain": forward}
    for option in CLIENT_OPTIONS:
        optimizer = option.build(list(split.client.named_parameters()))
        context = ClientContext(split, option.settings(), 0, optimizer)
        timed[f"probe {option.name}"] = lambda c=context: send_probes(c, _Discard(), inputs)  # type: ignore[arg-type]
        timed[f"update {option.name}"] = lambda o=optimizer, q=option.queries: o.step(
            estimate=o.estimate(0, torch.full((q,), 0.1)))
    times: dict[str, list[float]] = {name: [] for name in timed}
    for round_index in range(repeats + 1):
        for name, run in timed.items():
            start = time.perf_counter()
            run()  # a probe before its update: a sparse direction's rows come from its step's probes
            if round_index:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    rows = []
    for option in CLIENT_OPTIONS:
        probes = len(option.settings().points())
        probe_times = times[f"probe {option.name}"]
        rows.append({"option": option.name, "probes": probes, "probe_s": statistics.median(probe_times),
                     "per_probe_vs_plain": statistics.median(p / probes / f for p, f in zip(probe_times, times["plain"])),
                     "update_s": statistics.median(times[f"update {option.name}"])})
    return rows, statistics.median(times["plain"])


def client_lines(rows: list[dict[str, Any]], plain: float, repeats: int) -> list[str]:
    lines = ["", "## The zeroth-order client's cost: probes and update", "",
             (f"SmolLM2-135M's shape (random weights, {CLIENT_LAYERS} blocks), cut after block {CLIENT_CUT}, batch "
              f"{CLIENT_BATCH} x {CLIENT_LENGTH} tokens; {repeats} rounds after a warm-up round, each timing every "
              "option once (medians; the ratio to a plain forward is taken within each round). A plain no-grad client "
              f"forward: {plain:.3f} s. The client's peak per option: the memory study."), "",
             "| option | probes | probe s | per probe / plain forward | update s |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['option']} | {r['probes']} | {r['probe_s']:.3f} | {r['per_probe_vs_plain']:.2f} | "
              f"{r['update_s']:.3f} |" for r in rows]
    best = min(rows, key=lambda r: r["per_probe_vs_plain"])
    dense = rows[0]
    sparse = next(r for r in rows if r["option"].startswith("zo_sgd, sparse, paired"))
    return lines + [
        "",
        (f"- Probe time per probe, best option ({best['option']}): {best['per_probe_vs_plain']:.2f}x a plain forward "
         f"(target <= 1.5x): {'met' if best['per_probe_vs_plain'] <= 1.5 else 'NOT met'}. The paper's dense, "
         f"one-at-a-time probes: {dense['per_probe_vs_plain']:.2f}x."),
        (f"- Update: {sparse['update_s']:.3f} s with sparse embedding directions against {dense['update_s']:.3f} s "
         f"dense ({dense['update_s'] / max(sparse['update_s'], 1e-9):.1f}x less): the sparse update draws the rows "
         "the batch read, not the 49,152-row table."),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="6 blocks instead of 30, 2 repeats, 2 client rounds (a smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--small-batch", type=int, default=2, help="a second batch size for the batching comparison")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--cut", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--client-repeats", type=int, default=15, help="rounds of the client's probes and update")
    parser.add_argument("--no-client", action="store_true", help="time the steps only")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    started = time.perf_counter()
    layers, repeats = (6, 2) if args.quick else (SMOLLM2_SHAPE["num_hidden_layers"], args.repeats)
    client_repeats = 2 if args.quick else args.client_repeats
    code = code_state()

    rows: list[dict] = []
    plan = step_plan(args.batch, args.small_batch)
    for index, (option, size) in enumerate(plan, 1):
        seconds, phases = time_steps(option, random_batch(SMOLLM2_SHAPE["vocab_size"], size, args.seq), args.cut,
                                     layers, repeats)
        rows.append({"mode": option.mode, "option": option.name, "batch": size, "q": option.queries,
                     "server_probes": "batched" if option.batch_probes else "one at a time",
                     "sec_per_step": round(seconds, 4), "steps_per_sec": round(1 / seconds, 4),
                     **{phase: round(value, 4) for phase, value in phases.items()}})
        print(f"[{index}/{len(plan)}] {option.name} batch={size} q={option.queries} {rows[-1]['server_probes']}: "
              f"{seconds:.3f} s/step ({', '.join(f'{k} {v:.2f}' for k, v in phases.items())})", flush=True)

    def sec(option: str, q: int, batched: bool, size: int = args.batch) -> float:
        label = "batched" if batched else "one at a time"
        return next(r["sec_per_step"] for r in rows
                    if r["option"] == option and r["q"] == q and r["server_probes"] == label and r["batch"] == size)

    def phase(option: str, name: str) -> float:
        return next(r[name] for r in rows if r["option"] == option and r["q"] == 1 and r["batch"] == args.batch
                    and r["server_probes"] == "batched")

    batching_gain = sec("hosl", 8, False) / sec("hosl", 8, True)
    small_gain = sec("hosl", 8, False, args.small_batch) / sec("hosl", 8, True, args.small_batch)
    hosl_vs_fo = sec("hosl", 1, True) / sec("fo", 1, True)
    # hosl must run the server forward twice (L+ and L-) where fo runs it once; with everything else equal
    # that alone bounds the ratio from below
    server_bound = (sec("fo", 1, True) + phase("hosl", "server forward") / 2) / sec("fo", 1, True)
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "speed.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    client: list[str] = []
    if not args.no_client:
        client_rows, plain = client_costs(client_repeats)
        client = client_lines(client_rows, plain, client_repeats)
        with (args.out / "speed_client.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(client_rows[0]))
            writer.writeheader()
            writer.writerows(client_rows)
    elapsed = time.perf_counter() - started
    lines = [
        "# Speed: hosl vs fo, batched vs one-at-a-time server probes, client options",
        "",
        (f"Command: `{command_line('speed', argv)}` ({elapsed / 60:.1f} min). Machine: {machine()}. Code: {code}."),
        (f"Model: SmolLM2-135M shape ({layers} blocks, random weights), cut after block {args.cut}, "
         f"sequences of {args.seq} tokens, one answer token per sequence; median of {repeats} steps "
         "after a warm-up step; AdamW on the first-order side. Phases are mean seconds per step; `backward` is the "
         "server's (fo's client backward is in the step total only)."),
        "",
        "| option | batch | Q | server probes | s/step | steps/s | " + " | ".join(PHASES) + " |",
        "|---|---:|---:|---|---:|---:|" + "---:|" * len(PHASES),
        *[f"| {r['option']} | {r['batch']} | {r['q']} | {r['server_probes']} | {r['sec_per_step']:.3f} | "
          f"{r['steps_per_sec']:.3f} | " + " | ".join(f"{r[p]:.3f}" for p in PHASES) + " |" for r in rows],
        "",
        (f"- Batched vs one at a time at Q=8, batch {args.batch}: {batching_gain:.2f}x faster (target >= 1.5x): "
         f"{'met' if batching_gain >= 1.5 else 'NOT met'}. At batch {args.small_batch}: {small_gain:.2f}x."),
        (f"- hosl step time / fo step time at Q=1: {hosl_vs_fo:.2f} (target <= 1.2): "
         f"{'met' if hosl_vs_fo <= 1.2 else 'NOT met'}. The second server forward alone (hosl's L- point, "
         f"{phase('hosl', 'server forward') / 2:.2f} s) puts a floor of {server_bound:.2f} under this ratio."),
        *client,
    ]
    (args.out / "speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plt = pyplot()
    if plt is None:
        return
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for batched, marker in ((True, "o"), (False, "s")):
        qs = [1, 4, 8]
        axis.plot(qs, [sec("hosl", q, batched) for q in qs], marker=marker,  # at the main batch size
                  label=f"hosl, probes {'batched' if batched else 'one at a time'}")
    axis.axhline(sec("fo", 1, True), color="gray", linestyle="--", label="fo")
    axis.set_xlabel("queries Q")
    axis.set_ylabel("seconds per step")
    axis.set_title(f"Step time, {layers}-block SmolLM2 shape, batch {args.batch}x{args.seq}, cut {args.cut}",
                   fontsize=9)
    axis.legend()
    figure.tight_layout()
    figure.savefig(args.out / "speed.png", dpi=120)


if __name__ == "__main__":
    main()
