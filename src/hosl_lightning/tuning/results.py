"""What a study measured: one record per trial and the study's result, written as a table, a CSV and a plot.

Kept apart from the search: the records are plain data that can be built, read back (``benchmarks/tuning.py``
rebuilds them from a study's database) and written without running one.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class TrialRecord:
    number: int
    state: str
    params: dict[str, Any]
    value: float | None
    seconds: float
    selection_seconds: float
    steps: int
    last_epoch: int | None
    error: str | None = None  # why a FAIL trial failed (also the Optuna trial's user attr "error")


@dataclass
class TuneResult:
    """What a ``tune`` call measured; also written to ``output_dir`` (trials.csv, results.md, history.png)."""

    study_name: str
    storage: str
    subset: str
    direction: str = "maximize"
    trials: list[TrialRecord] = field(default_factory=list)
    best_params: dict[str, Any] = field(default_factory=dict)
    best_value: float | None = None
    search_seconds: float = 0.0
    retrain_seconds: float = 0.0
    retrain_metrics: dict[str, float] = field(default_factory=dict)


def write_results(out: Path, result: TuneResult, metric: str, study: Any = None) -> None:
    """trials.csv (one row per trial), results.md (table, best, failures, retrain) and history.png (if matplotlib is there).

    Called after every trial, so each file is written whole to a temporary file and then renamed over the old
    one: a crash or Ctrl-C mid-write leaves the previous version, never half of one.
    """
    keys = sorted({k for t in result.trials for k in t.params})
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["number", "state", metric, "seconds", "selection_seconds", "steps", "last_epoch", *keys, "error"])
    for t in result.trials:
        writer.writerow([t.number, t.state, t.value, f"{t.seconds:.2f}", f"{t.selection_seconds:.2f}", t.steps,
                         t.last_epoch, *[t.params.get(k) for k in keys], t.error or ""])
    _write_atomic(out / "trials.csv", table.getvalue())
    sign = 1.0 if result.direction == "maximize" else -1.0
    ranked = sorted(result.trials, key=lambda t: -math.inf if t.value is None else sign * t.value, reverse=True)
    short = [k.rsplit(".", 1)[-1] for k in keys]
    lines = [f"# Tuning study `{result.study_name}` (subset: {result.subset})", "",
             f"Storage: `{result.storage}`. Search: {result.search_seconds:.1f} s for {len(result.trials)} trials.", "",
             f"| trial | state | {metric} | seconds | selection s | " + " | ".join(short) + " |",
             "|---|---|---:|---:|---:|" + "---:|" * len(short)]
    for t in ranked:
        value = "" if t.value is None else f"{t.value:.4f}"
        cells = [f"{t.params.get(k):.3g}" if isinstance(t.params.get(k), float) else str(t.params.get(k)) for k in keys]
        lines.append(f"| {t.number} | {t.state.lower()} | {value} | {t.seconds:.1f} | {t.selection_seconds:.1f} | "
                     + " | ".join(cells) + " |")
    if result.best_value is None:
        lines += ["", "Best: none yet (no trial has completed with a finite value)."]
    else:
        lines += ["", f"Best: {metric}={result.best_value} with `{json.dumps(result.best_params)}`."]
    if result.retrain_metrics:
        lines += [f"Retrained on the full data in {result.retrain_seconds:.1f} s: "
                  + ", ".join(f"{k}={v:.4f}" for k, v in sorted(result.retrain_metrics.items())) + "."]
    failed = [t for t in result.trials if t.error is not None]
    if failed:
        lines += ["", "Failed trials:", ""] + [f"- trial {t.number}: {_one_line(t.error or '')}" for t in failed]
    _write_atomic(out / "results.md", "\n".join(lines) + "\n")
    if study is not None:
        _plot(out / "history.png", study)


def _one_line(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path`` (atomic on one filesystem)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temporary.open("w", newline="") as handle:
        handle.write(text)
    os.replace(temporary, path)


def _plot(path: Path, study: Any) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import optuna.visualization.matplotlib as ovm
    except ImportError:
        log.warning("matplotlib is not installed: no plot written (pip install matplotlib)")
        return
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
        axes = ovm.plot_optimization_history(study)
    axes.figure.set_size_inches(7, 4)
    axes.figure.tight_layout()
    axes.figure.savefig(path, dpi=120)
    plt.close(axes.figure)
