"""The ``hosl-lightning`` command: LightningCLI over HOSLModule, any LightningDataModule and HOSLStrategy.

``hosl-lightning fit --config configs/quickstart.yaml`` trains; ``--print_config`` prints a config that
runs as is; invalid options fail while the config is parsed, before any model is loaded.
``hosl-lightning tune --fit_config ... --space ...`` searches hyperparameters (``hosl_lightning.tuning``);
``hosl-lightning export --ckpt_path ... --out ...`` writes a plain transformers model.

Every user error (an option, a file, a checkpoint, found while parsing or later) is reported in one style: one
line, ``hosl-lightning <command>: error: <message>``, exit status 2, no traceback. Any other exception is a bug
and keeps its traceback.

Only the entry point lives here; the LightningCLI itself is ``hosl_lightning.lightning.cli`` (re-exported), which
the tuning trials import without importing this dispatcher back.
"""

from __future__ import annotations

import sys
from argparse import ArgumentError
from typing import NoReturn

from hosl_lightning.core.options import UserError
from hosl_lightning.lightning.cli import HOSLCLI, build_cli

__all__ = ["HOSLCLI", "build_cli", "main", "one_line"]


def one_line(message: str) -> str:
    """A parser's or a check's message as one line. jsonargparse lists every type it tried for a nested option:
    keep a check's own ``... is not valid: ...`` line when there is one, else the innermost ``Parser key`` on."""
    lines = [line.strip(" -") for line in str(message).splitlines() if line.strip(" -")]
    checked = [line for line in lines if " is not valid: " in line]
    if checked:
        return checked[-1]
    keys = [i for i, line in enumerate(lines) if line.startswith("Parser key")]
    kept = [line for line in lines[keys[-1] if keys else 0 :] if not line.startswith("Given value")]
    return " ".join(kept or lines)


def report_user_error(command: str, error: BaseException) -> NoReturn:
    """Print ``error`` as the command line reports every user error, and exit with status 2."""
    prog = f"hosl-lightning {command}".strip()
    print(f"{prog}: error: {one_line(str(error))}", file=sys.stderr)
    raise SystemExit(2)


def main(args: list[str] | None = None) -> None:
    from_command_line = args is None
    args = list(sys.argv[1:] if args is None else args)
    command = args[0] if args and not args[0].startswith("-") else ""
    try:
        if command == "export":  # a plain transformers model from a split run's checkpoint(s)
            from hosl_lightning.lightning.export import main as export_main

            export_main(args[1:])
            return
        if command == "tune":  # hyperparameter search over fit configs (hosl_lightning.tuning)
            from hosl_lightning.tuning.search import main as tune_main

            tune_main(args[1:])
            return
        build_cli(None if from_command_line else args)
    except (UserError, ArgumentError) as error:
        report_user_error(command, error)


if __name__ == "__main__":
    main()
