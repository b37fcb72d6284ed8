"""Train on a weighted subset of the training data, re-chosen every few steps (AUTOMATA's data side).

``SubsetSelection`` is a callback: it wraps the training DataLoader of the datamodule (or module) so that an
"epoch" is ``fraction`` of the batches, and every ``every_n_steps`` steps it chooses them again: by GradMatch
over candidate batches' gradient features (``features``), or over single examples class by class
(``granularity="per_class"``); by MILO-style coverage of fixed embeddings; at random; or all of them (the
full-data baseline, through the same code path). Each training batch carries its weights as ``loss_weight``
(one number, or one per example), which the split model multiplies into the server's loss and into every ZO
probe loss, so the weights enter both halves' updates.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from torch.utils.data import DataLoader

from hosl_lightning.core.options import check_choice, check_int, check_number
from hosl_lightning.distributed.sync import weights_digest
from hosl_lightning.tuning.batches import (
    SelectedBatches,
    WeightedCollate,
    WeightedDataset,
    WeightedIndex,
    class_labels,
    partition,
    subset_length,
    weighted_batches,
)
from hosl_lightning.tuning.features import FeaturePass, row_embeddings
from hosl_lightning.tuning.matching import (
    Selection,
    facility_location,
    gradmatch,
    per_class_gradmatch,
    random_examples,
    random_subset,
)

log = logging.getLogger(__name__)

Method = Literal["gradmatch", "random", "full", "milo"]
METHODS: tuple[str, ...] = ("gradmatch", "random", "full", "milo")
Feature = Literal["hidden", "head", "label_head"]
FEATURES: tuple[str, ...] = ("hidden", "head", "label_head")
Granularity = Literal["batch", "per_class"]
GRANULARITIES: tuple[str, ...] = ("batch", "per_class")


class SelectionCache:
    """Selections keyed by the weights they were computed from, shared across fits (e.g. the trials of a study).

    Every trial of a study starts from the same pretrained weights, so its first GradMatch selection is the
    same: it is computed once. A key holds a digest of all weights, so trained weights never hit. ``hits`` counts
    the lookups answered, MILO's embeddings included.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[Any, ...], Any] = {}  # (Selection, batches), or MILO's embeddings
        self.hits = 0

    def get(self, key: tuple[Any, ...]) -> Any:
        found = self._entries.get(key)
        self.hits += found is not None
        return found

    def put(self, key: tuple[Any, ...], value: Any) -> None:
        self._entries[key] = value


class SubsetSelection(Callback):
    """Train on ``fraction`` of the training batches, chosen again every ``every_n_steps`` steps.

    Args:
        method: ``"gradmatch"`` (orthogonal matching pursuit over gradient features, non-negative weights),
            ``"random"`` (uniform, weight 1), ``"full"`` (every batch, weight 1: the full-data baseline through
            the same code) or ``"milo"`` (model-agnostic, MILO-style: per class, the examples that best cover the
            class under cosine similarity of fixed embeddings, the final hidden states of the weights training
            starts from, computed once (a resumed fit embeds from the checkpoint's weights); each selection draws
            another stochastic-greedy subset; weight 1).
        fraction: the share of batches in the subset, in (0, 1]; an epoch is that many steps.
        every_n_steps: steps between selections; default one subset epoch.
        seed: seeds the candidate batches (re-drawn at every selection), random picks and the epoch order.
        ridge: GradMatch's ridge, relative to the mean squared feature norm.
        cache: share selections between fits that start from the same weights (``SelectionCache``).
        stratify: cut the candidate batches so that each holds the classes in about the training data's
            proportions. ``None`` (default): when every training example has an integer ``label`` (as
            ``PromptClassificationDataModule``'s do); ``True``: require such labels; ``False``: a plain shuffle.
            On a classification task the gradient feature mostly measures a batch's class mix, and without
            stratification GradMatch picks batches of opposite, extreme mixes whose errors cancel in the sum but
            not step by step (benchmarks/README.md, "Subset choice").
        feature: GradMatch's feature, the gradient of the loss training uses (the classification loss on batches
            with ``class_labels``, else the LM loss). ``"hidden"`` (default): dL/dh at the final hidden state
            (``hidden`` numbers). ``"head"``: the LM head's weight gradient with its vocabulary side projected by
            a fixed random sign matrix to ``feature_rows`` rows (``feature_rows`` x ``hidden`` numbers); it also
            sees the inputs, where dL/dh sees only the error. ``"label_head"`` (classification only): the
            gradient at the head's label-word rows, (p - y) times the final hidden state (classes x ``hidden``
            numbers), the last-layer gradient CORDS and AUTOMATA match.
        granularity: ``"batch"`` (default): choose among candidate batches, one weight per batch (AUTOMATA's
            per-batch GradMatch). ``"per_class"``: choose examples class by class, in proportion to the class
            sizes, each matched against its own class's gradient (CORDS' PerClass; with ``feature="label_head"``
            on its own label-word row alone, PerClassPerGradient), one weight per example; the chosen examples
            are then cut into stratified batches. Needs labelled examples; with ``"random"`` it draws examples
            per class. ``"milo"`` always works per class; ``"full"`` ignores it.
        feature_rows: rows of that projection.
        warm_start_steps: AUTOMATA's warm start. The first ``warm_start_steps`` steps train on random batches of
            all the data (weight 1, drawn again every subset epoch), and the first ``method`` choice is made from
            the weights they leave. They are steps of the fit, not extra ones: the cost stays the same, but a
            first GradMatch choice then depends on the trial and is not shared through ``cache``. A subset
            chosen from the pretrained weights alone comes from a model that has learnt nothing of the task.
        feature_batch_size: examples per forward of the feature pass. A candidate's feature is a sum over its
            examples, so the pass need not follow the candidate batches: it forwards all the examples once, sorted
            by length into chunks of this many, so that almost no padding is computed and each forward serves more
            rows. Lower it for long sequences (a chunk's activations must fit in memory).
        progress: show a progress bar while features are computed.

    The batches are those the training DataLoader would make (its dataset, batch size, collate and workers);
    its sampler is replaced. Needs a model trained under ``HOSLStrategy`` in one process (the features come
    from the split model's server half). Logs ``subset/selection_sec`` (time spent choosing, cumulative).
    """

    def __init__(
        self,
        method: Method = "gradmatch",
        fraction: float = 0.1,
        every_n_steps: int | None = None,
        seed: int = 0,
        ridge: float = 1e-3,
        cache: SelectionCache | None = None,
        stratify: bool | None = None,
        feature: Feature = "hidden",
        granularity: Granularity = "batch",
        feature_rows: int = 16,
        warm_start_steps: int = 0,
        feature_batch_size: int = 64,
        progress: bool = True,
    ) -> None:
        check_choice("method", method, METHODS)
        check_number("fraction", fraction, 0, 1, strict=True)
        check_int("every_n_steps", every_n_steps, 1, none="one subset epoch")
        check_int("seed", seed)
        check_number("ridge", ridge, 0)
        check_choice("feature", feature, FEATURES)
        check_choice("granularity", granularity, GRANULARITIES)
        check_int("feature_rows", feature_rows, 1)
        check_int("warm_start_steps", warm_start_steps, 0)
        check_int("feature_batch_size", feature_batch_size, 1)
        if not any(stratify is allowed for allowed in (None, True, False)):  # 1 == True, but 1 is not a bool
            raise ValueError(f"stratify={stratify!r} is not valid: choose None (when labels exist), True or False")
        self.method, self.fraction, self.every_n_steps = method, float(fraction), every_n_steps
        self.seed, self.ridge, self.cache, self.stratify, self.granularity = seed, ridge, cache, stratify, granularity
        self.feature, self.feature_rows, self.feature_batch_size = feature, feature_rows, feature_batch_size
        self.warm_start_steps = 0 if method == "full" else warm_start_steps  # all the data needs no warm start
        self.selection_seconds = 0.0
        self.selections = 0  # selections made (including cache hits)
        self.last: Selection | None = None
        self._round = 0
        self._since_selection = 0
        self._steps = 0  # batches trained in this fit (the warm start counts them)
        self._in_epoch = 0  # batches trained in this epoch (a checkpoint mid-epoch resumes after them)
        self._restored: list[list[WeightedIndex]] | None = None
        self._restored_skip = 0
        self._sampler: SelectedBatches | None = None
        self._loader: DataLoader | None = None
        self._labels: Tensor | None = None  # each training example's class, when candidates are stratified
        self._embeddings: Tensor | None = None  # method="milo": each training example's fixed embedding
        self._classes: Tensor | None = None  # per-example choices: each training example's class
        self._features = FeaturePass(feature, feature_rows, feature_batch_size, seed, progress)
        self._source: Any = None
        self._original: Any = None

    # ---- the DataLoader ----------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._source = trainer.datamodule if trainer.datamodule is not None else pl_module
        self._original = self._source.train_dataloader
        self._source.train_dataloader = self._wrapped_train_dataloader  # Lightning calls it by name

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self._source is not None:
            del self._source.train_dataloader  # the instance attribute: the class's method shows again
            self._source = None

    def _wrapped_train_dataloader(self) -> DataLoader:
        loader = self._original()
        if not isinstance(loader, DataLoader) or loader.batch_size is None:
            raise TypeError("SubsetSelection needs train_dataloader() to return one DataLoader with a batch_size")
        if loader.dataset is not getattr(self._loader, "dataset", None):
            # read once, and only when used: every example of the dataset is visited
            labels = class_labels(loader.dataset) if self.stratify is not False or self._per_example else None
            if labels is None and (self.stratify or self._per_example and self.method != "milo"):
                option, instead = (("stratify=True", "stratify=None or False") if self.stratify
                                   else ("granularity='per_class'", "granularity='batch'"))
                raise ValueError(f"SubsetSelection({option}) needs every training example to have an integer "
                                 f"'label' (attribute or key); this dataset's do not: use {instead}")
            self._labels = None if self.stratify is False else labels
            if labels is None and self._per_example:  # MILO's coverage needs no classes: all examples form one
                labels = torch.zeros(len(loader.dataset), dtype=torch.long)
            self._classes = labels if self._per_example else None
            self._embeddings = None
        self._loader = loader
        candidates = math.ceil(len(loader.dataset) / loader.batch_size)  # type: ignore[arg-type]
        length = candidates if self.method == "full" else subset_length(self.fraction, candidates)
        previous, self._sampler = self._sampler, SelectedBatches(length, self.seed)
        if self._restored is not None:
            self._sampler.update(self._restored, self._round)
            self._sampler.skip = self._restored_skip
        elif previous is not None and previous.batches:  # reload_dataloaders_every_n_epochs: keep the choice
            self._sampler.update(previous.batches, self._round)
        return DataLoader(
            WeightedDataset(loader.dataset), batch_sampler=self._sampler, collate_fn=WeightedCollate(loader.collate_fn),
            num_workers=loader.num_workers, pin_memory=loader.pin_memory,
        )

    @property
    def _per_example(self) -> bool:
        """Whether choices are made over examples (then cut into batches) rather than over candidate batches."""
        return self.method == "milo" or (self.granularity == "per_class" and self.method in ("gradmatch", "random"))

    # ---- when to choose ------------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.method == "gradmatch" and self._per_example:
            _split_model(trainer, self.method, check_only=True)  # the strategy first: its error is the one to fix
        if self.method == "gradmatch" and self._per_example and pl_module.automatic_optimization:
            raise ValueError("SubsetSelection(granularity='per_class') weighs each example, but a drop-in training_step "
                             "computes its own loss, which per-example weights cannot scale: use HOSLModule, or "
                             "granularity='batch'")
        if self.method == "milo":  # from the weights training starts from: fixed
            self._milo_embeddings(trainer)
        if self._restored is None:
            self._steps = 0
            self._select(trainer)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # 0, or after a resume from a checkpoint taken mid-epoch the batches of this epoch already trained
        self._in_epoch, self._restored_skip = self._restored_skip, 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        assert self._sampler is not None
        self._in_epoch += 1
        self._since_selection += 1
        self._steps += 1
        due = self._sampler.length if self._warming else (self.every_n_steps or self._sampler.length)
        warm_start_ends = self._steps == self.warm_start_steps
        if (self._since_selection >= due or warm_start_ends) and not _training_ends(trainer):
            self._select(trainer)
        pl_module.log("subset/selection_sec", self.selection_seconds, on_step=True, on_epoch=False)

    @property
    def _warming(self) -> bool:
        """Still in the warm start: choices are random batches of all the data."""
        return self._steps < self.warm_start_steps

    # ---- choosing --------------------------------------------------------------------------------------
    def _select(self, trainer: Trainer) -> None:
        assert self._sampler is not None and self._loader is not None
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self._round + 1)
        candidates = partition(len(self._loader.dataset), self._loader.batch_size, generator, self._labels)  # type: ignore[arg-type]
        self.last, batches = self._choose(trainer, candidates, self._sampler.length, generator)
        self._sampler.update(batches, self._round + 1)
        self._round += 1
        self._since_selection = 0
        self.selections += 1
        self.selection_seconds += time.perf_counter() - started

    def _choose(
        self, trainer: Trainer, candidates: list[list[int]], budget: int, generator: torch.Generator
    ) -> tuple[Selection, list[list[WeightedIndex]]]:
        """This round's choice, and the weighted batches it makes."""
        if self._per_example and not self._warming:
            return self._choose_examples(trainer, budget, generator)
        if self.method == "gradmatch" and not self._warming:
            return self._gradmatch(trainer, candidates, budget, generator)
        if self.method == "full":
            chosen = Selection(list(range(len(candidates))), [1.0] * len(candidates), 0, 0.0)
        else:  # random, or the warm start's random batches of all the data
            chosen = random_subset(len(candidates), budget, generator)
        return chosen, weighted_batches(candidates, chosen)

    def _gradmatch(
        self, trainer: Trainer, candidates: list[list[int]], budget: int, generator: torch.Generator
    ) -> tuple[Selection, list[list[WeightedIndex]]]:
        model = _split_model(trainer, self.method)
        key = None
        if self.cache is not None:
            key = (weights_digest(model), self._round, self.seed, len(candidates), budget, self.ridge,
                   self._labels is not None, self.feature, self.feature_rows, self.feature_batch_size)
            cached = self.cache.get(key)
            if cached is not None:
                return cached
        features = self._features(model, self._loader, candidates, trainer.strategy.root_device,  # type: ignore[arg-type]
                                  f"GradMatch features (selection {self._round})")
        chosen = gradmatch(features, budget, generator, self.ridge)
        log.info("GradMatch chose %d of %d batches (%d matched, residual %.3f)", budget, len(candidates),
                 chosen.matched, chosen.residual)
        result = chosen, weighted_batches(candidates, chosen)
        if self.cache is not None and key is not None:
            self.cache.put(key, result)
        return result

    def _choose_examples(
        self, trainer: Trainer, budget: int, generator: torch.Generator
    ) -> tuple[Selection, list[list[WeightedIndex]]]:
        """A per-example choice of ``budget`` batches' worth of examples, cut into stratified weighted batches."""
        assert self._loader is not None and self._classes is not None
        batch_size, classes = self._loader.batch_size, self._classes
        assert batch_size is not None
        count = min(len(classes), budget * batch_size)
        key = None
        if self.method == "random":
            chosen = random_examples(classes, count, generator)
        elif self.method == "milo":
            chosen = facility_location(self._milo_embeddings(trainer), classes, count, generator)
        else:
            model = _split_model(trainer, self.method)
            if self.cache is not None:
                key = (weights_digest(model), self._round, self.seed, len(classes), batch_size, count, self.ridge,
                       "per_class", self.feature, self.feature_rows, self.feature_batch_size)
                cached = self.cache.get(key)
                if cached is not None:
                    return cached
            examples = [[index] for index in range(len(classes))]
            features = self._features(model, self._loader, examples, trainer.strategy.root_device,
                                      f"GradMatch features (selection {self._round})")
            blocks = features.shape[1] // model.server.lm_head.in_features if self.feature == "label_head" else None
            chosen = per_class_gradmatch(features, classes, count, generator, self.ridge, num_classes=blocks)
            log.info("per-class GradMatch chose %d of %d examples (%d matched, worst class residual %.3f)",
                     count, len(classes), chosen.matched, chosen.residual)
        picked = torch.tensor(chosen.indices, dtype=torch.long)
        batches = [[(int(picked[i]), chosen.weights[i]) for i in part]
                   for part in partition(len(picked), batch_size, generator, classes[picked])]
        if key is not None and self.cache is not None:
            self.cache.put(key, (chosen, batches))
        return chosen, batches

    def _milo_embeddings(self, trainer: Trainer) -> Tensor:
        """Every training example's fixed embedding, from the weights as they are when first asked for: the start of
        training, or after a dataset reload (shared through ``cache`` by the weights' digest)."""
        if self._embeddings is not None:
            return self._embeddings
        assert self._loader is not None
        model = _split_model(trainer, self.method, "embeds the examples")
        key = ("embeddings", weights_digest(model), len(self._loader.dataset), self.feature_batch_size)  # type: ignore[arg-type]
        cached = None if self.cache is None else self.cache.get(key)
        if cached is None:
            examples = [[index] for index in range(len(self._loader.dataset))]  # type: ignore[arg-type]
            cached = self._features(model, self._loader, examples, trainer.strategy.root_device, "MILO embeddings",
                                    row_embeddings)
            if self.cache is not None:
                self.cache.put(key, cached)
        self._embeddings = cached
        return cached

    # ---- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        batches = None if self._sampler is None else self._sampler.batches
        return {"round": self._round, "since_selection": self._since_selection, "batches": batches,
                "in_epoch": self._in_epoch, "selection_seconds": self.selection_seconds, "steps": self._steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._round, self._since_selection = state_dict["round"], state_dict["since_selection"]
        self.selection_seconds = state_dict["selection_seconds"]
        self._steps = state_dict.get("steps", 0)  # checkpoints from before the warm start lack it
        self._restored = state_dict["batches"]
        self._restored_skip = state_dict["in_epoch"]
        if self._sampler is not None and self._restored is not None:
            self._sampler.update(self._restored, self._round)
            self._sampler.skip = self._restored_skip


def _training_ends(trainer: Trainer) -> bool:
    """After this batch the fit is over (max_steps reached, or the last batch of the last epoch): no use choosing."""
    out_of_steps = trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step
    last_epoch = trainer.max_epochs is not None and 0 <= trainer.max_epochs <= trainer.current_epoch + 1
    return out_of_steps or (last_epoch and trainer.is_last_batch)


def _split_model(trainer: Trainer, method: str, work: str = "computes features", check_only: bool = False) -> Any:
    """The split model of an in-process HOSLStrategy, which features and embeddings need (None: ``check_only``)."""
    from hosl_lightning.lightning.strategy import HOSLStrategy

    strategy = trainer.strategy
    if not isinstance(strategy, HOSLStrategy) or strategy.transport != "in_process":
        found = (f"HOSLStrategy(transport={strategy.transport!r})" if isinstance(strategy, HOSLStrategy)
                 else type(strategy).__name__)
        raise ValueError(
            f"SubsetSelection(method={method!r}) {work} with the split model in this process, but this run uses "
            f"{found}: use HOSLStrategy(transport='in_process') (or method='random' / 'full')"
        )
    return None if check_only else strategy.split_model
