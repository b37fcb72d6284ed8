"""LightningDataModules for prompt-based classification and plain causal-LM fine-tuning.

Batches are dicts of long tensors that any Hugging Face causal LM takes as is (labels are standard
causal-LM labels, -100 = ignored; the model shifts them itself).

``PromptClassificationDataModule`` gives two batch layouts:

* gold batches (training with ``loss="lm"``): one row per example, prompt + gold label word;
  ``labels`` hold the label word's token ids and -100 everywhere else.
* scoring batches (validation and test always; training too with ``loss="classification"``): one row per
  example and class, prompt + that class's label word, rows ordered example-major (row ``b * C + c``),
  with ``class_labels`` ``[B]`` (gold class index) and ``num_classes`` ``C`` (an int). A scorer sums each
  row's label-word log-likelihood and takes the arg-max over the C rows of an example.

Tokenisation: the prompt is tokenised on its own and each label word as the continuation of the prompt
(the tail of the tokens of prompt + word, so a SentencePiece tokenizer's word-boundary marks come out as
they would in running text); when the two disagree on the prompt's tokens, the word's own tokens are used.
Trailing special tokens (an EOS some tokenizers append) are left off: nothing is predicted after the answer.

Truncation never cuts the answer. With ``max_length``, a prompt that does not fit beside its longest label
word loses tokens from the LEFT of one field, the task's ``truncate_column`` (the SST-2 sentence, the RTE
premise, the BoolQ passage): the template's own words, the other fields and the answer are kept whole, so
"... the end of a long review It was great" keeps " It was". When even an empty field leaves too many
tokens, the error names the example.

Padding is done here, not by the tokenizer: ``padding_side`` ("right" by default, or "left") and the
tokenizer's pad token, set to its EOS token when it has none.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from hosl_lightning.data import EpochShuffle
from hosl_lightning.models import resolve_source
from hosl_lightning.options import check_choice, check_int
from hosl_lightning.tasks import (
    SPLITS,
    ClassificationTask,
    HubSource,
    Prompt,
    find_split_files,
    get_task,
    load_local_split,
)

IGNORE_INDEX = -100

#: ``tokenizer.model_max_length`` above this is a "no limit" placeholder, not a real context size.
_NO_LIMIT = 1_000_000


# --- tokenizer ------------------------------------------------------------------------------------------


def resolve_tokenizer(tokenizer: str | PreTrainedTokenizerBase, **kwargs: Any) -> PreTrainedTokenizerBase:
    """A tokenizer instance (loaded by name or path when given a string) with a pad token.

    A tokenizer without a pad token gets its EOS token as pad: padded positions are masked out of
    attention and labels, so which id fills them does not matter, only that it is a real token id.
    """
    if isinstance(tokenizer, str):  # hub id, local path, .gguf file or alias, as for the model
        gguf_file = kwargs.pop("gguf_file", None)
        source, gguf = resolve_source(tokenizer, gguf_file)
        tokenizer = AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf} if gguf else {}), **kwargs)
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        kind = type(tokenizer).__name__
        raise TypeError(f"tokenizer must be a name, a path or a PreTrainedTokenizerBase, got {kind}")
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                "the tokenizer has neither a pad token nor an EOS token to pad with; set tokenizer.pad_token"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens the tokenizer puts before a text (e.g. ``[bos]`` for Llama and OPT, ``[]`` for GPT-2)."""
    plain = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


# --- sampling -------------------------------------------------------------------------------------------


def seeded_order(size: int, seed: int) -> list[int]:
    """A permutation of ``range(size)`` drawn from ``seed`` alone.

    The same one MeZO draws (``np.random.seed(seed); np.random.permutation(size)``), so a MeZO-style
    sample (first n of the permutation) picks the same examples from the same data.
    """
    return np.random.RandomState(seed).permutation(size).tolist()


def k_per_class(
    order: Sequence[int], classes: Sequence[int], k: int, names: Sequence[Hashable], where: str
) -> list[int]:
    """The first ``k`` examples of each class in ``order`` (kept in that order); an error if a class has fewer."""
    picked: dict[int, list[int]] = {index: [] for index in range(len(names))}
    for i in order:
        if len(picked[classes[i]]) < k:
            picked[classes[i]].append(i)
    short = {names[c]: len(found) for c, found in picked.items() if len(found) < k}
    if short:
        raise ValueError(f"k_shot={k} examples per class, but {where} has fewer for labels {short} (label: available)")
    chosen = {i for found in picked.values() for i in found}
    return [i for i in order if i in chosen]


def sample_train(
    classes: Sequence[int],
    *,
    seed: int,
    names: Sequence[Hashable],
    where: str,
    k_shot: int | None = None,
    num_train: int | None = None,
    carve: int = 0,
) -> tuple[list[int], list[int]]:
    """Training indices, and ``carve`` validation indices taken from the same split, disjoint from them.

    ``k_shot``: k examples per class (seeded, balanced). ``num_train``: the first n of the seeded order
    (at most all). Neither: everything, less the carved examples. The carved validation examples are the
    next ones in the seeded order after the training sample, as in MeZO (which draws
    ``num_train + num_dev`` examples and keeps the last ``num_dev`` as its dev set).
    """
    order = seeded_order(len(classes), seed)
    if k_shot is not None:
        train = k_per_class(order, classes, k_shot, names, where)
    elif num_train is not None:
        train = order[:num_train]
    elif carve:
        train = order[: max(0, len(order) - carve)]
    else:
        train = list(range(len(classes)))
    if not carve:
        return train, []
    taken = set(train)
    return train, [i for i in order if i not in taken][:carve]


# --- encoded examples, collation ------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of one classification example: its prompt (with leading special tokens) and each class's answer."""

    prompt: list[int]
    answers: list[list[int]]
    label: int


class ListDataset(Dataset):
    """A map-style dataset over a list."""

    def __init__(self, items: Sequence[Any]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


def pad_rows(
    rows: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_id: int, side: str
) -> dict[str, torch.Tensor]:
    """Pads token rows and their labels to the longest row: ``input_ids``, ``attention_mask``, ``labels``."""
    width = max(len(row) for row in rows)
    ids, mask, targets = [], [], []
    for row, label in zip(rows, labels, strict=True):
        fill = width - len(row)
        if side == "right":
            ids.append([*row, *[pad_id] * fill])
            mask.append([1] * len(row) + [0] * fill)
            targets.append([*label, *[IGNORE_INDEX] * fill])
        else:
            ids.append([*[pad_id] * fill, *row])
            mask.append([0] * fill + [1] * len(row))
            targets.append([*[IGNORE_INDEX] * fill, *label])
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return {"input_ids": as_long(ids), "attention_mask": as_long(mask), "labels": as_long(targets)}


@dataclass(frozen=True)
class PromptCollator:
    """Builds gold batches (``score_all_classes=False``) or scoring batches (``True``) from EncodedExamples."""

    pad_id: int
    padding_side: str = "right"
    score_all_classes: bool = False

    def __call__(self, examples: Sequence[EncodedExample]) -> dict[str, Any]:
        if self.score_all_classes:
            pairs = [(ex.prompt, answer) for ex in examples for answer in ex.answers]
        else:
            pairs = [(ex.prompt, ex.answers[ex.label]) for ex in examples]
        rows = [[*prompt, *answer] for prompt, answer in pairs]
        labels = [[IGNORE_INDEX] * len(prompt) + list(answer) for prompt, answer in pairs]
        batch: dict[str, Any] = pad_rows(rows, labels, self.pad_id, self.padding_side)
        if self.score_all_classes:
            batch["class_labels"] = torch.tensor([ex.label for ex in examples], dtype=torch.long)
            batch["num_classes"] = len(examples[0].answers)
        return batch


@dataclass(frozen=True)
class LMCollator:
    """Causal-LM batches: labels are the input ids, -100 on padding."""

    pad_id: int
    padding_side: str = "right"

    def __call__(self, rows: Sequence[list[int]]) -> dict[str, torch.Tensor]:
        return pad_rows(rows, rows, self.pad_id, self.padding_side)


# --- prompt encoding ------------------------------------------------------------------------------------


class PromptEncoder:
    """Token ids for prompts and label words of one task, with answer-preserving truncation (module docstring)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, task: ClassificationTask, max_length: int | None) -> None:
        self.tokenizer, self.task, self.max_length = tokenizer, task, max_length
        self.prefix = special_prefix(tokenizer)
        self.word_ids = [self._word_ids(value, word) for value, word in task.label_words.items()]
        self.truncated = 0

    def _word_ids(self, value: Hashable, word: str) -> list[int]:
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(
                f"label word {word!r} of label {value!r} (task {self.task.name!r}) tokenises to nothing with this "
                "tokenizer; choose another label word"
            )
        return list(ids)

    def encode(self, prompts: Sequence[Prompt], labels: Sequence[int], where: Sequence[str]) -> list[EncodedExample]:
        texts = [prompt.text for prompt in prompts]
        prompt_ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        joint = [
            self.tokenizer([t + word for t in texts], add_special_tokens=False)["input_ids"] for word in self.task.words
        ]
        examples = []
        for i, prompt in enumerate(prompts):
            answers = [self._answer(prompt_ids[i], joint[c][i], c) for c in range(self.task.num_classes)]
            ids = self._fit(list(prompt_ids[i]), prompt, max(map(len, answers)), where[i])
            examples.append(EncodedExample([*self.prefix, *ids], answers, labels[i]))
        return examples

    def _answer(self, prompt_ids: list[int], joint_ids: list[int], c: int) -> list[int]:
        """The label word's tokens as a continuation of the prompt (or alone, if the boundary merged)."""
        n = len(prompt_ids)
        if len(joint_ids) > n and list(joint_ids[:n]) == list(prompt_ids):
            return list(joint_ids[n:])
        return self.word_ids[c]

    def _fit(self, ids: list[int], prompt: Prompt, answer_len: int, where: str) -> list[int]:
        """Cuts tokens from the left of the truncatable field until prefix + prompt + answer fit max_length."""
        if self.max_length is None:
            return ids
        excess = len(self.prefix) + len(ids) + answer_len - self.max_length
        if excess <= 0:
            return ids
        start, count = self._field_tokens(prompt)
        if excess > count:
            rest = len(ids) - count
            raise ValueError(
                f"{where} does not fit max_length={self.max_length} even with column {self.task.truncate_column!r} "
                f"cut away entirely: the rest of the prompt (template text and other columns) takes {rest} tokens, "
                f"the longest label word {answer_len} and special tokens {len(self.prefix)}. Raise max_length or "
                "shorten the template."
            )
        self.truncated += 1
        return ids[:start] + ids[start + excess :]

    def _field_tokens(self, prompt: Prompt) -> tuple[int, int]:
        """(first index, count) of the run of prompt tokens lying wholly inside the truncatable field."""
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError("truncating a prompt needs character offsets, which only fast tokenizers give; "
                             "use a fast tokenizer or raise max_length")
        offsets = self.tokenizer(prompt.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        lo, hi = prompt.span
        inside = [i for i, (a, b) in enumerate(offsets) if lo <= a and b <= hi and b > a]
        if not inside:
            return 0, 0
        count = 1
        while count < len(inside) and inside[count] == inside[0] + count:
            count += 1
        return inside[0], count


# --- split sources --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitSource:
    """Where one split's examples come from: a local file, a hub split, or carved out of ``train``."""

    split: str
    file: Path | None = None
    hub: HubSource | None = None
    carved: bool = False

    def describe(self) -> str:
        if self.file is not None:
            origin = f"file {str(self.file)!r}"
        else:
            origin = self.hub.describe("train" if self.carved else self.split)  # type: ignore[union-attr]
        return f"carved out of the train split, {origin}" if self.carved else origin

    def load(self, cache_dir: str | None) -> datasets.Dataset:
        if self.file is not None:
            return load_local_split(self.file, self.split, cache_dir)
        dataset = self.hub.load(self.split, cache_dir)  # type: ignore[union-attr]
        if len(dataset) == 0:
            raise ValueError(f"{self.split} split is empty: {self.describe()} holds no examples")
        return dataset


def local_sources(
    data_dir: str | Path | None, files: Mapping[str, str | Path | None]
) -> dict[str, SplitSource]:
    """Sources from a data folder and/or explicit files (files win); a validation file equal to the
    training file means "carve validation out of train"."""
    paths: dict[str, Path] = dict(find_split_files(data_dir)) if data_dir is not None else {}
    paths.update({split: Path(f) for split, f in files.items() if f is not None})
    sources = {split: SplitSource(split, file=path) for split, path in paths.items()}
    if "train" in paths and "validation" in paths and paths["train"].resolve() == paths["validation"].resolve():
        sources["validation"] = SplitSource("validation", file=paths["train"], carved=True)
    return sources


def check_columns(dataset: datasets.Dataset, needed: Sequence[str], what: str, source: SplitSource) -> None:
    missing = [column for column in needed if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{what} names column(s) {missing} missing from the {source.split} split ({source.describe()}); "
            f"available columns: {dataset.column_names}"
        )


# --- shared DataModule plumbing -------------------------------------------------------------------------


class _TokenizedDataModule(LightningDataModule):
    """Tokenizer handling, split caching and DataLoaders shared by both DataModules."""

    def __init__(
        self,
        tokenizer: str | PreTrainedTokenizerBase | None,
        tokenizer_kwargs: dict[str, Any] | None,
        max_length: int | None,
        batch_size: int,
        eval_batch_size: int | None,
        seed: int,
        padding_side: str,
        num_workers: int,
        cache_dir: str | None,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__()
        check_int("max_length", max_length, 1, none="the tokenizer's limit")
        check_int("batch_size", batch_size, 1)
        check_int("eval_batch_size", eval_batch_size, 1, none="batch_size")
        check_choice("padding_side", padding_side, ("right", "left"))
        check_int("num_workers", num_workers, 0)
        self._tokenizer_arg = tokenizer
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.tokenizer_kwargs = dict(tokenizer_kwargs or {})
        self._max_length = max_length
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        check_int("shuffle_seed", shuffle_seed, none="seed")
        self.seed, self.padding_side, self.num_workers, self.cache_dir = seed, padding_side, num_workers, cache_dir
        self.shuffle_seed = seed if shuffle_seed is None else shuffle_seed
        self._splits: dict[str, ListDataset] = {}

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer (loaded on first use when given by name), with a pad token."""
        if self._tokenizer is None:
            if self._tokenizer_arg is None:
                raise ValueError("no tokenizer: pass tokenizer=<hub id, path or instance>, or set datamodule.tokenizer")
            self._tokenizer = resolve_tokenizer(self._tokenizer_arg, **self.tokenizer_kwargs)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: str | PreTrainedTokenizerBase) -> None:
        """Lets a module hand over the model's own tokenizer; splits already tokenised are dropped."""
        self._tokenizer_arg, self._tokenizer = tokenizer, None
        self._splits.clear()

    @property
    def max_length(self) -> int | None:
        """``max_length`` as given, else the tokenizer's ``model_max_length`` when that is a real limit."""
        if self._max_length is not None:
            return self._max_length
        limit = getattr(self.tokenizer, "model_max_length", None)
        return int(limit) if isinstance(limit, int) and limit < _NO_LIMIT else None

    def setup(self, stage: str | None = None) -> None:
        for split in self._splits_for(stage):
            self.dataset(split)

    def _splits_for(self, stage: str | None) -> list[str]:
        available = [split for split in SPLITS if self._has(split)]
        needed = {"fit": ["train"], "validate": ["validation"], "test": ["test"]}
        if stage is None:
            return available
        if stage not in needed:
            raise ValueError(f"stage {stage!r} is not supported; this DataModule supports {list(needed)}")
        for split in needed[stage]:
            if not self._has(split):
                raise ValueError(f"stage {stage!r} needs a {split} split, but none was given ({self._where_hint()})")
        return needed[stage] + (["validation"] if stage == "fit" and self._has("validation") else [])

    def dataset(self, split: str) -> ListDataset:
        """The tokenised examples of ``split`` (built once)."""
        if split not in self._splits:
            if not self._has(split):
                raise ValueError(f"no {split} split was given ({self._where_hint()})")
            self._splits[split] = self._build(split)
        return self._splits[split]

    def _loader(self, split: str, collate: Any) -> DataLoader:
        dataset, workers = self.dataset(split), self.num_workers
        if split == "train":
            sampler = EpochShuffle(len(dataset), self.shuffle_seed)
            return DataLoader(dataset, self.batch_size, sampler=sampler, collate_fn=collate, num_workers=workers)
        return DataLoader(dataset, self.eval_batch_size, shuffle=False, collate_fn=collate, num_workers=workers)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches; an empty list (Lightning then skips validation) when no validation split exists."""
        return self._loader("validation", self._eval_collate()) if self._has("validation") else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self._eval_collate())

    def _has(self, split: str) -> bool:
        raise NotImplementedError

    def _where_hint(self) -> str:
        raise NotImplementedError

    def _build(self, split: str) -> ListDataset:
        raise NotImplementedError

    def _eval_collate(self) -> Any:
        raise NotImplementedError


# --- prompt classification ------------------------------------------------------------------------------


class PromptClassificationDataModule(_TokenizedDataModule):
    """Prompt-based classification: a task's template and label words over local files or a hub dataset.

    Args:
        tokenizer: hub id, path, ``.gguf`` file or model alias such as ``smollm2-135m`` (loaded with
            ``AutoTokenizer.from_pretrained``, ``tokenizer_kwargs`` passed on),
            or an instance; ``None`` if the module sets ``datamodule.tokenizer`` before setup.
        task: a name from ``hosl_lightning.tasks.TASK_NAMES``: ``"generic"`` (any local text/label data),
            ``"sst2"``, ``"rte"``, ``"cb"``, ``"boolq"``, ``"wsc"``, ``"wic"`` (MeZO's templates; the hub
            by default), or ``"rotten_tomatoes"`` (the bundled sample).
        data_dir: folder with ``train``/``validation``/``test`` files (``.jsonl``, ``.json``, ``.csv``,
            ``.parquet``); ``train_file``/``validation_file``/``test_file`` name files one by one and win
            over ``data_dir``. Without any, a built-in task reads its bundled folder or the hub. A
            ``validation_file`` equal to ``train_file`` carves validation out of train (disjoint), as the
            hub tasks do (MeZO's protocol: dev carved from train, test = the official validation split).
        text_column / label_column: columns of the generic task (``label_column`` also renames a built-in's).
        label_words: label value -> word, e.g. ``{"negative": " terrible", "positive": " great"}``;
            required for ``"generic"``, overrides a built-in's otherwise.
        template: format string over columns (default for generic: ``"{text} It was"``).
        max_length: maximum tokens per row (prompt + answer); default: the tokenizer's
            ``model_max_length`` when it is a real limit, else no limit. Long prompts are cut from the left
            of the task's ``truncate_column``; the answer never is.
        batch_size / eval_batch_size: examples per batch (a scoring batch has ``eval_batch_size * C`` rows).
        loss: ``"lm"`` (train on the gold label word's tokens) or ``"classification"`` (training batches
            in scoring layout, for a loss over the classes' scores, as MeZO's option).
        k_shot: k training examples per class (seeded, balanced; an error if a class has fewer).
        num_train / num_validation / num_test: at most n examples of each split, the first n of a seeded
            permutation (MeZO: 1000 / 500 / 1000). ``num_validation`` is required when validation is carved
            out of train.
        seed: seed of all sampling and of the training shuffle (which also depends on the epoch).
        shuffle_seed: seed of the training shuffle alone (default: ``seed``), to repeat a fit on the same
            examples in another order, e.g. to measure how much a result owes to the order.
        padding_side: ``"right"`` or ``"left"``.
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
    ) -> None:
        super().__init__(tokenizer, tokenizer_kwargs, max_length, batch_size, eval_batch_size, seed, padding_side,
                         num_workers, cache_dir, shuffle_seed)
        check_choice("loss", loss, ("lm", "classification"))
        check_int("k_shot", k_shot, 1, none="no per-class sample")
        for name, value in (("num_train", num_train), ("num_validation", num_validation), ("num_test", num_test)):
            check_int(name, value, 1, none="the whole split")
        if k_shot is not None and num_train is not None:
            raise ValueError(f"k_shot={k_shot} and num_train={num_train} both choose the training sample; set one")
        self.save_hyperparameters(ignore=[] if isinstance(tokenizer, (str, type(None))) else ["tokenizer"])
        self.task: ClassificationTask = get_task(
            task, template=template, label_words=label_words, text_column=text_column, label_column=label_column
        )
        self.loss, self.k_shot = loss, k_shot
        self.limits = {"train": num_train, "validation": num_validation, "test": num_test}
        files = {"train": train_file, "validation": validation_file, "test": test_file}
        self.sources = self._resolve_sources(data_dir, files)
        if "validation" in self.sources and self.sources["validation"].carved and num_validation is None:
            raise ValueError(
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
        raise ValueError(
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
                raise ValueError(f"example {row} of the {source.split} split ({source.describe()}): {error}") from None
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
        train, validation = sample_train(
            self._classes(self._raw_split("train"), source), seed=self.seed, names=self.task.label_values,
            where=f"the train split ({source.describe()})", k_shot=self.k_shot, num_train=self.limits["train"],
            carve=carve,
        )
        self._indices["train"] = train
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
            raise ValueError(f"{split} split is empty after sampling ({self.sources[split].describe()})")
        if wanted is not None and got < wanted:
            rank_zero_warn(f"num_{split}={wanted} but the {split} split ({self.sources[split].describe()}) gives {got}")

    # -- tokenisation --

    def _build(self, split: str) -> ListDataset:
        indices = self._sample(split)
        source = self.sources[split]
        rows = self._raw_split(split).select(indices)
        prompts, labels, where = [], [], []
        for row_index, row in zip(indices, rows, strict=True):
            place = f"example {row_index} of the {split} split ({source.describe()})"
            for column in self.task.fields:
                if row[column] is None:
                    raise ValueError(f"{place} has no value in column {column!r}")
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


# --- plain causal-LM fine-tuning ------------------------------------------------------------------------


class TextLMDataModule(_TokenizedDataModule):
    """Plain causal-LM fine-tuning on a text column (evaluated by loss / perplexity) over local files.

    Every split gives ``input_ids``, ``attention_mask`` and ``labels`` (= ``input_ids``, -100 on padding).
    A text longer than ``max_length`` tokens keeps its first ``max_length`` tokens (the tokenizer's own
    truncation, special tokens included). Texts of fewer than 2 tokens hold no next-token target and are
    dropped, with a warning; a split left empty is an error.

    Args: as :class:`PromptClassificationDataModule`, with ``text_column`` the column to train on.
    """

    def __init__(
        self,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        data_dir: str | None = None,
        train_file: str | None = None,
        validation_file: str | None = None,
        test_file: str | None = None,
        text_column: str = "text",
        max_length: int | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_train: int | None = None,
        num_validation: int | None = None,
        num_test: int | None = None,
        seed: int = 0,
        padding_side: Literal["right", "left"] = "right",
        num_workers: int = 0,
        tokenizer_kwargs: dict[str, Any] | None = None,
        cache_dir: str | None = None,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__(tokenizer, tokenizer_kwargs, max_length, batch_size, eval_batch_size, seed, padding_side,
                         num_workers, cache_dir, shuffle_seed)
        for name, value in (("num_train", num_train), ("num_validation", num_validation), ("num_test", num_test)):
            check_int(name, value, 1, none="the whole split")
        self.save_hyperparameters(ignore=[] if isinstance(tokenizer, (str, type(None))) else ["tokenizer"])
        self.text_column = text_column
        self.limits = {"train": num_train, "validation": num_validation, "test": num_test}
        files = {"train": train_file, "validation": validation_file, "test": test_file}
        if data_dir is None and not any(files.values()):
            raise ValueError("TextLMDataModule has no data: set data_dir, or train_file / validation_file / test_file")
        self.sources = local_sources(data_dir, files)
        if "validation" in self.sources and self.sources["validation"].carved:
            raise ValueError(f"validation_file and train_file are the same file ({self.sources['train'].describe()})")

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", LMCollator(self.tokenizer.pad_token_id, self.padding_side))

    def _eval_collate(self) -> LMCollator:
        return LMCollator(self.tokenizer.pad_token_id, self.padding_side)

    def _has(self, split: str) -> bool:
        return split in self.sources

    def _where_hint(self) -> str:
        return f"splits given: { {split: source.describe() for split, source in self.sources.items()} }"

    def _build(self, split: str) -> ListDataset:
        source = self.sources[split]
        dataset = source.load(self.cache_dir)
        check_columns(dataset, [self.text_column], "text_column", source)
        limit = self.limits[split]
        indices = seeded_order(len(dataset), self.seed)[:limit] if limit else list(range(len(dataset)))
        texts = list(dataset.select(indices)[self.text_column])
        for row, text in zip(indices, texts, strict=True):
            if not isinstance(text, str):
                raise ValueError(f"example {row} of the {split} split ({source.describe()}): column "
                                 f"{self.text_column!r} holds {text!r}, not a string")
        max_length = self.max_length
        encoded = self.tokenizer(texts, truncation=max_length is not None, max_length=max_length)["input_ids"]
        rows = [list(ids) for ids in encoded if len(ids) >= 2]
        if len(rows) < len(encoded):
            dropped = len(encoded) - len(rows)
            rank_zero_warn(f"{split}: dropped {dropped} texts of fewer than 2 tokens ({source.describe()})")
        if not rows:
            raise ValueError(
                f"{split} split is empty after dropping texts of fewer than 2 tokens ({source.describe()})"
            )
        return ListDataset(rows)
