"""Why GradMatch subsets trained worse than random ones, and what stratified candidate batches change.

    python -m benchmarks.diagnostics.subset_choice           # about 25 minutes on 2 CPU cores
    python -m benchmarks.diagnostics.subset_choice --quick   # a 2-minute smoke run (2 blocks, 64 examples, 1 seed)
    python -m benchmarks.diagnostics.subset_choice --feature head --methods gradmatch --candidates stratified --tag head

Issue 6. Same model, data and sizes as the retired tuning study (``tuning_setup``): SmolLM2-135M-Instruct cut to 4 blocks,
rotten_tomatoes with 480 training reviews in 30 candidate batches of 16, subsets of 10% (3 batches).

1. **What the feature sees.** At the pretrained weights: each candidate batch's GradMatch feature
   (dL/dh at the final hidden state), how its projection on the mean feature correlates with the batch's share
   of positive reviews, and the share of positives in the batches GradMatch and random picks choose, with
   plain and with stratified candidates.
2. **What a trial learns.** One configuration (the tuning searches' second start-up trial) trained for 27
   steps (9 subset epochs, one choice at the start) on the subset each method picks, for several seeds (a seed
   changes the candidate batches and the random picks), plain and stratified; validation accuracy on the
   200 validation reviews after the last step.

Outputs: subset_choice.md (command, machine, commit, tables) and subset_choice.csv (one row per fit).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from hosl_lightning import SplitCausalLM, load_causal_lm
from hosl_lightning.tuning import (
    SubsetSelection,
    batch_feature,
    build_trial_cli,
    class_labels,
    gradmatch,
    override_args,
    partition,
    random_subset,
    subset_length,
    vocabulary_projection,
)

from ..common.environment import RESULTS, code_state, command_line, machine
from ..common.models import prepare_model
from .tuning_setup import FULL, QUICK, WORK, fit_config

CONFIGURATION = {  # the second start-up trial of every search in tuning.md (TPE seed 0)
    "model.optimizer.init_args.lr": 0.0006074996073425694,
    "trainer.strategy.init_args.cut_layer": 1,
    "trainer.strategy.init_args.mu": 0.0038322168504927897,
    "trainer.strategy.init_args.q": 2,
    "trainer.strategy.init_args.zo_lr": 5.9812219011525586e-05,
}
SUBSET_EPOCHS = 9


def positive_shares(batches: list[list[int]], labels: torch.Tensor) -> list[float]:
    return [float(labels[batch].float().mean()) for batch in batches]


def feature_report(config: Path, model_dir: Path, size: dict[str, Any], seed: int, feature: str) -> list[str]:
    """Part 1: the candidates' features at the pretrained weights and the class mix of each method's picks."""
    cli = build_trial_cli(["--config", str(config)], [])
    datamodule = cli.datamodule
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    dataset = loader.dataset
    labels = class_labels(dataset)
    assert labels is not None
    model = SplitCausalLM(load_causal_lm(str(model_dir)), 1).eval()  # the feature does not depend on the cut
    sketch = None
    if feature == "head":  # as SubsetSelection(feature="head") with its default 16 rows
        sketch = vocabulary_projection(model.server.lm_head.out_features, 16, seed)
    table = ("| candidates | corr(projection on mean feature, positive share) | GradMatch picks: positive shares "
             "(weights) | relative residual | random picks: positive shares |")
    lines = [f"## 1. What the {feature!r} feature sees (pretrained weights, seed {seed})", "",
             f"Positive share of the training sample: {float(labels.float().mean()):.3f}.", "",
             table, "|---|---:|---|---:|---|"]
    budget = subset_length(size["fraction"], -(-len(dataset) // 16))
    for name, stratify in (("plain", None), ("stratified", labels)):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + 1)  # as SubsetSelection's first choice
        candidates = partition(len(dataset), 16, generator, stratify)
        features = torch.stack([batch_feature(model, loader.collate_fn([dataset[i] for i in batch]), sketch)
                                for batch in candidates])
        shares = torch.tensor(positive_shares(candidates, labels))
        projection = features @ features.mean(dim=0)
        correlation = float(torch.corrcoef(torch.stack([projection, shares]))[0, 1])
        chosen = gradmatch(features, budget, generator)
        picked = random_subset(len(candidates), budget, generator)
        lines.append(
            f"| {name} | {correlation:+.2f} | "
            + ", ".join(f"{shares[i]:.2f} ({w:.2f})" for i, w in zip(chosen.indices, chosen.weights))
            + f" | {chosen.residual:.3f} | " + ", ".join(f"{shares[i]:.2f}" for i in picked.indices) + " |")
    return lines


def train(config: Path, size: dict[str, Any], method: str, seed: int, stratify: bool, subset_epochs: int,
          feature: str) -> dict[str, Any]:
    """Part 2: one fit of CONFIGURATION on the subset ``method`` picks; validation accuracy after the last step."""
    started = time.perf_counter()
    epoch = subset_length(size["fraction"], -(-size["num_train"] // 16))
    selection = SubsetSelection(method, size["fraction"], every_n_steps=subset_epochs * epoch, seed=seed,
                                stratify=stratify, feature=feature, progress=False)
    args = ["--config", str(config), *override_args(CONFIGURATION), f"--trainer.max_epochs={subset_epochs}",
            f"--trainer.check_val_every_n_epoch={subset_epochs}"]
    cli = build_trial_cli(args, [selection])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)  # validates after its last step
    value = float(cli.trainer.callback_metrics["val_acc"])
    labels = class_labels(cli.trainer.train_dataloader.dataset)
    assert labels is not None
    picked = selection.state_dict()["batches"]  # the chosen batches, as (example, weight) pairs
    shares = positive_shares([[i for i, _ in batch] for batch in picked], labels)
    weights = [batch[0][1] for batch in picked]
    return {"method": method, "feature": feature if method == "gradmatch" else "-",
            "candidates": "stratified" if stratify else "plain", "seed": seed, "val_acc": value,
            "positive_shares": " ".join(f"{s:.2f}" for s in shares),
            "weights": " ".join(f"{w:.2f}" for w in weights), "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per method and candidate kind (default 4)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--feature", choices=("hidden", "head"), default="hidden", help="GradMatch's feature")
    parser.add_argument("--methods", nargs="+", choices=("gradmatch", "random"), default=["gradmatch", "random"])
    parser.add_argument("--candidates", nargs="+", choices=("plain", "stratified"), default=["plain", "stratified"])
    parser.add_argument("--tag", default="", help="suffix of the output files (subset_choice-TAG.md, ...)")
    args = parser.parse_args(argv)
    size = dict(QUICK if args.quick else FULL)
    seeds = 1 if args.quick else args.seeds
    subset_epochs = 2 if args.quick else SUBSET_EPOCHS
    command = command_line("diagnostics.subset_choice", argv)
    started, code = time.perf_counter(), code_state()
    model_dir = prepare_model(size["layers"], WORK / f"smollm2-135m-{size['layers']}-blocks")
    config = WORK / ("choice-quick.yaml" if args.quick else "choice.yaml")
    config.write_text(yaml.safe_dump(fit_config(model_dir, size)))
    lines = feature_report(config, model_dir, size, seed=0, feature=args.feature)
    rows = []
    for seed in range(seeds):
        for kind in args.candidates:
            for method in args.methods:
                rows.append(train(config, size, method, seed, kind == "stratified", subset_epochs, args.feature))
                print(f"=== {rows[-1]}", flush=True)
    out = Path(args.out) / ("_subset_choice_quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    name = "subset_choice" + (f"-{args.tag}" if args.tag else "")
    with (out / f"{name}.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    settings = {k.rsplit(".", 1)[-1]: v for k, v in CONFIGURATION.items()}
    batches = subset_length(size["fraction"], -(-size["num_train"] // 16))
    summary = ["## 2. What a trial learns", "",
               (f"Configuration: `{settings}`, {subset_epochs} subset epochs of {batches} batches, one choice at "
                "the start; val_acc on the validation sample after the last step."), "",
               "| candidates | method | val_acc per seed | mean | spread (max - min) | positive shares of the picks, per seed |",
               "|---|---|---|---:|---:|---|"]
    for kind in args.candidates:
        for method in args.methods:
            mine = [r for r in rows if r["candidates"] == kind and r["method"] == method]
            values = [r["val_acc"] * 100 for r in mine]
            summary.append(f"| {kind} | {method} | {', '.join(f'{v:.1f}' for v in values)} | "
                           f"{statistics.mean(values):.1f} | {max(values) - min(values):.1f} | "
                           f"{'; '.join(r['positive_shares'] for r in mine)} |")
    header = ["# Subset choice: class mix of GradMatch and random picks, plain and stratified candidates", "",
              f"Command: `{command}`  ", f"Machine: {machine()}  ", f"Code: {code}  ",
              f"Total wall time: {(time.perf_counter() - started) / 60:.1f} min.", ""]
    (out / f"{name}.md").write_text("\n".join(header + lines + [""] + summary) + "\n")
    print((out / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
