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
import sys
import time
from pathlib import Path

import torch

from hosl_lightning import SplitCausalLM, load_causal_lm
from hosl_lightning.steps import ZOSettings, fo_step, hosl_step
from hosl_lightning.zo import ZOSGD

SMOLLM2_SHAPE = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                     num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                     max_position_embeddings=2048)


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


def time_steps(mode: str, settings: ZOSettings, batch: dict, cut: int, layers: int, repeats: int) -> float:
    split, zo, optimizer = build(mode, cut, layers)
    seconds = []
    for step in range(repeats + 1):
        started = time.perf_counter()
        if mode == "hosl":
            assert zo is not None
            hosl_step(split, batch, zo, settings, step, lambda loss: loss.backward())
        else:
            fo_step(split, batch, lambda loss: loss.backward())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step warms up allocators and kernels
            seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="6 blocks instead of 30, 2 repeats (a smoke run)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--cut", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    layers, repeats = (6, 2) if args.quick else (SMOLLM2_SHAPE["num_hidden_layers"], args.repeats)
    ids = torch.randint(0, SMOLLM2_SHAPE["vocab_size"], (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]  # a classification prompt: one answer token per sequence
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    rows: list[dict] = []
    plan = [("fo", 1, True)] + [("hosl", q, batched) for q in (1, 4, 8) for batched in (True, False)]
    for index, (mode, q, batched) in enumerate(plan, 1):
        seconds = time_steps(mode, ZOSettings(queries=q, batch_probes=batched), batch, args.cut, layers, repeats)
        rows.append({"mode": mode, "q": q, "server_probes": "batched" if batched else "one at a time",
                     "sec_per_step": round(seconds, 4), "steps_per_sec": round(1 / seconds, 4)})
        print(f"[{index}/{len(plan)}] {mode} q={q} {rows[-1]['server_probes']}: {seconds:.3f} s/step", flush=True)

    def sec(mode: str, q: int, batched: bool) -> float:
        label = "batched" if batched else "one at a time"
        return next(r["sec_per_step"] for r in rows if r["mode"] == mode and r["q"] == q and r["server_probes"] == label)

    batching_gain = sec("hosl", 8, False) / sec("hosl", 8, True)
    hosl_vs_fo = sec("hosl", 1, True) / sec("fo", 1, True)
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "speed.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    command = "python benchmarks/speed.py" + (" --quick" if args.quick else "")
    lines = [
        "# Speed: hosl vs fo, batched vs one-at-a-time server probes",
        "",
        f"Command: `{command}`. Machine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, Python {sys.version.split()[0]}.",
        f"Model: SmolLM2-135M shape ({layers} blocks, random weights), cut after block {args.cut}, "
        f"batch {args.batch} x {args.seq} tokens, one answer token per sequence; median of {repeats} steps "
        "after a warm-up step; AdamW on the first-order side.",
        "",
        "| mode | Q | server probes | s/step | steps/s |",
        "|---|---|---|---|---|",
        *[f"| {r['mode']} | {r['q']} | {r['server_probes']} | {r['sec_per_step']:.3f} | {r['steps_per_sec']:.3f} |"
          for r in rows],
        "",
        f"- Batched vs one at a time at Q=8: {batching_gain:.2f}x faster (target >= 1.5x): "
        f"{'met' if batching_gain >= 1.5 else 'NOT met'}.",
        f"- hosl step time / fo step time at Q=1: {hosl_vs_fo:.2f} (target <= 1.2): "
        f"{'met' if hosl_vs_fo <= 1.2 else 'NOT met'}.",
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
        axis.plot(qs, [sec("hosl", q, batched) for q in qs], marker=marker,
                  label=f"hosl, probes {'batched' if batched else 'one at a time'}")
    axis.axhline(sec("fo", 1, True), color="gray", linestyle="--", label="fo")
    axis.set_xlabel("queries Q")
    axis.set_ylabel("seconds per step")
    axis.set_title(f"Step time, {layers}-block SmolLM2 shape, batch {args.batch}x{args.seq}, cut {args.cut}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(args.out / "speed.png", dpi=120)


if __name__ == "__main__":
    main()
