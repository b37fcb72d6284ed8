"""Per-side memory accounting in training: what HOSLStrategy measures, when, and where it is reported."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import TINY_LLAMA, for_mode, quiet_trainer, tiny_data
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import Logger

from hosl_lightning import HOSLModule, HOSLStrategy, SplitCausalLM, load_causal_lm
from hosl_lightning.core.zo import ZOSGD
from hosl_lightning.measurement import (
    CudaCounters,
    MemoryReport,
    SideSwitch,
    StepMemoryMeter,
)
from hosl_lightning.measurement import tracker as tracker_module
from hosl_lightning.modes import ZOSettings
from hosl_lightning.modes.in_process import fo_step, hosl_step

MIB = 2**20
KEYS = ("peak", "params", "grads", "optimizer", "activations")


class _Collect(Logger):
    """Keeps every metrics dict Lightning sends to a logger."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "collect"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))


def _fit(mode: str, every: int | None, steps: int = 3, **kwargs: Any) -> tuple[Any, HOSLStrategy, _Collect]:
    torch.manual_seed(0)
    module = HOSLModule(model_config=TINY_LLAMA)
    measuring = {} if every is None else {"memory_every_n_steps": every}  # None: the default
    strategy = HOSLStrategy(cut_layer=1, **for_mode(mode, q=2, zo_lr=1e-3), **measuring, **kwargs)
    logger = _Collect()
    trainer = quiet_trainer(strategy, max_steps=steps, logger=logger, log_every_n_steps=1)
    trainer.fit(module, tiny_data())
    return trainer, strategy, logger


@pytest.fixture(scope="module")
def runs() -> dict[str, tuple[Any, HOSLStrategy, _Collect]]:
    return {mode: _fit(mode, every=1) for mode in ("hosl", "fo", "zo")}


def _logged(trainer: Any, side: str, key: str) -> float:
    return float(trainer.callback_metrics[f"hosl/memory/{side}_{key}_mib"])


def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_hosl_client_logs_no_gradients_or_optimizer_state_and_peaks_below_fo(runs: dict) -> None:
    hosl, _, _ = runs["hosl"]
    fo, _, _ = runs["fo"]
    assert _logged(hosl, "client", "grads") == 0 and _logged(hosl, "client", "optimizer") == 0
    assert _logged(hosl, "server", "grads") > 0 and _logged(hosl, "server", "optimizer") > 0
    assert _logged(hosl, "client", "peak") < _logged(fo, "client", "peak")
    # fo: one AdamW steps both halves; each half is charged its own gradients and moments
    split = fo.strategy.split_model
    client_params = _bytes(split.client.parameters()) / MIB
    assert _logged(fo, "client", "grads") == pytest.approx(client_params)
    assert 2 * client_params <= _logged(fo, "client", "optimizer") <= 2.01 * client_params
    zo, _, _ = runs["zo"]
    assert all(_logged(zo, side, key) == 0 for side in ("client", "server") for key in ("grads", "optimizer"))


@pytest.mark.parametrize("mode", ["hosl", "fo", "zo"])
def test_params_and_buffers_are_the_exact_bytes_of_each_half(runs: dict, mode: str) -> None:
    trainer, strategy, _ = runs[mode]
    split = strategy.split_model
    report = strategy.memory_report
    for side, half in (("client", split.client), ("server", split.server)):
        memory = getattr(report, side)
        assert memory.params == _bytes(half.parameters())
        assert memory.buffers == _bytes(half.buffers())
        assert memory.params + memory.buffers + memory.activations <= memory.peak
        assert _logged(trainer, side, "params") == pytest.approx(memory.params / MIB)
        assert memory.method == "tracker" and memory.device == "cpu"


def test_report_is_reachable_from_python_and_reaches_the_logger(runs: dict) -> None:
    trainer, strategy, logger = runs["hosl"]
    report = strategy.memory_report
    assert isinstance(report, MemoryReport) and report.step == trainer.global_step - 1 and report.mode == "hosl"
    assert report.client.peak > report.client.params > 0
    logged = logger.rows[-1][1]
    for side in ("client", "server"):
        for key in KEYS:
            assert logged[f"hosl/memory/{side}_{key}_mib"] == pytest.approx(report.metrics()[f"{side}_{key}_mib"])
    assert logged["hosl/memory/step"] == report.step
    assert logged["hosl/server_sec"] > 0  # the server's share of the step is still timed


def test_measured_steps_train_exactly_like_unmeasured_ones(runs: dict) -> None:
    _, measured, _ = runs["hosl"]
    _, plain, logger = _fit("hosl", every=0)
    assert plain.memory_report is None
    assert not any(k.startswith("hosl/memory/") for _, row in logger.rows for k in row)
    for a, b in zip(measured.split_model.state_dict().values(), plain.split_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_memory_profiling_is_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off by default: measuring a CUDA side resets the device's peak statistics, which are the user's too."""
    resets: list[Any] = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *args, **kwargs: resets.append(args))
    _, strategy, logger = _fit("hosl", every=None, steps=2)
    assert strategy.memory_every_n_steps == 0 and strategy.memory_report is None
    assert not any(k.startswith("hosl/memory/") for _, row in logger.rows for k in row)
    assert resets == []


def test_tracker_runs_only_on_the_first_two_steps_and_every_n(monkeypatch: pytest.MonkeyPatch) -> None:
    entered: list[int] = []
    reports: list[int] = []
    enter, report = tracker_module.SideTracker.__enter__, StepMemoryMeter.report

    def counting_enter(self: Any) -> Any:
        entered.append(self._depth)
        return enter(self)

    def recording_report(self: Any, step: int, mode: str) -> MemoryReport:
        reports.append(step)
        return report(self, step, mode)

    monkeypatch.setattr(tracker_module.SideTracker, "__enter__", counting_enter)
    monkeypatch.setattr(StepMemoryMeter, "report", recording_report)
    _fit("hosl", every=3, steps=7)
    assert reports == [0, 1, 3, 6]
    assert entered == [0] * 8  # one tracker per side, on measured steps only


@pytest.mark.parametrize("bad", [-1, 1.5, True, "50"])
def test_bad_memory_option_names_the_option_the_value_and_the_range(bad: Any) -> None:
    with pytest.raises(ValueError, match=rf"memory_every_n_steps={bad!r} is not valid: it must be an integer >= 0"):
        HOSLStrategy(memory_every_n_steps=bad)


class _PlainFineTuner(LightningModule):
    """A drop-in module: automatic optimization, its own optimizer, no hosl_lightning import needed."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = load_causal_lm(model_config=TINY_LLAMA)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)  # frozen client parameters included


@pytest.mark.parametrize("mode", ["hosl", "fo"])
def test_dropin_module_is_measured_per_side(mode: str) -> None:
    strategy = HOSLStrategy(cut_layer=1, **for_mode(mode, q=2), memory_every_n_steps=1)
    trainer = quiet_trainer(strategy, max_steps=3)
    trainer.fit(_PlainFineTuner(), tiny_data())
    report = strategy.memory_report
    assert report is not None and report.step == 2
    assert report.server.grads > 0 and report.server.optimizer_state > 0
    client_params = _bytes(strategy.split_model.client.parameters())
    if mode == "hosl":
        assert report.client.grads == 0 and report.client.optimizer_state == 0
    else:
        assert report.client.grads == client_params and report.client.optimizer_state >= 2 * client_params
    assert report.client.activations > 0 and report.server.activations > 0
    assert float(trainer.callback_metrics["hosl/memory/step"]) == 1  # a step's report is logged by the next step


class _SimulatedAllocator(CudaCounters):
    """A CUDA allocator's counters, simulated on CPU by a tracker that sees every tensor."""

    def __init__(self, tracker: Any) -> None:
        self.tracker, self.cpu = tracker, torch.device("cpu")

    def allocated(self, device: torch.device) -> int:
        return self.tracker._curr_mem_snap.get(self.cpu, {}).get("Total", 0)

    def peak(self, device: torch.device) -> int:
        return self.tracker._peak_mem.get(self.cpu, 0)

    def reset_peak(self, device: torch.device) -> None:
        self.tracker._peak_mem[self.cpu] = self.allocated(device)


def _measure_second_step(mode: str, method: str) -> MemoryReport:
    torch.manual_seed(0)
    split = SplitCausalLM(load_causal_lm(model_config=dict(TINY_LLAMA, hidden_size=64, intermediate_size=128)), 1)
    switch = SideSwitch()
    switch.install(split)
    ids = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    optimizers: list[torch.optim.Optimizer]
    if mode == "hosl":
        split.client.requires_grad_(False)
        zo = ZOSGD(split.client.named_parameters(), lr=1e-3)
        optimizers = [torch.optim.AdamW(split.server.parameters()), zo]
        run, side = (lambda t: hosl_step(split, batch, zo, ZOSettings(queries=2), t, lambda l: l.backward())), "server"
    else:
        optimizers = [torch.optim.AdamW(split.parameters())]
        run, side = (lambda t: fo_step(split, batch, lambda l: l.backward())), "shared"

    def step(t: int) -> None:
        run(t)
        with switch.enter(side):
            optimizers[0].step()

    step(0)
    optimizers[0].zero_grad(set_to_none=True)
    if method == "tracker":
        meter = StepMemoryMeter(split, switch, optimizers, method="tracker")
        with meter:
            step(1)
    else:
        allocator = tracker_module.SideTracker(list(split.parameters()))
        allocator.track_external(split, optimizers[0])
        with allocator:
            meter = StepMemoryMeter(split, switch, optimizers, method="cuda", counters=_SimulatedAllocator(allocator))
            with meter:
                step(1)
    return meter.report(1, mode)


@pytest.mark.parametrize("mode", ["hosl", "fo"])
def test_cuda_method_finds_the_same_peaks_as_the_tracker(mode: str) -> None:
    """The CUDA method sees only device-wide counters, read at each switch of side; fed by a simulated
    allocator it must attribute the same peak to each side as the per-side trackers do."""
    tracked, counted = _measure_second_step(mode, "tracker"), _measure_second_step(mode, "cuda")
    for side in ("client", "server"):
        a, b = getattr(tracked, side), getattr(counted, side)
        assert b.method == "cuda" and a.method == "tracker"
        assert b.peak == a.peak
        assert (b.params, b.grads, b.optimizer_state) == (a.params, a.grads, a.optimizer_state)
    assert tracked.server.peak > tracked.client.peak > tracked.client.params


def test_side_switch_innermost_side_wins_and_reports_each_change() -> None:
    switch, changes = SideSwitch(), []
    switch.listeners.append(lambda old, new: changes.append((old, new)))
    assert switch.current == "client"
    with switch.enter("server"):
        with switch.enter("client"), switch.enter("client"):
            assert switch.current == "client"
        with switch.enter("shared"):
            assert switch.current == "shared"
        assert switch.current == "server"
    assert changes == [("client", "server"), ("server", "client"), ("client", "server"),
                       ("server", "shared"), ("shared", "server"), ("server", "client")]
    with pytest.raises(ValueError, match="side='edge' is not valid"), switch.enter("edge"):
        pass
