"""The report of ``benchmarks.cut_depth``: accuracy by cut and method, each learning client minus frozen with paired
95% intervals, the issue's two verdicts, the sweeps, the runs still missing, and the curves against step and
against the seconds of the steps."""

from __future__ import annotations

import csv
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from .claims import TIED, accuracy_cell
from .common.environment import machine
from .common.plotting import pyplot, save_figure
from .common.stats import difference_cell, paired, paired_point
from .common.tasks import CUT, MODEL_NAME
from .convergence_report import mean_curve
from .cut_depth import BBC, FG, FO, FROZEN, LARGER_Q, TASK, ZO_SGD, Entry, Plan, Setup, listing, rates

GAIN, FO_GAP = 1.0, 1.0  # the targets: a client beats frozen by >= 1 point; the deep cut within 1 of fo

Runs = list[dict[str, Any]]


def beats_frozen(gains: dict[int, dict[str, tuple | None]]) -> list[str]:
    """Each (cut, learning client) whose paired difference from frozen is at least ``GAIN`` points with its 95%
    interval above 0; ``gains[cut][method]`` is ``paired(client, frozen)`` or None."""
    return [f"cut {cut}: {name} {difference_cell(gain, seeds=True)}" for cut, by_method in gains.items()
            for name, gain in by_method.items() if gain is not None and gain[0] >= GAIN and gain[1] > 0]


def frozen_verdict(gains: dict[int, dict[str, tuple | None]], seeds: int) -> str:
    """The first target, said plainly: where a learning client beats frozen, or that none does (with the largest
    difference), and whether the verdict waits on runs."""
    known = {(cut, name): gain for cut, by_method in gains.items() for name, gain in by_method.items() if gain}
    if not known:
        return "Not yet assessable: no learning client and frozen have a paired seed at any cut."
    short = sum(gain is None or gain[3] < seeds for by_method in gains.values() for gain in by_method.values())
    total = sum(map(len, gains.values()))
    provisional = (f" (provisional: {short} of the {total} comparisons of a learning client with frozen have fewer "
                   f"than {seeds} paired seeds; see the missing runs)" if short else "")
    winners = beats_frozen(gains)
    if winners:
        return "A learning client beats frozen at: " + "; ".join(winners) + "." + provisional
    (cut, name), best = max(known.items(), key=lambda item: item[1][0])
    return (f"None does{' so far' if short else ''}: no learning client beats frozen by {GAIN:g} point with its "
            f"interval above 0 at any cut (the largest difference: {name} at cut {cut}, "
            f"{difference_cell(best, seeds=True)})." + provisional)


def deep_verdict(clients: dict[str, Runs], fo: Runs, cut: int, seeds: int) -> str:
    """The second target: the best learning client at the deep cut (highest mean test accuracy) within ``FO_GAP``
    point of fo (fo minus it, paired)."""
    finished = {name: runs for name, runs in clients.items() if runs}
    if not finished or not fo:
        return f"Not yet assessable: fo and a learning client must have finished at cut {cut}."
    name = max(finished, key=lambda n: statistics.mean(r["test"]["acc"] for r in finished[n]))
    gap, interval = paired_point(fo, finished[name]), paired(fo, finished[name])
    met = "met" if gap <= FO_GAP else f"NOT met, by {gap - FO_GAP:.1f} points"
    short = [n for n, runs in clients.items() if len(runs) < seeds] + (["fo"] if len(fo) < seeds else [])
    provisional = f" (provisional: fewer than {seeds} seeds for {', '.join(short)})" if short else ""
    return (f"At cut {cut} the best learning client is {name}: fo minus it {difference_cell(interval, seeds=True)}; "
            f"within {FO_GAP:g} point of fo: {met}." + provisional)


def step_seconds(record: dict[str, Any]) -> tuple[float, float | None, float, bool]:
    """Client, server and total seconds per training step, and whether the total is the steps' own (client plus
    server, recorded) rather than the fit's wall time per step (validation included: runs before ``server_s``)."""
    steps = record["config"]["steps"]
    client = record["client_s"] / steps
    if "server_s" in record:
        return client, record["server_s"] / steps, client + record["server_s"] / steps, True
    return client, None, record["train_s"] / steps, False


def seconds_curve(runs: Runs) -> list[tuple[float, float]]:
    """Mean validation accuracy against the mean client plus server seconds of the steps up to it, over the runs
    that kept server seconds. The others (cached before ``server_s``: the claims study's cut-2 runs) kept only
    the fit's wall time, validation, loading and other processes' load included (frozen's seed 0 took 6672 s under
    heavy load), which is not comparable: they are left out, not plotted pro rata."""
    timed = [r for r in runs if "server_s" in r]
    return [(statistics.mean(p["client_s"] + p["server_s"] for r in timed for p in r["curve"] if p["step"] == step),
             accuracy) for step, accuracy in (mean_curve(timed, "val_acc") if timed else [])]


def client_share(runs: Runs) -> str:
    """The client's share of the first-order loss decrease both halves predicted over a fit, mean over seeds."""
    shares = [d["client"] / (d["server"] + d["client"]) for r in runs
              if (d := r.get("predicted_decrease")) and d["steps"] and d["server"] + d["client"] > 0]
    return f"{100 * statistics.mean(shares):.2g}%" if shares else "-"


class Tables:
    """The plan's final runs, found in the cache, by dataset, cut and method."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.runs: dict[tuple[str, int, str], Runs] = defaultdict(list)
        self.diverged: list[Entry] = []  # finished without a test score: the run diverged
        for entry in plan.everything:  # each run once: --bbc-news puts bbc_news's runs in plan.entries too
            if not entry.sweep and plan.done(entry):
                record = plan.cache[entry.config.key()]
                if record.get("test"):
                    self.runs[(entry.dataset, entry.cut, entry.method)].append(record)
                else:
                    self.diverged.append(entry)
        for runs in self.runs.values():
            runs.sort(key=lambda r: r["config"]["seed"])

    def methods(self, cut: int, dataset: str = TASK) -> list[str]:
        """The methods ``dataset``'s plan runs at ``cut``, in the table's order, and fo (cut 2's runs serve where
        it has none of its own)."""
        planned = {e.method for e in self.plan.everything if e.cut == cut and e.dataset == dataset and not e.sweep}
        order = [FROZEN.name, ZO_SGD.name, *(m.name for m in FG.values()), FO.name]
        return [name for name in order if name in planned or name == FO.name]

    def get(self, dataset: str, cut: int, method: str) -> tuple[Runs, str]:
        """The runs and, for fo at a cut it has no runs of its own, where they come from (cut 2's: the same
        computation). Where fo's check failed, each cut's own fo runs alone."""
        own = self.runs.get((dataset, cut, method), [])
        if (method == FO.name and cut != CUT and len(own) < len(self.plan.setup.seeds)
                and self.plan.fo_check is not False):
            cut_2 = [self.plan.cache[e.config.key()] for e in (self.plan.rates.final("", FO.name, CUT, s, dataset)
                                                                for s in self.plan.setup.seeds) if self.plan.done(e)]
            return cut_2, "cut 2's runs"
        return own, ""


def write_report(cache: dict[str, dict[str, Any]], setup: Setup, out: Path, command: str, bbc: bool = False) -> None:
    """cut_depth.md / .csv / .png from the cache: only the plan's runs, and a list of those it still lacks."""
    plan = Plan(cache, setup, bbc)
    tables = Tables(plan)
    rows: list[dict[str, Any]] = []
    verdicts: list[str] = []
    body: list[str] = []
    for dataset in [TASK] + ([BBC] if bbc or any(d == BBC for d, _, _ in tables.runs) else []):
        table, gains, new_rows = accuracy_table(tables, dataset)
        body += table
        rows += new_rows
        deep = setup.deep
        clients = {m: tables.get(dataset, deep, m)[0] for m in tables.methods(deep, dataset)
                   if m not in (FROZEN.name, FO.name)}
        verdicts += [f"- **{dataset}, a learning client beats frozen (>= {GAIN:g} point, interval above 0):** "
                     + frozen_verdict(gains, len(setup.seeds)),
                     f"- **{dataset}, the deep cut within {FO_GAP:g} point of fo:** "
                     + deep_verdict(clients, tables.get(dataset, deep, FO.name)[0], deep, len(setup.seeds))]
    diverged = [f"- {e.label()}: {plan.cache[e.config.key()]['diverged']}" for e in tables.diverged]
    elsewhere = plan.pending_elsewhere()
    if elsewhere:
        verdicts.append(f"- **Waiting on the claims study:** not in the cache yet: {listing(elsewhere)}. They are "
                        "the claims study's runs, under the same cache keys (`results/convergence/`): `python -m "
                        "benchmarks.claims` runs them and this study never does; rebuild this report "
                        "(`python -m benchmarks.cut_depth --report-only`) once they are in.")
    lines = [*header(tables, command), "## Verdicts (issue 40)", "", *verdicts, "", *body, *sweep_section(tables),
             *missing_section(plan), *(["## Diverged runs", "", "Done, not scored, not rerun:", "", *diverged, ""]
                                      if diverged else [])]
    out.mkdir(parents=True, exist_ok=True)
    (out / "cut_depth.md").write_text("\n".join(lines) + "\n")
    with (out / "cut_depth.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    plot(out / "cut_depth.png", tables, setup.cuts)


def header(tables: Tables, command: str) -> list[str]:
    plan, setup = tables.plan, tables.plan.setup
    used = [r for runs in tables.runs.values() for r in runs]
    commits = Counter(r["commit"].split(",")[0] for r in used)
    machines = Counter(r.get("machine", "not recorded").split(",")[0] for r in used)
    return ["# The cut-depth study: does a learning client beat a frozen one, and at which cut?", "",
            f"Command: `{command}`  ", f"Machine of this report: {machine()}  ", f"Model: {MODEL_NAME}  ",
            "Code: each run records its commit (runs per commit: "
            + (", ".join(f"{c} ({n})" for c, n in sorted(commits.items())) or "none yet") + ")  ",
            "Runs' machines: " + (", ".join(f"{m} ({n})" for m, n in machines.items()) or "none yet"), "", TIED, "",
            (f"rotten_tomatoes, {setup.steps} steps of batch 8, seeds {', '.join(map(str, setup.seeds))}, the same "
             f"{setup.n_test} test examples; cuts {', '.join(map(str, setup.cuts))} of {setup.layers} blocks (the "
             f"deep cut leaves {setup.layers - setup.deep} on the server). The forward-gradient client's larger Q at "
             f"the deep cut: {f'Q={plan.deep_q}' if plan.deep_q else 'none'} (the largest the budget allows). fo "
             "trains every weight by backprop and the cut does not change its arithmetic: "
             + (f"{fo_check_line(plan)}." if plan.fo_check is False else
                f"where fo has no runs of its own at a cut, cut 2's serve ({fo_check_line(plan)}).")), ""]


def accuracy_table(tables: Tables, dataset: str) -> tuple[list[str], dict[int, dict[str, tuple | None]], list[dict]]:
    """The table of ``dataset``, each learning client's paired difference from frozen by cut, and the csv rows."""
    setup = tables.plan.setup
    gains: dict[int, dict[str, tuple | None]] = {}
    rows = []
    lines = [f"## {dataset}: test accuracy by cut and method", "",
             ("| cut | method | seeds | test acc (range) | minus frozen [95% CI] (seeds) | minus fo [95% CI] | "
              "client s/step | server s/step | step s | client share of predicted decrease |"),
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for cut in setup.cuts if dataset == TASK else (setup.deep,):
        frozen, fo = tables.get(dataset, cut, FROZEN.name)[0], tables.get(dataset, cut, FO.name)[0]
        gains[cut] = {}
        for method in tables.methods(cut, dataset):
            runs, source = tables.get(dataset, cut, method)
            learning = method not in (FROZEN.name, FO.name)
            if learning:
                gains[cut][method] = paired(runs, frozen)
            cells = [difference_cell(gains[cut][method], seeds=True) if learning else "",
                     "" if method == FO.name else difference_cell(paired(runs, fo)), *timing_cells(runs),
                     client_share(runs) if learning else ""]
            name = method + (f" ({source})" if source else "")
            lines.append(f"| {cut} | {name} | {len(runs)} | {accuracy_cell(runs)} | " + " | ".join(cells) + " |")
            rows += [csv_row(dataset, cut, method, r, source) for r in runs]
    lines += ["", ("Accuracy in % (range over seeds). Intervals: paired 95% bootstrap over the seeds both methods "
                   "finished and the test examples. Seconds: medians over seeds of each half's seconds per training "
                   "step (the strategy's `hosl/client_sec` and `hosl/server_sec`; fo's one AdamW step over both "
                   "halves counts as the client's); * marks runs cached before server seconds were kept, whose step "
                   "s is the fit's wall time per step (validation included). Times compare only between runs on one "
                   "machine under like load (each run records its machine and load average). The client share: the "
                   "client's part of the first-order loss decrease both halves predicted over the fit "
                   "(`hosl/predicted_decrease_*`). hosl's server seconds include that diagnostic's two passes over "
                   "the server's gradients and weights (about 0.13 s a step, `forward_gradient.md`), which frozen's "
                   "and fo's do not. The figure (`cut_depth.png`) plots against seconds only the runs that kept "
                   "server seconds: the * runs are left out of its seconds panels."), ""]
    return lines, gains, rows


def timing_cells(runs: Runs) -> list[str]:
    """Median client, server and total seconds per step over ``runs`` (* where the total is the fit's wall time)."""
    if not runs:
        return ["-", "-", "-"]
    timing = [step_seconds(r) for r in runs]
    servers = [t[1] for t in timing if t[1] is not None]
    return [f"{statistics.median(t[0] for t in timing):.2f}",
            f"{statistics.median(servers):.2f}" if servers else "-",
            f"{statistics.median(t[2] for t in timing):.2f}" + ("" if all(t[3] for t in timing) else "*")]


def fo_check_line(plan: Plan) -> str:
    """What fo's check found, naming both records' commits (and machines where they differ)."""
    if plan.fo_runs is None:
        return "fo's check at the deep cut, seed 0, is not run yet"
    at_2, deep = plan.fo_runs
    cut = plan.setup.deep
    code = (f"records: cut 2's {at_2['commit']}, cut {cut}'s {deep['commit']}"
            + ("" if at_2.get("machine") == deep.get("machine") else
               f"; machines {at_2.get('machine', 'not recorded')} and {deep.get('machine', 'not recorded')}"))
    if plan.fo_check:
        return f"fo at cut {cut}, seed 0, predicted every test example as at cut 2; {code}"
    tests = [(r.get("test") or {}).get("correct") for r in plan.fo_runs]
    differ = (f"predicted {sum(a != b for a, b in zip(*tests))} of {len(tests[0])} test examples differently from "
              "cut 2's" if None not in tests and len(tests[0]) == len(tests[1]) else "ended differently from cut 2's")
    return (f"fo's check FAILED: at cut {cut}, seed 0, fo {differ} ({code}). The cut does not change fo's arithmetic, "
            "so the mismatch may come from the two records' commits or machines rather than from the cut; either "
            "way cut 2's runs no longer stand in: each cut's table takes its own fo runs, which the plan now holds")


CSV_FIELDS = ["dataset", "cut", "method", "runs_from", "seed", "lr", "zo_lr", "test_acc", "client_s_per_step",
              "server_s_per_step", "step_s", "step_s_is", "train_s", "predicted_decrease_client",
              "predicted_decrease_server", "load_1min", "machine", "commit"]


def csv_row(dataset: str, cut: int, method: str, record: dict[str, Any], source: str) -> dict[str, Any]:
    client, server, total, own = step_seconds(record)
    config, decrease = record["config"], record.get("predicted_decrease") or {}
    values = [dataset, cut, method, source or f"cut {config['cut']}", config["seed"], config["lr"], config["zo_lr"],
              record["test"]["acc"], round(client, 3), None if server is None else round(server, 3), round(total, 3),
              "client+server" if own else "fit wall / steps", round(record["train_s"], 1), decrease.get("client"),
              decrease.get("server"), record.get("load_1min"), record.get("machine"), record["commit"]]
    return dict(zip(CSV_FIELDS, values))


def sweep_section(tables: Tables) -> list[str]:
    """Each method's rates at each cut: the values its sweep tried with their validation losses, the pick and why."""
    plan = tables.plan
    lines = ["## Learning rates", "", "| cut | method | tried: rate (final val loss) | chosen | why |",
             "|---:|---|---|---|---|"]
    for cut in plan.setup.cuts:
        for name in tables.methods(cut):
            entries, pick = plan.rates.sweeps.get((name, cut), []), plan.rates.picks.get((name, cut))
            if not entries and pick is None:
                continue
            tried = ", ".join(sweep_cell(plan, e) for e in entries) or "-"
            chosen = "-" if pick is None else rates(pick)
            why = plan.rates.why.get((name, cut), "sweep not finished")
            lines.append(f"| {cut} | {name} | {tried} | {chosen} | {why} |")
    return [*lines, "", (f"Sweeps: rotten_tomatoes, seed 0, {plan.setup.sweep_steps} steps, validated once on "
                         f"{plan.setup.n_val} examples. The hosl clients' server runs the chosen server lr of its cut "
                         f"(frozen's; fo's at cut 2). Every larger Q's zo_lr is the Q=1 pick at its cut times the "
                         f"factor the Q={LARGER_Q} sweep at cut 2 chose (x1 or x10: it tries the Q=1 pick there and "
                         "10x it). bbc_news runs take the rotten_tomatoes rates."), ""]


def sweep_cell(plan: Plan, entry: Entry) -> str:
    if entry.config is None:
        return "... (waits on an earlier sweep)"
    record = plan.cache.get(entry.config.key())
    value = entry.config.lr if entry.config.zo_lr is None else entry.config.zo_lr
    loss = ("not run" if record is None else "diverged" if record["diverged"] or not record["curve"]
            else f"{record['curve'][-1]['val_loss']:.3f}")
    return f"{value:g} ({loss})"


def missing_section(plan: Plan) -> list[str]:
    """The plan's runs not in the cache, by method and cut: a report from a partial cache says what it lacks."""
    groups: dict[tuple[str, int, str, bool], list[Entry]] = defaultdict(list)
    for entry in plan.missing():
        groups[(entry.method, entry.cut, entry.dataset, entry.sweep)].append(entry)
    if not groups:
        return ["## Missing runs", "", "None: every run of the plan is in the cache.", ""]
    lines = ["## Missing runs", "", f"{sum(map(len, groups.values()))} runs of the plan are not in the cache yet:", ""]
    for (method, cut, dataset, sweep), entries in groups.items():
        what = (f"sweep ({len(entries)} rates)" if sweep else
                "seeds " + ", ".join(str(e.seed) for e in entries))
        notes = (["the claims study's, never run here: `python -m benchmarks.claims` adds them"]
                 if entries[0].claims else []) + (
            ["its rates wait on an unfinished sweep"] if any(e.config is None for e in entries) else [])
        lines.append(f"- {method} at cut {cut} on {dataset}: {what}" + (f" ({'; '.join(notes)})" if notes else ""))
    return [*lines, ""]


def plot(path: Path, tables: Tables, cuts: tuple[int, ...]) -> None:
    plt = pyplot()
    if plt is None or not tables.runs:
        return
    figure, axes = plt.subplots(2, len(cuts), figsize=(5 * len(cuts), 8), squeeze=False)
    names = [FROZEN.name, ZO_SGD.name, *(m.name for m in FG.values()), FO.name]
    color = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(names)}
    for column, cut in enumerate(cuts):
        for method in tables.methods(cut):
            runs, source = tables.get(TASK, cut, method)
            if not runs:
                continue
            accuracy, timed = mean_curve(runs, "val_acc"), seconds_curve(runs)
            style = {"marker": "o", "color": color[method], "label": method + (f" ({source})" if source else "")}
            axes[0][column].plot([s for s, _ in accuracy], [100 * a for _, a in accuracy], **style)
            if timed:
                axes[1][column].plot([s for s, _ in timed], [100 * a for _, a in timed], **style)
        axes[0][column].set(title=f"cut {cut}: validation accuracy", xlabel="step", ylabel="accuracy (%)")
        axes[1][column].set(title=f"cut {cut}: against the steps' seconds", xlabel="client + server seconds",
                            ylabel="accuracy (%)")
        if axes[0][column].lines:
            axes[0][column].legend(fontsize=7)
        if not axes[1][column].lines:
            axes[1][column].text(0.5, 0.5, "no run with server seconds yet", ha="center", va="center",
                                 transform=axes[1][column].transAxes)
    figure.suptitle("Seconds panels: only the runs that kept server seconds. Runs cached before (the claims study's "
                    "cut-2 runs) timed the whole fit,\nvalidation, loading and other processes' load included, and are "
                    "left out.", fontsize=9)
    save_figure(figure, path, dpi=90)
