"""The ``hosl-lightning`` command: LightningCLI over HOSLModule, any LightningDataModule and HOSLStrategy.

``hosl-lightning fit --config configs/quickstart.yaml`` trains; ``--print_config`` prints a config that
runs as is; invalid options fail while the config is parsed, before any model is loaded.
``hosl-lightning tune --fit_config ... --space ...`` searches hyperparameters (``hosl_lightning.tuning``).

Only the entry point lives here; the LightningCLI itself is ``hosl_lightning.lightning.cli`` (re-exported), which
the tuning trials import without importing this dispatcher back.
"""

from __future__ import annotations

import sys

from hosl_lightning.lightning.cli import HOSLCLI, OptionError, build_cli

__all__ = ["HOSLCLI", "build_cli", "main"]


def main(args: list[str] | None = None) -> None:
    from_command_line = args is None
    args = list(sys.argv[1:] if args is None else args)
    if args[:1] == ["export"]:  # a plain transformers model from a split run's checkpoint(s)
        from hosl_lightning.lightning.export import main as export_main

        export_main(args[1:])
        return
    if args[:1] == ["tune"]:  # hyperparameter search over fit configs (hosl_lightning.tuning)
        from hosl_lightning.tuning.search import main as tune_main

        tune_main(args[1:])
        return
    try:
        build_cli(None if from_command_line else args)
    except OptionError as error:  # one style for every refused option: usage, the message, exit status 2
        error.parser.error(str(error))


if __name__ == "__main__":
    main()
