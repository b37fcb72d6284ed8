"""hosl-lightning tune: search spaces, errors before any trial, a shared study, results written, the retrain,
failed and diverged trials recorded without ending the study, the pruner."""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import pytest
import yaml

from hosl_lightning.cli import main
from hosl_lightning.tuning import TrialRecord, TuneResult, load_space, override_args, tune, write_results

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL = ["--trainer.max_steps=-1", "--trainer.max_epochs=2", "--trainer.val_check_interval=1.0",
         "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false", "--data.init_args.train_size=64"]
SPACE = {
    "trainer.strategy.init_args.zo_lr": {"low": 1.0e-6, "high": 1.0e-3, "log": True},
    "model.optimizer.init_args.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
    "trainer.strategy.init_args.q": {"low": 1, "high": 2},
    "trainer.strategy.init_args.direction": {"choices": ["gaussian", "rademacher"]},
}


def _space(tmp_path: Path, space: dict | None = None) -> str:
    path = tmp_path / f"space{len(list(tmp_path.glob('space*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(space or SPACE))
    return str(path)


def _tune(tmp_path: Path, **kwargs) -> object:
    options = dict(fit_config=str(CONFIGS / "synthetic.yaml"), space=_space(tmp_path), n_trials=3, subset="gradmatch",
                   fraction=0.5, metric="val_loss", direction="minimize", output_dir=str(tmp_path / "out"),
                   n_startup_trials=2, overrides=SMALL)
    options.update(kwargs)
    return tune(**options)


def test_tune_runs_trials_on_subsets_retrains_the_best_and_writes_results(tmp_path: Path) -> None:
    result = _tune(tmp_path)
    assert len(result.trials) == 3 and all(t.state in ("COMPLETE", "PRUNED") for t in result.trials)
    complete = [t for t in result.trials if t.state == "COMPLETE"]
    assert result.best_value == min(t.value for t in complete)
    assert set(result.best_params) == set(SPACE)
    # trials trained on half the batches (64 examples / 16 = 4 candidates -> 2 per epoch), 2 epochs
    assert {t.steps for t in complete} == {4}
    assert all(t.selection_seconds > 0 for t in result.trials)
    assert result.retrain_metrics["val_loss"] > 0 and result.retrain_seconds > 0
    out = tmp_path / "out"
    assert (out / "hosl-tune.db").exists()
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [int(r["number"]) for r in rows] == [0, 1, 2]
    markdown = (out / "results.md").read_text()
    assert "Best: val_loss=" in markdown and "Retrained on the full data" in markdown
    table = [line for line in markdown.splitlines() if line.startswith("| ") and "complete" in line]
    values = [float(line.split("|")[3]) for line in table]
    assert values == sorted(values)  # best first: ascending when minimising
    assert (out / "history.png").exists() == (importlib.util.find_spec("matplotlib") is not None)  # optional


def test_workers_with_one_storage_share_the_study(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    _tune(tmp_path, n_trials=1, storage=storage, retrain=False, subset="random")
    import optuna

    _tune(tmp_path, n_trials=1, storage=storage, retrain=False, subset="random")
    study = optuna.load_study(study_name="hosl-tune", storage=storage)
    assert len(study.trials) == 2
    assert study.trials[0].params != study.trials[1].params


def test_the_command_line_runs_a_study(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["tune", "--fit_config", str(CONFIGS / "synthetic.yaml"), "--space", _space(tmp_path), "--n_trials", "1",
          "--subset", "full", "--metric", "val_loss", "--direction", "minimize", "--retrain", "false",
          "--output_dir", str(tmp_path / "cli"), "--overrides", str(SMALL).replace("'", '"')])
    printed = capsys.readouterr().out
    assert "[tune] trial 0 (1/1)" in printed and "[tune] best val_loss=" in printed
    assert (tmp_path / "cli" / "results.md").exists()


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"a.b": {"low": 1, "hi": 2}}, r"search space entry 'a.b' has unknown field\(s\) \['hi'\]: valid fields are low"),
        ({"a.b": {"low": 2.0, "high": 1.0}}, "low=2.0 must be below high=1.0"),
        ({"a.b": {"low": 0.0, "high": 1.0, "log": True}}, "a log scale needs low > 0"),
        ({"a.b": {"choices": []}}, "'choices' must be a non-empty list"),
        ({"a.b": 3}, "must be a mapping"),
        ({"a.b": {"low": "x", "high": 1}}, "low='x' is not a number"),
    ],
)
def test_bad_search_spaces_name_the_entry_and_the_problem(space: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        load_space(_space(tmp_path, space))


def test_a_key_the_config_does_not_have_fails_before_any_trial(tmp_path: Path) -> None:
    space = {"trainer.strategy.init_args.zoo_lr": {"low": 1.0e-6, "high": 1.0e-3}}
    with pytest.raises(ValueError, match=r"do not fit the config(.|\n)*Option 'zoo_lr' is not accepted"):
        _tune(tmp_path, space=_space(tmp_path, space))
    assert not (tmp_path / "out" / "hosl-tune.db").exists()  # refused before a study was created


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"subset": "craig"}, "subset='craig' is not valid: choose one of 'gradmatch', 'random', 'full', 'milo'"),
        ({"feature": "logits"}, "feature='logits' is not valid: choose one of 'hidden', 'head', 'label_head'"),
        ({"granularity": "example"}, "granularity='example' is not valid: choose one of 'batch', 'per_class'"),
        ({"subset_val_batches": 0}, "subset_val_batches=0 is not valid: it must be an integer >= 1, or None"),
        ({"fraction": 2.0}, r"fraction=2.0 is not valid: it must be a number in \(0, 1\]"),
        ({"pruner": "asha"}, "pruner='asha' is not valid: choose one of 'hyperband', 'none'"),
        ({"direction": "up"}, "direction='up' is not valid"),
        ({"fit_config": "missing.yaml"}, "fit_config file 'missing.yaml' does not exist"),
        ({"selection_seed": 1.5}, r"selection_seed=1.5 is not valid: it must be an integer, or None for sampler_seed"),
        ({"sampler_seed": True}, "sampler_seed=True is not valid: it must be an integer"),
        ({"n_trials": 0}, "n_trials=0 is not valid: it must be an integer >= 1"),
        ({"n_startup_trials": -1}, "n_startup_trials=-1 is not valid: it must be an integer >= 0"),
        ({"reduction_factor": 1}, "reduction_factor=1 is not valid: it must be an integer >= 2"),
        ({"timeout_s": 0}, "timeout_s=0 is not valid: it must be a number > 0"),
        ({"warm_start_steps": -1}, "warm_start_steps=-1 is not valid: it must be an integer >= 0"),
    ],
)
def test_bad_options_fail_before_any_trial(kwargs: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        _tune(tmp_path, **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("selection_seed", "expected"), [(None, 3), (7, 7)])
def test_selection_options_and_the_trial_validation_reach_every_trial(
    selection_seed: int | None, expected: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hosl_lightning.tuning.search as tune_module

    seeds: list[tuple[object, ...]] = []

    class Recording(tune_module.SubsetSelection):
        def setup(self, trainer, *args: object, **kwargs: object) -> None:  # what a trial's selection really uses
            seeds.append((self.seed, self.warm_start_steps, self.feature, self.granularity, trainer.limit_val_batches))
            super().setup(trainer, *args, **kwargs)

    import hosl_lightning.data.tokenized as tokenized
    import hosl_lightning.models.loading as loading

    fits: list[list[str]] = []
    shared: list[tuple[bool, bool]] = []  # each fit runs where models are read and splits tokenised once a study
    fit = tune_module._fit

    def recording_fit(args: list[str], *rest: object) -> object:
        fits.append(args)
        shared.append((loading._loaded is not None, tokenized._built is not None))
        return fit(args, *rest)

    monkeypatch.setattr(tune_module, "SubsetSelection", Recording)
    monkeypatch.setattr(tune_module, "_fit", recording_fit)
    _tune(tmp_path, n_trials=1, subset="random", sampler_seed=3, selection_seed=selection_seed, warm_start_steps=2,
          feature="head", granularity="batch", subset_val_batches=2,
          overrides=[o for o in SMALL if "limit_val_batches" not in o])
    assert seeds == [(expected, 2, "head", "batch", 2)]
    trial, retrain = fits
    assert shared == [(True, True), (True, True)]
    assert "--trainer.limit_val_batches=2" in trial and not any("limit_val_batches" in a for a in retrain)


def _states_under(pruner: object) -> dict[int, str]:
    """Trial states when three good trials (0-2) set the bar and every later one is much worse at every step."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="pruning", pruner=pruner)
    for _ in range(3):
        study.add_trial(optuna.trial.create_trial(value=0.0, intermediate_values=dict.fromkeys(range(8), 0.0)))

    def objective(trial: optuna.Trial) -> float:
        for step in range(8):
            trial.report(10.0 + trial.number, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return 10.0 + trial.number

    study.optimize(objective, n_trials=12)
    return {t.number: t.state.name for t in study.trials}


def test_the_pruner_is_a_hyperband_pruner_that_never_prunes_startup_trials() -> None:
    import optuna

    from hosl_lightning.tuning.pruning import StartupCompletes

    pruner = StartupCompletes(6, reduction_factor=2)
    assert isinstance(optuna.create_study(pruner=pruner).pruner, optuna.pruners.HyperbandPruner)  # what TPE checks
    plain = _states_under(optuna.pruners.HyperbandPruner(reduction_factor=2))
    assert "PRUNED" in {plain[n] for n in (3, 4, 5)}  # plain Hyperband would prune a start-up trial here
    states = _states_under(pruner)
    assert [states[n] for n in (3, 4, 5)] == ["COMPLETE"] * 3  # start-up trials (numbers < 6) finish
    assert "PRUNED" in {states[n] for n in range(6, 15)}  # later ones are pruned as Hyperband would


def _fit_outcomes(monkeypatch: pytest.MonkeyPatch, outcomes: dict[int, object]) -> list[list[str]]:
    """Make the k-th fit of a study raise ``outcomes[k]`` (an exception) or report it as its metric (a number)."""
    from hosl_lightning.tuning import search

    real, calls = search._fit, []

    def fit(args: list[str], callbacks: list, metric: str):
        calls.append(args)
        outcome = outcomes.get(len(calls) - 1)
        if isinstance(outcome, BaseException):
            raise outcome
        cli, trainer, value = real(args, callbacks, metric)
        return cli, trainer, value if outcome is None else outcome

    monkeypatch.setattr(search, "_fit", fit)
    return calls


def _study(tmp_path: Path):
    import optuna

    return optuna.load_study(study_name="hosl-tune", storage=f"sqlite:///{tmp_path / 'out' / 'hosl-tune.db'}")


def test_a_failing_trial_is_recorded_and_the_study_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fit_outcomes(monkeypatch, {1: RuntimeError("the server ran out of memory")})
    result = _tune(tmp_path, subset="random", pruner="none")
    assert len(calls) == 4  # three trials and the retrain
    assert [t.state for t in result.trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert result.trials[1].error == "RuntimeError: the server ran out of memory" and result.trials[1].value is None
    assert result.best_value == min(result.trials[0].value, result.trials[2].value)
    assert result.retrain_metrics["val_loss"] > 0
    failed = _study(tmp_path).trials[1]
    assert failed.state.name == "FAIL" and failed.user_attrs["error"] == "RuntimeError: the server ran out of memory"
    rows = list(csv.DictReader((tmp_path / "out" / "trials.csv").open()))
    assert [(r["state"], r["error"]) for r in rows] == [
        ("COMPLETE", ""), ("FAIL", "RuntimeError: the server ran out of memory"), ("COMPLETE", "")]
    assert "- trial 1: RuntimeError: the server ran out of memory" in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_metric_fails_its_trial_and_is_never_the_best(
    bad: float, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fit_outcomes(monkeypatch, {0: bad})  # minimising: -inf would win if it counted
    result = _tune(tmp_path, n_trials=2, subset="random", pruner="none", retrain=False)
    assert [t.state for t in result.trials] == ["FAIL", "COMPLETE"]
    assert result.trials[0].error.startswith(f"FloatingPointError: val_loss={bad} is not finite")
    assert result.best_value == result.trials[1].value and math.isfinite(result.best_value)
    study = _study(tmp_path)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]
    assert study.best_trial.number == 1


def test_finished_trials_are_on_disk_when_the_study_is_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fit_outcomes(monkeypatch, {1: KeyboardInterrupt()})
    with pytest.raises(KeyboardInterrupt):
        _tune(tmp_path, subset="random", pruner="none")
    out = tmp_path / "out"
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [(r["number"], r["state"]) for r in rows] == [("0", "COMPLETE"), ("1", "FAIL")]
    assert float(rows[0]["val_loss"]) > 0 and rows[1]["error"].startswith("KeyboardInterrupt")
    assert "| 0 | complete |" in (out / "results.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["hosl-tune.db", "results.md", "trials.csv"]  # no temporary left


def test_when_every_trial_fails_the_error_names_the_first_and_the_files_are_written(tmp_path: Path) -> None:
    space = {"model.optimizer.init_args.lr": {"low": -2.0, "high": -1.0}}  # AdamW refuses it when the fit starts
    with pytest.raises(RuntimeError, match=r"no trial completed with a finite value \(2 failed, 0 pruned\): nothing to "
                                           r"retrain; the first error \(trial 0\): ValueError: Invalid learning rate"):
        _tune(tmp_path, space=_space(tmp_path, space), n_trials=2, subset="random")
    rows = list(csv.DictReader((tmp_path / "out" / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["FAIL", "FAIL"] and all("Invalid learning rate" in r["error"] for r in rows)
    assert "Best: none yet" in (tmp_path / "out" / "results.md").read_text()


def test_results_are_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    result = TuneResult("s", "sqlite://", "random", direction="minimize")
    result.trials.append(TrialRecord(0, "COMPLETE", {"a.lr": 0.1}, 0.5, 1.0, 0.0, 4, 1))
    write_results(tmp_path, result, "val_loss")
    before = (tmp_path / "trials.csv").read_text(), (tmp_path / "results.md").read_text()
    result.trials.insert(0, TrialRecord(1, "COMPLETE", {"a.lr": 0.2}, 0.4, "a crash while writing", 0.0, 4, 1))
    with pytest.raises(ValueError):
        write_results(tmp_path, result, "val_loss")
    assert ((tmp_path / "trials.csv").read_text(), (tmp_path / "results.md").read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.md", "trials.csv"]


@pytest.mark.parametrize(
    ("space", "overrides", "message"),
    [
        ({"trainer.strategy.init_args.cut_layer": {"choices": [1, 2, 9]}}, [],
         (r"search space entry 'trainer.strategy.init_args.cut_layer': the value 9 is out of range for this llama "
          r"model with 4 decoder blocks: cut_layer must be an integer in \[0, 4\]")),
        ({"trainer.strategy.init_args.cut_layer": {"low": 0, "high": 5}}, [], r"the value 5 is out of range"),
        ({"trainer.strategy.init_args.q": {"low": 1, "high": 2}}, ["--trainer.strategy.init_args.cut_layer=7"],
         r"trainer.strategy.init_args.cut_layer=7 \(from the fit config or the overrides\) is out of range"),
        ({"trainer.strategy.init_args.direction": {"choices": ["gaussian", "sphere"]}}, [],
         (r"the search space's point \(trainer.strategy.init_args.direction='sphere'\) is refused by HOSLStrategy: "
          r"direction='sphere' is not valid: choose one of")),
        ({"trainer.strategy.init_args.q": {"low": 0, "high": 2}}, [], r"q=0 is not valid: it must be an integer >= 1"),
    ],
)
def test_values_the_model_or_strategy_cannot_take_fail_before_any_trial(
    space: dict, overrides: list[str], message: str, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=message):
        _tune(tmp_path, space=_space(tmp_path, space), overrides=SMALL + overrides)
    assert not (tmp_path / "out").exists()  # refused before a study was created


def test_a_trainer_option_the_subset_makes_invalid_fails_before_the_study(tmp_path: Path, capsys) -> None:
    """64 examples / 16 = 4 batches, a subset of 0.5 trains 2 an epoch: val_check_interval=3 failed every trial."""
    message = (r"trainer.val_check_interval=3 is not valid for tune: a trial trains on the subset \(subset='random', "
               r"fraction=0.5\) of 2 batches an epoch, of 4 training batches of 16, .* set val_check_interval <= 2")
    with pytest.raises(ValueError, match=message):
        _tune(tmp_path, subset="random", overrides=[*SMALL, "--trainer.val_check_interval=3"])
    assert not (tmp_path / "out").exists()  # refused before a study was created
    with pytest.raises(SystemExit):
        main(["tune", "--fit_config", str(CONFIGS / "synthetic.yaml"), "--space", _space(tmp_path), "--subset", "random",
              "--fraction", "0.5", "--overrides", str([*SMALL, "--trainer.val_check_interval=3"]).replace("'", '"')])
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hosl-lightning ")]
    assert line.startswith("hosl-lightning tune: error: trainer.val_check_interval=3 is not valid for tune")


def test_override_args_keep_strings_bare_and_encode_numbers() -> None:
    assert override_args({"a.lr": 1e-05, "a.q": 2, "a.dir": "rademacher", "a.flag": True}) == [
        "--a.lr=1e-05", "--a.q=2", "--a.dir=rademacher", "--a.flag=true"]
