"""Where and on what code a study ran: the machine, the commit, the command; and a quiet Lightning."""

from __future__ import annotations

import logging
import os
import platform
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> str:
    """The CPU, its cores and the library versions, as a report's "Machine" line."""
    import lightning as L
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cpu}, {cores} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"transformers {transformers.__version__}, lightning {L.__version__}, Python {platform.python_version()}")


def load_average() -> str:
    """The machine's load average, as a record keeps it: timings depend on it, memory figures do not."""
    try:
        one, five, _ = os.getloadavg()
    except (OSError, AttributeError):  # AttributeError: a platform without it (Windows)
        return "unknown"
    return f"{one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} logical cores"


def load_1min() -> float | None:
    """The 1-minute load average, as a run's record keeps it (None where the platform gives none)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def command_line(study: str, argv: list[str] | None) -> str:
    """The command that reproduces this run, as a shell would take it (``argv`` None: this process's arguments)."""
    args = sys.argv[1:] if argv is None else argv
    return f"python -m benchmarks.{study}" + "".join(f" {shlex.quote(a)}" for a in args)


def code_state() -> str:
    """The commit a study runs, and any uncommitted change to the package or to the benchmarks."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "benchmarks/*.py"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    changed = [line[3:] for line in dirty if line.strip()]
    return f"commit {commit}" + (f", with uncommitted changes in {', '.join(changed)}" if changed else "")


class TruncationNotes(logging.Handler):
    """Keeps the DataModule's "N of M prompts cut ... to fit max_length" messages (everything else is dropped)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        self.context = ""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "prompts cut" in message:
            self.messages.append(f"{self.context}: {message}")


def quiet_lightning() -> TruncationNotes:
    """Silence Lightning's per-run chatter that a study of many runs does not need; keep the truncation notes."""
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*max_epochs.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*but have no `val_dataloader`.*")  # validation is scored apart
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    # from_pretrained leaves the model in eval mode and Lightning keeps it so; SmolLM2 has no dropout
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    notes = TruncationNotes()
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    rank_zero.setLevel(logging.INFO)
    rank_zero.propagate = False
    rank_zero.handlers = [notes]
    import datasets

    datasets.disable_progress_bars()
    return notes
