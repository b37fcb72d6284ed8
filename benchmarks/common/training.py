"""The accuracy studies' harness: a method, a run's configuration (its cache key), training and scoring one run,
the learning-rate sweep, and the client-memory records. The claims and convergence studies share it and one cache,
so a run either finished is never redone by the other.

A method is found by name in ``METHOD``: a study registers its methods (``register``) before it builds keys.
"""

from __future__ import annotations

import copy
import functools
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from hosl_lightning import HOSLModule, HOSLStrategy, SplitCausalLM
from hosl_lightning.lightning.option_use import options_for
from hosl_lightning.modes import DivergenceError

from .cache import digest
from .environment import RESULTS, load_1min, machine
from .tasks import ALL_DATASETS, BATCH, CUT, DATASETS, MAX_LENGTH, MODEL, MU, datamodule

CACHE = RESULTS / "convergence"  # both studies' runs and memory records
NUM_TRAIN = 2400  # 300 steps x 8: one pass
STEPS, EVAL_EVERY, N_VAL, N_TEST, SEEDS = 300, 50, 100, 500, (0, 1, 2)
SWEEP_STEPS, SWEEP_DATASET = 60, "rotten_tomatoes"
PROGRESS_EVERY = 50  # steps between a run's progress lines on stderr (0: none)


@dataclass(frozen=True)
class Method:
    """How one method trains: its mode, its client options, and the learning rates its sweep tries."""

    name: str
    mode: str
    q: int = 1
    zo_optimizer: str = "zo_sgd"
    embedding_directions: str = "dense"
    pair_probes: bool = False
    direction: str = "gaussian"
    lrs: tuple[float, ...] = ()  # AdamW lr (fo, and hosl's server when zo_lrs is set)
    zo_lrs: tuple[float, ...] = ()  # the ZO optimizer's lr (zo; hosl's client)
    client_adapter: dict[str, Any] | None = None  # a peft config for the client's blocks (the d_c study)
    client_frozen: tuple[str, ...] | None = None  # client modules that do not train (the d_c study)

    def options(self) -> dict[str, Any]:
        """What keys a run: every field but the sweep's grid (a run keeps its own lr, so a wider grid orphans
        nothing), less those added later while at their defaults (old keys stay valid)."""
        return {k: v for k, v in asdict(self).items()
                if k not in SWEEP_GRID and not (k in LATER_FIELDS and v == LATER_FIELDS[k])}


# Fields added after runs were cached, and their defaults: a new Method field goes here with its default, so that
# every cached run keeps its key.
LATER_FIELDS: dict[str, Any] = {"client_adapter": None, "client_frozen": None}
SWEEP_GRID = ("lrs", "zo_lrs")  # the learning rates a sweep tries: not part of any run's key
METHOD: dict[str, Method] = {}  # every registered method by name: what a run's key reads its options from


def register(*methods: Method) -> None:
    """Make ``methods`` known by name, for the keys of their runs."""
    METHOD.update((m.name, m) for m in methods)


@dataclass(frozen=True)
class RunConfig:
    """Everything that fixes a run's outcome: its cache key."""

    method: str
    dataset: str
    seed: int
    steps: int
    lr: float | None
    zo_lr: float | None
    n_val: int
    n_test: int
    eval_every: int
    model: str = MODEL
    cut: int = CUT
    mu: float = MU
    batch: int = BATCH
    max_length: int = MAX_LENGTH
    num_train: int = NUM_TRAIN

    def key(self) -> str:
        fields = asdict(self) | {"options": METHOD[self.method].options()}
        return f"{self.method.replace('/', '_')}-{self.dataset}-s{self.seed}-{self.steps}steps-{digest(fields)}"

    @property
    def is_sweep(self) -> bool:
        """A learning-rate sweep run: scored on validation alone (``sweep_configs``), never on the test split."""
        return self.n_test == 0


class Curve(L.Callback):
    """Validation loss and accuracy every ``every`` steps, with each half's cumulative seconds and the train loss.

    The seconds are the training steps' own (the strategy's ``hosl/client_sec`` and ``hosl/server_sec``), not the
    validation's. Runs cached before ``server_s`` was kept have ``client_s`` alone."""

    def __init__(self, every: int, val_batches: list[dict[str, Any]]) -> None:
        self.every, self.val_batches = every, val_batches
        self.points: list[dict[str, float]] = []
        self.train_loss: list[float] = []
        self.client_s = self.server_s = 0.0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        metrics = trainer.callback_metrics
        self.client_s += float(metrics.get("hosl/client_sec", 0.0))
        self.server_s += float(metrics.get("hosl/server_sec", 0.0))
        self.train_loss.append(float(metrics.get("train_loss", float("nan"))))
        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            scores = pl_module.evaluate(self.val_batches, stage="val")
            self.points.append({"step": step, "val_loss": scores["val_loss"], "val_acc": scores["val_acc"],
                                "client_s": self.client_s, "server_s": self.server_s})


class Progress(L.Callback):
    """A run's progress, a line on stderr every ``every`` steps, after each of ``curve``'s validations and at the last
    step: the step, the minutes so far, those left at the mean wall time of the steps so far (their validations
    included), the last train loss and the last validation accuracy. It reads and prints, nothing more: a record and
    its key are the same with it and without it."""

    def __init__(self, every: int, curve: Curve | None = None) -> None:
        self.every, self.curve = every, curve
        self.started, self.validations = time.perf_counter(), 0

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        step, total = trainer.global_step, trainer.max_steps
        points = [] if self.curve is None else self.curve.points
        validated, self.validations = len(points) > self.validations, len(points)
        if step <= 0 or not (step % self.every == 0 or step == total or validated):
            return
        seconds = time.perf_counter() - self.started
        line = f"    step {step}/{total}: {seconds / 60:.1f} min"
        if total > 0:
            line += f", about {seconds / step * (total - step) / 60:.1f} min left ({seconds / step:.1f} s a step)"
        loss = trainer.callback_metrics.get("train_loss")
        if loss is not None:
            line += f"; train loss {float(loss):.4f}"
        if points:
            line += f"; val acc {points[-1]['val_acc']:.4f} at step {points[-1]['step']}"
        print(line, file=sys.stderr, flush=True)


@torch.no_grad()
def score_examples(module: HOSLModule, batches: list[dict[str, Any]]) -> tuple[list[int], float]:
    """Each test example's correctness (argmax over its classes' label-word log-likelihoods) and the mean loss."""
    correct, losses = [], []
    module.eval()
    for batch in batches:
        scores = module.model.sequence_log_likelihood(batch["input_ids"], batch.get("attention_mask"), batch["labels"])
        classes = scores.view(-1, int(batch["num_classes"]))
        correct += (classes.argmax(-1) == batch["class_labels"]).int().tolist()
        losses += torch.nn.functional.cross_entropy(classes.float(), batch["class_labels"], reduction="none").tolist()
    return correct, statistics.mean(losses)


def run(config: RunConfig, base: Any, tokenizer: Any, data_dir: Path, code: str,
        progress_every: int = PROGRESS_EVERY) -> dict[str, Any]:
    """Train and score one configuration; a run that diverges is recorded as such, not retried. ``code`` is the
    code the process imported (``code_state()`` at its start), which the record keeps. ``progress_every``: steps
    between progress lines on stderr (``Progress``; 0: none)."""
    method, spec = METHOD[config.method], next(d for d in ALL_DATASETS if d.name == config.dataset)
    train_dm = datamodule(spec, data_dir, tokenizer, config.seed, num_train=config.num_train)
    eval_dm = datamodule(spec, data_dir, tokenizer, 0, num_validation=config.n_val, num_test=config.n_test or 1)
    train_dm.setup("fit")
    eval_dm.setup("fit")
    eval_dm.setup("test")
    val_batches, test_batches = list(eval_dm.val_dataloader()), list(eval_dm.test_dataloader())
    L.seed_everything(config.seed, verbose=False)
    optimizer = functools.partial(torch.optim.AdamW, lr=config.lr) if config.lr is not None else torch.optim.AdamW
    module = HOSLModule(model=copy.deepcopy(base), optimizer=optimizer)
    zo = options_for(method.mode, q=method.q, mu=config.mu, zo_lr=config.zo_lr or 0.0, seed=config.seed,
                     zo_optimizer=method.zo_optimizer, embedding_directions=method.embedding_directions,
                     pair_probes=method.pair_probes, direction=method.direction)
    strategy = HOSLStrategy(cut_layer=config.cut, **zo, client_adapter=method.client_adapter,
                            client_frozen=None if method.client_frozen is None else list(method.client_frozen),
                            memory_every_n_steps=0)
    curve = Curve(config.eval_every, val_batches)
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=config.steps, max_epochs=-1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[curve] + ([Progress(progress_every, curve)] if progress_every > 0 else []))
    started, diverged, load = time.perf_counter(), None, load_1min()
    try:
        trainer.fit(module, train_dataloaders=train_dm.train_dataloader())
    except DivergenceError as error:
        diverged = str(error)
    record: dict[str, Any] = {"config": asdict(config), "options": asdict(method), "commit": code,
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
                              "load_1min": load, "train_s": time.perf_counter() - started, "diverged": diverged,
                              "curve": curve.points, "train_loss": curve.train_loss, "client_s": curve.client_s,
                              "server_s": curve.server_s}
    if method.mode == "hosl":  # each half's first-order predicted loss decrease, summed over the fit
        decrease = strategy.predicted_decrease
        record["predicted_decrease"] = {**decrease.totals, "steps": decrease.steps}
    if method.client_adapter is None:
        record["client_shift"] = client_shift(strategy.split_model, base, config.cut)
    if diverged is None and not config.is_sweep:  # sweep runs are judged on validation only
        correct, loss = score_examples(module, test_batches)
        record["test"] = {"acc": statistics.mean(correct), "loss": loss, "correct": correct}
    return record


def client_shift(split: Any, base: Any, cut: int) -> float:
    """How far training moved the client: ||w_end - w_start|| / ||w_start|| over all its weights. Near 0, the
    server did the learning."""
    start, end = SplitCausalLM(copy.deepcopy(base), cut).client.state_dict(), split.client.state_dict()
    moved = sum(float((end[name].float() - weight.float()).pow(2).sum()) for name, weight in start.items())
    return (moved / sum(float(weight.float().pow(2).sum()) for weight in start.values())) ** 0.5


def measure_memory(method: Method, base: Any, tokenizer: Any, data_dir: Path, code: str, cut: int = CUT) -> dict[str, Any]:
    """The client's peak over two steps of ``method`` (tracker, CPU) and its inference floor, on a real batch."""
    from .memory import ClientOption, measure_client_peak

    if method.client_adapter is not None or method.client_frozen is not None:  # it would measure the whole client
        raise ValueError(f"measure_memory does not apply client_adapter or client_frozen ({method.name})")
    spec = next(d for d in DATASETS if d.name == SWEEP_DATASET)
    dm = datamodule(spec, data_dir, tokenizer, 0, num_train=BATCH)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    option = ClientOption(method.name, method.mode, method.zo_optimizer, method.embedding_directions,
                          method.pair_probes, method.q, method.direction, mu=MU)
    split = SplitCausalLM(copy.deepcopy(base), cut).eval()
    floor = measure_client_peak(split, batch, None)  # before the steps change the weights and their flags
    peak = measure_client_peak(split, batch, option)
    return {"config": {"method": method.name, "kind": "memory", "batch": BATCH, "max_length": MAX_LENGTH, "cut": cut},
            "commit": code, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "peak_mib": peak / 2**20, "floor_mib": floor / 2**20}


def memory_key(method: Method, cut: int = CUT) -> str:
    fields = method.options() | {"batch": BATCH, "max_length": MAX_LENGTH, "cut": cut}
    return f"memory-{method.name.replace('/', '_')}" + (f"-cut{cut}" if cut != CUT else "") + f"-{digest(fields)}"


# --- the sweep and the final runs --------------------------------------------------------------------------------


def sweep_configs(method: Method, fo_lr: float | None, steps: int, n_val: int) -> list[RunConfig]:
    """A method's sweep runs: validated once, at their end, and never tested."""
    if method.mode == "fo":
        return [RunConfig(method.name, SWEEP_DATASET, 0, steps, lr, None, n_val, 0, steps) for lr in method.lrs]
    server_lr = fo_lr if method.mode == "hosl" else None
    return [RunConfig(method.name, SWEEP_DATASET, 0, steps, server_lr, zo_lr, n_val, 0, steps)
            for zo_lr in method.zo_lrs]


def selected(cache: dict[str, dict[str, Any]], configs: list[RunConfig]) -> RunConfig | None:
    """The configuration with the lowest final validation loss among those that finished without diverging."""
    done = [(cache[c.key()], c) for c in configs if c.key() in cache]
    if len(done) < len(configs):
        return None
    finite = [(r["curve"][-1]["val_loss"], c) for r, c in done if r["diverged"] is None and r["curve"]]
    return min(finite, key=lambda item: item[0])[1] if finite else None


def sweep_choices(cache: dict[str, dict[str, Any]], sweep_steps: int, n_val: int,
                  methods: tuple[Method, ...]) -> tuple[dict[str, RunConfig], list[RunConfig]]:
    """Each method's selected sweep run (once its sweep is complete) and the sweep runs still missing, fo's first
    (its lr is the hosl servers')."""
    todo: list[RunConfig] = []
    fo_sweep = sweep_configs(METHOD["fo"], None, sweep_steps, n_val)
    todo += [c for c in fo_sweep if c.key() not in cache]
    fo = selected(cache, fo_sweep)
    best: dict[str, RunConfig] = {}
    for method in methods:
        if method.mode in ("hosl", "frozen") and fo is None:
            continue
        if method.mode == "frozen":  # nothing of its own to sweep: its server takes fo's selected lr, as hosl's does
            best[method.name] = RunConfig(method.name, SWEEP_DATASET, 0, sweep_steps, fo.lr, None, n_val, 0, sweep_steps)
            continue
        configs = fo_sweep if method.mode == "fo" else sweep_configs(method, fo.lr if fo else None, sweep_steps, n_val)
        todo += [c for c in configs if c.key() not in cache and c not in todo]
        pick = selected(cache, configs)
        if pick is not None:
            best[method.name] = pick
    return best, todo


def final_config(best: RunConfig, dataset: str, seed: int, steps: int, n_val: int, n_test: int,
                 cut: int = CUT) -> RunConfig:
    """The final run of a method at its selected learning rates."""
    return RunConfig(best.method, dataset, seed, steps, best.lr, best.zo_lr, n_val, n_test, EVAL_EVERY, cut=cut)
