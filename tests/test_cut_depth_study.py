"""The cut-depth study (issue 40, item 3): its plan holds the runs the issue asks for within the budget, reuses the
claims study's cut-2 runs by their keys, judges its two targets from paired intervals, says what a partial cache
lacks, and runs end to end on a tiny model. Nothing here trains SmolLM2."""

from __future__ import annotations

import copy
import csv
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from conftest import TINY_LLAMA, quiet_trainer, tiny_data
from test_tasks import bpe_tokenizer

from benchmarks import cut_depth
from benchmarks.common import training
from benchmarks.common.cache import load_cache, save
from benchmarks.common.stats import paired
from benchmarks.common.training import CACHE, RunConfig
from benchmarks.cut_depth import BBC, BUDGET_H, FG, FO, FROZEN, LARGER_Q, TASK, ZO_SGD, Costs, Plan, Setup
from benchmarks.cut_depth_report import (
    Tables,
    beats_frozen,
    deep_verdict,
    frozen_verdict,
    seconds_curve,
    write_report,
)
from hosl_lightning import HOSLModule, HOSLStrategy, SplitCausalLM, load_causal_lm
from hosl_lightning.data import ASSETS_DIR


def finals(plan: Plan) -> dict[tuple[str, int], list[int]]:
    found: dict[tuple[str, int], list[int]] = {}
    for entry in plan.entries:
        if not entry.sweep and entry.dataset == cut_depth.TASK:
            found.setdefault((entry.method, entry.cut), []).append(entry.seed)
    return found


def test_the_plan_holds_every_method_cut_and_seed_and_fits_the_budget() -> None:
    plan, setup = Plan({}), Setup()
    assert setup.cuts[0] == 2 and setup.layers - setup.deep <= 4  # the deep cut leaves at most 4 server blocks
    runs = finals(plan)
    for cut in setup.cuts:
        for method in (FROZEN, ZO_SGD, FG[1]):
            assert sorted(runs[(method.name, cut)]) == [0, 1, 2], (method.name, cut)
    for cut in setup.cuts[:-1]:
        assert sorted(runs[(FG[LARGER_Q].name, cut)]) == [0, 1, 2]
    assert plan.deep_q is not None and sorted(runs[(FG[plan.deep_q].name, setup.deep)]) == [0, 1, 2]
    assert sorted(runs[(FO.name, 2)]) == [0, 1, 2] and runs[(FO.name, setup.deep)] == [0]  # the check
    assert plan.hours(plan.budget_entries) <= BUDGET_H
    order = [(e.method, e.cut) for e in plan.entries if not e.sweep]
    decisive = [i for i, (m, c) in enumerate(order) if c != 2 and m in (FROZEN.name, FG[1].name)]
    larger = [i for i, (m, _) in enumerate(order) if m in (FG[LARGER_Q].name, FG[plan.deep_q].name)]
    assert max(decisive) < min(larger)
    # the larger Q's own sweep: two rates at cut 2, seed 0, before every larger-Q run that takes its rate
    sweep = [i for i, e in enumerate(plan.entries) if e.sweep and e.method == FG[LARGER_Q].name]
    assert len(sweep) == 2 and {plan.entries[i].cut for i in sweep} == {2}
    larger_q = {method.name for q, method in FG.items() if q > 1}
    first_larger = min(i for i, e in enumerate(plan.entries) if not e.sweep and e.method in larger_q)
    assert max(sweep) < first_larger
    assert "h estimated" in plan.summary() and f"Q={plan.deep_q}" in plan.summary()


def test_a_plan_over_budget_drops_the_deep_larger_q_first_never_seeds_or_frozen() -> None:
    plan = Plan({}, costs=dataclasses.replace(Costs(), tangent=0.2))  # tangent forwards 2.4x dearer
    assert plan.deep_q is None and "does not fit" in plan.summary()
    runs = finals(plan)
    assert all(sorted(runs[(FROZEN.name, c)]) == [0, 1, 2] for c in Setup().cuts)
    assert sorted(runs[(FG[LARGER_Q].name, 16)]) == [0, 1, 2]


def test_the_cut_2_runs_are_the_claims_studys_cached_files() -> None:
    plan = Plan(load_cache(CACHE))
    claims = {(e.method, e.seed, e.sweep): e for e in plan.entries if e.claims}
    assert {e.cut for e in claims.values()} == {2}
    for stem in ("fo-rotten_tomatoes-s0-300steps-09c5f0caadbc", "fo-rotten_tomatoes-s1-300steps-b7d77aaef557",
                 "frozen-rotten_tomatoes-s0-300steps-87867f2bcd00"):
        method, seed = stem.split("-rotten")[0], int(stem.split("-s")[1][0])
        entry = claims[(method, seed, False)]
        assert entry.config.key() == stem and plan.done(entry)
    zo_sgd = [e for (m, _, sweep), e in claims.items() if m == ZO_SGD.name and not sweep]
    assert len(zo_sgd) == 3 and all(map(plan.done, zo_sgd))  # the paper's ZO-SGD, every seed
    assert all(c not in plan.runnable() for c in (e.config for e in claims.values()))  # never run here


def test_the_claims_studys_missing_cut_2_runs_are_pending_elsewhere_and_the_claims_study_runs_them(
        tmp_path: Path) -> None:
    """Cut 2's frozen seeds 1 and 2 are the claims study's (the same keys): the plan never runs them, the dry run
    counts them as pending elsewhere (not done), the report names them, and the claims study's plan holds them."""
    from benchmarks import claims

    full = load_cache(CACHE)
    frozen = {Plan(full).rates.final("", FROZEN.name, 2, seed).config.key() for seed in (1, 2)}
    cache = {key: record for key, record in full.items() if key not in frozen}  # as before the claims study ran them
    plan = Plan(cache)
    pending = plan.pending_elsewhere()
    assert {(e.method, e.cut, e.seed) for e in pending} == {(FROZEN.name, 2, 1), (FROZEN.name, 2, 2)}
    assert not set(pending) & set(plan.runnable())
    summary = plan.summary()
    assert "Pending elsewhere, not done: 2 of the claims study's runs" in summary
    assert "frozen at cut 2 on rotten_tomatoes: seeds 1, 2" in summary and "python -m benchmarks.claims" in summary
    cut_2 = [e for e in plan.everything if e.group == "cut 2"]
    row = next(line for line in summary.splitlines() if line.startswith("cut 2 ")).split()
    assert row[3] == str(sum(map(plan.done, cut_2))) and row[5] == "2"  # cached: not them; pending elsewhere: 2
    hosl, _ = claims.best_hosl(cache)
    assert frozen <= {config.key() for config in claims.plan(cache, hosl, claims.study_methods(hosl))}
    write_report(cache, Setup(), tmp_path, "test")
    report = (tmp_path / "cut_depth.md").read_text()
    assert ("- **Waiting on the claims study:** not in the cache yet: frozen at cut 2 on rotten_tomatoes: seeds 1, 2. "
            "They are the claims study's runs") in report
    assert "`python -m benchmarks.claims` runs them" in report


# --- a synthetic cache on a tiny setup: the report's logic without training -------------------------------------

TINY = Setup(cuts=(2, 4), layers=5, steps=2, sweep_steps=1, seeds=(0, 1, 2), n_val=8, n_test=8, num_train=16)


def _rate(config: RunConfig) -> float:
    return config.zo_lr if config.zo_lr is not None else config.lr


def _record(config: RunConfig, correct: list[int] | None = None, commit: str = "commit test",
            server: bool = True) -> dict[str, Any]:
    """A run's record as ``training.run`` writes it (``server``: with server seconds, as runs since issue 40)."""
    seconds = {"client_s": 1.0, **({"server_s": 2.0} if server else {})}
    point = {"step": config.steps, "val_loss": 1.0 - 100 * _rate(config), "val_acc": 0.5, **seconds}
    return {"config": dataclasses.asdict(config), "commit": commit, "machine": "test machine", "diverged": None,
            "curve": [point], "train_s": 10.0, **seconds,
            "test": None if correct is None else {"acc": sum(correct) / len(correct), "correct": correct}}


def _swept(setup: Setup = TINY, loss: Callable[[RunConfig], float] | None = None) -> dict[str, dict[str, Any]]:
    """A cache holding every sweep of ``setup``'s plan (``loss``: each run's validation loss; by default the
    higher rate wins)."""
    cache: dict[str, dict[str, Any]] = {}
    while True:
        plan = Plan(cache, setup, bbc=True)
        todo = [e.config for entries in plan.rates.sweeps.values() for e in entries
                if e.config is not None and not plan.done(e)]
        if not todo:
            return cache
        for config in todo:
            cache[config.key()] = _record(config)
            if loss is not None:
                cache[config.key()]["curve"][-1]["val_loss"] = loss(config)


def test_the_larger_q_sweep_at_cut_2_sets_every_larger_q_runs_rate() -> None:
    """The larger Q's sweep tries the Q=1 pick at cut 2 and 10x it; every larger-Q run, at every cut, takes the
    Q=1 pick at its own cut times the factor that sweep chose."""
    q1_at_4 = lambda c: (c.method, c.cut) == (FG[1].name, 4)
    cache = _swept(loss=lambda c: 1 + 100 * _rate(c) if q1_at_4(c) else 1 - 100 * _rate(c))
    plan = Plan(cache, TINY)
    picks = plan.rates.picks
    assert picks[(FG[1].name, 2)].zo_lr == 1e-4 and picks[(FG[1].name, 4)].zo_lr == 1e-6
    assert [e.config.zo_lr for e in plan.rates.sweeps[(FG[LARGER_Q].name, 2)]] == [1e-4, 1e-3]
    assert plan.rates.factor == 10.0 and picks[(FG[LARGER_Q].name, 2)].zo_lr == 1e-3
    for q in (LARGER_Q, plan.deep_q):
        run = next(e for e in plan.entries if e.method == FG[q].name and e.cut == 4 and not e.sweep)
        assert (run.config.zo_lr, run.config.lr) == (1e-5, picks[(FROZEN.name, 4)].lr)  # 1e-6 x 10, cut 4's server
    assert "x10, the factor Q=8's sweep at cut 2 chose" in plan.rates.why[(FG[LARGER_Q].name, 4)]
    fresh = Plan(_swept(loss=lambda c: 1 + 100 * _rate(c) if c.method == FG[LARGER_Q].name else 1 - 100 * _rate(c)),
                 TINY)
    assert fresh.rates.factor == 1.0 and fresh.rates.picks[(FG[LARGER_Q].name, 4)].zo_lr == 1e-4


def test_bbc_news_runs_count_once_and_its_verdicts_can_be_final(tmp_path: Path) -> None:
    """With --bbc-news, bbc_news's runs are in the plan's entries: the report lists each once, a verdict on 2 of
    3 seeds stays provisional, and bbc_news's table holds only the methods its plan runs, so 3 seeds make it final."""
    cache = _swept()
    plan = Plan(cache, TINY, bbc=True)
    fo = [plan.rates.final("", FO.name, 2, seed, BBC) for seed in TINY.seeds]  # cut 2's fo serves the deep cut
    right = {FROZEN.name: 4, ZO_SGD.name: 5, FG[1].name: 6, FO.name: 7}  # of 8 test examples

    def finish(seeds: tuple[int, ...]) -> tuple[str, list[dict[str, str]]]:
        for entry in plan.bbc + fo:
            if entry.seed in seeds:
                cache[entry.config.key()] = _record(entry.config, [1] * right[entry.method] + [0] * (8 - right[
                    entry.method]))
        write_report(cache, TINY, tmp_path, "test", bbc=True)
        with (tmp_path / "cut_depth.csv").open() as handle:
            rows = [row for row in csv.DictReader(handle) if row["dataset"] == BBC]
        return (tmp_path / "cut_depth.md").read_text(), rows

    report, rows = finish((0, 1))
    runs = [(row["method"], row["seed"]) for row in rows]
    assert len(runs) == len(set(runs)) == 4 * 2  # frozen, ZO-SGD, Q=1 and fo: seeds 0 and 1, once each
    bbc = report[report.index(f"## {BBC}: test accuracy"):]
    assert f"| 4 | {FROZEN.name} | 2 |" in bbc and f"| 4 | {FG[1].name} | 2 |" in bbc
    assert FG[plan.deep_q].name not in bbc.split("## Learning rates")[0]  # bbc_news runs no larger Q
    verdicts = [line for line in report.splitlines() if line.startswith(f"- **{BBC}")]
    assert len(verdicts) == 2 and all("provisional" in line for line in verdicts)
    report, rows = finish((2,))
    assert len(rows) == 4 * 3
    verdicts = [line for line in report.splitlines() if line.startswith(f"- **{BBC}")]
    assert len(verdicts) == 2 and not any("provisional" in line for line in verdicts), verdicts


def test_fos_check_takes_its_runs_by_exact_key_and_a_failed_check_uses_each_cuts_own_fo(tmp_path: Path) -> None:
    cache = _swept()
    plan = Plan(cache, TINY)
    at_2, deep = (plan.rates.final("", FO.name, cut, 0).config for cut in (2, 4))
    right = [1, 0] * 4
    cache[at_2.key()] = _record(at_2, right, commit="commit aaaaaaa")
    decoy = dataclasses.replace(deep, lr=3 * deep.lr)  # fo at the deep cut, seed 0, at another lr: not the check
    cache[decoy.key()] = _record(decoy, [1 - x for x in right])
    assert Plan(cache, TINY).fo_check is None
    cache[deep.key()] = _record(deep, right, commit="commit bbbbbbb")
    assert Plan(cache, TINY).fo_check is True
    cache[deep.key()] = _record(deep, [0] + right[1:], commit="commit bbbbbbb")  # one prediction differs
    plan = Plan(cache, TINY, bbc=True)
    assert plan.fo_check is False
    assert {(e.dataset, e.seed) for e in plan.entries if e.method == FO.name and e.cut == 4} == {
        (d, s) for d in (TASK, BBC) for s in TINY.seeds}  # fo's own seeds at the deep cut join the plan
    for seed in (1, 2):
        config = plan.rates.final("", FO.name, 2, seed).config
        cache[config.key()] = _record(config, right)
    runs, source = Tables(Plan(cache, TINY)).get(TASK, 4, FO.name)
    assert source == "" and [r["config"]["seed"] for r in runs] == [0]  # its own run, not cut 2's three
    write_report(cache, TINY, tmp_path, "test")
    report = (tmp_path / "cut_depth.md").read_text()
    assert "fo's check FAILED: at cut 4, seed 0, fo predicted 1 of 8 test examples differently" in report
    assert "records: cut 2's commit aaaaaaa, cut 4's commit bbbbbbb" in report and "commits or machines" in report
    assert "| 4 | fo | 1 |" in report


def test_the_seconds_panel_leaves_out_runs_without_server_seconds() -> None:
    """Runs cached before server seconds were kept timed the whole fit (validation, loading, other load): the
    seconds curve leaves them out instead of spreading their wall time over the steps."""
    config = RunConfig(FROZEN.name, TASK, 0, 300, 1e-5, None, 100, 500, 50)
    new, old = _record(config), _record(config, server=False)
    old["train_s"] = 6672.0
    assert seconds_curve([new, old]) == [(3.0, 0.5)] and seconds_curve([old]) == []


def _run(seed: int, correct: list[int]) -> dict:
    return {"config": {"seed": seed}, "test": {"acc": sum(correct) / len(correct), "correct": correct}}


def _runs(share: float, shift: int = 0) -> list[dict]:
    """Three seeds of 200 examples, the first ``share`` of them right (rotated by ``shift``)."""
    right = int(200 * share)
    return [_run(s, ([1] * right + [0] * (200 - right))[shift:] + ([1] * right + [0] * (200 - right))[:shift])
            for s in range(3)]


def test_the_verdicts_from_paired_intervals() -> None:
    frozen = _runs(0.80)
    better, same = _runs(0.90), _runs(0.80)
    gains = {16: {"better": paired(better, frozen), "same": paired(same, frozen)}}
    assert [line.split(":")[0] for line in beats_frozen(gains)] == ["cut 16"] and "better" in beats_frozen(gains)[0]
    assert frozen_verdict(gains, 3).startswith("A learning client beats frozen at: cut 16: better +10.0")
    none = frozen_verdict({16: {"same": gains[16]["same"]}, 26: {"better": None}}, 3)
    assert none.startswith("None does") and "provisional" in none  # cut 26's client has no paired seed yet
    assert "met" in deep_verdict({"better": better, "same": same}, _runs(0.905), 26, 3)
    assert "NOT met, by 4.0 points" in deep_verdict({"better": better}, _runs(0.95), 26, 3)
    assert deep_verdict({"better": []}, _runs(0.95), 26, 3).startswith("Not yet assessable")


def test_report_only_on_an_empty_cache_says_what_is_missing(tmp_path: Path) -> None:
    assert cut_depth.main(["--report-only", "--cache", str(tmp_path / "empty"), "--out", str(tmp_path)]) == 0
    report = (tmp_path / "cut_depth.md").read_text()
    assert "Not yet assessable" in report and "runs of the plan are not in the cache yet" in report
    for line in ("frozen at cut 16 on rotten_tomatoes: sweep", "hosl/forward_gradient-sparse at cut 26",
                 "fo at cut 2 on rotten_tomatoes: seeds 0, 1, 2 (the claims study's"):
        assert line in report
    assert "| 16 | frozen | 0 | - |" in report  # no number where no run finished


def test_fo_is_one_computation_at_every_cut() -> None:
    """Why cut 2's fo runs serve every cut: the weights after fo training are bit-for-bit the same at every cut."""
    base = load_causal_lm(model_config={**TINY_LLAMA, "num_hidden_layers": 4, "tie_word_embeddings": True})
    weights = []
    for cut in (1, 3):
        L.seed_everything(0, verbose=False)
        module = HOSLModule(model=copy.deepcopy(base), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
        trainer = quiet_trainer(HOSLStrategy(cut_layer=cut, mode="fo", memory_every_n_steps=0), max_steps=4)
        trainer.fit(module, tiny_data())
        start = dict(SplitCausalLM(copy.deepcopy(base), cut).named_parameters())
        trained = dict(trainer.strategy.split_model.named_parameters())
        assert trained.keys() == start.keys()
        unmoved = [name for name, p in trained.items() if torch.equal(p.detach(), start[name].detach())]
        assert not unmoved, unmoved  # every weight trained: equal weights below are not untouched ones
        weights.append(torch.cat([p.detach().flatten() for p in trained.values()]))
    assert torch.equal(*weights)


def test_a_tiny_study_runs_end_to_end(tmp_path: Path) -> None:
    tokenizer = bpe_tokenizer()
    torch.manual_seed(0)
    base = load_causal_lm(model_config={**TINY_LLAMA, "vocab_size": len(tokenizer), "num_hidden_layers": 5,
                                        "max_position_embeddings": 128})
    setup = Setup(cuts=(2, 4), layers=5, steps=2, sweep_steps=1, seeds=(0,), n_val=8, n_test=8, num_train=16)
    claims = Plan({}, setup).rates.sweeps[(FO.name, 2)]  # fo's sweep at cut 2, the claims study's: run it as it would
    for entry in claims:
        save(entry.config.key(), training.run(entry.config, base, tokenizer, ASSETS_DIR, "claims"), tmp_path / "cache")
    cut_depth.sit(setup, tmp_path / "cache", 60.0, False, lambda: (base, tokenizer), ASSETS_DIR, "commit test")
    cache = load_cache(tmp_path / "cache")
    plan = Plan(cache, setup)
    ran = {(r["config"]["method"], r["config"]["cut"]) for r in cache.values() if r["config"]["n_test"]}
    assert {(FROZEN.name, 4), (FG[1].name, 4), (ZO_SGD.name, 4), (FG[plan.deep_q].name, 4), (FG[1].name, 2),
            (FG[LARGER_Q].name, 2)} <= ran
    assert len(plan.rates.sweeps[(FG[LARGER_Q].name, 2)]) == 2 and plan.rates.factor is not None
    done_claims = {e.config.key() for e in plan.entries if e.claims and plan.done(e)}
    assert done_claims == {e.config.key() for e in claims}  # cut 2's fo, frozen, ZO-SGD runs: the claims study's alone
    fg = next(r for r in cache.values() if r["config"]["method"] == FG[1].name and r["config"]["n_test"]
              and r["config"]["cut"] == 4)
    assert fg["commit"] == "commit test" and fg["server_s"] > 0 and fg["predicted_decrease"]["steps"] == 2
    assert len(fg["test"]["correct"]) == 8
    write_report(cache, setup, tmp_path, "test")
    report = (tmp_path / "cut_depth.md").read_text()
    assert "| 4 | hosl/forward_gradient-sparse | 1 |" in report and "## Missing runs" in report
    assert "the * runs are left out of its seconds panels" in report
    assert (tmp_path / "cut_depth.csv").read_text().count("\n") == 1 + len([e for e in plan.entries if not e.sweep
                                                                           and plan.done(e)])
    key = next(k for k, r in cache.items() if r is fg)  # a run that diverged is done, listed, and scores nothing
    cache[key] = {**fg, "diverged": "step 1: the training loss is nan", "test": None}
    write_report(cache, setup, tmp_path, "test")
    report = (tmp_path / "cut_depth.md").read_text()
    assert "| 4 | hosl/forward_gradient-sparse | 0 |" in report and "step 1: the training loss is nan" in report
