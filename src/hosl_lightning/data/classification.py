"""The DataModule of prompt-based classification: a task's prompts over local files or a hub dataset.

It reads the split sources, samples them as MeZO does (k per class, or the first n of a seeded order; a
validation sample carved out of train when the task has no labelled validation split), renders and
tokenises each example, and batches them in the gold or scoring layout of
:mod:`hosl_lightning.data.collation`.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, Literal

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from hosl_lightning.core.options import UserError, check_choice, check_int
from hosl_lightning.data.collation import PromptCollator
from hosl_lightning.data.encoding import PromptEncoder
from hosl_lightning.data.partition import Partition
from hosl_lightning.data.sampling import sample_train, seeded_order
from hosl_lightning.data.sources import SPLITS, SplitSource, check_columns, check_has_text, local_sources
from hosl_lightning.data.tasks import ClassificationTask, get_task
from hosl_lightning.data.tokenized import ListDataset, _TokenizedDataModule

if TYPE_CHECKING:
    import datasets


class PromptClassificationDataModule(_TokenizedDataModule):
    """Prompt-based classification: a task's template and label words over local files or a hub dataset.

    Args:
        tokenizer: hub id, path, ``.gguf`` file or model alias such as ``smollm2-135m`` (loaded with
            ``AutoTokenizer.from_pretrained``, ``tokenizer_kwargs`` passed on),
            or an instance; ``None`` if the module sets ``datamodule.tokenizer`` before setup.
        task: a name from ``hosl_lightning.data.TASK_NAMES``: ``"generic"`` (any local text/label data),
            ``"sst2"``, ``"rte"``, ``"cb"``, ``"boolq"``, ``"wsc"``, ``"wic"`` (MeZO's templates; the hub
            by default), or ``"rotten_tomatoes"`` (the bundled sample).
        data_dir: folder with ``train``/``validation``/``test`` files (``.jsonl``, ``.json``, ``.csv``,
            ``.parquet``); ``train_file``/``validation_file``/``test_file`` name files one by one and win
            over ``data_dir``. Without any, a built-in task reads its bundled folder or the hub. A
            ``validation_file`` equal to ``train_file`` carves validation out of train (disjoint), as the
            hub tasks do (MeZO's protocol: dev carved from train, test = the official validation split).
        text_column: the text column of the generic task.
        label_column: the label column of the generic task (also renames a built-in's).
        label_words: label value -> word, e.g. ``{"negative": " terrible", "positive": " great"}``;
            required for ``"generic"``, overrides a built-in's otherwise.
        template: format string over columns (default for generic: ``"{text} It was"``).
        max_length: maximum tokens per row (prompt + answer); default: the tokenizer's
            ``model_max_length`` when it is a real limit, else no limit. Long prompts are cut from the left
            of the task's ``truncate_column``; the answer never is.
        batch_size: examples per batch.
        eval_batch_size: examples per evaluation batch (a scoring batch has ``eval_batch_size * C`` rows).
        loss: ``"lm"`` (train on the gold label word's tokens) or ``"classification"`` (training batches
            in scoring layout, for a loss over the classes' scores, as MeZO's option).
        k_shot: k training examples per class (seeded, balanced; an error if a class has fewer).
        num_train: at most n training examples, the first n of a seeded permutation (MeZO: 1000).
        num_validation: as ``num_train``, for validation (MeZO: 500); required when validation is carved
            out of train.
        num_test: as ``num_train``, for test (MeZO: 1000).
        seed: seed of all sampling and of the training shuffle (which also depends on the epoch).
        shuffle_seed: seed of the training shuffle alone (default: ``seed``), to repeat a fit on the same
            examples in another order, e.g. to measure how much a result owes to the order.
        padding_side: ``"right"`` or ``"left"``.
        partition: how several clients share the training split: ``"none"`` (each reads all of it), ``"iid"``
            (equal seeded shards) or ``"dirichlet"`` (label skew: each class divided among the clients in
            Dirichlet(``alpha``) proportions; smaller ``alpha``, fewer classes per client). Drawn from ``seed``, the
            same in every client, so shards are disjoint and cover the split (``hosl_lightning.data.partition``).
        alpha: the Dirichlet concentration of ``partition="dirichlet"`` (unset: 0.5); refused with other schemes.
        client_index: which shard this process takes (unset: ``RANK - 1``, as torchrun sets it for a
            distributed run's clients).
        num_clients: how many shards there are (unset: ``WORLD_SIZE - 1``).
    """

    def __init__(
        self,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        task: str = "generic",
        data_dir: str | None = None,
        train_file: str | None = None,
        validation_file: str | None = None,
        test_file: str | None = None,
        text_column: str | None = None,
        label_column: str | None = None,
        label_words: dict[Any, str] | None = None,
        template: str | None = None,
        max_length: int | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        loss: Literal["lm", "classification"] = "lm",
        k_shot: int | None = None,
        num_train: int | None = None,
        num_validation: int | None = None,
        num_test: int | None = None,
        seed: int = 0,
        padding_side: Literal["right", "left"] = "right",
        num_workers: int = 0,
        tokenizer_kwargs: dict[str, Any] | None = None,
        cache_dir: str | None = None,
        shuffle_seed: int | None = None,
        partition: Literal["none", "iid", "dirichlet"] = "none",
        alpha: float | None = None,
        client_index: int | None = None,
        num_clients: int | None = None,
    ) -> None:
        super().__init__(tokenizer, tokenizer_kwargs, max_length, batch_size, eval_batch_size, seed, padding_side,
                         num_workers, cache_dir, shuffle_seed)
        self.partition = Partition(partition, alpha, client_index, num_clients)
        check_choice("loss", loss, ("lm", "classification"))
        check_int("k_shot", k_shot, 1, none="no per-class sample")
        for name, value in (("num_train", num_train), ("num_validation", num_validation), ("num_test", num_test)):
            check_int(name, value, 1, none="the whole split")
        if k_shot is not None and num_train is not None:
            raise UserError(f"k_shot={k_shot} and num_train={num_train} both choose the training sample; set one")
        self.save_hyperparameters(ignore=[] if isinstance(tokenizer, (str, type(None))) else ["tokenizer"])
        self.task: ClassificationTask = get_task(
            task, template=template, label_words=label_words, text_column=text_column, label_column=label_column
        )
        self.loss, self.k_shot = loss, k_shot
        self.text_column = (text_column or "text") if task == "generic" else None
        self.limits = {"train": num_train, "validation": num_validation, "test": num_test}
        files = {"train": train_file, "validation": validation_file, "test": test_file}
        self.sources = self._resolve_sources(data_dir, files)
        if "validation" in self.sources and self.sources["validation"].carved and num_validation is None:
            raise UserError(
                f"task {self.task.name!r} carves its validation examples out of the train split "
                f"({self.sources['train'].describe()}); set num_validation (MeZO used 500)"
            )
        self._raw: dict[str, datasets.Dataset] = {}
        self._indices: dict[str, list[int]] = {}

    @property
    def label_words(self) -> dict[int, str]:
        """Class index -> label word."""
        return dict(enumerate(self.task.words))

    @property
    def class_names(self) -> list[Hashable]:
        """Class index -> label value in the data."""
        return self.task.label_values

    @property
    def num_classes(self) -> int:
        return self.task.num_classes

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self._warn_absent_classes()

    def _warn_absent_classes(self) -> None:
        """Warn about a label word whose class no split read contains: it silently adds a class (a 2-class task
        scored as 3), usually a label-word map copied from another dataset or a misspelt label value."""
        if not self._splits:
            return
        present = {example.label for dataset in self._splits.values() for example in dataset.items}
        absent = [value for index, value in enumerate(self.class_names) if index not in present]
        if absent:
            read = ", ".join(sorted(self._splits))
            rank_zero_warn(f"label_words names class(es) {absent} that no split read ({read}) contains: the task is "
                           f"scored as {self.num_classes} classes, {len(absent)} of them absent from the data; drop "
                           "them from label_words if the data has no such class")

    def train_dataloader(self) -> DataLoader:
        collate = PromptCollator(self.tokenizer.pad_token_id, self.padding_side, self.loss == "classification")
        return self._loader("train", collate)

    def _eval_collate(self) -> PromptCollator:
        return PromptCollator(self.tokenizer.pad_token_id, self.padding_side, score_all_classes=True)

    # -- sources and sampling --

    def _resolve_sources(self, data_dir: str | None, files: dict[str, str | None]) -> dict[str, SplitSource]:
        if data_dir is not None or any(files.values()):
            return local_sources(data_dir, files)
        if self.task.data_dir is not None:
            return local_sources(self.task.data_dir, {})
        if self.task.hub is not None:
            hub = self.task.hub
            sources = {split: SplitSource(split, hub=hub) for split in SPLITS if hub.splits.get(split) is not None}
            if "train" in sources and hub.splits.get("validation") is None:
                sources["validation"] = SplitSource("validation", hub=hub, carved=True)
            return sources
        raise UserError(
            f"task {self.task.name!r} has no data: set data_dir, or train_file / validation_file / test_file"
        )

    def _has(self, split: str) -> bool:
        return split in self.sources

    def _where_hint(self) -> str:
        given = {split: source.describe() for split, source in self.sources.items()}
        return f"task {self.task.name!r}, splits given: {given}"

    def _raw_split(self, split: str) -> datasets.Dataset:
        """The full, unsampled dataset behind ``split`` (a carved validation split reads train's)."""
        source = self.sources[split]
        key = "train" if source.carved else split
        if key not in self._raw:
            dataset = self.sources[key].load(self.cache_dir)
            check_columns(dataset, self.task.fields, f"the template {self.task.template!r}", self.sources[key])
            check_columns(dataset, [self.task.label_column], "label_column", self.sources[key])
            self._raw[key] = dataset
        return self._raw[key]

    def _classes(self, dataset: datasets.Dataset, source: SplitSource) -> list[int]:
        classes = []
        for row, value in enumerate(list(dataset[self.task.label_column])):
            try:
                classes.append(self.task.class_index(value))
            except ValueError as error:
                raise UserError(f"example {row} of the {source.split} split ({source.describe()}): {error}") from None
        return classes

    def _sample(self, split: str) -> list[int]:
        """Row indices of ``split`` in its raw dataset, drawn once."""
        if split not in self._indices:
            if split == "train" or self.sources[split].carved:
                self._sample_train()
            else:
                self._sample_eval(split)
            self._check_sample(split)
        return self._indices[split]

    def _sample_train(self) -> None:
        """Draws train and, when validation is carved out of train, validation with it (disjoint)."""
        source = self.sources["train"]
        carved = self._has("validation") and self.sources["validation"].carved
        carve = (self.limits["validation"] or 0) if carved else 0  # required when carved (checked in __init__)
        classes, where = self._classes(self._raw_split("train"), source), f"the train split ({source.describe()})"
        train, validation = sample_train(
            classes, seed=self.seed, names=self.task.label_values, where=where, k_shot=self.k_shot,
            num_train=self.limits["train"], carve=carve,
        )
        self._indices["train"] = self.partition.shard(train, classes, self.seed, where)  # this client's share
        if carved:
            self._indices["validation"] = validation

    def _sample_eval(self, split: str) -> None:
        """The first ``num_<split>`` of a seeded permutation, or the whole split in file order."""
        dataset = self._raw_split(split)
        self._classes(dataset, self.sources[split])  # every label must be known, sampled or not
        limit = self.limits[split]
        self._indices[split] = seeded_order(len(dataset), self.seed)[:limit] if limit else list(range(len(dataset)))

    def _check_sample(self, split: str) -> None:
        wanted, got = self.limits[split], len(self._indices[split])
        if got == 0:
            raise UserError(f"{split} split is empty after sampling ({self.sources[split].describe()})")
        if wanted is not None and got < wanted:
            rank_zero_warn(f"num_{split}={wanted} but the {split} split ({self.sources[split].describe()}) gives {got}")

    def _column_option(self, column: str) -> str:
        """The option that chose ``column``: text_column for the generic task's text, else the template."""
        if column == self.text_column:
            return f"text_column={column!r}"
        return f"template={self.task.template!r}"

    # -- tokenisation --

    def _build(self, split: str) -> ListDataset:
        indices = self._sample(split)
        source = self.sources[split]
        rows = self._raw_split(split).select(indices)
        for column in self.task.fields:
            check_has_text(list(rows[column]), self._column_option(column), column, source)
        prompts, labels, where = [], [], []
        for row_index, row in zip(indices, rows, strict=True):
            place = f"example {row_index} of the {split} split ({source.describe()})"
            for column in self.task.fields:
                if row[column] is None:
                    raise UserError(f"{place} has no value in column {column!r}")
            prompts.append(self.task.render(row))
            labels.append(self.task.class_index(row[self.task.label_column]))
            where.append(place)
        encoder = PromptEncoder(self.tokenizer, self.task, self.max_length)
        examples = encoder.encode(prompts, labels, where)
        if encoder.truncated:
            rank_zero_info(
                f"{split}: {encoder.truncated} of {len(examples)} prompts cut from the left of column "
                f"{self.task.truncate_column!r} to fit max_length={self.max_length}"
            )
        return ListDataset(examples)
