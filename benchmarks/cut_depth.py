"""The cut-depth study: does a client that learns beat a frozen one, and at which cut?

    python -m benchmarks.cut_depth                    # run what is missing (resumes from the cache), then report
    python -m benchmarks.cut_depth --budget-min 150   # a sitting: start no run its estimate ends past 150 min
    python -m benchmarks.cut_depth --dry-run          # print the plan (runs, what is cached, estimated hours)
    python -m benchmarks.cut_depth --report-only      # rebuild cut_depth.md / .csv / .png from the cache
    python -m benchmarks.cut_depth --bbc-news         # also the deep cut on bbc_news, after everything else

Issue 40, item 3. SmolLM2-135M-Instruct on rotten_tomatoes, 300 steps of batch 8, seeds 0-2, the same 500 test
examples, through the claims and convergence studies' harness (``benchmarks.common.training``) and their cache
(``results/convergence/``): a run is a JSON file keyed by its full configuration, holding its commit, and the
cut-2 runs of fo, frozen and the paper's ZO-SGD are the claims study's own files (this study never runs them).

- **Cuts.** 2 (the claims study's), 16, and 26, the deep cut: 4 of SmolLM2's 30 blocks stay on the server, the
  most the issue allows (at most 4). Of 26 and 27 it is the cheaper for a learning client (its cost grows with
  the blocks it holds) and the stronger frozen reference (its server keeps one block more).
- **Methods.** ``frozen`` (the client never learns); ``hosl/zo_sgd-dense`` (the paper's ZO-SGD, Q=1, dense
  directions); the forward-gradient client (``zo_optimizer: forward_gradient``) at Q=1, at Q=8 at cuts 2 and 16,
  and at the largest Q of ``DEEP_QS`` whose runs fit ``BUDGET_H`` at the deep cut; and ``fo``. The forward-gradient
  client draws sparse embedding directions (rows the batch reads): a table row the batch does not read has zero
  gradient, so a dense direction there adds only noise to the update, and a walk over 28 M weights per query.
- **fo is one computation at every cut.** It trains every weight by backprop with one AdamW, and the cut only
  moves where the backward pass crosses; the weights after training are bit-for-bit the same at every cut
  (``tests/test_cut_depth_study.py`` checks it on a tiny Llama). So cut 2's fo runs serve every cut, and one fo
  run at the deep cut (seed 0) checks it on SmolLM2, against cut 2's seed 0 found by its exact key: should its
  test predictions differ from cut 2's, fo's other seeds at cuts 16 and 26 (and at the deep cut on bbc_news) join
  the plan, and the report takes each cut's own fo runs. A mismatch may also come from the two records' commits or
  machines; the report names both.
- **Learning rates** (seed 0, ``SWEEP_STEPS`` steps, validated once on 100 examples, the lowest validation loss
  wins): fo's AdamW lr is the claims study's pick. The server's AdamW lr at a cut is frozen's pick there from
  ``SERVER_LRS`` (the server learning alone); at cut 2 it is fo's, as in the claims study. Every hosl client's
  server runs it, so a client minus frozen compares equal servers. ZO-SGD's zo_lr is swept over its claims grid
  (the claims study's pick at cut 2); the forward-gradient client's over ``FG_ZO_LRS`` at Q=1. The larger Q has a
  sweep of its own at cut 2 (Q=``LARGER_Q``): the Q=1 pick there and 10x it (``LARGER_Q_FACTORS``; the mean over
  Q directions has the same expected step and less variance, so a larger rate may now be the better one). Every
  larger-Q run, at every cut and the deep cut's Q included, takes the Q=1 pick at its cut times the factor that
  sweep chose (at cut 2, the sweep's pick itself).
- **Order.** Sweeps before the runs that take their rates; then frozen, fo's check and the Q=1 forward-gradient
  client at cuts 16 and 26, seed by seed; ZO-SGD there; the forward-gradient client at cut 2; the larger Q's sweep
  at cut 2, then Q=8 at cuts 2 and 16; the deep cut's larger Q; bbc_news (``--bbc-news``, at the rotten_tomatoes
  rates) last.
- **The claims study's runs** (cut 2's fo, frozen and ZO-SGD) are taken by their keys and never run here: those
  not cached yet are listed as pending elsewhere (``python -m benchmarks.claims`` runs them), not as done.
- **Cost.** ``Costs`` estimates each run from per-block costs fitted to the cached runs (2-core AMD EPYC); the
  plan prints its hours (wall hours of that 2-core machine, not CPU-core hours), and the deep cut's larger Q is
  the first thing it drops to fit ``BUDGET_H``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .claims import FROZEN
from .common import training
from .common.cache import load_cache, save, sitting_parser
from .common.environment import code_state, command_line, machine, quiet_lightning
from .common.models import SMOLLM2_SHAPE
from .common.tasks import CUT, DEFAULT_DATA, MODEL
from .common.training import (
    CACHE,
    EVAL_EVERY,
    METHOD,
    N_TEST,
    N_VAL,
    NUM_TRAIN,
    SEEDS,
    STEPS,
    SWEEP_STEPS,
    Method,
    RunConfig,
    register,
    selected,
)

TASK, BBC = "rotten_tomatoes", "bbc_news"
DEEP_CUT, LARGER_Q, DEEP_QS = 26, 8, (8, 4, 2)
BUDGET_H = 12.0  # the study's new runs, on the 2-core machine
SERVER_LRS = (1e-5, 1e-4)  # frozen's sweep of the server's AdamW lr at cuts past 2
FG_ZO_LRS = (1e-6, 1e-5, 1e-4)
LARGER_Q_FACTORS = (1.0, 10.0)  # the larger Q's sweep at cut 2: the Q=1 pick there, and 10x it
FO, ZO_SGD = METHOD["fo"], METHOD["hosl/zo_sgd-dense"]  # the convergence study's (claims' cut-2 runs)
FROZEN_SWEEP = dataclasses.replace(FROZEN, lrs=SERVER_LRS)  # the same runs' keys: a key leaves the grid out


def forward_gradient(q: int) -> Method:
    """The forward-gradient client at ``q`` directions a step, with sparse embedding directions."""
    return Method("hosl/forward_gradient-sparse" + (f"-q{q}" if q > 1 else ""), "hosl", q=q,
                  zo_optimizer="forward_gradient", embedding_directions="sparse", zo_lrs=FG_ZO_LRS)


FG = {q: forward_gradient(q) for q in sorted({1, LARGER_Q, *DEEP_QS})}
register(FROZEN, *FG.values())


@dataclass(frozen=True)
class Setup:
    """The study's sizes: ``Setup()`` is the real one; the tests build a tiny one."""

    cuts: tuple[int, ...] = (CUT, 16, DEEP_CUT)  # cut 2 first, the deep cut last
    layers: int = SMOLLM2_SHAPE["num_hidden_layers"]
    steps: int = STEPS
    sweep_steps: int = SWEEP_STEPS
    seeds: tuple[int, ...] = SEEDS
    n_val: int = N_VAL
    n_test: int = N_TEST
    num_train: int = NUM_TRAIN

    @property
    def deep(self) -> int:
        return self.cuts[-1]


@dataclass(frozen=True)
class Costs:
    """Seconds of a run on the study's machine (2-core AMD EPYC, 2 threads, batch 8 x 64), per block of SmolLM2.

    Fitted to the cached runs: ZO-SGD's client seconds a step are 0.175 + 0.106 x cut at cuts 1, 2, 4 and 8 (four
    walks over the 28 M-weight table, then two forwards and four walks per block); its 300 steps take about 950 s
    at every one of those cuts, fo's about 870 s. The diagnostic ``forward_gradient.md`` gave a tangent forward's
    cost: one more query at cut 2 adds 8.5% of a ZO-SGD step."""

    step: float = 0.1  # a step's fixed part: the head at the label positions, Lightning's loop
    forward: float = 0.035  # a block's forward without autograd
    server_block: float = 0.065  # a block's forward, backward and AdamW step
    tangent: float = 0.083  # a block's forward with a tangent (forward-mode AD)
    walk: float = 0.00155  # drawing a direction over a million weights and adding it once
    fo_extra: float = 0.6  # fo's backward into the token table and its AdamW step there
    validation: float = 10.0  # 100 validation examples (every EVAL_EVERY steps, and at the end)
    test: float = 50.0  # 500 test examples
    start: float = 15.0  # a run's model copy, data and Trainer

    def step_seconds(self, method: Method, cut: int, layers: int) -> float:
        block = block_weights() / 1e6
        table = SMOLLM2_SHAPE["vocab_size"] * SMOLLM2_SHAPE["hidden_size"] / 1e6
        server, q = layers - cut, method.q
        if method.mode == "fo":
            return self.step + layers * self.server_block + self.fo_extra
        if method.mode == "frozen":
            return self.step + cut * self.forward + server * self.server_block
        if method.zo_optimizer == "forward_gradient":  # q tangent forwards and walks (draw, update); sparse table
            return self.step + q * cut * (self.tangent + 2 * block * self.walk) + server * self.server_block
        probes = self.step + 4 * q * table * self.walk + q * cut * (2 * self.forward + 4 * block * self.walk)
        return probes + server * (self.server_block + (2 * q - 1) * self.forward)  # ZO-SGD: 2q server forwards

    def fit_seconds(self, method: Method, cut: int, steps: int, sweep: bool, layers: int) -> float:
        """A run's ``trainer.fit``: its steps and validations (what a record's ``train_s`` times)."""
        validations = 1 if sweep else steps // EVAL_EVERY
        return steps * self.step_seconds(method, cut, layers) + validations * self.validation

    def run_seconds(self, method: Method, cut: int, steps: int, sweep: bool, layers: int) -> float:
        return self.start + self.fit_seconds(method, cut, steps, sweep, layers) + (0 if sweep else self.test)


def block_weights() -> int:
    """The weights of one SmolLM2 decoder block (attention with grouped keys and values, gated MLP, two norms)."""
    hidden, mlp = SMOLLM2_SHAPE["hidden_size"], SMOLLM2_SHAPE["intermediate_size"]
    kv = hidden * SMOLLM2_SHAPE["num_key_value_heads"] // SMOLLM2_SHAPE["num_attention_heads"]
    return 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * mlp + 2 * hidden


# --- the plan -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One run of the plan. ``config`` is None while the sweep it takes its rates from is unfinished."""

    group: str
    method: str
    cut: int
    dataset: str
    seed: int
    sweep: bool
    config: RunConfig | None
    claims: bool = False  # the claims study's run (cut 2): reused, never run here

    def label(self) -> str:
        what = "sweep" if self.sweep else f"seed {self.seed}"
        rate = "" if self.config is None or not self.sweep else f" ({rates(self.config)})"
        return f"{self.method} at cut {self.cut} on {self.dataset}, {what}{rate}"


def scaled(rate: float | None, factor: float) -> float:
    """``rate`` x ``factor`` to 6 significant digits: 1e-5 x 10 is 1e-4, not 0.00010000000000000002 (a run's key
    holds its rates)."""
    assert rate is not None
    return float(f"{rate * factor:.6g}")


def rates(config: RunConfig) -> str:
    return ", ".join(f"{name} {value:g}" for name, value in (("lr", config.lr), ("zo_lr", config.zo_lr))
                     if value is not None)


class Rates:
    """The sweeps and what they chose: each (method, cut)'s sweep entries and its pick (a sweep configuration, or
    for a method that is not swept there, the one whose rates it takes), with why."""

    def __init__(self, cache: dict[str, dict[str, Any]], setup: Setup) -> None:
        self.cache, self.setup = cache, setup
        self.sweeps: dict[tuple[str, int], list[Entry]] = {}
        self.picks: dict[tuple[str, int], RunConfig] = {}
        self.why: dict[tuple[str, int], str] = {}
        fo = self._sweep(FO, CUT, None, claims=True)
        q1: dict[int, RunConfig | None] = {}  # the Q=1 forward-gradient client's pick at each cut
        for cut in setup.cuts:
            if fo is not None:
                self._take(FO.name, cut, fo, "fo's sweep (claims study); fo is one computation at every cut"
                           if cut != CUT else None)
            if cut == CUT:
                server = fo
                if fo is not None:
                    self._take(FROZEN.name, cut, fo, "fo's lr, as the claims study")
            else:
                server = self._sweep(FROZEN_SWEEP, cut, None)
            self._sweep(ZO_SGD, cut, server, claims=cut == CUT)
            q1[cut] = self._sweep(FG[1], cut, server)
        self.factor = self._larger_q_sweep(q1.get(CUT))
        for cut, pick in q1.items():
            for q, method in FG.items():
                if q > 1 and pick is not None and self.factor is not None and (q, cut) != (LARGER_Q, CUT):
                    self._take(method.name, cut, dataclasses.replace(pick, zo_lr=scaled(pick.zo_lr, self.factor)),
                               f"the Q=1 pick at this cut x{self.factor:g}, the factor Q={LARGER_Q}'s sweep at cut "
                               f"{CUT} chose")

    def _larger_q_sweep(self, q1: RunConfig | None) -> float | None:
        """The larger Q's sweep at cut 2 (the Q=1 pick there, and ``LARGER_Q_FACTORS`` times it): the factor it
        chose, which every larger-Q run takes over the Q=1 pick at its cut (None until the sweep is complete)."""
        grid = tuple(None if q1 is None else scaled(q1.zo_lr, f) for f in LARGER_Q_FACTORS)
        pick = self._sweep(FG[LARGER_Q], CUT, q1, grid=grid)
        if pick is None:
            return None
        factors = ", ".join(f"x{f:g}" for f in LARGER_Q_FACTORS)
        self.why[(FG[LARGER_Q].name, CUT)] += f"; the grid: the Q=1 pick at cut {CUT} {factors}"
        return next(f for f, value in zip(LARGER_Q_FACTORS, grid) if value == pick.zo_lr)

    def _take(self, name: str, cut: int, pick: RunConfig, why: str | None) -> None:
        self.picks[(name, cut)] = pick
        if why:
            self.why[(name, cut)] = why

    def _sweep(self, method: Method, cut: int, server: RunConfig | None, claims: bool = False,
               grid: tuple[float | None, ...] | None = None) -> RunConfig | None:
        """Enter ``method``'s sweep at ``cut`` (the server at ``server``'s lr where it sweeps the client) and return
        its pick once complete. ``grid``: the rates it tries where not the method's own (None: not known yet)."""
        first_order = method.mode in ("fo", "frozen")
        grid = grid or (method.lrs if first_order else method.zo_lrs)
        configs = [None if value is None or not first_order and server is None else
                   RunConfig(method.name, TASK, 0, self.setup.sweep_steps, value if first_order else server.lr,
                             None if first_order else value, self.setup.n_val, 0, self.setup.sweep_steps, cut=cut,
                             num_train=self.setup.num_train)
                   for value in grid]
        self.sweeps[(method.name, cut)] = [Entry("sweeps", method.name, cut, TASK, 0, True, c, claims)
                                            for c in configs]
        pick = None if None in configs else selected(self.cache, configs)  # type: ignore[arg-type]
        if pick is not None:
            value = pick.lr if first_order else pick.zo_lr
            tried = [c.lr if first_order else c.zo_lr for c in configs if c is not None]
            edge = " (at the grid's edge)" if value in (min(tried), max(tried)) and len(grid) > 1 else ""
            self._take(method.name, cut, pick, f"lowest validation loss of {len(grid)} after {pick.steps} steps{edge}"
                       + (" (claims study)" if claims else ""))
        elif None not in configs and all(c.key() in self.cache for c in configs):  # type: ignore[union-attr]
            self.why[(method.name, cut)] = "every rate of the sweep diverged: no final run until the grid changes"
        return pick

    def final(self, group: str, name: str, cut: int, seed: int, dataset: str = TASK) -> Entry:
        pick, s = self.picks.get((name, cut)), self.setup
        config = None if pick is None else RunConfig(name, dataset, seed, s.steps, pick.lr, pick.zo_lr, s.n_val,
                                                     s.n_test, EVAL_EVERY, cut=cut, num_train=s.num_train)
        claims = cut == CUT and name in (FO.name, FROZEN.name, ZO_SGD.name) and dataset == TASK
        return Entry(group, name, cut, dataset, seed, False, config, claims)


class Plan:
    """Every run of the study in the order a sitting takes them, the larger Q the budget allows at the deep cut,
    and the estimated hours."""

    def __init__(self, cache: dict[str, dict[str, Any]], setup: Setup = Setup(), bbc: bool = False,
                 costs: Costs = Costs()) -> None:
        self.cache, self.setup, self.costs = cache, setup, costs
        self.rates = r = Rates(cache, setup)
        cuts, seeds, deep = setup.cuts, setup.seeds, setup.deep
        later = cuts[1:]
        sweeps = lambda name, at: [e for c in at for e in r.sweeps.get((name, c), [])]
        self.fo_runs = fo_check_runs(cache, r)
        self.fo_check = fo_same_at_every_cut(self.fo_runs)
        first = sweeps(FO.name, (CUT,)) + sweeps(FROZEN.name, later) + sweeps(FG[1].name, later)
        for seed in seeds:  # fo at the deep cut, seed 0: the check that cut 2's fo serves every cut
            for cut in later:
                fo = self.fo_check is False or (cut == deep and seed == seeds[0])
                first += [r.final("deeper cuts", name, cut, seed) for name in (FROZEN.name, FO.name, FG[1].name)
                          if name != FO.name or fo]
        zo_sgd = sweeps(ZO_SGD.name, later) + [r.final("ZO-SGD", ZO_SGD.name, c, s) for s in seeds for c in later]
        cut_2 = sweeps(ZO_SGD.name, (CUT,)) + sweeps(FG[1].name, (CUT,)) + [
            r.final("cut 2", name, CUT, s) for s in seeds for name in (FROZEN.name, FO.name, ZO_SGD.name, FG[1].name)]
        larger = sweeps(FG[LARGER_Q].name, (CUT,)) + [r.final(f"Q={LARGER_Q}", FG[LARGER_Q].name, c, s)
                                                       for s in seeds for c in cuts[:-1]]
        core = first + zo_sgd + cut_2 + larger
        # decided as if fo's check holds, so that a failed check does not orphan the deep runs already cached
        nominal = [e for e in core if e.method != FO.name or e.cut == CUT or (e.cut, e.seed) == (deep, seeds[0])]
        self.deep_q = next((q for q in DEEP_QS if self.hours(nominal + self._deep(q)) <= BUDGET_H), None)
        self.entries = core + (self._deep(self.deep_q) if self.deep_q else [])
        self.budget_entries = list(self.entries)
        # fo on bbc_news at the deep cut is the claims study's cut-2 fo there (one computation at every cut), unless
        # fo's check failed
        bbc_methods = (FROZEN.name, FG[1].name, ZO_SGD.name) + ((FO.name,) if self.fo_check is False else ())
        self.bbc = [r.final("bbc_news", name, deep, s, BBC) for s in seeds for name in bbc_methods]
        if bbc:
            self.entries += self.bbc

    @property
    def everything(self) -> list[Entry]:
        """The plan's entries, and bbc_news's where ``--bbc-news`` did not add them: each run once. (Not a set: the
        runs of a sweep that waits on another are equal entries, one a rate.)"""
        return self.entries + [e for e in self.bbc if e not in self.entries]

    def _deep(self, q: int) -> list[Entry]:
        return [self.rates.final(f"deep Q={q}", FG[q].name, self.setup.deep, s) for s in self.setup.seeds]

    def seconds(self, entry: Entry, fit: bool = False) -> float:
        """The estimated seconds of ``entry``'s run (``fit``: of its ``trainer.fit`` alone)."""
        steps = self.setup.sweep_steps if entry.sweep else self.setup.steps
        estimate = self.costs.fit_seconds if fit else self.costs.run_seconds
        return estimate(METHOD[entry.method], entry.cut, steps, entry.sweep, self.setup.layers)

    def hours(self, entries: list[Entry]) -> float:
        """The estimated hours of ``entries`` that this study runs (the claims study's are not its to run)."""
        return sum(self.seconds(e) for e in entries if not e.claims) / 3600

    def done(self, entry: Entry) -> bool:
        return entry.config is not None and entry.config.key() in self.cache

    def runnable(self) -> list[Entry]:
        """The runs a sitting can start now, in order: not cached, rates known, not the claims study's."""
        return [e for e in self.entries if e.config is not None and not e.claims and not self.done(e)]

    def missing(self) -> list[Entry]:
        return [e for e in self.entries if not self.done(e)]

    def pending_elsewhere(self) -> list[Entry]:
        """The claims study's runs that this plan takes and the cache lacks: ``python -m benchmarks.claims`` runs
        them (the same keys); this study never does."""
        return [e for e in self.everything if e.claims and not self.done(e)]

    def summary(self) -> str:
        """The plan as a table of its groups, what is cached, what the claims study has still to run, and the
        estimated hours of what is left."""
        lines = [(f"{'group':<14} {'runs':>5} {'cached':>7} {'claims':>7} {'pending elsewhere':>18} {'est. h':>7} "
                  f"{'est. h left':>12}")]
        everything, elsewhere = self.everything, self.pending_elsewhere()
        for group in dict.fromkeys(e.group for e in everything):
            of = [e for e in everything if e.group == group]
            left = [e for e in of if not self.done(e)]
            lines.append(f"{group:<14} {len(of):>5} {sum(map(self.done, of)):>7} {sum(e.claims for e in of):>7} "
                         f"{sum(e in elsewhere for e in of):>18} {self.hours(of):>7.2f} {self.hours(left):>12.2f}"
                         + ("  (optional: --bbc-news)" if group == "bbc_news" and self.bbc[0] not in self.entries
                            else ""))
        total, left = self.hours(self.budget_entries), self.hours([e for e in self.budget_entries if not self.done(e)])
        deep = (f"Q={self.deep_q}, the largest of {DEEP_QS} that fits" if self.deep_q else
                f"none: even Q={DEEP_QS[-1]} does not fit")
        runs = sum(not e.claims for e in self.budget_entries)
        lines += ["", (f"This study's {runs} runs (less the claims study's): {total:.2f} h estimated of a {BUDGET_H:g} "
                       f"h budget, {left:.2f} h left; the deep cut's larger Q: {deep}.")]
        if elsewhere:
            lines.append(f"Pending elsewhere, not done: {len(elsewhere)} of the claims study's runs are not cached yet "
                         f"({listing(elsewhere)}); `python -m benchmarks.claims` runs them (the same cache keys), this "
                         "study never does.")
        upcoming = self.runnable()[:4]
        if upcoming:
            more = len(self.runnable()) > len(upcoming)
            lines.append("Next: " + "; ".join(e.label() for e in upcoming) + ("; ..." if more else "."))
        if self.fo_check is False:
            lines.append("fo's deep-cut check differs from cut 2: fo's seeds at cuts 16 and 26 are in the plan.")
        cpu = machine().split(",")[0]
        ratios = [self.cache[e.config.key()]["train_s"] / self.seconds(e, fit=True) for e in self.entries
                  if self.done(e) and self.cache[e.config.key()].get("machine", "").startswith(cpu + ",")]
        if ratios:
            lines.append(f"Recorded over estimated fit seconds, the plan's {len(ratios)} cached runs on this CPU "
                         f"({cpu}): median {statistics.median(ratios):.2f} (range {min(ratios):.2f}-"
                         f"{max(ratios):.2f}; load moves it).")
        return "\n".join(lines)


def listing(entries: list[Entry]) -> str:
    """``entries`` by method, cut and dataset: "frozen at cut 2 on rotten_tomatoes: seeds 1, 2; ..."."""
    groups: dict[tuple[str, int, str, bool], list[Entry]] = {}
    for entry in entries:
        groups.setdefault((entry.method, entry.cut, entry.dataset, entry.sweep), []).append(entry)
    return "; ".join(f"{method} at cut {cut} on {dataset}: " + (f"sweep ({len(of)} rates)" if sweep else
                                                                "seeds " + ", ".join(str(e.seed) for e in of))
                     for (method, cut, dataset, sweep), of in groups.items())


def fo_check_runs(cache: dict[str, dict[str, Any]], rates: Rates) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """fo's records of its check, found by their exact keys: seed 0 at cut 2 and at the deep cut (None: not both
    run yet)."""
    keys = [None if e.config is None else e.config.key()
            for e in (rates.final("", FO.name, cut, rates.setup.seeds[0]) for cut in (CUT, rates.setup.deep))]
    if None in keys or not all(k in cache for k in keys):
        return None
    return cache[keys[0]], cache[keys[1]]  # type: ignore[index]


def fo_same_at_every_cut(runs: tuple[dict[str, Any], dict[str, Any]] | None) -> bool | None:
    """Whether fo's check run at the deep cut predicted every test example as cut 2's did (diverged alike where it
    diverged); None: not both run yet. The cut does not change fo's arithmetic, so it should."""
    if runs is None:
        return None
    outcome = [((r.get("test") or {}).get("correct"), r.get("diverged")) for r in runs]
    return outcome[0] == outcome[1]


# --- sittings -------------------------------------------------------------------------------------------------------


def sit(setup: Setup, cache_dir: Path, budget_min: float, bbc: bool, load: Any, data_dir: Path, code: str) -> None:
    """Run the plan's runs in order until none is left or the next would end past ``budget_min`` minutes by its
    estimate (a sitting's bound; the estimate is rough). ``load()`` gives the model and tokenizer, once, when a run
    is due."""
    started, loaded = time.perf_counter(), None
    while True:
        plan = Plan(load_cache(cache_dir), setup, bbc)
        todo = plan.runnable()
        elapsed = (time.perf_counter() - started) / 60
        if not todo or elapsed > budget_min:
            print(f"[{elapsed:5.1f} min] {len(todo)} runs can start now, {len(plan.missing())} missing in all; "
                  "stopping", flush=True)
            return
        minutes = plan.seconds(todo[0]) / 60
        if elapsed + minutes > budget_min:
            print(f"[{elapsed:5.1f} min] the next run ({todo[0].label()}) is estimated at {minutes:.0f} min, past the "
                  f"{budget_min:g}-minute sitting; stopping", flush=True)
            return
        loaded = loaded or load()
        config = todo[0].config
        assert config is not None
        print(f"[{elapsed:5.1f} min] {config.method} at cut {config.cut} on {config.dataset}, seed {config.seed}, "
              f"{config.steps} steps, {rates(config)} ({len(todo)} runs can start)", flush=True)
        record = training.run(config, *loaded, data_dir, code)
        save(config.key(), record, cache_dir)
        test = record.get("test", {})
        print(f"    {'diverged' if record['diverged'] else 'done'} in {record['train_s']:.0f} s"
              + (f", test acc {test['acc']:.4f}" if test else ""), flush=True)
        gc.collect()


def main(argv: list[str] | None = None) -> int:
    from .cut_depth_report import write_report

    parser = sitting_parser(__doc__)
    parser.add_argument("--dry-run", action="store_true", help="print the plan and its estimated hours, run nothing")
    parser.add_argument("--bbc-news", action="store_true", help="also the deep cut on bbc_news (after the rest)")
    parser.add_argument("--cache", type=Path, default=CACHE, help=argparse.SUPPRESS)  # the tests' empty caches
    args = parser.parse_args(argv)
    plan = Plan(load_cache(args.cache), bbc=args.bbc_news)
    print(plan.summary(), flush=True)
    if args.dry_run:
        return 0
    if not args.report_only:
        torch.set_num_threads(2)  # only when it trains: a report must not change its caller's torch
        quiet_lightning()

        def load() -> tuple[Any, Any]:
            from hosl_lightning import load_causal_lm, resolve_tokenizer

            return load_causal_lm(MODEL), resolve_tokenizer(MODEL)

        sit(Setup(), args.cache, args.budget_min, args.bbc_news, load, DEFAULT_DATA, code_state())
    write_report(load_cache(args.cache), Setup(), args.out, command_line("cut_depth", argv), args.bbc_news)
    print((args.out / "cut_depth.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
