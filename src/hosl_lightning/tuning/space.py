"""The search space of ``hosl-lightning tune``: a YAML file of config keys and their distributions, checked on load.

Kept apart from the study so that a space can be read and checked, and turned into command-line overrides,
without Optuna or a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hosl_lightning.core.options import MissingFileError, UserError

SPEC_KEYS = ("low", "high", "log", "step", "choices")


@dataclass(frozen=True)
class Parameter:
    """One searched option: a config key (as on the command line, without ``--``) and its distribution."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None

    def suggest(self, trial: Any) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        assert self.low is not None and self.high is not None
        if isinstance(self.low, int) and isinstance(self.high, int) and not isinstance(self.step, float):
            return trial.suggest_int(self.key, self.low, self.high, step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)


def load_space(path: str | Path) -> list[Parameter]:
    """Read a search space: a YAML mapping of config keys to ``{low, high[, log, step]}`` or ``{choices: [...]}``."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"search space file {str(path)!r} does not exist")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"search space {str(path)!r} must be a non-empty mapping of config keys to distributions")
    return [parse_parameter(str(key), spec) for key, spec in raw.items()]


def parse_parameter(key: str, spec: Any) -> Parameter:
    where = f"search space entry {key!r}"
    if not isinstance(spec, dict):
        raise UserError(f"{where} must be a mapping such as {{low: 1.0e-6, high: 1.0e-4, log: true}} or {{choices: [1, 2]}}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise UserError(f"{where} has unknown field(s) {unknown}: valid fields are {', '.join(SPEC_KEYS)}")
    if "choices" in spec:
        choices = spec["choices"]
        if set(spec) != {"choices"} or not isinstance(choices, list) or not choices:
            raise UserError(f"{where}: 'choices' must be a non-empty list and stand alone, got {spec}")
        return Parameter(key, choices=tuple(choices))
    if "low" not in spec or "high" not in spec:
        raise UserError(f"{where} needs 'low' and 'high' (or 'choices'), got {spec}")
    low, high = spec["low"], spec["high"]
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: {name}={value!r} is not a number")
    if not low < high:
        raise UserError(f"{where}: low={low} must be below high={high}")
    log_scale = spec.get("log", False)
    if not isinstance(log_scale, bool):
        raise UserError(f"{where}: log={log_scale!r} must be true or false")
    if log_scale and low <= 0:
        raise UserError(f"{where}: a log scale needs low > 0, got low={low}")
    return Parameter(key, low=low, high=high, log=log_scale, step=spec.get("step"))


def override_args(values: dict[str, Any]) -> list[str]:
    """Command-line overrides for the sampled values (``--key=value``)."""
    return [f"--{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in values.items()]
