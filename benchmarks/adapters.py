"""Parameter-efficient HOSL: full client weights vs LoRA on the client (and on the server), SmolLM2-135M.

    python benchmarks/adapters.py           # the study (~25 minutes on 2 quiet CPU cores)
    python benchmarks/adapters.py --quick   # a smoke run (2 steps, 16 examples)

Issue 7, item 3. SmolLM2-135M-Instruct (all 30 blocks, loaded once, a fresh copy per run), cut after block 2,
hosl mode with Q=1, fine-tuned on rotten_tomatoes (``../shared/data``, "<text> It was" + " terrible"/" great"),
the same seeded 384-example training sample and order for every run (batch 8, 48 steps), validated every 12
steps on a fixed 100-example validation sample and tested at the end on a fixed 500-example test sample.

Runs (one seed each):

- ``full/full``: client full weights (ZO, lr 1e-6, mu 1e-3), server full weights (AdamW 1e-4);
- ``lora/full``: client LoRA r=8, alpha=16 on q_proj, v_proj (ZO, lr 5e-5, mu 5e-3: the authors' LoRA
  settings), server full weights (AdamW 1e-4);
- ``lora/lora``: client LoRA as above, server LoRA r=8, alpha=16 on q_proj, v_proj (AdamW 1e-3);
- ``full/frozen`` and ``lora/frozen``: the same two clients with the server's learning rate at 0, so only the
  ZO client learns: the direct test of the bound O(sqrt(d_c / (T Q))), which predicts that the smaller d_c
  converges faster.

Reported per run: the client's ZO dimension d_c, validation accuracy and training loss against steps, test
accuracy, the client's peak memory in a training step and its parameter/optimizer bytes (the strategy's own
measurement, ``strategy.memory_report``, on the first steps), bytes per step across the cut, and the bytes a
weight hand-off between clients would move (the trainable client parameters). Outputs: adapters.md,
adapters.csv (one row per run and evaluation) and adapters.png.
"""

from __future__ import annotations

import argparse
import copy
import csv
import shlex
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import code_state, machine, pyplot, quiet_lightning
from tuning import keep_blocks

from hosl_lightning import (
    HOSLModule,
    HOSLStrategy,
    PromptClassificationDataModule,
    SplitCausalLM,
    load_causal_lm,
    resolve_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "rotten_tomatoes"
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
FULL = {"steps": 48, "num_train": 384, "num_validation": 100, "num_test": 500, "val_every": 12}
QUICK = {"steps": 2, "num_train": 16, "num_validation": 16, "num_test": 16, "val_every": 1}


@dataclass(frozen=True)
class Run:
    name: str
    client_adapter: dict | None
    server_adapter: dict | None
    zo_lr: float
    mu: float
    server_lr: float


RUNS = (
    Run("full/full", None, None, 1e-6, 1e-3, 1e-4),
    Run("lora/full", LORA, None, 5e-5, 5e-3, 1e-4),
    Run("lora/lora", LORA, LORA, 5e-5, 5e-3, 1e-3),
    Run("full/frozen", None, None, 1e-6, 1e-3, 0.0),
    Run("lora/frozen", LORA, None, 5e-5, 5e-3, 0.0),
)


@dataclass
class Curve(L.Callback):
    """Validation accuracy and training loss against steps."""

    val: list[tuple[int, float]] = field(default_factory=list)
    loss: list[tuple[int, float]] = field(default_factory=list)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and "val_acc" in trainer.callback_metrics:
            self.val.append((trainer.global_step, float(trainer.callback_metrics["val_acc"])))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        self.loss.append((trainer.global_step, float(trainer.callback_metrics["train_loss"])))


def run_one(run: Run, base: Any, tokenizer: Any, size: dict) -> dict[str, Any]:
    L.seed_everything(0)
    module = HOSLModule(model=copy.deepcopy(base), optimizer=partial(torch.optim.AdamW, lr=run.server_lr))
    strategy = HOSLStrategy(cut_layer=2, mode="hosl", q=1, mu=run.mu, zo_lr=run.zo_lr, seed=0,
                            client_adapter=run.client_adapter, server_adapter=run.server_adapter,
                            memory_every_n_steps=10_000)  # measured on the first two steps only
    data = PromptClassificationDataModule(
        tokenizer=tokenizer, task="rotten_tomatoes", data_dir=str(DATA), max_length=48, batch_size=8,
        eval_batch_size=32, seed=0, num_train=size["num_train"], num_validation=size["num_validation"],
        num_test=size["num_test"])
    curve = Curve()
    trainer = L.Trainer(strategy=strategy, max_steps=size["steps"], val_check_interval=size["val_every"],
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[curve])
    started = time.perf_counter()
    trainer.fit(module, data)
    train_s = time.perf_counter() - started
    split, report = strategy.split_model, strategy.memory_report
    traffic = copy.copy(split.boundary.traffic)  # the last training step's bytes (testing adds its own)
    (scores,) = trainer.test(module, data, verbose=False)
    assert report is not None
    zo = [p for p in split.client.parameters() if getattr(p, "_hosl_zo", False)]
    return {
        "run": run.name, "d_c": sum(p.numel() for p in zo),
        "server_trainable": sum(p.numel() for p in split.server.parameters() if p.requires_grad),
        "val": curve.val, "loss": curve.loss, "test_acc": float(scores["test_acc"]),
        "test_f1": float(scores["test_f1"]), "train_s": train_s, "s_per_step": train_s / size["steps"],
        "client_peak_mib": report.client.peak / 2**20, "client_params_mib": report.client.params / 2**20,
        "client_optimizer_mib": report.client.optimizer_state / 2**20,
        "bytes_up": traffic.bytes_up, "bytes_down": traffic.bytes_down,
        "handoff_bytes": sum(p.numel() * p.element_size() for p in zo),
    }


def write(out: Path, rows: list[dict], zero_shot: float, size: dict, command: str, code: str, wall_s: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "adapters.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", "kind", "step", "value"])
        for r in rows:
            writer.writerows([[r["run"], "val_acc", s, v] for s, v in r["val"]])
            writer.writerows([[r["run"], "train_loss", s, v] for s, v in r["loss"]])
            writer.writerow([r["run"], "test_acc", size["steps"], r["test_acc"]])
    lines = [
        "# Parameter-efficient HOSL: full client vs LoRA client (SmolLM2-135M, rotten_tomatoes)", "",
        f"Command: `{command}`  ", f"Machine: {machine()}  ", f"Code: {code}  ", f"Wall time: {wall_s / 60:.1f} min.", "",
        f"hosl, cut after block 2, Q=1, batch 8, {size['steps']} steps, one seed; validation accuracy on "
        f"{size['num_validation']} examples every {size['val_every']} steps (zero-shot {zero_shot * 100:.1f}%), "
        f"test accuracy on {size['num_test']}. LoRA: r=8, alpha=16 on q_proj and v_proj.", "",
        "| run (client/server) | ZO dimension d_c | server trainable | val acc by step (%) | test acc (%) "
        "| client peak (MiB) | client params (MiB) | client optimizer (MiB) | bytes up+down / step "
        "| weight hand-off (bytes) | s/step |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        curve = ", ".join(f"{s}: {v * 100:.0f}" for s, v in r["val"])
        per_step = (r["bytes_up"] + r["bytes_down"])  # the traffic counter holds the last step's bytes
        lines.append(f"| {r['run']} | {r['d_c']:,} | {r['server_trainable']:,} | {curve} | {r['test_acc'] * 100:.1f} | "
                     f"{r['client_peak_mib']:.1f} | {r['client_params_mib']:.1f} | {r['client_optimizer_mib']:.2f} | "
                     f"{per_step:,} | {r['handoff_bytes']:,} | {r['s_per_step']:.2f} |")
    by = {r["run"]: r for r in rows}

    def area(r: dict) -> float:  # mean validation accuracy over the curve: higher = learned sooner
        return sum(v for _, v in r["val"]) / max(len(r["val"]), 1)

    lines += ["", "Does the smaller client dimension converge faster?", ""]
    for lora, full in (("lora/frozen", "full/frozen"), ("lora/full", "full/full")):
        a, b = by[lora], by[full]
        lines.append(f"- {lora} vs {full}: d_c {a['d_c']:,} vs {b['d_c']:,}; mean val acc over the curve "
                     f"{area(a) * 100:.1f} vs {area(b) * 100:.1f}; final loss (mean of last 8 steps) "
                     f"{_tail(a):.3f} vs {_tail(b):.3f}; test {a['test_acc'] * 100:.1f} vs {b['test_acc'] * 100:.1f}")
    (out / "adapters.md").write_text("\n".join(lines) + "\n")
    plot(out / "adapters.png", rows, zero_shot)


def _tail(r: dict) -> float:
    values = [v for _, v in r["loss"]][-8:]
    return sum(values) / max(len(values), 1)


def plot(path: Path, rows: list[dict], zero_shot: float) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    for r in rows:
        style = "--" if "frozen" in r["run"] else "-"
        left.plot([0] + [s for s, _ in r["val"]], [zero_shot * 100] + [v * 100 for _, v in r["val"]], style,
                  marker="o", label=f"{r['run']} (d_c={r['d_c']:,})")
        steps, losses = [s for s, _ in r["loss"]], [v for _, v in r["loss"]]
        smooth = [sum(losses[max(0, i - 7): i + 1]) / len(losses[max(0, i - 7): i + 1]) for i in range(len(losses))]
        right.plot(steps, smooth, style, label=r["run"])
    left.set_xlabel("step")
    left.set_ylabel("validation accuracy (%)")
    left.legend(fontsize=8)
    right.set_xlabel("step")
    right.set_ylabel("training loss (8-step mean)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--layers", type=int, default=None, help="keep only the first N blocks (smoke runs)")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    arguments = argv if argv is not None else sys.argv[1:]
    command = "python benchmarks/adapters.py" + (" " + shlex.join(arguments) if arguments else "")
    started, code = time.perf_counter(), code_state()
    quiet_lightning()
    base = load_causal_lm("smollm2-135m")
    if args.layers is not None:
        base = keep_blocks(base, args.layers)
    tokenizer = resolve_tokenizer("smollm2-135m")
    zero = HOSLModule(model=copy.deepcopy(base))
    zero.model = SplitCausalLM(zero.model, 2)  # evaluate() scores through the split model's server half
    data = PromptClassificationDataModule(tokenizer=tokenizer, task="rotten_tomatoes", data_dir=str(DATA),
                                          max_length=48, eval_batch_size=32, seed=0, num_train=size["num_train"],
                                          num_validation=size["num_validation"])
    data.setup("validate")
    zero_shot = zero.evaluate(data.val_dataloader(), "val")["val_acc"]
    del zero
    rows = []
    for run in RUNS:
        print(f"=== {run.name} ===", flush=True)
        rows.append(run_one(run, base, tokenizer, size))
        r = rows[-1]
        print(f"{run.name}: d_c={r['d_c']:,} val={r['val']} test={r['test_acc']:.3f} "
              f"peak={r['client_peak_mib']:.1f} MiB {r['s_per_step']:.2f} s/step", flush=True)
    out = Path(args.out) / "_adapters_quick" if args.quick else Path(args.out)
    write(out, rows, zero_shot, size, command, code, time.perf_counter() - started)
    print((out / "adapters.md").read_text())


if __name__ == "__main__":
    main()
