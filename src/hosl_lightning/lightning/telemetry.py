"""What a step cost, per half: server time, client time, bytes across the cut, and (on due steps) memory.

The split model's ``client_side`` / ``server_side`` enter a :class:`~hosl_lightning.measurement.SideSwitch`; this
class listens to it, so every piece of work is timed and measured as the half that does it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch.optim import Optimizer

from hosl_lightning.core.split_model import SplitCausalLM
from hosl_lightning.core.zo import ZOSGD, ZOEstimate
from hosl_lightning.measurement import MemoryReport, SideSwitch, StepMemoryMeter, process_peak_rss_mib


class StepTelemetry:
    """Times each half's share of a step, measures memory on due steps, and gathers the step's metrics.

    ``memory_every_n_steps``: measure on the first two steps of a fit (fo's optimizer state appears in step 1)
    and on every step whose index is a multiple of n; 0 turns it off.
    """

    def __init__(self, memory_every_n_steps: int) -> None:
        self.memory_every_n_steps = memory_every_n_steps
        self.memory_report: MemoryReport | None = None  # the latest measurement
        self.sides = SideSwitch()
        self.sides.listeners.append(self._time_sides)
        self.steps_seen = 0  # training steps started in this fit
        self._last_step_time: float | None = None
        self._step_started = self._switched_at = 0.0
        self._server_seconds = 0.0  # time spent in server-side work during the current step
        self._optimizer_sides: dict[int, str] = {}

    def install(self, split: SplitCausalLM) -> None:
        self.sides.install(split)
        self._optimizer_sides = {}

    def _time_sides(self, old: str, new: str) -> None:
        now = time.perf_counter()
        if old == "server":
            self._server_seconds += now - self._switched_at
        self._switched_at = now

    def start_step(self, split: SplitCausalLM) -> None:
        split.boundary.traffic.reset()
        self._server_seconds, self._step_started = 0.0, time.perf_counter()
        self._switched_at = self._step_started

    @contextmanager
    def measured(self, split: SplitCausalLM, step: int, mode: str, optimizers: list[Optimizer], role: str) -> Iterator[None]:
        """Measures both sides' memory over the enclosed step when the step is due."""
        every = self.memory_every_n_steps
        due = every > 0 and (self.steps_seen < 2 or step % every == 0)
        self.steps_seen += 1
        if not due or role == "client":  # a client process's own peak is measured whole (process_peak_rss_mib)
            yield
            return
        meter = StepMemoryMeter(split, self.sides, optimizers)
        with meter:
            yield
        self.memory_report = meter.report(step, mode)

    def memory_metrics(self, role: str) -> dict[str, float]:
        if role == "client":  # the process holds only the client: its peak resident memory is the client's
            return {"memory/process_peak_rss_mib": process_peak_rss_mib()}
        report = self.memory_report
        return {} if report is None else {f"memory/{k}": v for k, v in report.metrics().items()}

    def side_of(self, optimizer: Optimizer, split: SplitCausalLM, role: str) -> str:
        """The half whose parameters ``optimizer`` updates, or "shared" when it updates both (fo, zo)."""
        if role == "client":
            return "client"
        if id(optimizer) not in self._optimizer_sides:
            owner = {id(p): "server" for p in split.server.parameters()}
            owner |= {id(p): "client" for p in split.client.parameters()}
            updated = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad or isinstance(optimizer, ZOSGD)]
            sides = {owner.get(id(p), "shared") for p in updated}
            self._optimizer_sides[id(optimizer)] = sides.pop() if len(sides) == 1 else "shared"
        return self._optimizer_sides[id(optimizer)]

    def step_metrics(
        self, split: SplitCausalLM, estimate: ZOEstimate | None, server_optimizer: Optimizer | None,
        client_optimizer: Optimizer | None, role: str, extra: dict[str, float] | None = None,
    ) -> dict[str, float]:
        """The metrics of the step that just ended, keyed without the ``hosl/`` prefix."""
        now = time.perf_counter()
        metrics: dict[str, float] = {
            "server_sec": self._server_seconds,
            "client_sec": max(now - self._step_started - self._server_seconds, 0.0),
        }
        if self._last_step_time is not None:
            metrics["steps_per_sec"] = 1.0 / max(now - self._last_step_time, 1e-9)
        self._last_step_time = now
        if estimate is not None:
            metrics["zo_grad_abs"] = float(estimate.coefficients.abs().mean())
        if server_optimizer is not None:  # the server's optimizer; in zo mode the one ZOSGD that trains both halves
            metrics["lr_server"] = server_optimizer.param_groups[0]["lr"]
        if client_optimizer is not None:
            metrics["lr_client"] = client_optimizer.param_groups[0]["lr"]
        traffic = split.boundary.traffic
        metrics["bytes_up"], metrics["bytes_down"] = float(traffic.bytes_up), float(traffic.bytes_down)
        metrics.update(extra or {})
        metrics.update(self.memory_metrics(role))  # the latest measurement, on every step: loggers sample every n steps
        return metrics


def prefixed(metrics: dict[str, Any]) -> dict[str, Any]:
    return {f"hosl/{k}": v for k, v in metrics.items()}
