"""The DataModule of plain causal-LM fine-tuning on a text column of local files."""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from hosl_lightning.core.options import UserError, check_choice, check_int
from hosl_lightning.data.collation import LMCollator
from hosl_lightning.data.partition import Partition
from hosl_lightning.data.sampling import seeded_order
from hosl_lightning.data.sources import check_columns, check_has_text, local_sources
from hosl_lightning.data.tokenized import ListDataset, _TokenizedDataModule


class TextLMDataModule(_TokenizedDataModule):
    """Plain causal-LM fine-tuning on a text column (evaluated by loss / perplexity) over local files.

    Every split gives ``input_ids``, ``attention_mask`` and ``labels`` (= ``input_ids``, -100 on padding).
    A text longer than ``max_length`` tokens keeps its first ``max_length`` tokens (the tokenizer's own
    truncation, special tokens included). Texts of fewer than 2 tokens hold no next-token target and are
    dropped, with a warning; a split left empty is an error.

    Its arguments are :class:`PromptClassificationDataModule`'s, with ``text_column`` the column to train on
    (``partition="dirichlet"`` needs classes, so ``"none"`` and ``"iid"`` only).
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
        partition: Literal["none", "iid"] = "none",
        client_index: int | None = None,
        num_clients: int | None = None,
    ) -> None:
        super().__init__(tokenizer, tokenizer_kwargs, max_length, batch_size, eval_batch_size, seed, padding_side,
                         num_workers, cache_dir, shuffle_seed)
        check_choice("partition", partition, ("none", "iid"))  # "dirichlet" divides classes, and these have none
        self.partition = Partition(partition, None, client_index, num_clients)
        for name, value in (("num_train", num_train), ("num_validation", num_validation), ("num_test", num_test)):
            check_int(name, value, 1, none="the whole split")
        self.save_hyperparameters(ignore=[] if isinstance(tokenizer, (str, type(None))) else ["tokenizer"])
        self.text_column = text_column
        self.limits = {"train": num_train, "validation": num_validation, "test": num_test}
        files = {"train": train_file, "validation": validation_file, "test": test_file}
        if data_dir is None and not any(files.values()):
            raise UserError("TextLMDataModule has no data: set data_dir, or train_file / validation_file / test_file")
        self.sources = local_sources(data_dir, files)
        if "validation" in self.sources and self.sources["validation"].carved:
            raise UserError(f"validation_file and train_file are the same file ({self.sources['train'].describe()})")

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
        if split == "train":  # this client's share
            indices = self.partition.shard(indices, None, self.seed, f"the train split ({source.describe()})")
        texts = list(dataset.select(indices)[self.text_column])
        check_has_text(texts, f"text_column={self.text_column!r}", self.text_column, source)
        for row, text in zip(indices, texts, strict=True):
            if not isinstance(text, str):
                raise UserError(f"example {row} of the {split} split ({source.describe()}): column "
                                 f"{self.text_column!r} holds {text!r}, not a string")
        max_length = self.max_length
        encoded = self.tokenizer(texts, truncation=max_length is not None, max_length=max_length)["input_ids"]
        rows = [list(ids) for ids in encoded if len(ids) >= 2]
        if len(rows) < len(encoded):
            dropped = len(encoded) - len(rows)
            rank_zero_warn(f"{split}: dropped {dropped} texts of fewer than 2 tokens ({source.describe()})")
        if not rows:
            raise UserError(
                f"{split} split is empty after dropping texts of fewer than 2 tokens ({source.describe()})"
            )
        return ListDataset(rows)
