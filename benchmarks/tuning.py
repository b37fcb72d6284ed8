"""Tuning on subsets (AUTOMATA): full data vs random subsets vs GradMatch subsets, each with Optuna TPE + Hyperband.

    python benchmarks/tuning.py            # the study (75 minutes in one go on 2 quiet CPU cores; budget 90)
    python benchmarks/tuning.py --quick    # a few-minute smoke run (2 blocks, 64 examples, 3 trials)
    python benchmarks/tuning.py --out DIR  # where tuning.md, tuning.csv and tuning.png go (default benchmarks/results)
    python benchmarks/tuning.py --reuse full random gradmatch --study-seeds 5   # repeat the subset searches

Issue 6, item 3. The model is SmolLM2-135M-Instruct truncated to its first ``--layers`` decoder blocks (final
norm and head kept), saved once as a directory so each trial loads it in about a second. The task is
rotten_tomatoes (``../shared/data``, the built-in template "<text> It was" + " terrible"/" great") with a
seeded ``--num-train`` training sample, a fixed 200-example validation sample (what trials are ranked by) and
a fixed 1000-example test sample (what the retrained winners are scored on).

The same ``hosl_lightning.tuning.tune`` call runs three times, differing only in ``subset``: ``full`` (every
batch), ``random`` and ``gradmatch`` (``--fraction`` of the batches; candidate batches are stratified by class,
the default on labelled data). A full-data trial runs ``epochs`` epochs; a subset trial runs twice as many
subset epochs (``--subset-epochs``), i.e. a fifth of the steps, and is validated as often. AUTOMATA's warm
start is on by default (``--warm-start-steps``, 0 turns it off): the first half of a subset trial's steps take
random batches of all the data, and its subset is then chosen once (``--select-every-epochs`` re-chooses it)
from the weights they leave, so GradMatch makes one feature pass per trial. Without the warm start every trial's
choice is made from the same pretrained weights and computed once per study. Each search: ``--trials`` trials,
TPE with seed 0 whose first ``--startup`` trials are random (and never pruned), Hyperband on the ranking metric
at each validation, over client lr, mu, server lr, cut layer and Q. The startup trials have the same
configurations in all searches (same sampler seed), which is what the rank agreement (Kendall tau, subset's
val_acc vs full data's) is computed on.

Two kinds of repetition measure the noise. Each search's best configuration is retrained on the full data
(plain loader, no subset) with ``--retrain-seeds`` seeds (training order, ZO directions, Lightning's seed; the
same examples) and tested; a (configuration, seed) two searches share is trained once, and kept in
``_tuning_tmp/retrain.json`` for later runs of the same sizes. ``--study-seeds`` repeats each subset search with
other seeds for the subset choice and the trials' training (the sampler's seed stays 0): one subset is shared by
all trials of a search, so one search is one draw of that subset's luck.

Wall time is the whole search: model loading, training, validation and selection, in one process, one search
after the other. Outputs: tuning.md (command, machine, commit, the table and the verdict on each target),
tuning.csv (one row per trial and per retrain) and tuning.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import code_state, command_line, machine, pyplot

from hosl_lightning.tuning import TuneResult, override_args, subset_length, tune
from hosl_lightning.tuning.search import _fit

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "rotten_tomatoes"
METHODS = ("full", "random", "gradmatch")
FULL = {"layers": 4, "num_train": 480, "num_validation": 200, "num_test": 1000, "trials": 10, "startup": 6,
        "epochs": 3, "fraction": 0.1}
QUICK = {"layers": 2, "num_train": 64, "num_validation": 16, "num_test": 16, "trials": 3, "startup": 2,
         "epochs": 2, "fraction": 0.25}
SPACE = {
    "trainer.strategy.init_args.zo_lr": {"low": 1.0e-7, "high": 1.0e-4, "log": True},
    "trainer.strategy.init_args.mu": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
    "model.optimizer.init_args.lr": {"low": 1.0e-5, "high": 1.0e-3, "log": True},
    "trainer.strategy.init_args.cut_layer": {"choices": [1, 2]},
    "trainer.strategy.init_args.q": {"choices": [1, 2]},
}
TARGET_SPEEDUP, TARGET_GAP = 3.0, 1.0
COLORS = {"full": "grey", "random": "tab:orange", "gradmatch": "tab:blue"}


def keep_blocks(model: Any, layers: int) -> Any:
    """A Llama-family causal LM cut down to its first ``layers`` decoder blocks (final norm and head kept)."""
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    return model


def prepare_model(layers: int, directory: Path) -> Path:
    """SmolLM2-135M-Instruct's first ``layers`` blocks, with its tokenizer, as a directory (made once)."""
    if (directory / "model.safetensors").exists():
        return directory
    from hosl_lightning import load_causal_lm, resolve_tokenizer
    from hosl_lightning.models import export_model

    model = keep_blocks(load_causal_lm("smollm2-135m"), layers)
    export_model(model, directory)
    resolve_tokenizer("smollm2-135m").save_pretrained(directory)
    return directory


def fit_config(model_dir: Path, size: dict[str, Any]) -> dict[str, Any]:
    return {
        "seed_everything": 0,
        "trainer": {"max_epochs": size["epochs"], "num_sanity_val_steps": 0, "logger": False,
                    "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "strategy": {"class_path": "hosl_lightning.HOSLStrategy",
                                 "init_args": {"cut_layer": 2, "mode": "hosl", "memory_every_n_steps": 0}}},
        "model": {"model": str(model_dir),
                  "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1.0e-4}}},
        "data": {"class_path": "hosl_lightning.PromptClassificationDataModule",
                 "init_args": {"tokenizer": str(model_dir), "task": "rotten_tomatoes", "data_dir": str(DATA),
                               "max_length": 48, "batch_size": 16, "eval_batch_size": 64, "seed": 0,
                               "num_train": size["num_train"], "num_validation": size["num_validation"],
                               "num_test": size["num_test"]}},
    }


def seed_args(seed: int) -> list[str]:
    """Seed ``seed`` of a fit: its training order, ZO directions and Lightning's seed; the examples stay the same."""
    return [f"--seed_everything={seed}", f"--trainer.strategy.init_args.seed={seed}",
            f"--data.init_args.shuffle_seed={seed}"]


def retrain_key(params: dict[str, Any], seed: int) -> str:
    return json.dumps([params, seed], sort_keys=True)


def retrain(config: Path, params: dict[str, Any], seed: int, memo: dict[str, dict[str, float]]) -> dict[str, float]:
    """Fit ``params`` on the full data with ``seed`` and test; a (configuration, seed) already retrained is not
    trained again (seed 0 is the config's own seeds, so it equals a plain fit of the config)."""
    key = retrain_key(params, seed)
    if key not in memo:
        started = time.perf_counter()
        cli, trainer, value = _fit(["--config", str(config), *override_args(params), *seed_args(seed)], [],
                                   "val_acc")
        (scores,) = trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
        memo[key] = {"val_acc": value, **{k: float(v) for k, v in scores.items()},
                     "seconds": time.perf_counter() - started}
    return memo[key]


def search_name(method: str, study_seed: int, size: dict[str, Any]) -> str:
    """The folder of a search's study database. It names every setting that changes a subset search (the sizes
    are fixed per ``--quick`` or not), so ``--reuse`` never reads back a search made with other settings."""
    if method == "full":
        return "full"
    return (f"{method}-warm{size['warm_start_steps']}-{size['subset_metric']}-epochs{size['subset_epochs']}"
            f"-every{size['select_every']}" + (f"-s{study_seed}" if study_seed else ""))


def load_search(database: Path, subset: str) -> TuneResult:
    """A finished search read back from its Optuna database (trial values, parameters and recorded times)."""
    import optuna

    from hosl_lightning.tuning import TrialRecord

    study = optuna.load_study(study_name="hosl-tune", storage=f"sqlite:///{database}")
    result = TuneResult("hosl-tune", f"sqlite:///{database}", subset)
    for t in study.trials:
        result.trials.append(TrialRecord(t.number, t.state.name, dict(t.params), t.value,
                                         t.user_attrs.get("seconds", 0.0), t.user_attrs.get("selection_seconds", 0.0),
                                         0, None))
    result.search_seconds = sum(t.seconds for t in result.trials)
    result.best_params, result.best_value = dict(study.best_params), float(study.best_value)
    return result


def finished_search(database: Path, trials: int) -> bool:
    """Whether ``database`` holds a search of ``trials`` finished trials (a crashed run's partial one does not)."""
    if not database.exists():
        return False
    import optuna

    study = optuna.load_study(study_name="hosl-tune", storage=f"sqlite:///{database}")
    return sum(t.state.is_finished() for t in study.trials) >= trials


def kendall_tau(a: list[float], b: list[float]) -> float:
    from torchmetrics.functional import kendall_rank_corrcoef

    return float(kendall_rank_corrcoef(torch.tensor(a), torch.tensor(b), variant="b"))


def startup_values(result: TuneResult, startup: int) -> dict[int, tuple[str, float | None]]:
    return {t.number: (json.dumps(t.params, sort_keys=True), t.value) for t in result.trials if t.number < startup}


def summarise(results: dict[str, TuneResult], retrained: dict[str, list[dict[str, float]]], startup: int,
              subset_metric: str = "val_acc") -> list[dict]:
    """One row per search; tau compares the subset's ranking (higher is better) with the full data's val_acc.

    ``results`` is keyed by search label (``method`` or ``method s<seed>``); ``retrained[label]`` holds the
    winner's retrains, one per seed, and ``test_acc`` is their mean."""
    rows, full = [], results["full"]
    base = startup_values(full, startup)
    for label, result in results.items():
        method, _, study_seed = label.partition(" s")
        shared = startup_values(result, startup)
        assert all(shared[n][0] == base[n][0] for n in base), "startup configurations differ between searches"
        sign = -1.0 if method != "full" and subset_metric == "val_loss" else 1.0
        pairs = [(base[n][1], sign * shared[n][1]) for n in base
                 if base[n][1] is not None and shared[n][1] is not None]
        tau = kendall_tau([p[0] for p in pairs], [p[1] for p in pairs]) if len(pairs) > 2 else float("nan")
        rows.append({
            "search": label, "method": method, "study_seed": int(study_seed or 0),
            "search_s": result.search_seconds, "selection_s": sum(t.selection_seconds for t in result.trials),
            "speedup": full.search_seconds / result.search_seconds,
            "pruned": sum(t.state == "PRUNED" for t in result.trials), "trials": len(result.trials),
            "best_val": result.best_value, "best_params": result.best_params,
            "metric": "val_acc" if method == "full" else subset_metric,
            "retrain_s": mean([r["seconds"] for r in retrained[label]]),
            "test_accs": [round(r["test_acc"], 6) for r in retrained[label]],  # float32 noise off, to compare
            # what the searches optimise, measured on the winner retrained on full data (nan: not recorded, a
            # retrain imported from a run before val_acc was kept)
            "val_accs": [float(r.get("val_acc", float("nan"))) for r in retrained[label]],
            "test_acc": mean([round(r["test_acc"], 6) for r in retrained[label]]),
            "tau": tau if method != "full" else 1.0,
        })
    return rows


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def standard_error(values: list[float]) -> float:
    """The standard error of the mean of ``values`` (nan for a single value)."""
    if len(values) < 2:
        return float("nan")
    centre = mean(values)
    return (sum((v - centre) ** 2 for v in values) / (len(values) - 1) / len(values)) ** 0.5


def paired_gaps(minuend: dict, subtrahend: dict) -> list[float]:
    """Test-accuracy gaps (points) between two searches' winners, retrain seed by retrain seed."""
    return [(a - b) * 100 for a, b in zip(minuend["test_accs"], subtrahend["test_accs"], strict=True)]


def gap_summary(name: str, gaps_by_study: list[list[float]]) -> tuple[float, str]:
    """The mean gap over study seeds (each the mean over retrain seeds) and a sentence on its noise.

    The noise is the standard error across study seeds when there are several (each search's whole luck:
    subsets, trials and retrains), else across the retrain seeds of the one search (the retrains' luck alone)."""
    per_study = [mean(gaps) for gaps in gaps_by_study]
    gap = round(mean(per_study), 6)  # a gap of exactly 1 point must not read 1.0000001 against the target
    if len(per_study) > 1:
        return gap, (f"{name} {gap:+.1f} points, standard error {standard_error(per_study):.1f} over "
                     f"{len(per_study)} study seeds (per study seed: {', '.join(f'{g:+.1f}' for g in per_study)})")
    (gaps,) = gaps_by_study
    if len(gaps) < 2:
        return gap, f"{name} {gap:+.1f} points (one search, one retrain seed: no noise estimate)"
    return gap, (f"{name} {gap:+.1f} points, standard error {standard_error(gaps):.1f} over {len(gaps)} retrain "
                 f"seeds (per seed: {', '.join(f'{g:+.1f}' for g in gaps)})")


def mean_tau(group: list[dict]) -> str:
    """The mean tau of a method's searches; a search whose start-up trials all tie has none (tau-b is 0/0)."""
    taus = [r["tau"] for r in group if not math.isnan(r["tau"])]
    untied = f"mean tau {mean(taus):.2f}" if taus else "tau undefined"
    tied = len(group) - len(taus)
    return untied + (f" ({tied} search(es) left out: every start-up trial tied, so tau is undefined)" if tied else "")


def tau_comparison(gradmatch: list[dict], random: list[dict]) -> str:
    """GradMatch's rank agreement with full data against random's, paired by study seed (both taus defined)."""
    pairs = [(a["tau"], b["tau"]) for a, b in zip(gradmatch, random, strict=True)
             if not (math.isnan(a["tau"]) or math.isnan(b["tau"]))]
    if not pairs:
        return "rank agreement: no study seed where both taus are defined"
    differences = [a - b for a, b in pairs]
    spread = f", standard error {standard_error(differences):.2f}" if len(pairs) > 1 else ""
    return (f"rank agreement with full data (Kendall tau, the {len(pairs)} study seed(s) where both are defined): "
            f"{mean([a for a, _ in pairs]):.2f} vs {mean([b for _, b in pairs]):.2f}, GradMatch minus random "
            f"{mean(differences):+.2f}{spread} (not a target)")


def mean_known(values: list[float]) -> float:
    """The mean of the values that are not nan (nan when none is)."""
    known = [v for v in values if not math.isnan(v)]
    return mean(known) if known else float("nan")


def mean_val(row: dict) -> float:
    """The mean validation accuracy of a search's retrained winner, over the retrain seeds that recorded one."""
    return mean_known(row["val_accs"])


def val_cell(row: dict) -> str:
    missing = sum(math.isnan(v) for v in row["val_accs"])
    return "n/a" if missing == len(row["val_accs"]) else f"{mean_val(row) * 100:.1f}" + ("*" if missing else "")


def best_in_search(row: dict) -> str:
    value = row["best_val"]
    return f"val_loss {value:.3f}" if row["metric"] == "val_loss" else f"val_acc {value * 100:.1f}"


def full_row(rows: list[dict]) -> dict:
    return next(r for r in rows if r["method"] == "full")


def write_outputs(out: Path, name: str, rows: list[dict], results: dict[str, TuneResult], size: dict, command: str,
                  wall_s: float, code: str, reused: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / f"{name}.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "trial", "state", "metric", "value", "seconds", "selection_seconds", "steps",
                         "params"])
        by = {r["search"]: r for r in rows}
        for label, result in results.items():
            for t in result.trials:
                writer.writerow([label, t.number, t.state, by[label]["metric"], t.value, f"{t.seconds:.2f}",
                                 f"{t.selection_seconds:.2f}", t.steps, json.dumps(t.params, sort_keys=True)])
            for seed, (test, val) in enumerate(zip(by[label]["test_accs"], by[label]["val_accs"], strict=True)):
                for metric, value in (("test_acc", test), ("val_acc", val)):  # the winner's full-data retrains
                    writer.writerow([label, f"retrain-seed-{seed}", "RETRAIN", metric, value, "", "", "",
                                     json.dumps(result.best_params, sort_keys=True)])
    full = full_row(rows)
    read_back = (" (searches and retrains read back from earlier runs are not in it)"
                 if reused or size["cached_retrains"] else "")
    lines = [
        "# Tuning on subsets: full data vs random vs GradMatch (Optuna TPE + Hyperband)", "",
        f"Command: `{command}`  ", f"Machine: {machine()}  ", f"Code: {code}  ",
        f"Total wall time of this run: {wall_s / 60:.1f} min{read_back}.", "",
        f"Model: SmolLM2-135M-Instruct truncated to its first {size['layers']} blocks. Data: rotten_tomatoes, "
        f"{size['num_train']} training examples (batches of 16), {size['num_validation']} validation (ranking), "
        f"{size['num_test']} test (retrained winners). Each search: {size['trials']} trials, the first "
        f"{size['startup']} random and never pruned, {size['epochs']} epochs per full-data trial and "
        f"{size['subset_epochs']} per subset trial (validated {size['epochs']} times, ranked by "
        f"{size['subset_metric']}), subsets of "
        f"{size['fraction']:.0%} of the batches (candidates stratified by class), "
        + (f"re-chosen every {size['select_every']} subset epochs." if size["select_every"] < size["subset_epochs"]
           else "chosen once per trial.")
        + (f" Warm start: a subset trial's first {size['warm_start_steps']} steps take random batches of all the "
           "data (drawn again every subset epoch, the same for random and GradMatch at a study seed), and the "
           "subset is chosen from the weights they leave." if size["warm_start_steps"] else ""), "",
        *([(f"Each subset search is repeated with study seeds 0 to {size['study_seeds'] - 1} (labelled s1, s2, "
            "...): the seed of the subset choice and of the trials' training order, ZO directions and Lightning "
            "seed. The sampler's seed stays 0, so every search starts with the same configurations, which Kendall "
            "tau compares."), ""] if size["study_seeds"] > 1 else []),
        *([(f"Searches not rerun here ({', '.join(reused)}): each is read from the study database of an earlier "
            "run with the same sizes and settings (`_tuning_tmp/full/<search>/hosl-tune.db`, the folder named "
            "after them); its wall time is the sum of its trials' times."), ""] if reused else []),
        (f"Each search's best configuration is retrained on the full data with {len(full_row(rows)['test_accs'])} "
         "seed(s) (seed s: training order, ZO directions and Lightning's seed; the same examples) and tested on "
         "the test sample; the table gives the mean, and the range over seeds."
         + (f" {size['cached_retrains']} of the {size['retrains']} retrains were read from earlier runs' "
            "(`_tuning_tmp/retrain.json`); their times are those runs'." if size["cached_retrains"] else "")), "",
        ("| search | search wall time | selection time | speedup vs full | trials pruned | best in search "
         "| retrained test acc (range) | retrained val acc | Kendall tau vs full (startup trials) |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['search']} | {r['search_s']:.0f} s | {r['selection_s']:.0f} s | {r['speedup']:.2f}x | "
                     f"{r['pruned']}/{r['trials']} | {best_in_search(r)} | {r['test_acc'] * 100:.1f} "
                     f"({min(r['test_accs']) * 100:.1f}-{max(r['test_accs']) * 100:.1f}) | {val_cell(r)} | "
                     f"{'undefined (all tied)' if math.isnan(r['tau']) else format(r['tau'], '.2f')} |")
    if any(math.isnan(v) for r in rows for v in r["val_accs"]):
        lines += ["", ("\\* the mean over the retrain seeds that recorded a validation accuracy: a retrain imported "
                       "from a run before it was kept has none.")]
    lines += ["", "Best configurations:", ""]
    lines += [f"- {r['search']}: `{json.dumps({k.rsplit('.', 1)[-1]: v for k, v in r['best_params'].items()})}` "
              f"(retrain {r['retrain_s']:.0f} s; test acc by seed: "
              f"{', '.join(f'{a * 100:.1f}' for a in r['test_accs'])}; val acc by seed: "
              f"{', '.join('n/a' if math.isnan(v) else f'{v * 100:.1f}' for v in r['val_accs'])})" for r in rows]
    lines += ["", ("Targets (over all of a method's searches: speedup from the mean search time, test accuracy the "
                   "mean over searches and retrain seeds, gaps paired by retrain seed):"), ""]
    searches = {method: [r for r in rows if r["method"] == method] for method in ("random", "gradmatch")}
    for method, group in searches.items():
        speedup = full["search_s"] / mean([r["search_s"] for r in group])
        gap, noise = gap_summary("full minus subset:", [paired_gaps(full, r) for r in group])
        lines.append(f"- {method}: speedup {speedup:.2f}x (target >= {TARGET_SPEEDUP}x: "
                     f"{'met' if speedup >= TARGET_SPEEDUP else 'NOT met'}); test accuracy {gap:+.1f} points "
                     f"below full-data tuning (target <= {TARGET_GAP}: {'met' if gap <= TARGET_GAP else 'NOT met'}); "
                     f"{noise}; {mean_tau(group)}")
    g, r = searches["gradmatch"], searches["random"]
    difference, noise = gap_summary("GradMatch minus random:", [paired_gaps(a, b) for a, b in zip(g, r, strict=True)])
    lines.append(f"- GradMatch no worse than random: test {mean([x['test_acc'] for x in g]) * 100:.1f} vs "
                 f"{mean([x['test_acc'] for x in r]) * 100:.1f} ({'met' if difference >= 0 else 'NOT met'} on test "
                 f"accuracy); {noise}; {tau_comparison(g, r)}")
    val_g, val_r = (mean_known([mean_val(x) for x in group]) * 100 for group in (g, r))
    disagree = (val_g - val_r) * difference < 0  # nan compares False: no claim without both
    lines.append(f"- Diagnostic, not a target: validation accuracy of the same retrained winners (the "
                 f"{size['num_validation']} examples every search ranks by), GradMatch {val_g:.1f} vs random "
                 f"{val_r:.1f}." + (" Validation and test disagree on which method's winners are better: the two "
                                     "samples rank these configurations differently." if disagree else ""))
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    plot(out / f"{name}.png", rows, results, size["startup"])


def plot(path: Path, rows: list[dict], results: dict[str, TuneResult], startup: int) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(13, 4))
    names, colors = [r["search"] for r in rows], [COLORS[r["method"]] for r in rows]
    left.bar(names, [r["search_s"] / 60 for r in rows], color=colors)
    left.set_ylabel("search wall time (min)")
    middle.bar(names, [r["test_acc"] * 100 for r in rows], color=colors)
    for x, r in enumerate(rows):  # each retrain seed as a dot on its method's mean
        middle.scatter([x] * len(r["test_accs"]), [a * 100 for a in r["test_accs"]], color="black", s=12, zorder=3)
    middle.set_ylabel("test acc after full-data retrain (%, mean; dots: seeds)")
    low, high = min(min(r["test_accs"]) for r in rows), max(max(r["test_accs"]) for r in rows)
    middle.set_ylim(low * 100 - 5, high * 100 + 3)
    full = {t.number: t.value for t in results["full"].trials if t.number < startup}
    scale = 1.0 if rows[-1]["metric"] == "val_loss" else 100.0
    for r in rows[1:]:
        sub = {t.number: t.value for t in results[r["search"]].trials if t.number < startup}
        shared = [n for n in full if full[n] is not None and sub.get(n) is not None]
        right.scatter([full[n] * 100 for n in shared], [sub[n] * scale for n in shared], color=COLORS[r["method"]],
                      marker="x" if r["method"] == "random" else "o", s=60,
                      label=r["method"] if r["study_seed"] == 0 else None)
    right.set_xlabel("val acc, trained on full data (%)")
    right.set_ylabel("val loss, trained on the subset" if rows[-1]["metric"] == "val_loss"
                     else "val acc, trained on the subset (%)")
    right.legend()
    right.set_title("same configurations (startup trials)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--subset-epochs", type=int, default=None,
                        help="epochs of a subset trial, a multiple of a full-data trial's epochs (default: twice "
                             "as many); validation runs as many times as in a full-data trial")
    parser.add_argument("--reuse", nargs="+", choices=METHODS, default=[], metavar="METHOD",
                        help="take these searches (full, random, gradmatch) from the study databases of an earlier "
                             "run with the same sizes instead of running them again; a reused search's wall time "
                             "is the sum of its trials' times")
    parser.add_argument("--reuse-full", action="store_true", help="the same as --reuse full")
    parser.add_argument("--retrain-seeds", type=int, default=3,
                        help="retrain each search's best configuration with this many seeds (0, 1, ...): the "
                             "training order and ZO directions change, the examples do not (default 3)")
    parser.add_argument("--study-seeds", type=int, default=1,
                        help="run each subset search with this many study seeds (0, 1, ...): the seed of the subset "
                             "choice and of the trials' training; the sampler's seed, and so the start-up "
                             "configurations, stay the same (default 1)")
    parser.add_argument("--select-every-epochs", type=int, default=None,
                        help="choose the subset again every this many subset epochs (AUTOMATA's R; default: "
                             "once per trial)")
    parser.add_argument("--warm-start-steps", type=int, default=None,
                        help="each subset trial's first steps on random batches of all the data, before the first "
                             "subset choice (AUTOMATA's warm start; part of the trial's steps, not extra). Default: "
                             "half a subset trial's steps (GRAD-MATCH's kappa = 1/2; 9 of 18 at the full sizes); 0 "
                             "turns it off")
    parser.add_argument("--subset-metric", choices=("val_acc", "val_loss"), default="val_acc",
                        help="what the subset searches rank trials by (the full-data search ranks by val_acc); "
                             "val_loss, the cross-entropy over the class scores, is continuous where accuracy ties")
    parser.add_argument("--tag", default="", help="suffix of the output files (tuning-TAG.md, ...)")
    args = parser.parse_args(argv)
    for option, low in (("retrain_seeds", 1), ("study_seeds", 1), ("warm_start_steps", 0)):
        if getattr(args, option) is not None and getattr(args, option) < low:
            parser.error(f"--{option.replace('_', '-')}={getattr(args, option)} is not valid: it must be >= {low}")
    reused = sorted(set(args.reuse) | ({"full"} if args.reuse_full else set()), key=METHODS.index)
    size = dict(QUICK if args.quick else FULL)
    command = command_line("tuning.py", argv)
    work = ROOT / "benchmarks" / "results" / "_tuning_tmp"
    started, code = time.perf_counter(), code_state()  # the code this run imported, before anything changes
    model_dir = prepare_model(size["layers"], work / f"smollm2-135m-{size['layers']}-blocks")
    config, space = work / ("fit-quick.yaml" if args.quick else "fit.yaml"), work / "space.yaml"
    config.write_text(yaml.safe_dump(fit_config(model_dir, size)))
    space.write_text(yaml.safe_dump(SPACE))
    batches = -(-size["num_train"] // 16)
    subset_epoch = subset_length(size["fraction"], batches)
    results: dict[str, TuneResult] = {}
    subset_epochs = args.subset_epochs or 2 * size["epochs"]
    if subset_epochs % size["epochs"]:
        parser.error(f"--subset-epochs={subset_epochs} is not valid: it must be a multiple of {size['epochs']} "
                     "(a full-data trial's epochs), so that subset trials validate at the same fractions of training")
    select_every = args.select_every_epochs or subset_epochs
    size["subset_epochs"], size["select_every"], size["subset_metric"] = subset_epochs, select_every, args.subset_metric
    warm_start_steps = subset_epochs * subset_epoch // 2 if args.warm_start_steps is None else args.warm_start_steps
    size["study_seeds"], size["warm_start_steps"] = args.study_seeds, warm_start_steps
    searches = [("full", 0)] + [(m, k) for m in METHODS[1:] for k in range(args.study_seeds)]
    for method, study_seed in searches:
        label = method if not study_seed else f"{method} s{study_seed}"
        run_dir = work / ("quick" if args.quick else "full") / search_name(method, study_seed, size)
        if method in reused and finished_search(run_dir / "hosl-tune.db", size["trials"]):
            results[label] = load_search(run_dir / "hosl-tune.db", method)
            print(f"=== {label} search reused: {results[label].search_seconds:.0f} s ===", flush=True)
            continue
        if method in reused:
            print(f"=== {label}: no finished search with these settings in {run_dir} to reuse, so it runs ===",
                  flush=True)
        for old in run_dir.glob("*.db"):
            old.unlink()  # a fresh study each time
        overrides = seed_args(study_seed) if study_seed else []
        if method != "full" and subset_epochs != size["epochs"]:
            overrides += [f"--trainer.max_epochs={subset_epochs}",
                          f"--trainer.check_val_every_n_epoch={-(-subset_epochs // size['epochs'])}"]
        metric = "val_acc" if method == "full" else args.subset_metric
        print(f"=== search on {method} data (study seed {study_seed}), ranked by {metric} ===", flush=True)
        results[label] = tune(str(config), str(space), n_trials=size["trials"], subset=method, metric=metric,
                              direction="minimize" if metric == "val_loss" else "maximize",
                              fraction=size["fraction"], select_every_n_steps=select_every * subset_epoch,
                              output_dir=str(run_dir), n_startup_trials=size["startup"], retrain=False,
                              selection_seed=study_seed, warm_start_steps=warm_start_steps,
                              overrides=overrides)
    memo_path = work / ("retrain-quick.json" if args.quick else "retrain.json")
    memo: dict[str, dict[str, float]] = json.loads(memo_path.read_text()) if memo_path.exists() else {}
    retrained, cached = {}, 0
    for label, result in results.items():
        retrained[label] = []
        for seed in range(args.retrain_seeds):
            print(f"=== retrain the {label} search's best on full data, seed {seed} ===", flush=True)
            cached += retrain_key(result.best_params, seed) in memo
            retrained[label].append(retrain(config, result.best_params, seed, memo))
            memo_path.write_text(json.dumps(memo))  # a later run with the same sizes reuses these retrains
    rows = summarise(results, retrained, size["startup"], size["subset_metric"])
    out = Path(args.out) if not args.quick else Path(args.out) / "_tuning_quick"
    name = "tuning" + (f"-{args.tag}" if args.tag else "")
    size["cached_retrains"], size["retrains"] = cached, len(results) * args.retrain_seeds
    write_outputs(out, name, rows, results, size, command, time.perf_counter() - started, code, reused)
    print((out / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
