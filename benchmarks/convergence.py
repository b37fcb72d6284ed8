"""Convergence of the client optimizers: fo, zo, and hosl with each zeroth-order client option, at equal steps.

    python benchmarks/convergence.py                    # run what is missing (resumes from the cache), then report
    python benchmarks/convergence.py --budget-min 150   # stop starting new runs after 150 minutes
    python benchmarks/convergence.py --report-only      # rebuild convergence.md / .csv / .png from the cache
    python benchmarks/convergence.py --quick            # a smoke run: 4 steps, 16 examples, into a scratch folder
    python benchmarks/convergence.py --methods fo hosl/zo_sgd-dense --datasets sms_spam   # only these runs first

Issue 20, item 4. SmolLM2-135M-Instruct (``load_causal_lm("smollm2-135m")``, loaded once, a fresh deep copy per
run), cut after block 2, prompt classification on ``rotten_tomatoes`` and ``sms_spam`` from ``../shared/data``
(the prompts of ``benchmarks/accuracy.py``), batch 8, max_length 64. Methods:

- ``fo``: first-order split learning (AdamW on both halves);
- ``zo``: ZO-SGD on both halves (MeZO over the split model);
- ``hosl/zo_sgd-dense``: the paper's hosl (ZO-SGD client, dense directions, probes one at a time);
- ``hosl/zo_sgd-sparse``, ``hosl/fzoo-sparse``, ``hosl/momentum-sparse``: the new client options;
- ``fixed-client``: a reference, not an option: hosl whose client probes but never moves (``zo_lr`` 0), so its
  server learns alone. What the options gain over it is what the client's own learning adds.

Every hosl method's server runs AdamW at fo's selected lr. Learning rates come from a small sweep per method
(rotten_tomatoes, seed 0, ``SWEEP_STEPS`` steps, selected by validation loss); then every method trains
``STEPS`` steps for each seed and dataset, is validated every ``EVAL_EVERY`` steps on ``N_VAL`` examples (loss,
accuracy, the client's cumulative seconds) and finally scored on the same ``N_TEST`` test examples. Runs since
the fixed-client reference also record how far the client's weights moved (``client_shift``).

Every finished run is written to ``benchmarks/results/convergence/<key>.json``, keyed by its full configuration
and holding the commit that produced it, so a later sitting adds runs instead of redoing them. Commit the folder.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import hashlib
import inspect
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import (  # the same prompts, batch, max_length, cut and mu, scored the same way
    ALL_DATASETS,
    BATCH,
    CUT,
    DATASETS,
    DEFAULT_DATA,
    MAX_LENGTH,
    MODEL,
    MODEL_NAME,
    MU,
    code_state,
    datamodule,
    machine,
    quiet_lightning,
)
from convergence_report import REFERENCE

from hosl_lightning import (
    HOSLModule,
    HOSLStrategy,
    load_causal_lm,
    resolve_tokenizer,
)
from hosl_lightning.modes import DivergenceError

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / "results" / "convergence"
NUM_TRAIN = 2400  # 300 steps x 8: one pass
STEPS, EVAL_EVERY, N_VAL, N_TEST, SEEDS = 300, 50, 100, 500, (0, 1, 2)
SWEEP_STEPS, SWEEP_DATASET = 60, "rotten_tomatoes"


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


LATER_FIELDS: dict[str, Any] = {"client_adapter": None, "client_frozen": None}  # fields added after runs were cached, and their defaults
SWEEP_GRID = ("lrs", "zo_lrs")  # the learning rates a sweep tries: not part of any run's key


METHODS = (
    Method("fo", "fo", lrs=(1e-5, 1e-4)),
    Method("hosl/zo_sgd-dense", "hosl", zo_lrs=(1e-6, 1e-5)),
    Method("hosl/zo_sgd-sparse", "hosl", embedding_directions="sparse", pair_probes=True, zo_lrs=(1e-5, 1e-4)),
    Method("hosl/fzoo-sparse", "hosl", q=2, zo_optimizer="fzoo", embedding_directions="sparse",
           direction="rademacher", zo_lrs=(1e-6, 1e-5)),
    Method("hosl/momentum-sparse", "hosl", zo_optimizer="zo_momentum", embedding_directions="sparse",
           pair_probes=True, zo_lrs=(1e-7, 1e-6)),
    Method("zo", "zo", zo_lrs=(1e-6, 1e-5)),
    Method(REFERENCE, "hosl", zo_lrs=(0.0,)),  # the reference: the server learns, the client never moves
)
METHOD = {m.name: m for m in METHODS}
HOSL_OPTIONS = tuple(m.name for m in METHODS if m.mode == "hosl" and m.name != REFERENCE)  # the client options


def library_default_hosl() -> str:
    """The convergence study's hosl option that trains with HOSLStrategy's own client defaults (read from its
    signature, so the two cannot drift apart)."""
    defaults = {k: p.default for k, p in inspect.signature(HOSLStrategy.__init__).parameters.items()}
    wanted = (defaults["zo_optimizer"] or "zo_sgd", defaults["embedding_directions"], defaults["pair_probes"],
              defaults["direction"], defaults["q"])
    for method in METHODS:
        if method.name in HOSL_OPTIONS and (method.zo_optimizer, method.embedding_directions, method.pair_probes,
                                            method.direction, method.q) == wanted:
            return method.name
    raise LookupError(f"no hosl option of the convergence study trains with HOSLStrategy's defaults {wanted}")


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


def digest(fields: dict[str, Any]) -> str:
    """A cache key's digest of everything that fixes a run."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


class Curve(L.Callback):
    """Validation loss and accuracy every ``every`` steps, with the client's cumulative seconds and the train loss."""

    def __init__(self, every: int, val_batches: list[dict[str, Any]]) -> None:
        self.every, self.val_batches = every, val_batches
        self.points: list[dict[str, float]] = []
        self.train_loss: list[float] = []
        self.client_s = 0.0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        metrics = trainer.callback_metrics
        self.client_s += float(metrics.get("hosl/client_sec", 0.0))
        self.train_loss.append(float(metrics.get("train_loss", float("nan"))))
        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            scores = pl_module.evaluate(self.val_batches, stage="val")
            self.points.append({"step": step, "val_loss": scores["val_loss"], "val_acc": scores["val_acc"],
                                "client_s": self.client_s})


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


def run(config: RunConfig, base: Any, tokenizer: Any, data_dir: Path, code: str) -> dict[str, Any]:
    """Train and score one configuration; a run that diverges is recorded as such, not retried. ``code`` is the
    code the process imported (``code_state()`` at its start), which the record keeps."""
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
    strategy = HOSLStrategy(cut_layer=config.cut, mode=method.mode, q=method.q, mu=config.mu,
                            zo_lr=config.zo_lr or 0.0, seed=config.seed, zo_optimizer=method.zo_optimizer,
                            embedding_directions=method.embedding_directions, pair_probes=method.pair_probes,
                            direction=method.direction, client_adapter=method.client_adapter,
                            client_frozen=None if method.client_frozen is None else list(method.client_frozen),
                            memory_every_n_steps=0)
    curve = Curve(config.eval_every, val_batches)
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=config.steps, max_epochs=-1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[curve])
    started, diverged = time.perf_counter(), None
    try:
        trainer.fit(module, train_dataloaders=train_dm.train_dataloader())
    except DivergenceError as error:
        diverged = str(error)
    record: dict[str, Any] = {"config": asdict(config), "options": asdict(method), "commit": code,
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
                              "train_s": time.perf_counter() - started, "diverged": diverged,
                              "curve": curve.points, "train_loss": curve.train_loss, "client_s": curve.client_s}
    if method.client_adapter is None:
        record["client_shift"] = client_shift(strategy.split_model, base, config.cut)
    if diverged is None and not config.is_sweep:  # sweep runs are judged on validation only
        correct, loss = score_examples(module, test_batches)
        record["test"] = {"acc": statistics.mean(correct), "loss": loss, "correct": correct}
    return record


def client_shift(split: Any, base: Any, cut: int) -> float:
    """How far training moved the client: ||w_end - w_start|| / ||w_start|| over all its weights. Near 0, the
    server did the learning."""
    from hosl_lightning import SplitCausalLM

    start, end = SplitCausalLM(copy.deepcopy(base), cut).client.state_dict(), split.client.state_dict()
    moved = sum(float((end[name].float() - weight.float()).pow(2).sum()) for name, weight in start.items())
    return (moved / sum(float(weight.float().pow(2).sum()) for weight in start.values())) ** 0.5


def measure_memory(method: Method, base: Any, tokenizer: Any, data_dir: Path, code: str, cut: int = CUT) -> dict[str, Any]:
    """The client's peak over two steps of ``method`` (tracker, CPU) and its inference floor, on a real batch."""
    from hosl_lightning import SplitCausalLM
    from hosl_lightning.measurement import measure_client_inference, measure_client_step
    from hosl_lightning.modes import ZOSettings
    from hosl_lightning.zo_optimizers import build_zo_optimizer, zo_optimizer_spec

    if method.client_adapter is not None or method.client_frozen is not None:  # it would measure the whole client
        raise ValueError(f"measure_memory does not apply client_adapter or client_frozen ({method.name})")
    spec = next(d for d in DATASETS if d.name == SWEEP_DATASET)
    dm = datamodule(spec, data_dir, tokenizer, 0, num_train=BATCH)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    split = SplitCausalLM(copy.deepcopy(base), cut).eval()
    floor = measure_client_inference(split, batch).peak
    cls, _ = zo_optimizer_spec(method.zo_optimizer)
    settings = ZOSettings(queries=method.q, mu=MU, estimator=cls.estimator, pair_probes=method.pair_probes)
    build = lambda named: build_zo_optimizer(method.zo_optimizer, named, lr=0.0, direction=method.direction,
                                             embedding_directions=method.embedding_directions)
    peak = measure_client_step(split, batch, method.mode, settings, zo_optimizer=build).peak  # type: ignore[arg-type]
    return {"config": {"method": method.name, "kind": "memory", "batch": BATCH, "max_length": MAX_LENGTH, "cut": cut},
            "commit": code, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "peak_mib": peak / 2**20, "floor_mib": floor / 2**20}


def memory_key(method: Method, cut: int = CUT) -> str:
    fields = method.options() | {"batch": BATCH, "max_length": MAX_LENGTH, "cut": cut}
    return f"memory-{method.name.replace('/', '_')}" + (f"-cut{cut}" if cut != CUT else "") + f"-{digest(fields)}"


def load_cache(folder: Path | None = None) -> dict[str, dict[str, Any]]:
    folder = CACHE if folder is None else folder  # read at call time: --quick points CACHE elsewhere
    return {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))} if folder.exists() else {}


def own_records(cache: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """This study's runs and memory records: its own methods, at cut 2, on its datasets. ``claims.py`` keeps other
    cuts, tasks, variants and RSS records in the same folder."""
    names, datasets = {m.name for m in METHODS}, {d.name for d in DATASETS}

    def ours(config: dict[str, Any]) -> bool:
        kind = config.get("kind")
        return (config.get("method") in names and config.get("cut", CUT) == CUT
                and (kind == "memory" or kind is None and config.get("dataset") in datasets))

    return {key: record for key, record in cache.items() if ours(record["config"])}


def save(key: str, record: dict[str, Any], cache_dir: Path) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{key}.json"
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(record, indent=1))
    temporary.replace(path)  # never a half-written run in the cache


# --- the plan: the sweep, then the final runs ------------------------------------------------------------------


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
                  methods: tuple[Method, ...] = METHODS) -> tuple[dict[str, RunConfig], list[RunConfig]]:
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


def plan(cache: dict[str, dict[str, Any]], steps: int, sweep_steps: int, n_val: int, n_test: int,
         seeds: tuple[int, ...], datasets: tuple[str, ...]) -> list[RunConfig]:
    """Every run still missing, in the order that makes the results useful soonest: the sweep (fo first, whose
    lr the hosl servers use), then seed 0 of every method on each dataset, then the other seeds, one dataset at a
    time (the first, where the methods differ most, before the next)."""
    best, todo = sweep_choices(cache, sweep_steps, n_val)
    order = [(seeds[0], d) for d in datasets] + [(s, d) for d in datasets for s in seeds[1:]]
    for seed, dataset in order:
        for method in METHODS:
            if method.name in best:
                final = final_config(best[method.name], dataset, seed, steps, n_val, n_test)
                if final.key() not in cache:
                    todo.append(final)
    return todo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget-min", type=float, default=150.0, help="start no new run after this many minutes")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a smoke run into a scratch folder")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--methods", nargs="+", choices=[m.name for m in METHODS], default=None,
                        help="run only these methods' missing runs (sweeps included); the report covers all")
    parser.add_argument("--datasets", nargs="+", choices=[d.name for d in DATASETS], default=None,
                        help="run only these datasets' missing final runs; the report covers all")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    global CACHE
    steps, sweep_steps, n_val, n_test, seeds = STEPS, SWEEP_STEPS, N_VAL, N_TEST, SEEDS
    if args.quick:
        CACHE = Path("/tmp/convergence-quick")
        steps, sweep_steps, n_val, n_test, seeds = 4, 2, 16, 16, (0,)
        args.out = CACHE
    started, code = time.perf_counter(), code_state()  # the code this process imports, before anything changes
    if not args.report_only:
        quiet_lightning()
        base, tokenizer = None, None
        datasets = tuple(d.name for d in DATASETS)
        while True:
            cache = load_cache()
            todo = [c for c in plan(cache, steps, sweep_steps, n_val, n_test, seeds, datasets)
                    if (args.methods is None or c.method in args.methods)
                    and (args.datasets is None or c.is_sweep or c.dataset in args.datasets)]
            elapsed = (time.perf_counter() - started) / 60
            if not todo or elapsed > args.budget_min:
                print(f"[{elapsed:5.1f} min] {len(todo)} runs left; stopping", flush=True)
                break
            if base is None:
                base, tokenizer = load_causal_lm(MODEL), resolve_tokenizer(MODEL)
            missing_memory = [m for m in METHODS if memory_key(m) not in cache
                              and (args.methods is None or m.name in args.methods)]
            if missing_memory and not args.quick:
                method = missing_memory[0]
                print(f"[{elapsed:5.1f} min] client memory of {method.name}", flush=True)
                save(memory_key(method), measure_memory(method, base, tokenizer, args.data_dir, code), CACHE)
                continue
            config = todo[0]
            print(f"[{elapsed:5.1f} min] {config.method} on {config.dataset}, seed {config.seed}, {config.steps} "
                  f"steps, lr {config.lr}, zo_lr {config.zo_lr} ({len(todo)} runs left)", flush=True)
            record = run(config, base, tokenizer, args.data_dir, code)
            save(config.key(), record, CACHE)
            test = record.get("test", {})
            print(f"    {'diverged' if record['diverged'] else 'done'} in {record['train_s']:.0f} s; val loss "
                  f"{record['curve'][-1]['val_loss'] if record['curve'] else float('nan'):.4f}"
                  + (f", test acc {test['acc']:.4f}" if test else ""), flush=True)
            gc.collect()
    from convergence_report import write_report

    write_report(own_records(load_cache()), args.out, steps, sweep_steps, seeds, n_test, machine(), MODEL_NAME,
                 default=library_default_hosl())
    return 0


if __name__ == "__main__":
    sys.exit(main())
