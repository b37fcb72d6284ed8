"""The LightningCLI of ``hosl-lightning fit/validate/test``: HOSLModule, any LightningDataModule, HOSLStrategy.

Its own module, apart from the ``hosl-lightning`` entry point (``hosl_lightning.cli``): the tuning trials build
this CLI too, and the entry point dispatches ``tune`` to them, so the two must not live in one module. Which
process serves and which trains is the strategy's launcher's business (:mod:`.launcher`), not the CLI's.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from numbers import Real
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI

from hosl_lightning.core.options import UserError, check_int, check_number
from hosl_lightning.lightning.callbacks import LossSummary, PredictionWriter, ZeroShotReport
from hosl_lightning.lightning.checkpoint_io import check_saved_model, read_checkpoint
from hosl_lightning.lightning.module import HOSLModule
from hosl_lightning.lightning.strategy import HOSLStrategy  # noqa: F401  (registers the "hosl" strategy)
from hosl_lightning.models import deferred_weights

#: ``ckpt_path`` values that Lightning resolves itself rather than naming a file.
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")
_NON_FINITE = re.compile(r"^[-+]?(?:inf|Inf|INF|infinity|Infinity|INFINITY|nan|NaN|NAN)$")


@contextmanager
def reading_non_finite() -> Iterator[None]:
    """Inside, jsonargparse reads ``inf``, ``-Infinity`` and ``nan`` (as Python spells them) as numbers, so that
    ``--mu=inf`` meets the option's own check ("must be ... finite", as ``--mu=1e999`` does) instead of "Expected a
    float. Got value: inf": YAML spells them ``.inf`` only. jsonargparse's YAML loader is one class for the whole
    process, so the rule is added for the parse alone, and a quoted ``"inf"`` stays a string."""
    try:
        from jsonargparse._loaders_dumpers import get_yaml_default_loader
    except ImportError:  # another jsonargparse layout: ``inf`` is refused by type, as before
        yield
        return
    loader = get_yaml_default_loader()
    saved = loader.__dict__.get("yaml_implicit_resolvers")
    loader.yaml_implicit_resolvers = {key: list(rules) for key, rules in loader.yaml_implicit_resolvers.items()}
    loader.add_implicit_resolver("tag:yaml.org,2002:float", _NON_FINITE, list("-+iInN"))
    try:
        yield
    finally:
        if saved is None:
            del loader.yaml_implicit_resolvers
        else:
            loader.yaml_implicit_resolvers = saved


def print_config_action() -> Any:
    """jsonargparse's ``--print_config`` action, whose switches let a parse complete before the config is printed
    (it prints halfway through the parse, before its own validation and before any constructor has checked its
    options); None with another jsonargparse layout, which then prints as before."""
    try:
        from jsonargparse._actions import _ActionPrintConfig
    except ImportError:
        return None
    return _ActionPrintConfig if hasattr(_ActionPrintConfig, "skip_print_config") else None


# The commands of ``hosl-lightning`` that are not Trainer methods: the entry point (hosl_lightning.cli) runs them
# before this CLI parses anything; they are listed here so that ``hosl-lightning --help`` shows all it can do.
OTHER_COMMANDS = {
    "tune": "Search hyperparameters over a fit config (hosl-lightning tune --help).",
    "export": "Write a plain transformers model from a split run's checkpoint (hosl-lightning export --help).",
}


class _Refusals:
    """jsonargparse's instantiator for every class the config names (model and data keep Lightning's): it calls the
    class as jsonargparse would, and keeps each :class:`UserError` its constructor raises. jsonargparse reports a
    refusal of a class in a union (the Trainer's ``strategy: str | Strategy``) as "Does not validate against any of
    the Union subtypes ...", with our message among its lines and the UserError itself dropped (only the first
    subtype's error is chained); :meth:`cause_of` finds it again."""

    def __init__(self) -> None:
        self.raised: list[UserError] = []

    def __call__(self, class_type: type, *args: Any, **kwargs: Any) -> Any:
        try:
            return class_type(*args, **kwargs)
        except UserError as error:
            self.raised.append(error)
            raise

    def cause_of(self, error: BaseException) -> UserError | None:
        """The latest refusal whose message ``error`` carries: not one that jsonargparse got past (another subtype
        of the union took the value) while something else failed."""
        return next((refusal for refusal in reversed(self.raised) if str(refusal) in str(error)), None)

    @contextmanager
    def reported(self) -> Iterator[None]:
        """Inside, what a constructor raises leaves as a :class:`UserError`: its own refusal (found again inside
        jsonargparse's error, see :meth:`cause_of`), or another error of a constructor, named by its type."""
        try:
            yield
        except UserError:
            raise
        except (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError) as error:
            refusal = self.cause_of(error)
            if refusal is not None:
                raise refusal from error
            raise UserError(f"{type(error).__name__}: {error}") from error


class HOSLCLI(LightningCLI):
    """LightningCLI with HOSLStrategy as the default strategy; reports the loss trend and zero-shot vs final scores."""

    def init_parser(self, **kwargs: Any) -> Any:
        """Every parser (the main one and each subcommand's) raises its errors, for ``main`` to report in one style."""
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """``--print_config`` prints a config only once it has passed the checks ``fit`` makes before it loads a
        model (the Trainer's options, the optimizer's, the strategy's), and otherwise refuses it as ``fit`` would:
        one line, exit status 2, instead of printing a config that does not run."""
        printing = print_config_action()
        with reading_non_finite(), printing.skip_print_config() if printing else nullcontext():
            super().parse_arguments(parser, args)
        if printing is not None and printing.is_print_config_requested(parser):
            self.before_instantiate_classes()
            self._build_strategy()
            printing.print_config_if_requested(parser, self.config)  # prints, and exits with status 0

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.set_defaults({"trainer.strategy": "hosl"})

    def before_instantiate_classes(self) -> None:
        """Trainer options that Lightning itself would refuse only once the model has loaded, refused now."""
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        config = self.config[subcommand]
        trainer = config.get("trainer") or {}
        accumulate = trainer.get("accumulate_grad_batches", 1)
        if accumulate != 1:  # HOSLModule optimizes manually: Lightning cannot accumulate for it
            raise UserError(f"trainer.accumulate_grad_batches={accumulate!r} is not valid: HOSLModule steps its "
                            "optimizers itself (manual optimization), which Lightning cannot accumulate; use 1, and a "
                            "larger data batch_size instead")
        max_steps = trainer.get("max_steps", -1)
        if max_steps != -1:
            try:
                check_int("trainer.max_steps", max_steps, 0)
            except UserError as error:
                raise UserError(f"{error}, or -1 for no limit") from None
        optimizer = (config.get("model") or {}).get("optimizer")
        init_args = getattr(optimizer, "init_args", None) or {}
        for name in ("lr", "eps", "weight_decay", "momentum"):  # torch's optimizers refuse a negative one only
            value = init_args.get(name)                         # when the fit starts
            if isinstance(value, (int, float)):
                check_number(f"model.optimizer.init_args.{name}", value, 0)
        betas = init_args.get("betas")
        if isinstance(betas, (list, tuple)) and not all(  # torch refuses them only when the fit starts, too
                isinstance(beta, Real) and not isinstance(beta, bool) and 0 <= beta < 1 for beta in betas):
            raise UserError(f"model.optimizer.init_args.betas={betas!r} is not valid: each beta must be a number in "
                            "[0, 1), e.g. [0.9, 0.999]")

    def _add_subcommands(self, parser: Any, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        for name, description in OTHER_COMMANDS.items():
            parser._subcommands_action.add_subcommand(name, self.init_parser(description=description), help=description)

    def _parse_ckpt_path(self) -> None:
        """The model the user names is the model that runs: a checkpoint's hyperparameters fill in only the
        module options that the command line and config leave unset (Lightning's own CLI lets them win)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or ckpt_path in LIGHTNING_CKPT_NAMES:
            return
        hparams = read_checkpoint(ckpt_path).get("hyper_parameters", {})  # a bad file is named before anything loads
        hparams.pop("_instantiator", None)
        if "_class_path" in hparams:  # a module other than HOSLModule: Lightning's own way
            return super()._parse_ckpt_path()
        given = self.config[subcommand].get("model") or {}
        unset = {key: value for key, value in hparams.items() if given.get(key) is None}
        check_saved_model(ckpt_path, unset.get("model"), "--model.model")
        if unset:
            self.config = self.parser.parse_object({subcommand: {"model": unset}}, self.config)

    def _distributed(self) -> bool:
        strategy = self._get(self.config, "trainer.strategy", None)
        init_args = getattr(strategy, "init_args", None)
        return getattr(init_args, "transport", None) == "distributed"

    def _build_strategy(self) -> None:
        """Build the config's strategy alone, as :meth:`instantiate_classes` would (its refusals reported alike),
        and drop it: ``--print_config`` checks the strategy's options without loading the model."""
        subcommand = self.config.get("subcommand")
        key = f"{subcommand}.trainer.strategy"
        if subcommand is None or key not in self.config:
            return
        only = Namespace(subcommand=subcommand)
        only[key] = self.config[key]
        refusals = _Refusals()
        self.parser.add_instantiator(refusals, object)
        with refusals.reported():
            self.parser.instantiate_classes(only, instantiate_groups=False)  # groups (the model) would be built empty

    def instantiate_classes(self) -> None:
        """In a distributed run the model is built on the meta device; each process then loads only its half.

        A bad option refused by a constructor (``q=0 is not valid: ...``) is reported as that constructor's
        :class:`UserError`, also where jsonargparse wraps it (a strategy's refusal, inside its union-type error);
        another error of a constructor becomes one. The command line reports them as it reports jsonargparse's own:
        one line, exit status 2.
        """
        refusals = _Refusals()
        self.parser.add_instantiator(refusals, object)  # after Lightning's, which build the model and data
        with refusals.reported():
            if not self._distributed():
                return super().instantiate_classes()
            with deferred_weights():
                super().instantiate_classes()


class _DropAdvert(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip: For seamless cloud logging")


def quiet_library_noise() -> None:
    """Silence what the libraries print that is neither ours nor actionable by a user of this command: Lightning's
    advertisement for its cloud logger (on every fit, even with ``logger: false``), and the deprecation warning
    that Lightning's own pytree helper raises under this torch (``isinstance(treespec, LeafSpec)``). Installed
    once; warnings and logs of our own, and every other library message, still show."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropAdvert) for f in logger.filters):
        logger.addFilter(_DropAdvert())


def build_cli(args: list[str] | None = None) -> HOSLCLI:
    """Parse ``args`` (default: the command line) and run the subcommand; returns the CLI with its trainer."""
    quiet_library_noise()
    return HOSLCLI(
        HOSLModule,
        subclass_mode_data=True,
        trainer_defaults={"callbacks": [LossSummary(), ZeroShotReport(), PredictionWriter()]},
        save_config_kwargs={"overwrite": True},
        args=args,  # None: LightningCLI reads the command line itself (passing sys.argv too makes it warn)
    )
