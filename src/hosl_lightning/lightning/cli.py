"""The LightningCLI of ``hosl-lightning fit/validate/test``: HOSLModule, any LightningDataModule, HOSLStrategy.

Its own module, apart from the ``hosl-lightning`` entry point (``hosl_lightning.cli``): the tuning trials build
this CLI too, and the entry point dispatches ``tune`` to them, so the two must not live in one module. Which
process serves and which trains is the strategy's launcher's business (:mod:`.launcher`), not the CLI's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LightningCLI

from hosl_lightning.lightning.callbacks import LossSummary, ZeroShotReport
from hosl_lightning.lightning.module import HOSLModule
from hosl_lightning.lightning.strategy import HOSLStrategy  # noqa: F401  (registers the "hosl" strategy)
from hosl_lightning.models import deferred_weights
from hosl_lightning.models.sources import looks_like_path


class HOSLCLI(LightningCLI):
    """LightningCLI with HOSLStrategy as the default strategy; reports the loss trend and zero-shot vs final scores."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.set_defaults({"trainer.strategy": "hosl"})

    def _parse_ckpt_path(self) -> None:
        """The model the user names is the model that runs: a checkpoint's hyperparameters fill in only the
        module options that the command line and config leave unset (Lightning's own CLI lets them win)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        hparams = torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters", {})
        hparams.pop("_instantiator", None)
        if "_class_path" in hparams:  # a module other than HOSLModule: Lightning's own way
            return super()._parse_ckpt_path()
        given = self.config[subcommand].get("model") or {}
        unset = {key: value for key, value in hparams.items() if given.get(key) is None}
        saved = unset.get("model")
        if isinstance(saved, str) and looks_like_path(saved) and not Path(saved).expanduser().exists():
            raise OptionError(f"ckpt_path={ckpt_path!r} was saved with model={saved!r}, which does not exist here: "
                              "pass --model.model=<where the model is now>", self.parser)
        if unset:
            self.config = self.parser.parse_object({subcommand: {"model": unset}}, self.config)

    def _distributed(self) -> bool:
        strategy = self._get(self.config, "trainer.strategy", None)
        init_args = getattr(strategy, "init_args", None)
        return getattr(init_args, "transport", None) == "distributed"

    def instantiate_classes(self) -> None:
        """In a distributed run the model is built on the meta device; each process then loads only its half.

        A bad option refused by a constructor (``q=0 is not valid: ...``) becomes an :class:`OptionError`, which
        the command line reports as jsonargparse reports its own: usage and the message, exit status 2.
        """
        try:
            if not self._distributed():
                return super().instantiate_classes()
            with deferred_weights():
                super().instantiate_classes()
        except (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError) as error:
            raise OptionError(f"{type(error).__name__}: {error}", self.parser) from error


class OptionError(ValueError):
    """An option a constructor refused while the CLI built its classes, before anything trained."""

    def __init__(self, message: str, parser: Any) -> None:
        super().__init__(message)
        self.parser = parser


def build_cli(args: list[str] | None = None) -> HOSLCLI:
    """Parse ``args`` (default: the command line) and run the subcommand; returns the CLI with its trainer."""
    return HOSLCLI(
        HOSLModule,
        subclass_mode_data=True,
        trainer_defaults={"callbacks": [LossSummary(), ZeroShotReport()]},
        save_config_kwargs={"overwrite": True},
        args=args,  # None: LightningCLI reads the command line itself (passing sys.argv too makes it warn)
    )
