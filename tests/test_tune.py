"""hosl-lightning tune: search spaces, errors before any trial, a shared study, results written, the retrain."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from hosl_lightning.cli import main
from hosl_lightning.tuning import load_space, override_args, tune
from hosl_lightning.tuning.search import _StartupCompletes

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
        ({"subset": "craig"}, "subset='craig' is not valid: choose one of 'gradmatch', 'random', 'full'"),
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
def test_selection_seed_and_warm_start_reach_every_trials_selection(
    selection_seed: int | None, expected: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hosl_lightning.tuning.search as tune_module

    seeds: list[tuple[int, int]] = []

    class Recording(tune_module.SubsetSelection):
        def setup(self, *args: object, **kwargs: object) -> None:
            seeds.append((self.seed, self.warm_start_steps))  # what a trial's selection really uses
            super().setup(*args, **kwargs)

    monkeypatch.setattr(tune_module, "SubsetSelection", Recording)
    _tune(tmp_path, n_trials=1, retrain=False, subset="random", sampler_seed=3, selection_seed=selection_seed,
          warm_start_steps=2)
    assert seeds == [(expected, 2)]


def test_startup_trials_are_never_pruned() -> None:
    class AlwaysPrune:
        def prune(self, study, trial) -> bool:
            return True

    pruner = _StartupCompletes(AlwaysPrune(), 3)
    assert [pruner.prune(None, SimpleNamespace(number=n)) for n in range(5)] == [False, False, False, True, True]


def test_override_args_keep_strings_bare_and_encode_numbers() -> None:
    assert override_args({"a.lr": 1e-05, "a.q": 2, "a.dir": "rademacher", "a.flag": True}) == [
        "--a.lr=1e-05", "--a.q=2", "--a.dir=rademacher", "--a.flag=true"]
