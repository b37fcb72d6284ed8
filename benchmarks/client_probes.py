"""The zeroth-order client's own cost: probe forwards, the update and peak memory, per client option.

    python benchmarks/client_probes.py [--repeats 15] [--out benchmarks/results]

Issue 20, item 2. On SmolLM2-135M's shape (random weights: cost does not depend on their values), cut after
block 2, batch 8 x 64 tokens, 2 torch threads, everything in one process so the ratios compare like with like:

- ``plain forward``: one no-grad client forward of the batch, the yardstick;
- ``probes``: the client's share of a step's probes (perturbing, drawing directions, forwards) for each option:
  dense or sparse embedding directions, the two signs of a query one after the other or paired in one forward
  (``pair_probes``), and FZOO's one-sided probes; reported per probe as a ratio to the plain forward;
- ``update``: the client's ZO update from one step's estimate;
- ``peak``: the client's peak memory over two hosl steps (tracker), as a ratio to the inference floor.

Targets (issue 20): probe time at most 1.5x a plain forward per probe, an update that costs the rows it touches,
and the client's peak within 1.25x the floor. Writes ``client_probes.md`` and ``client_probes.csv``.
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import code_state

from hosl_lightning import SplitCausalLM, load_causal_lm
from hosl_lightning.core.zo import ZOSGD
from hosl_lightning.measurement.standalone import measure_client_inference, measure_client_step
from hosl_lightning.modes import ClientContext, StepInputs, ZOSettings
from hosl_lightning.modes.base import send_probes
from hosl_lightning.zo_optimizers import build_zo_optimizer, zo_optimizer_spec

SMOLLM2_SHAPE = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                 "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                 "tie_word_embeddings": True, "max_position_embeddings": 2048}
CUT, BATCH, LENGTH, LAYERS = 2, 8, 64, 4  # blocks past the cut only matter to the server: 4 keep it quick


@dataclass(frozen=True)
class Option:
    name: str
    optimizer: str = "zo_sgd"
    embedding_directions: str = "dense"
    pair_probes: bool = False
    queries: int = 1
    direction: str = "gaussian"

    def settings(self) -> ZOSettings:
        estimator = zo_optimizer_spec(self.optimizer)[0].estimator
        return ZOSettings(queries=self.queries, estimator=estimator, pair_probes=self.pair_probes)

    def build(self, named: list[tuple[str, Any]]) -> ZOSGD:
        return build_zo_optimizer(self.optimizer, named, lr=0.0, direction=self.direction,
                                  embedding_directions=self.embedding_directions)


OPTIONS = (
    Option("zo_sgd, dense, one at a time (the paper's)"),
    Option("zo_sgd, dense, paired", pair_probes=True),
    Option("zo_sgd, sparse, one at a time", embedding_directions="sparse"),
    Option("zo_sgd, sparse, paired", embedding_directions="sparse", pair_probes=True),
    Option("zo_sgd, sparse, one at a time, rademacher", embedding_directions="sparse", direction="rademacher"),
    Option("zo_sgd, sparse, paired, rademacher", embedding_directions="sparse", pair_probes=True,
           direction="rademacher"),
    Option("fzoo (Q=2), sparse, rademacher", optimizer="fzoo", embedding_directions="sparse", queries=2,
           direction="rademacher"),
    Option("zo_momentum, sparse, paired", optimizer="zo_momentum", embedding_directions="sparse", pair_probes=True),
)


class _Discard:
    """A link that runs the client's forwards and drops their activations: the client's share alone."""

    def start(self, *args: Any) -> None: ...

    def up(self, forward: Callable[[], Any], **fields: Any) -> None:
        forward()


def _model(frozen: bool = True) -> SplitCausalLM:
    """The model; ``frozen``: no gradients anywhere (timing the client), else the server trains (memory)."""
    torch.manual_seed(0)
    split = SplitCausalLM(load_causal_lm(model_config=dict(SMOLLM2_SHAPE, num_hidden_layers=LAYERS)), CUT).eval()
    for p in split.parameters() if frozen else split.client.parameters():
        p.requires_grad_(False)
    return split


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    split = _model()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SMOLLM2_SHAPE["vocab_size"], (BATCH, LENGTH), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    inputs = StepInputs.of(batch)
    def forward() -> None:
        with torch.no_grad():
            split.client_forward(ids, batch["attention_mask"])

    # Every timed thing runs once per round, round after round, so drift on a shared machine hits all alike;
    # each ratio is taken within a round, and the medians over rounds are reported.
    timed: dict[str, Callable[[], Any]] = {"plain": forward}
    setups = []
    for option in OPTIONS:
        optimizer = option.build(list(split.client.named_parameters()))
        settings = option.settings()
        context = ClientContext(split, settings, 0, optimizer)
        timed[f"probe {option.name}"] = lambda c=context: send_probes(c, _Discard(), inputs)  # type: ignore[arg-type]
        timed[f"update {option.name}"] = lambda o=optimizer, q=option.queries: o.step(
            estimate=o.estimate(0, torch.full((q,), 0.1)))
        setups.append((option, settings, optimizer))
    times: dict[str, list[float]] = {name: [] for name in timed}
    for round_index in range(args.repeats + 1):
        for name, run in timed.items():
            start = time.perf_counter()
            run()  # a probe before its update: a sparse direction's rows come from its step's probes
            if round_index:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    plain = statistics.median(times["plain"])
    floor = None if args.no_memory else measure_client_inference(split, batch).peak
    rows = []
    for option, settings, _optimizer in setups:
        probes = len(settings.points())
        probe_s = statistics.median(times[f"probe {option.name}"])
        ratio = statistics.median(p / probes / f for p, f in zip(times[f"probe {option.name}"], times["plain"]))
        update_s = statistics.median(times[f"update {option.name}"])
        peak = None
        if floor is not None:
            peak = measure_client_step(_model(frozen=False), batch, "hosl", settings, zo_optimizer=option.build).peak
        rows.append({
            "option": option.name, "probes": probes, "probe_s": probe_s, "per_probe_vs_plain": ratio,
            "update_s": update_s, "peak_mib": None if peak is None else peak / 2**20,
            "peak_vs_floor": None if peak is None or not floor else peak / floor,
        })
        print(f"{option.name}: {probe_s:.3f} s for {probes} probes ({ratio:.2f}x a plain forward each), update "
              f"{update_s:.3f} s" + ("" if peak is None else f", peak {peak / 2**20:.1f} MiB"), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "client_probes.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _write_markdown(args.out / "client_probes.md", rows, plain, floor, args)
    return 0


def _write_markdown(path: Path, rows: list[dict[str, Any]], plain: float, floor: float | None,
                    args: argparse.Namespace) -> None:
    lines = [
        "# The zeroth-order client's cost: probes, update, peak memory",
        "",
        (f"Command: `python benchmarks/client_probes.py --repeats {args.repeats}`. Machine: {platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, Python {platform.python_version()}. "
        f"Code: {code_state()}."),
        f"Model: SmolLM2-135M's shape (random weights), cut after block {CUT}, batch {BATCH} x {LENGTH} tokens; "
        f"{args.repeats} rounds after a warm-up round, each timing every option once (medians; the ratio to a plain "
        f"forward is taken within each round). A plain no-grad client forward: {plain:.3f} s."
        + ("" if floor is None else f" The client's inference floor: {floor / 2**20:.1f} MiB."),
        "",
        "| option | probes | probe s | per probe / plain forward | update s | peak MiB | peak / floor |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        peak = "" if row["peak_mib"] is None else f"{row['peak_mib']:.1f}"
        ratio = "" if row["peak_vs_floor"] is None else f"{row['peak_vs_floor']:.2f}"
        lines.append(f"| {row['option']} | {row['probes']} | {row['probe_s']:.3f} | {row['per_probe_vs_plain']:.2f} "
                     f"| {row['update_s']:.3f} | {peak} | {ratio} |")
    best = min(rows, key=lambda r: r["per_probe_vs_plain"])
    dense = rows[0]
    sparse = next(r for r in rows if r["option"].startswith("zo_sgd, sparse, paired"))
    lines += [
        "",
        (f"- Probe time per probe, best option ({best['option']}): {best['per_probe_vs_plain']:.2f}x a plain forward "
        f"(target <= 1.5x): {'met' if best['per_probe_vs_plain'] <= 1.5 else 'NOT met'}. The paper's dense, "
        f"one-at-a-time probes: {dense['per_probe_vs_plain']:.2f}x."),
        (f"- Update: {sparse['update_s']:.3f} s with sparse embedding directions against {dense['update_s']:.3f} s "
        f"dense ({dense['update_s'] / max(sparse['update_s'], 1e-9):.1f}x less): the sparse update draws the rows the "
        "batch read, not the 49,152-row table."),
    ]
    if floor is not None:
        worst = max((r for r in rows if not r["option"].startswith("zo_momentum")), key=lambda r: r["peak_vs_floor"])
        single = max((r for r in rows if "paired" not in r["option"] and not r["option"].startswith("zo_momentum")),
                     key=lambda r: r["peak_vs_floor"])
        lines.append(f"- Peak memory, stateless options: at most {worst['peak_vs_floor']:.2f}x the floor ({worst['option']}; "
                     f"target <= 1.25x): {'met' if worst['peak_vs_floor'] <= 1.25 else 'NOT met'}. Paired probes hold "
                     f"the activations of a doubled batch; one at a time, at most {single['peak_vs_floor']:.2f}x. ZO "
                     "momentum keeps one buffer the size of the client's weights, so it sits one weight copy above.")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
