"""Speed study: seconds per training step of hosl vs fo, and batched vs one-at-a-time probe losses.

    python benchmarks/speed.py [--quick] [--out benchmarks/results]

Everything runs in one process, on the same model, batch and seed, so the ratios compare like with like.
The model has SmolLM2-135M's shape (Llama, 30 blocks, hidden 576, vocab 49152) with random weights:
speed does not depend on the weight values, and no download or package is needed. Each setting is timed
over ``--repeats`` steps after one warm-up step and reported as the median.
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from hosl_lightning import SplitCausalLM, load_causal_lm
from hosl_lightning.core.zo import ZOSGD
from hosl_lightning.modes import ZOSettings
from hosl_lightning.modes.in_process import fo_step, hosl_step

SMOLLM2_SHAPE = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True,
                     "max_position_embeddings": 2048}


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def build(mode: str, cut: int, layers: int) -> tuple[SplitCausalLM, ZOSGD | None, torch.optim.Optimizer]:
    torch.manual_seed(0)
    split = SplitCausalLM(load_causal_lm(model_config=dict(SMOLLM2_SHAPE, num_hidden_layers=layers)), cut).eval()
    zo = None
    if mode == "hosl":
        for p in split.client.parameters():
            p.requires_grad_(False)
        zo = ZOSGD(split.client.named_parameters(), lr=1e-6)
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


def time_steps(mode: str, settings: ZOSettings, batch: dict, cut: int, layers: int,
               repeats: int) -> tuple[float, dict[str, float]]:
    """Median seconds per step over ``repeats`` steps after a warm-up, and the mean seconds per phase."""
    split, zo, optimizer = build(mode, cut, layers)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="6 blocks instead of 30, 2 repeats (a smoke run)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--small-batch", type=int, default=2, help="a second batch size for the batching comparison")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--cut", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    started = time.perf_counter()
    layers, repeats = (6, 2) if args.quick else (SMOLLM2_SHAPE["num_hidden_layers"], args.repeats)

    def make_batch(size: int) -> dict:
        ids = torch.randint(0, SMOLLM2_SHAPE["vocab_size"], (size, args.seq), generator=torch.Generator().manual_seed(0))
        labels = torch.full_like(ids, -100)
        labels[:, -1] = ids[:, -1]  # a classification prompt: one answer token per sequence
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    rows: list[dict] = []
    plan = [("fo", args.batch, 1, True)] + [("hosl", args.batch, q, batched) for q in (1, 4, 8) for batched in (True, False)]
    plan += [("hosl", args.small_batch, 8, batched) for batched in (True, False)]
    for index, (mode, size, q, batched) in enumerate(plan, 1):
        settings = ZOSettings(queries=q, batch_probes=batched)
        seconds, phases = time_steps(mode, settings, make_batch(size), args.cut, layers, repeats)
        rows.append({"mode": mode, "batch": size, "q": q, "server_probes": "batched" if batched else "one at a time",
                     "sec_per_step": round(seconds, 4), "steps_per_sec": round(1 / seconds, 4),
                     **{phase: round(value, 4) for phase, value in phases.items()}})
        print(f"[{index}/{len(plan)}] {mode} batch={size} q={q} {rows[-1]['server_probes']}: {seconds:.3f} s/step "
              f"({', '.join(f'{k} {v:.2f}' for k, v in phases.items())})", flush=True)

    def sec(mode: str, q: int, batched: bool, size: int = args.batch) -> float:
        label = "batched" if batched else "one at a time"
        return next(r["sec_per_step"] for r in rows
                    if r["mode"] == mode and r["q"] == q and r["server_probes"] == label and r["batch"] == size)

    def phase(mode: str, name: str) -> float:
        return next(r[name] for r in rows if r["mode"] == mode and r["q"] == 1 and r["batch"] == args.batch
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
    command = "python benchmarks/speed.py" + (" --quick" if args.quick else "")
    elapsed = time.perf_counter() - started
    lines = [
        "# Speed: hosl vs fo, batched vs one-at-a-time server probes",
        "",
        (f"Command: `{command}` ({elapsed / 60:.1f} min). Machine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, Python {sys.version.split()[0]}. "
        f"Code: commit {_commit()}."),
        (f"Model: SmolLM2-135M shape ({layers} blocks, random weights), cut after block {args.cut}, "
        f"sequences of {args.seq} tokens, one answer token per sequence; median of {repeats} steps "
        "after a warm-up step; AdamW on the first-order side. Phases are mean seconds per step; `backward` is the "
        "server's (fo's client backward is in the step total only)."),
        "",
        "| mode | batch | Q | server probes | s/step | steps/s | " + " | ".join(PHASES) + " |",
        "|---|---:|---:|---|---:|---:|" + "---:|" * len(PHASES),
        *[f"| {r['mode']} | {r['batch']} | {r['q']} | {r['server_probes']} | {r['sec_per_step']:.3f} | "
          f"{r['steps_per_sec']:.3f} | " + " | ".join(f"{r[p]:.3f}" for p in PHASES) + " |" for r in rows],
        "",
        (f"- Batched vs one at a time at Q=8, batch {args.batch}: {batching_gain:.2f}x faster (target >= 1.5x): "
        f"{'met' if batching_gain >= 1.5 else 'NOT met'}. At batch {args.small_batch}: {small_gain:.2f}x."),
        (f"- hosl step time / fo step time at Q=1: {hosl_vs_fo:.2f} (target <= 1.2): "
        f"{'met' if hosl_vs_fo <= 1.2 else 'NOT met'}. The second server forward alone (hosl's L- point, "
        f"{phase('hosl', 'server forward') / 2:.2f} s) puts a floor of {server_bound:.2f} under this ratio."),
    ]
    (args.out / "speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
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
