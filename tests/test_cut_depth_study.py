"""The cut-depth study (issue 40, item 3): its plan holds the runs the issue asks for within the budget, reuses the
claims study's cut-2 runs by their keys, judges its two targets from paired intervals, says what a partial cache
lacks, and runs end to end on a tiny model. Nothing here trains SmolLM2."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import lightning as L
import torch
from conftest import TINY_LLAMA, quiet_trainer, tiny_data
from test_tasks import bpe_tokenizer

from benchmarks import cut_depth
from benchmarks.common.cache import load_cache
from benchmarks.common.stats import paired
from benchmarks.common.training import CACHE
from benchmarks.cut_depth import BUDGET_H, FG, FO, FROZEN, LARGER_Q, ZO_SGD, Costs, Plan, Setup
from benchmarks.cut_depth_report import beats_frozen, deep_verdict, frozen_verdict, write_report
from hosl_lightning import HOSLModule, HOSLStrategy, load_causal_lm
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
        weights.append(torch.cat([p.detach().flatten() for p in trainer.strategy.split_model.parameters()]))
    assert torch.equal(*weights)


def test_a_tiny_study_runs_end_to_end(tmp_path: Path) -> None:
    tokenizer = bpe_tokenizer()
    torch.manual_seed(0)
    base = load_causal_lm(model_config={**TINY_LLAMA, "vocab_size": len(tokenizer), "num_hidden_layers": 5,
                                        "max_position_embeddings": 128})
    setup = Setup(cuts=(2, 4), layers=5, steps=2, sweep_steps=1, seeds=(0,), n_val=8, n_test=8, num_train=16)
    cut_depth.sit(setup, tmp_path / "cache", 60.0, False, lambda: (base, tokenizer), ASSETS_DIR, "commit test")
    cache = load_cache(tmp_path / "cache")
    plan = Plan(cache, setup)
    ran = {(r["config"]["method"], r["config"]["cut"]) for r in cache.values() if r["config"]["n_test"]}
    assert {(FROZEN.name, 4), (FG[1].name, 4), (ZO_SGD.name, 4), (FG[plan.deep_q].name, 4)} <= ran
    assert not any(e.claims for e in plan.entries if plan.done(e))  # cut 2's fo, frozen, ZO-SGD: claims' alone
    fg = next(r for r in cache.values() if r["config"]["method"] == FG[1].name and r["config"]["n_test"])
    assert fg["commit"] == "commit test" and fg["server_s"] > 0 and fg["predicted_decrease"]["steps"] == 2
    assert len(fg["test"]["correct"]) == 8
    write_report(cache, setup, tmp_path, "test")
    report = (tmp_path / "cut_depth.md").read_text()
    assert "| 4 | hosl/forward_gradient-sparse | 1 |" in report and "## Missing runs" in report
    assert (tmp_path / "cut_depth.csv").read_text().count("\n") == 1 + len([e for e in plan.entries if not e.sweep
                                                                           and plan.done(e)])
    key = next(k for k, r in cache.items() if r is fg)  # a run that diverged is done, listed, and scores nothing
    cache[key] = {**fg, "diverged": "step 1: the training loss is nan", "test": None}
    write_report(cache, setup, tmp_path, "test")
    report = (tmp_path / "cut_depth.md").read_text()
    assert "| 4 | hosl/forward_gradient-sparse | 0 |" in report and "step 1: the training loss is nan" in report
