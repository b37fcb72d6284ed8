"""Do subset trials rank configurations? Subset methods against full-data training on a fixed set of configurations.

    python -m benchmarks.tuning_ranks                    # run what is missing (resumes from the cache), then report
    python -m benchmarks.tuning_ranks --budget-min 150   # start no new trial after 150 minutes
    python -m benchmarks.tuning_ranks --report-only      # rebuild tuning_ranks.md / .csv / .png from the cache
    python -m benchmarks.tuning_ranks --quick            # a smoke run: 2 blocks, 3 configurations, tiny sizes

Issue 22. The model is SmolLM2-135M-Instruct cut down to its first ``layers`` decoder blocks, loaded once per
process, with a fresh deep copy per trial; the task is rotten_tomatoes (``../shared/data``) with the
classification loss, tokenised once per process. ``CONFIGS`` is a fixed set of hosl configurations (server
AdamW lr, client zo_lr, mu, Q) chosen to span runs that diverge, barely learn and learn well; ``default`` is
the quickstart's, the "no tuning" anchor.

- A **full-data trial** trains a configuration ``epochs`` epochs on all ``num_train`` examples, validates once at
  the end on ``num_validation`` examples (the full-data search ranks by that val_acc) and is then tested on
  ``num_test`` examples. It is also the configuration's retrain: its test accuracy is what a search that picks
  the configuration gets.
- A **subset trial** trains the same configuration the same ``epochs`` subset epochs on ``fraction`` of the
  batches, chosen by one of ``SELECTIONS``, and validates once at the end on the first ``subset_val_batches``
  validation batches (a smaller seeded sample), ranked by val_loss (continuous where accuracy ties on few
  examples). Its time includes the selection.
- A **search** evaluates every configuration of the set with one kind of trial and picks the best; its time is
  the sum of its trials' times. Regret is the oracle's test accuracy (the best of the set under full-data
  training) minus that of the configuration the search picked. Rank agreement is Spearman's and Kendall's
  correlation between a method's trial metric and the full-data trial metric over the set, with bootstrap
  95% intervals (configurations resampled, per study seed).

Every finished trial is written to ``benchmarks/results/tuning_ranks/<key>.json``, keyed by its full
configuration and holding the commit that produced it, so a later sitting adds trials instead of redoing them.
"""

from __future__ import annotations

import copy
import csv
import functools
import gc
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torchmetrics.functional import kendall_rank_corrcoef, spearman_corrcoef

from hosl_lightning import HOSLModule, HOSLStrategy, PromptClassificationDataModule, load_causal_lm, resolve_tokenizer
from hosl_lightning.modes import DivergenceError
from hosl_lightning.tuning import SelectionCache, SubsetSelection
from hosl_lightning.tuning.batches import subset_length

from .common.cache import digest, load_cache, save, sitting_parser
from .common.environment import RESULTS, code_state, command_line, machine, quiet_lightning
from .common.models import SMOLLM2, keep_blocks
from .common.plotting import pyplot, save_figure
from .common.tasks import DEFAULT_DATA

DATA = DEFAULT_DATA / "rotten_tomatoes"
CACHE = RESULTS / "tuning_ranks"
FULL = {"layers": 4, "num_train": 800, "num_validation": 200, "num_test": 1000, "epochs": 3, "batch": 16,
        "eval_batch": 50, "max_length": 48, "subset_val_batches": 2, "cut": 2}
QUICK = {"layers": 2, "num_train": 64, "num_validation": 16, "num_test": 16, "epochs": 2, "batch": 8,
         "eval_batch": 8, "max_length": 32, "subset_val_batches": 1, "cut": 1}
FRACTIONS, STUDY_SEEDS, BOOTSTRAP = (0.05, 0.1), (0, 1, 2), 2000
TARGET_SPEEDUP, TARGET_REGRET, TARGET_SPEARMAN = 10.0, 1.0, 0.5


@dataclass(frozen=True)
class Config:
    """One configuration of the fixed set: hosl with these learning rates, radius and queries."""

    name: str
    lr: float
    zo_lr: float
    mu: float = 1e-3
    q: int = 1


CONFIGS = (
    Config("default", 2e-5, 1e-6),  # the quickstart's: the "no tuning" anchor
    *(Config(f"lr{lr:g}", lr, 1e-6) for lr in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)),  # barely learns ... wrecks the model
    Config("lr3e-05-zo1e-05", 3e-5, 1e-5),
    Config("lr0.0001-zo0.0001", 1e-4, 1e-4),
    Config("lr0.0001-zo0.001", 1e-4, 1e-3),
    Config("lr0.0001-zo0.01", 1e-4, 1e-2),  # a client step large enough to diverge
    Config("lr0.0001-mu0.1", 1e-4, 1e-5, mu=1e-1),  # a radius too large for a faithful estimate
    Config("lr0.0003-q2", 3e-4, 1e-5, q=2),
)
QUICK_CONFIGS = (Config("default", 2e-5, 1e-6), Config("lr1e-3", 1e-3, 1e-5), Config("lr1e-6", 1e-6, 1e-6))


@dataclass(frozen=True)
class SubsetMethod:
    """A subset method: ``SubsetSelection``'s options, plus a warm start of half a trial's steps when ``warm``."""

    name: str
    method: str
    granularity: str = "batch"
    feature: str = "hidden"
    warm: bool = False


SELECTIONS = (
    SubsetMethod("random", "random"),
    SubsetMethod("gradmatch", "gradmatch"),  # today's default: per batch, dL/dh, from the pretrained weights
    SubsetMethod("gradmatch-pc", "gradmatch", "per_class", "label_head"),  # CORDS' PerClassPerGradient
    SubsetMethod("gradmatch-pc-warm", "gradmatch", "per_class", "label_head", warm=True),  # AUTOMATA's warm start
    SubsetMethod("milo", "milo"),
)
SELECTION = {s.name: s for s in SELECTIONS}


@dataclass(frozen=True)
class Trial:
    """Everything that fixes a trial's outcome: its cache key. ``selection`` None is a full-data trial."""

    config: Config
    selection: str | None
    fraction: float
    seed: int
    sizes: tuple[tuple[str, Any], ...]

    def key(self) -> str:
        fields = asdict(self) | {"options": asdict(SELECTION[self.selection]) if self.selection else None}
        kind = "full" if self.selection is None else f"{self.selection}-f{self.fraction:g}"
        return f"{kind}-{self.config.name}-s{self.seed}-{digest(fields)}"


# --- running trials -------------------------------------------------------------------------------------------


class Study:
    """What every trial shares: the model, loaded once, and the tokenised data, built once."""

    def __init__(self, sizes: dict[str, Any]) -> None:
        self.sizes = sizes
        self.base = keep_blocks(load_causal_lm(SMOLLM2), sizes["layers"])
        tokenizer = resolve_tokenizer(SMOLLM2)
        self.data = PromptClassificationDataModule(
            tokenizer=tokenizer, task="rotten_tomatoes", data_dir=str(DATA), loss="classification",
            max_length=sizes["max_length"], batch_size=sizes["batch"], eval_batch_size=sizes["eval_batch"], seed=0,
            num_train=sizes["num_train"], num_validation=sizes["num_validation"], num_test=sizes["num_test"])
        self.data.setup("fit")
        self.data.setup("test")
        self.selections = SelectionCache()  # a choice from the pretrained weights is made once per study

    def run(self, trial: Trial, code: str) -> dict[str, Any]:
        """Train (and, on full data, test) one trial; a diverged run is recorded as such."""
        sizes, config, full = self.sizes, trial.config, trial.selection is None
        L.seed_everything(trial.seed, verbose=False)
        self.data.shuffle_seed = trial.seed  # the training order; the examples stay the same
        module = HOSLModule(model=copy.deepcopy(self.base),
                            optimizer=functools.partial(torch.optim.AdamW, lr=config.lr))
        strategy = HOSLStrategy(cut_layer=sizes["cut"], mode="hosl", q=config.q, mu=config.mu, zo_lr=config.zo_lr,
                                seed=trial.seed, embedding_directions="sparse", memory_every_n_steps=0)
        callbacks: list[Any] = []
        selection = None
        if not full:
            option = SELECTION[trial.selection]  # type: ignore[index]
            batches = -(-sizes["num_train"] // sizes["batch"])
            steps = sizes["epochs"] * subset_length(trial.fraction, batches)
            selection = SubsetSelection(option.method, trial.fraction, every_n_steps=10**9, seed=trial.seed,
                                        cache=self.selections, feature=option.feature,  # type: ignore[arg-type]
                                        granularity=option.granularity,  # type: ignore[arg-type]
                                        warm_start_steps=steps // 2 if option.warm else 0, progress=False)
            callbacks.append(selection)
        trainer = L.Trainer(
            strategy=strategy, accelerator="cpu", devices=1, max_epochs=sizes["epochs"],
            check_val_every_n_epoch=sizes["epochs"], limit_val_batches=1.0 if full else sizes["subset_val_batches"],
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, callbacks=callbacks)
        started, diverged = time.perf_counter(), None
        try:
            trainer.fit(module, datamodule=self.data)
        except DivergenceError as error:
            diverged = str(error)
        seconds = time.perf_counter() - started
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
        record: dict[str, Any] = {
            "trial": asdict(trial), "commit": code, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "seconds": seconds, "steps": trainer.global_step, "diverged": diverged,
            "val_loss": metrics.get("val_loss", float("nan")) if diverged is None else float("nan"),
            "val_acc": metrics.get("val_acc", float("nan")) if diverged is None else float("nan"),
            "selection_seconds": 0.0 if selection is None else selection.selection_seconds,
        }
        if full and diverged is None:
            (scores,) = trainer.test(module, datamodule=self.data, verbose=False)
            record["test_acc"] = float(scores["test_acc"])
        elif full:
            record["test_acc"] = float("nan")
        return record


def plan(cache: dict[str, dict[str, Any]], configs: tuple[Config, ...], sizes: dict[str, Any],
         seeds: tuple[int, ...]) -> list[Trial]:
    """Every trial still missing, most useful first: the full-data trials, then each fraction's study seed 0
    for every method, then the other seeds."""
    frozen = tuple(sorted(sizes.items()))
    trials = [Trial(c, None, 1.0, 0, frozen) for c in configs]
    for seed in seeds:
        for fraction in FRACTIONS:
            trials += [Trial(c, s.name, fraction, seed, frozen) for s in SELECTIONS for c in configs]
    return [t for t in trials if t.key() not in cache]


# --- the report -------------------------------------------------------------------------------------------------


def finite(values: list[float]) -> torch.Tensor:
    """The values, with NaN (a diverged run) replaced by one below every other value: it ranks last."""
    known = [v for v in values if not math.isnan(v)]
    floor = min(known, default=0.0) - 1.0
    return torch.tensor([floor if math.isnan(v) else v for v in values], dtype=torch.float64)


def spearman(a: list[float], b: list[float]) -> float:
    return float(spearman_corrcoef(finite(a), finite(b)))  # ties share their mean rank


def kendall(a: list[float], b: list[float]) -> float:
    return float(kendall_rank_corrcoef(finite(a), finite(b), variant="b"))  # tau-b: ties count for neither


def bootstrap(statistic: Any, columns: list[tuple[list[float], list[float]]], seed: int = 0) -> tuple[float, float]:
    """A 95% percentile interval of the mean of ``statistic`` over the study seeds' (subset, full) columns, with the
    configurations resampled (the same draw for every seed)."""
    generator = torch.Generator().manual_seed(seed)
    n = len(columns[0][0])
    draws = []
    for _ in range(BOOTSTRAP):
        pick = torch.randint(0, n, (n,), generator=generator).tolist()
        values = [statistic([a[i] for i in pick], [b[i] for i in pick]) for a, b in columns]
        values = [v for v in values if not math.isnan(v)]
        if values:
            draws.append(statistics.mean(values))
    draws.sort()
    if not draws:  # every resample undefined (a constant column): no interval
        return math.nan, math.nan
    return draws[int(0.025 * len(draws))], draws[min(len(draws) - 1, int(0.975 * len(draws)))]


def defined_mean(values: list[float]) -> float:
    """The mean of the values that are defined (NaN when none is: a correlation of a constant column)."""
    known = [v for v in values if not math.isnan(v)]
    return statistics.mean(known) if known else math.nan


T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # Student's t


def mean_interval(values: list[float]) -> str:
    """The mean and its 95% interval over study seeds (Student's t: with 3 seeds, 4.3 standard errors), as text."""
    if len(values) < 2:
        return f"{statistics.mean(values):+.1f}" if values else "n/a"
    centre = statistics.mean(values)
    error = T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return f"{centre:+.1f} [{centre - error:+.1f}, {centre + error:+.1f}]"


def write_report(cache: dict[str, dict[str, Any]], configs: tuple[Config, ...], sizes: dict[str, Any],
                 seeds: tuple[int, ...], out: Path, command: str) -> None:
    frozen = tuple(sorted(sizes.items()))
    full = {c.name: cache.get(Trial(c, None, 1.0, 0, frozen).key()) for c in configs}
    if any(r is None for r in full.values()):
        missing = [name for name, r in full.items() if r is None]
        print(f"full-data trials missing for {missing}: no report yet")
        return
    test = {name: r["test_acc"] * 100 for name, r in full.items()}
    trained = {name: v for name, v in test.items() if not math.isnan(v)}
    if not trained:
        print("every full-data trial diverged: no oracle, no report")
        return
    oracle_name = max(trained, key=trained.__getitem__)
    oracle = trained[oracle_name]
    full_pick = max(full, key=lambda n: -math.inf if math.isnan(full[n]["val_acc"]) else full[n]["val_acc"])
    full_search_s = sum(r["seconds"] for r in full.values())
    full_val = [full[c.name]["val_acc"] for c in configs]
    commits = sorted({r["commit"] for r in cache.values()})
    lines = [
        "# Tuning on subsets: do subset trials rank configurations?", "",
        f"Command: `{command}`  ", f"Machine: {machine()}  ", f"Code: {', '.join(commits)} (each trial records its own)",
        "",
        (f"Model: SmolLM2-135M-Instruct cut to its first {sizes['layers']} blocks, hosl (cut {sizes['cut']}, sparse "
         f"embedding directions). Data: rotten_tomatoes, classification loss, {sizes['num_train']} training "
         f"examples in batches of {sizes['batch']}, {sizes['epochs']} epochs; full-data trials validate on "
         f"{sizes['num_validation']} examples and are tested on {sizes['num_test']}; subset trials validate on "
         f"the first {sizes['subset_val_batches'] * sizes['eval_batch']} of them and are ranked by val_loss."), "",
        "## The fixed set under full-data training", "",
        "| configuration | lr | zo_lr | mu | Q | val acc | test acc | trial time |", "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in configs:
        r = full[c.name]
        state = " (diverged)" if r["diverged"] else ""
        lines.append(f"| {c.name}{state} | {c.lr:g} | {c.zo_lr:g} | {c.mu:g} | {c.q} | {r['val_acc'] * 100:.1f} | "
                     f"{test[c.name]:.1f} | {r['seconds']:.0f} s |")
    ordered = sorted(trained.values())
    diverged = sum(math.isnan(v) for v in test.values())
    lines += ["", (f"Spread of full-data outcomes (test accuracy over the {len(configs)} configurations): best "
                   f"{ordered[-1]:.1f}, median {statistics.median(ordered):.1f}, worst {ordered[0]:.1f}"
                   + (f"; {diverged} diverged" if diverged else "") + "."),
              f"Anchors: no tuning (`default`) {test['default']:.1f}; oracle (`{oracle_name}`) {oracle:.1f}.",
              (f"Full-data search: picks `{full_pick}` (best val acc), test {test[full_pick]:.1f}, regret "
               f"{oracle - test[full_pick]:.1f} points, {full_search_s / 60:.1f} min."), "",
              "## Subset searches", "",
              ("| method | fraction | seeds | search time | speedup | regret, points (95% CI over seeds) | Spearman "
               "(95% CI) | Kendall (95% CI) | picks |"), "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    rows: list[dict[str, Any]] = []
    for fraction in FRACTIONS:
        for option in SELECTIONS:
            per_seed = []
            for seed in seeds:
                trials = [cache.get(Trial(c, option.name, fraction, seed, frozen).key()) for c in configs]
                if any(t is None for t in trials):
                    continue
                scores = [-t["val_loss"] for t in trials]  # higher is better; NaN (diverged) ranks last
                pick = configs[max(range(len(configs)), key=lambda i: -math.inf if math.isnan(scores[i]) else scores[i])]
                # a pick whose full-data training diverged scores as the worst trained configuration, at least
                picked = test[pick.name] if not math.isnan(test[pick.name]) else ordered[0]
                per_seed.append({"seed": seed, "scores": scores, "pick": pick.name, "regret": oracle - picked,
                                 "seconds": sum(t["seconds"] for t in trials),
                                 "selection_s": sum(t["selection_seconds"] for t in trials)})
            if not per_seed:
                continue
            columns = [(s["scores"], full_val) for s in per_seed]
            rho = defined_mean([spearman(a, b) for a, b in columns])
            tau = defined_mean([kendall(a, b) for a, b in columns])
            rho_ci, tau_ci = bootstrap(spearman, columns), bootstrap(kendall, columns)
            seconds = statistics.mean(s["seconds"] for s in per_seed)
            row = {"method": option.name, "fraction": fraction, "seeds": len(per_seed), "search_s": seconds,
                   "speedup": full_search_s / seconds, "regrets": [s["regret"] for s in per_seed], "spearman": rho,
                   "spearman_ci": rho_ci, "kendall": tau, "kendall_ci": tau_ci,
                   "by_seed": {s["seed"]: (s["regret"], spearman(s["scores"], full_val)) for s in per_seed},
                   "picks": [s["pick"] for s in per_seed],
                   "selection_s": statistics.mean(s["selection_s"] for s in per_seed)}
            rows.append(row)
            lines.append(f"| {option.name} | {fraction:.0%} | {len(per_seed)} | {seconds / 60:.1f} min | "
                         f"{row['speedup']:.1f}x | {mean_interval(row['regrets'])} | {rho:.2f} [{rho_ci[0]:.2f}, "
                         f"{rho_ci[1]:.2f}] | {tau:.2f} [{tau_ci[0]:.2f}, {tau_ci[1]:.2f}] | {', '.join(row['picks'])} |")
    lines += ["", ("A pick whose full-data training diverged counts as the worst trained configuration's test "
                   "accuracy in its regret, a lower bound on the harm."),
              "", ("Search time is the sum of a search's trials (training, validation and selection; a choice made "
                   "from the pretrained weights is shared by the study's trials, so the first trial of a process pays "
                   "it), averaged over study seeds. Speedup is the full-data search's time over it."), ""]
    lines += targets(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tuning_ranks.md").write_text("\n".join(lines) + "\n")
    with (out / "tuning_ranks.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["kind", "method", "fraction", "seed", "config", "seconds", "selection_seconds", "val_loss",
                         "val_acc", "test_acc", "diverged", "commit"])
        for record in cache.values():
            t = record["trial"]
            writer.writerow(["full" if t["selection"] is None else "subset", t["selection"] or "", t["fraction"],
                             t["seed"], t["config"]["name"], f"{record['seconds']:.2f}",
                             f"{record['selection_seconds']:.2f}", record["val_loss"], record["val_acc"],
                             record.get("test_acc", ""), bool(record["diverged"]), record["commit"]])
    plot(out / "tuning_ranks.png", rows, cache, configs, frozen, full_val)


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, each with its verdict and, where missed, by how much."""
    if not rows:
        return ["No subset search has all its trials yet."]
    lines = ["## Targets", ""]
    for row in rows:
        regret = statistics.mean(row["regrets"])
        verdicts = [("speedup", row["speedup"] >= TARGET_SPEEDUP, f"{row['speedup']:.1f}x vs >= {TARGET_SPEEDUP:g}x"),
                    ("regret", regret <= TARGET_REGRET, f"{regret:.1f} vs <= {TARGET_REGRET:g} points"),
                    ("Spearman", row["spearman"] >= TARGET_SPEARMAN,
                     f"{row['spearman']:.2f} vs >= {TARGET_SPEARMAN:g}")]
        lines.append(f"- {row['method']} at {row['fraction']:.0%} ({row['seeds']} seeds): " + "; ".join(
            f"{name} {'met' if ok else 'NOT met'} ({text})" for name, ok, text in verdicts))
    for fraction in FRACTIONS:
        by = {r["method"]: r for r in rows if r["fraction"] == fraction}
        for name in ("gradmatch", "gradmatch-pc", "gradmatch-pc-warm"):
            if name not in by or "random" not in by:
                continue
            mine, theirs = by[name]["by_seed"], by["random"]["by_seed"]
            seeds = sorted(set(mine) & set(theirs))  # paired: the same study seed on both sides
            regret = [mine[s][0] - theirs[s][0] for s in seeds]
            rho = [100 * (mine[s][1] - theirs[s][1]) for s in seeds if not math.isnan(mine[s][1] - theirs[s][1])]
            lines.append(f"- {name} minus random at {fraction:.0%}, paired over study seeds {seeds}: regret "
                         f"{mean_interval(regret)} points, Spearman {mean_interval(rho)} hundredths")
    return lines


def plot(path: Path, rows: list[dict[str, Any]], cache: dict[str, dict[str, Any]], configs: tuple[Config, ...],
         frozen: tuple[tuple[str, Any], ...], full_val: list[float]) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(FRACTIONS), figsize=(6 * len(FRACTIONS), 4.5), squeeze=False)
    for ax, fraction in zip(axes[0], FRACTIONS):
        for option in SELECTIONS:
            trials = [cache.get(Trial(c, option.name, fraction, 0, frozen).key()) for c in configs]
            if any(t is None for t in trials):
                continue
            ax.scatter([v * 100 for v in full_val], [t["val_loss"] for t in trials], label=option.name, s=25)
        ax.set_xlabel("full-data trial: val acc (%)")
        ax.set_ylabel("subset trial: val loss (study seed 0)")
        ax.set_title(f"fraction {fraction:.0%}")
        ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = sitting_parser(__doc__, unit="trial")
    parser.add_argument("--quick", action="store_true", help="a smoke run into a scratch folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    sizes, configs, seeds, cache_dir, out = FULL, CONFIGS, STUDY_SEEDS, CACHE, args.out
    if args.quick:
        sizes, configs, seeds, cache_dir = QUICK, QUICK_CONFIGS, (0,), Path("/tmp/tuning-ranks-quick")
        out = cache_dir
    command = command_line("tuning_ranks", argv)
    started, code = time.perf_counter(), code_state()
    if not args.report_only:
        quiet_lightning()
        study = None
        while True:
            todo = plan(load_cache(cache_dir), configs, sizes, seeds)
            elapsed = (time.perf_counter() - started) / 60
            if not todo or elapsed > args.budget_min:
                print(f"[{elapsed:5.1f} min] {len(todo)} trials left; stopping", flush=True)
                break
            study = study or Study(sizes)
            trial = todo[0]
            print(f"[{elapsed:5.1f} min] {trial.selection or 'full data'} f={trial.fraction:g} seed {trial.seed}: "
                  f"{trial.config.name} ({len(todo)} left)", flush=True)
            record = study.run(trial, code)
            save(trial.key(), record, cache_dir)
            print(f"    {'diverged' if record['diverged'] else 'done'} in {record['seconds']:.0f} s (selection "
                  f"{record['selection_seconds']:.0f} s): val loss {record['val_loss']:.4f}, val acc "
                  f"{record['val_acc']:.3f}" + (f", test acc {record['test_acc']:.3f}" if "test_acc" in record else ""),
                  flush=True)
            gc.collect()
    write_report(load_cache(cache_dir), configs, sizes, seeds, out, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
