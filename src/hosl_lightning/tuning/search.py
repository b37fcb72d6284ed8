"""``hosl-lightning tune``: hyperparameter search with Optuna, trials trained on small weighted subsets (AUTOMATA).

Each trial is a ``fit`` of the same config with the sampled values as command-line overrides, trained on
``fraction`` of the batches (``SubsetSelection``: GradMatch, random, or full data) and reporting the monitored
metric after every validation to a Hyperband pruner. TPE proposes the values. The study lives in a database
(SQLite by default; any SQLAlchemy URL, so workers on many machines can share one study). The best
configuration is then retrained on the full data, and a table and a plot are written.

The space is checked against the config, the strategy and the model before the first trial (``limits``). A trial
that raises, or ends on a non-finite metric, is marked FAIL with its error (user attr ``error``) and the study
goes on; trials.csv and results.md are rewritten (atomically) after every trial.

Needs the ``tune`` extra: ``pip install 'hosl-lightning[tune]'`` (optuna, optuna-integration).
"""

from __future__ import annotations

import gc
import math
import time
from pathlib import Path
from typing import Any, Literal

from hosl_lightning.core.options import MissingFileError, UserError, check_choice, check_int, check_number
from hosl_lightning.data.tokenized import tokenized_once
from hosl_lightning.models.loading import loaded_once
from hosl_lightning.tuning.limits import check_space, check_subset_epochs
from hosl_lightning.tuning.results import TrialRecord, TuneResult, write_results
from hosl_lightning.tuning.selection import (
    METHODS,
    Feature,
    Granularity,
    Method,
    SelectionCache,
    SubsetSelection,
)
from hosl_lightning.tuning.space import load_space, override_args

INSTALL_HINT = "pip install 'hosl-lightning[tune]'  (optuna and optuna-integration)"


def _require_optuna() -> Any:
    try:
        import optuna
        import optuna_integration  # noqa: F401
    except ImportError as error:
        raise ImportError(f"hosl-lightning tune needs optuna and optuna-integration: {INSTALL_HINT}") from error
    return optuna


def build_trial_cli(args: list[str], callbacks: list[Any], parse_only: bool = False) -> Any:
    """A LightningCLI for one trial (no run, no zero-shot report, no config file written)."""
    from hosl_lightning.lightning.cli import HOSLCLI
    from hosl_lightning.lightning.module import HOSLModule

    class _ParseOnly(HOSLCLI):
        def instantiate_classes(self) -> None:  # the check before a study: keys and values, no model
            pass

        def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
            pass

    if not parse_only:
        return HOSLCLI(HOSLModule, subclass_mode_data=True, trainer_defaults={"callbacks": callbacks}, run=False,
                       save_config_callback=None, args=args)
    try:
        return _ParseOnly(HOSLModule, subclass_mode_data=True, run=False, save_config_callback=None, args=args,
                          parser_kwargs={"exit_on_error": False})
    except Exception as error:  # jsonargparse's ArgumentError: the key or value the config does not accept
        raise UserError(f"the search space or overrides do not fit the config: {error}") from None


def _metric(trainer: Any, name: str) -> float | None:
    value = trainer.callback_metrics.get(name)
    return None if value is None else float(value)


def _fit(args: list[str], callbacks: list[Any], metric: str) -> tuple[Any, Any, float]:
    """Fit once; the monitored metric after the last validation (one more validation if the fit ran none)."""
    cli = build_trial_cli(args, callbacks)
    if cli.trainer.strategy.__class__.__name__ == "HOSLStrategy" and cli.trainer.strategy.transport != "in_process":
        raise UserError("tune runs trials in this process: drop transport=distributed from the config")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    value = _metric(cli.trainer, metric)
    if value is None:
        cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
        value = _metric(cli.trainer, metric)
    if value is None:
        raise KeyError(f"metric {metric!r} was not logged; logged metrics: {sorted(cli.trainer.callback_metrics)}")
    return cli, cli.trainer, value


def _describe(error: BaseException) -> str:
    """An error as a trial's record keeps it: its type and message, bounded (it goes into the study's database)."""
    text = f"{type(error).__name__}: {error}".strip()
    return text if len(text) <= 2000 else text[:1997] + "..."


def _no_trial_completed(result: TuneResult, study: Any, optuna: Any) -> str:
    """Why there is nothing to retrain: the study's trial states and the first error (this worker's, else any)."""
    states = optuna.trial.TrialState
    failed = sum(t.state == states.FAIL for t in study.trials)
    pruned = sum(t.state == states.PRUNED for t in study.trials)
    errors = [(t.number, t.error) for t in result.trials if t.error] or [
        (t.number, t.user_attrs["error"]) for t in study.trials if "error" in t.user_attrs]
    cause = f"; the first error (trial {errors[0][0]}): {errors[0][1]}" if errors else ""
    return f"no trial completed with a finite value ({failed} failed, {pruned} pruned): nothing to retrain{cause}"


def tune(
    fit_config: str,
    space: str,
    n_trials: int = 20,
    subset: Method = "milo",
    fraction: float = 0.05,
    select_every_n_steps: int | None = None,
    warm_start_steps: int = 0,
    feature: Feature = "hidden",
    granularity: Granularity = "batch",
    subset_val_batches: int | None = None,
    metric: str = "val_acc",
    direction: Literal["maximize", "minimize"] = "maximize",
    study_name: str = "hosl-tune",
    storage: str | None = None,
    output_dir: str = "tune_results",
    sampler_seed: int = 0,
    selection_seed: int | None = None,
    n_startup_trials: int = 5,
    pruner: Literal["hyperband", "none"] = "hyperband",
    reduction_factor: int = 3,
    retrain: bool = True,
    test: bool = True,
    timeout_s: float | None = None,
    overrides: list[str] | None = None,
) -> TuneResult:
    """Search ``space`` for the config ``fit_config`` with Optuna, training trials on subsets; retrain the best on full data.

    Args:
        fit_config: the fit config every trial starts from (as for ``hosl-lightning fit --config``).
        space: a YAML search space: config keys (as on the command line) mapped to ``{low, high, log, step}``
            (ints give integer parameters) or ``{choices: [...]}``, e.g.
            ``trainer.strategy.init_args.zo_lr: {low: 1.0e-7, high: 1.0e-5, log: true}``.
        n_trials: trials this worker runs (several workers on one study add up).
        subset: how trials choose their training batches: ``milo`` (default), ``gradmatch``, ``random`` or
            ``full`` (``SubsetSelection``). MILO is the default because in ``benchmarks/tuning_ranks.py`` (3 study
            seeds) it alone picked the oracle configuration on every seed at a 5% subset, 13.9x faster than the
            full-data search; per-batch GradMatch picked a configuration that wrecks the model.
        fraction: the share of training batches a trial trains on per epoch (``subset`` gradmatch, random or
            milo; ``full`` trains on all of them). Default 0.05, where MILO had zero regret at 13.9x in
            ``benchmarks/tuning_ranks.py``; at 0.1 its regret was 3.9 points.
        select_every_n_steps: steps between re-selections; default once per subset epoch.
        warm_start_steps: each trial's first steps on random batches of all the data before the first subset
            choice (AUTOMATA's warm start; ``SubsetSelection``). They count within the trial's steps.
        feature: GradMatch's gradient feature: ``hidden`` (dL/dh), ``head`` (the projected head gradient) or
            ``label_head`` (the gradient at the label-word rows, classification only; ``SubsetSelection``).
        granularity: ``batch`` (choose whole batches, AUTOMATA) or ``per_class`` (choose examples class by
            class, CORDS' PerClass; needs labelled examples).
        subset_val_batches: validate the study's trials (with any ``subset``, ``full`` too) on the first this
            many validation batches only (Lightning's ``limit_val_batches``), which cuts a short trial's fixed cost: a smaller seeded sample when the
            datamodule draws its validation sample (``num_validation``), else the first batches in file order.
            Default: all of them. The retrain uses all.
        metric: the logged metric trials are ranked by (after each validation, and at the end).
        direction: ``maximize`` or ``minimize`` the metric.
        study_name: the study's name in the storage; workers with the same name and storage share it.
        storage: an SQLAlchemy database URL (``postgresql://...``, ``mysql://...``); default
            ``sqlite:///<output_dir>/<study_name>.db``.
        output_dir: where trials.csv, results.md and history.png go.
        sampler_seed: seed of the TPE sampler (its first ``n_startup_trials`` are random); a worker that joins a
            study with n trials already in it uses ``sampler_seed + n``.
        selection_seed: seed of the subset choice (candidate batches, random picks, epoch order); default
            ``sampler_seed``. Set it apart to repeat a search on other subsets with the same start-up trials.
        n_startup_trials: TPE's random start-up trials; they are never pruned.
        pruner: ``hyperband`` (by the metric at each validation, i.e. per epoch) or ``none``.
        reduction_factor: Hyperband's reduction factor.
        retrain: fit the best configuration on the full data afterwards and report its metrics.
        test: also test the retrained model (when the datamodule has a test_dataloader).
        timeout_s: stop starting new trials after this many seconds.
        overrides: extra command-line arguments for every trial and the retrain, e.g. ``--trainer.max_epochs=3``.
    """
    optuna = _require_optuna()
    from optuna_integration import PyTorchLightningPruningCallback

    check_choice("subset", subset, METHODS)  # by the option's name here; SubsetSelection checks the others
    check_choice("direction", direction, ("maximize", "minimize"))
    check_choice("pruner", pruner, ("hyperband", "none"))
    check_int("n_trials", n_trials, 1)
    check_int("sampler_seed", sampler_seed)
    check_int("selection_seed", selection_seed, none="sampler_seed")
    check_int("n_startup_trials", n_startup_trials, 0)
    check_int("reduction_factor", reduction_factor, 2)
    check_int("subset_val_batches", subset_val_batches, 1, none="all of them")
    if timeout_s is not None:
        check_number("timeout_s", timeout_s, 0, strict=True)
    if not Path(fit_config).is_file():
        raise MissingFileError(f"fit_config file {fit_config!r} does not exist")
    selection_seed = sampler_seed if selection_seed is None else selection_seed
    SubsetSelection(subset, fraction, select_every_n_steps, seed=selection_seed, warm_start_steps=warm_start_steps,
                    feature=feature, granularity=granularity)  # checks these now, not in a trial
    trial_overrides = [] if subset_val_batches is None else [f"--trainer.limit_val_batches={subset_val_batches}"]
    parameters = load_space(space)
    base = ["fit", "--config", fit_config, *(overrides or [])]
    # Every choice and both ends of every range are checked before the study starts, without building a model:
    # keys and types against the config, the strategy's options, and cut_layer against the model's blocks.
    check_space(parameters, lambda point: build_trial_cli(base[1:] + override_args(point), [], parse_only=True).config)
    # A trainer option that the subset's size makes invalid (val_check_interval above a subset epoch) fails here,
    # naming the subset, not in every trial. It reads the training data once more (the DataModule alone, no model).
    with tokenized_once():
        check_subset_epochs(build_trial_cli(base[1:] + trial_overrides, [], parse_only=True).config, subset, fraction)

    from hosl_lightning.tuning.pruning import StartupCompletes  # subclasses optuna's HyperbandPruner

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{out / study_name}.db"
    study = optuna.create_study(
        study_name=study_name, storage=storage, direction=direction, load_if_exists=True,
        pruner=StartupCompletes(n_startup_trials, reduction_factor=reduction_factor) if pruner == "hyperband"
        else optuna.pruners.NopPruner())
    # A worker joining a study already under way gets its own random stream (the same seed would propose the
    # same start-up points again); a lone worker on a fresh study stays reproducible from sampler_seed.
    study.sampler = optuna.samplers.TPESampler(seed=sampler_seed + len(study.trials), n_startup_trials=n_startup_trials)
    result = TuneResult(study_name, storage, subset, direction=direction)
    cache = SelectionCache()
    started = time.perf_counter()

    def objective(trial: Any) -> float:
        """One trial; a failure (an error, Ctrl-C, a non-finite metric) is recorded and re-raised for Optuna to mark
        FAIL, and the files on disk are brought up to date after every trial, whatever its end."""
        record = TrialRecord(trial.number, "RUNNING", {}, None, 0.0, 0.0, 0, None)
        result.trials.append(record)
        trial_started = time.perf_counter()
        selection, cli = None, None
        try:
            record.params = values = {p.key: p.suggest(trial) for p in parameters}
            print(f"[tune] trial {trial.number} ({len(result.trials)}/{n_trials}): "
                  + ", ".join(f"{k.rsplit('.', 1)[-1]}={v:.3g}" if isinstance(v, float)
                              else f"{k.rsplit('.', 1)[-1]}={v}" for k, v in values.items()), flush=True)
            selection = SubsetSelection(subset, fraction, select_every_n_steps, seed=selection_seed, cache=cache,
                                        warm_start_steps=warm_start_steps, feature=feature, granularity=granularity)
            pruning = PyTorchLightningPruningCallback(trial, monitor=metric)
            cli, _, value = _fit(base[1:] + override_args(values) + trial_overrides, [selection, pruning], metric)
            if not math.isfinite(value):  # a diverged run: never COMPLETE, never the best
                raise FloatingPointError(f"{metric}={value} is not finite: the run diverged")
            record.state, record.value = "COMPLETE", value
            return value
        except optuna.TrialPruned:
            record.state = "PRUNED"
            raise
        except BaseException as error:  # KeyboardInterrupt too: the record says so before the study stops
            record.state, record.error = "FAIL", _describe(error)
            trial.set_user_attr("error", record.error)
            raise
        finally:
            record.seconds = time.perf_counter() - trial_started
            record.selection_seconds = 0.0 if selection is None else selection.selection_seconds
            if cli is not None:
                record.steps, record.last_epoch = cli.trainer.global_step, cli.trainer.current_epoch
            trial.set_user_attr("seconds", record.seconds)
            trial.set_user_attr("selection_seconds", record.selection_seconds)
            print(f"[tune] trial {trial.number}: {record.state.lower()}"
                  + (f", {metric}={record.value:.4f}" if record.value is not None else "")
                  + f" in {record.seconds:.1f} s (selection {record.selection_seconds:.1f} s)"
                  + (f": {record.error}" if record.error else ""), flush=True)
            result.search_seconds = time.perf_counter() - started
            write_results(out, result, metric)  # finished trials survive a later crash or Ctrl-C
            del cli
            gc.collect()

    # every trial and the retrain read the pretrained model and tokenise each split once between them
    with loaded_once(), tokenized_once():
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial from here instead
        # catch=(Exception,): a failed trial is marked FAIL and the study goes on; Ctrl-C still stops it.
        study.optimize(objective, n_trials=n_trials, timeout=timeout_s, catch=(Exception,))
        result.search_seconds = time.perf_counter() - started
        finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None
                    and math.isfinite(t.value)]  # another worker's older code may have completed a diverged trial
        if not finished:
            write_results(out, result, metric, study)
            raise RuntimeError(_no_trial_completed(result, study, optuna))
        best = (max if direction == "maximize" else min)(finished, key=lambda t: t.value)
        result.best_params, result.best_value = dict(best.params), float(best.value)
        print(f"[tune] best {metric}={result.best_value:.4f} with {result.best_params} "
              f"({result.search_seconds:.1f} s of search)", flush=True)
        write_results(out, result, metric, study)  # the search is kept even if the retrain fails
        if retrain:
            _retrain(result, base[1:] + override_args(result.best_params), metric, test)
            write_results(out, result, metric, study)
    return result


def _retrain(result: TuneResult, args: list[str], metric: str, test: bool) -> None:
    """Fit the best configuration on all the data (and test it), into ``result``'s retrain fields."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    started = time.perf_counter()
    cli, trainer, value = _fit(args, [], metric)
    result.retrain_metrics = {metric: value}
    if test and is_overridden("test_dataloader", cli.datamodule):
        for scores in trainer.test(cli.model, datamodule=cli.datamodule, verbose=False):
            result.retrain_metrics.update({k: float(v) for k, v in scores.items()})
    result.retrain_seconds = time.perf_counter() - started
    print(f"[tune] retrained on full data in {result.retrain_seconds:.1f} s: {result.retrain_metrics}", flush=True)
    del cli, trainer
    gc.collect()


def main(args: list[str] | None = None) -> TuneResult:
    """``hosl-lightning tune --fit_config fit.yaml --space space.yaml [--n_trials 20 ...]`` (see :func:`tune`).

    ``--config tune.yaml`` reads these options from a file; ``--print_config`` writes one. A bad option raises
    (``hosl-lightning`` reports it in its one style), and ``inf`` reads as a number, as in ``fit``.
    """
    from jsonargparse import auto_cli

    from hosl_lightning.lightning.cli import reading_non_finite

    with reading_non_finite():
        return auto_cli(tune, args=args, as_positional=False, exit_on_error=False)
