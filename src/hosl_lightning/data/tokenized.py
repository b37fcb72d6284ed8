"""What the tokenising DataModules share: the tokenizer, each split tokenised once, and the DataLoaders.

The tokenizer may be given by name and is loaded on first use, or handed over later by the module (the
model's own); ``max_length`` defaults to the tokenizer's limit, and one past the model's positions is refused
at setup (not an ``IndexError`` inside ``torch.embedding`` at the first long batch). Training batches come in
an :class:`~hosl_lightning.data.sampling.EpochShuffle` order, so a resumed run repeats the same order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from hosl_lightning.core.options import UserError, check_choice, check_int
from hosl_lightning.core.split_model import find_causal_lm
from hosl_lightning.data.encoding import resolve_tokenizer
from hosl_lightning.data.sampling import EpochShuffle
from hosl_lightning.data.sources import SPLITS
from hosl_lightning.models import position_limit

#: ``tokenizer.model_max_length`` above this is a "no limit" placeholder, not a real context size.
_NO_LIMIT = 1_000_000

_built: dict[tuple[Any, ...], ListDataset] | None = None  # inside tokenized_once(): the splits tokenised so far
# hyperparameters that do not change a split's examples (the tokenizer is keyed apart)
_LOADER_ONLY = frozenset({"tokenizer", "batch_size", "eval_batch_size", "num_workers", "shuffle_seed"})


@contextmanager
def tokenized_once() -> Iterator[None]:
    """Inside, a split is tokenised once for every DataModule configured alike; later ones reuse its examples.

    For many fits in one process over the same data, such as the trials of a study: each trial builds its own
    DataModule, and without this each would read and tokenise every split again. DataModules are alike when
    their class, the hyperparameters that shape the examples and their tokenizer (name, or the same instance)
    are; those that only shape the DataLoaders (batch sizes, workers, the shuffle) do not count. It keys on
    the constructor's arguments: a DataModule changed after construction, or a data file edited inside, is
    not seen.
    """
    global _built
    outer, _built = _built, ({} if _built is None else _built)
    try:
        yield
    finally:
        _built = outer


class ListDataset(Dataset):
    """A map-style dataset over a list."""

    def __init__(self, items: Sequence[Any]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


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
                raise UserError("no tokenizer: pass tokenizer=<hub id, path or instance>, or set datamodule.tokenizer")
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
        splits = self._splits_for(stage)
        self.check_max_length()  # every time: splits built before a Trainer was attached were not checked
        self.check_vocabulary()
        for split in splits:
            self.dataset(split)

    def _attached_model(self) -> Any:
        """The attached Trainer's causal LM (split or not), or None."""
        module = getattr(getattr(self, "trainer", None), "lightning_module", None)
        if module is None:
            return None
        try:
            _, model = find_causal_lm(module)
        except ValueError:
            return None
        return model if hasattr(model, "config") else None

    def check_vocabulary(self) -> None:
        """Refuses a tokenizer with more tokens than the model has embedding rows, before a batch reaches the model:
        an id past the table fails as a bare ``IndexError`` inside ``torch.embedding``, mid-training."""
        model = self._attached_model()
        rows = getattr(getattr(model, "config", None), "vocab_size", None)
        if not isinstance(rows, int):
            return
        # The base vocabulary and the pad id, not len(tokenizer): a tokenizer may list added tokens past the table
        # that text never maps to (transformers 5.4 adds five to SmolLM2's GGUF tokenizer, 49157 against 49152 rows).
        pad = self.tokenizer.pad_token_id
        size = max(int(self.tokenizer.vocab_size), 0 if pad is None else int(pad) + 1)
        if size > rows:
            name = getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__
            raise UserError(f"tokenizer={name!r} is not valid for this model: it has {size} tokens, but the model "
                            f"({model.config.model_type}) has {rows} rows in its embedding table (vocab_size), so ids "
                            f"from {rows} on cannot be embedded; use the model's own tokenizer")

    def check_max_length(self) -> None:
        """Refuses a ``max_length`` past the positions the model takes, before a batch reaches the model.

        The limit is the attached Trainer's model's (``max_position_embeddings`` or ``n_positions``); without
        one, the config beside the tokenizer's files, else the tokenizer's ``model_max_length`` if it is real.
        """
        max_length = self.max_length
        if max_length is None:
            return
        limit, whose = self._position_limit()
        if limit is not None and max_length > limit:
            given = "" if self._max_length is not None else " (the tokenizer's model_max_length)"
            raise UserError(f"max_length={max_length}{given} is not valid: {whose} takes at most {limit} positions; "
                             f"set max_length <= {limit}")

    def _position_limit(self) -> tuple[int | None, str]:
        """(most positions, whose limit it is), from the best source at hand (see :meth:`check_max_length`)."""
        model = self._attached_model()
        limit = position_limit(model.config) if model is not None else None
        if limit is not None:
            return limit, f"the model ({model.config.model_type})"
        name = str(getattr(self.tokenizer, "name_or_path", "") or "")
        folder = Path(name).expanduser()
        if name and (folder / "config.json").is_file():
            from transformers import AutoConfig

            try:
                limit = position_limit(AutoConfig.from_pretrained(folder))
            except (OSError, ValueError, KeyError):  # a config transformers cannot read says nothing here
                limit = None
            if limit is not None:
                return limit, f"the model whose config is beside the tokenizer ({str(folder)!r})"
        tokenizer_limit = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tokenizer_limit, int) and tokenizer_limit < _NO_LIMIT:
            return tokenizer_limit, "the tokenizer (its model_max_length)"
        return None, ""

    def _splits_for(self, stage: str | None) -> list[str]:
        available = [split for split in SPLITS if self._has(split)]
        needed = {"fit": ["train"], "validate": ["validation"], "test": ["test"], "predict": ["test"]}
        if stage is None:
            return available
        if stage not in needed:
            raise UserError(f"stage {stage!r} is not supported; this DataModule supports {list(needed)}")
        for split in needed[stage]:
            if not self._has(split):
                raise UserError(f"stage {stage!r} needs a {split} split, but none was given ({self._where_hint()})")
        data_dir = self.hparams.get("data_dir")  # a folder promises its splits; train_file alone asks for no validation
        if stage == "fit" and data_dir is not None and not self._has("validation") and self._validates():
            raise UserError(f"data_dir={data_dir!r} holds no validation file (validation.jsonl, .json, .csv or "
                            f".parquet), but the fit validates (trainer.limit_val_batches="
                            f"{self.trainer.limit_val_batches}): add a validation file, set validation_file, or set "
                            "trainer.limit_val_batches=0 to fit without validation")
        return needed[stage] + (["validation"] if stage == "fit" and self._has("validation") else [])

    def _validates(self) -> bool:
        """Whether an attached Trainer will run validation (a DataModule alone cannot tell: then no)."""
        trainer = getattr(self, "trainer", None)
        return trainer is not None and trainer.limit_val_batches != 0

    def dataset(self, split: str) -> ListDataset:
        """The tokenised examples of ``split`` (built once)."""
        if split not in self._splits:
            if not self._has(split):
                raise UserError(f"no {split} split was given ({self._where_hint()})")
            self.check_max_length()
            key = self._built_key(split)
            if key is not None and key in _built:  # type: ignore[operator]
                self._splits[split] = ListDataset(_built[key].items)  # type: ignore[index]
            else:
                self._splits[split] = self._build(split)
                if key is not None:
                    _built[key] = self._splits[split]  # type: ignore[index]
        return self._splits[split]

    def _built_key(self, split: str) -> tuple[Any, ...] | None:
        """What a split's examples depend on, inside :func:`tokenized_once` (else ``None``: nothing is shared)."""
        if _built is None:
            return None
        hparams = sorted((name, repr(value)) for name, value in self.hparams.items() if name not in _LOADER_ONLY)
        return type(self), tuple(hparams), self._tokenizer_arg, split

    def _loader(self, split: str, collate: Any) -> DataLoader:
        dataset, workers = self.dataset(split), self.num_workers
        if split == "train":
            sampler = EpochShuffle(len(dataset), self.shuffle_seed)
            return DataLoader(dataset, self.batch_size, sampler=sampler, collate_fn=collate, num_workers=workers)
        # keywords only: Lightning rebuilds a predict DataLoader from its arguments, and a positional batch_size clashes
        return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False, collate_fn=collate, num_workers=workers)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches; an empty list (Lightning then skips validation) when no validation split exists."""
        return self._loader("validation", self._eval_collate()) if self._has("validation") else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self._eval_collate())

    def predict_dataloader(self) -> DataLoader:
        """The test split's examples (those ``test`` scores), batched as for evaluation: ``predict`` runs on them."""
        return self._loader("test", self._eval_collate())

    def _has(self, split: str) -> bool:
        raise NotImplementedError

    def _where_hint(self) -> str:
        raise NotImplementedError

    def _build(self, split: str) -> ListDataset:
        raise NotImplementedError

    def _eval_collate(self) -> Any:
        raise NotImplementedError
