"""The ``hosl-lightning`` command: LightningCLI over HOSLModule, any LightningDataModule and HOSLStrategy.

``hosl-lightning fit --config configs/quickstart.yaml`` trains; ``--print_config`` prints a config that
runs as is; invalid options fail while the config is parsed, before any model is loaded.
``hosl-lightning tune --fit_config ... --space ...`` searches hyperparameters (``hosl_lightning.tune``).
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch.cli import LightningCLI

import hosl_lightning  # noqa: F401  (registers the "hosl" strategy)
from hosl_lightning.callbacks import LossSummary, ZeroShotReport
from hosl_lightning.launch import run
from hosl_lightning.models import deferred_weights
from hosl_lightning.module import HOSLModule


class HOSLCLI(LightningCLI):
    """LightningCLI with HOSLStrategy as the default strategy; reports the loss trend and zero-shot vs final scores."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.set_defaults({"trainer.strategy": "hosl"})

    def _distributed(self) -> bool:
        strategy = self._get(self.config, "trainer.strategy", None)
        init_args = getattr(strategy, "init_args", None)
        return getattr(init_args, "transport", None) == "distributed"

    def instantiate_classes(self) -> None:
        """In a distributed run the model is built on the meta device; each process then loads only its half."""
        if not self._distributed():
            return super().instantiate_classes()
        with deferred_weights():
            super().instantiate_classes()

    # Under a distributed strategy, the server process (rank 0) serves the client instead of running a loop.
    def fit(self, model: Any, **kwargs: Any) -> None:
        run(self.trainer, "fit", model, **kwargs)

    def validate(self, model: Any, **kwargs: Any) -> None:
        run(self.trainer, "validate", model, **kwargs)

    def test(self, model: Any, **kwargs: Any) -> None:
        run(self.trainer, "test", model, **kwargs)


def build_cli(args: list[str] | None = None) -> HOSLCLI:
    """Parse ``args`` (default: the command line) and run the subcommand; returns the CLI with its trainer."""
    return HOSLCLI(
        HOSLModule,
        subclass_mode_data=True,
        trainer_defaults={"callbacks": [LossSummary(), ZeroShotReport()]},
        save_config_kwargs={"overwrite": True},
        args=args if args is not None else sys.argv[1:],
    )


def main(args: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if args is None else args)
    if args[:1] == ["tune"]:  # hyperparameter search over fit configs (hosl_lightning.tune)
        from hosl_lightning.tune import main as tune_main

        tune_main(args[1:])
        return
    build_cli(args)


if __name__ == "__main__":
    main()
