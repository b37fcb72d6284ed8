"""Data that needs no download: a synthetic next-token task for smoke runs, tests and the quickstart.

Each sequence is an arithmetic progression of token ids modulo the vocabulary (start and stride drawn at
random), so the model must infer the stride from context: easy to learn, impossible to memorise, and the
falling loss is visible within a couple hundred steps on a tiny model.
"""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Subset

from hosl_lightning.core.options import check_choice, check_int
from hosl_lightning.data.partition import Partition
from hosl_lightning.data.sampling import EpochShuffle


class ProgressionDataset(Dataset):
    """``size`` sequences of ``length`` tokens ``(start + i * stride) % vocab_size``, labels = inputs."""

    def __init__(self, size: int, length: int, vocab_size: int, max_stride: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab_size, (size, 1), generator=generator)
        stride = torch.randint(1, max_stride + 1, (size, 1), generator=generator)
        self.input_ids = (start + stride * torch.arange(length)) % vocab_size

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class SyntheticLMDataModule(LightningDataModule):
    """Train/validation splits of ``ProgressionDataset`` (no files, no tokenizer).

    Args:
        vocab_size: token ids are drawn below this; match the model's vocabulary.
        seq_len: tokens per sequence.
        max_stride: strides are drawn from ``[1, max_stride]``.
        train_size: number of training sequences.
        val_size: number of validation sequences.
        batch_size: sequences per batch.
        seed: data seed (validation uses ``seed + 1``).
        partition: how the clients share the training sequences, as
            :class:`~hosl_lightning.PromptClassificationDataModule`'s (``"none"`` or ``"iid"``: no classes here).
        client_index: which share this client takes, as there.
        num_clients: how many shares there are, as there.
    """

    def __init__(
        self,
        vocab_size: int = 128,
        seq_len: int = 32,
        max_stride: int = 4,
        train_size: int = 4096,
        val_size: int = 256,
        batch_size: int = 16,
        seed: int = 0,
        partition: Literal["none", "iid"] = "none",
        client_index: int | None = None,
        num_clients: int | None = None,
    ) -> None:
        super().__init__()
        check_choice("partition", partition, ("none", "iid"))  # "dirichlet" divides classes, and these have none
        self.partition = Partition(partition, None, client_index, num_clients)
        for key, value, low in (("vocab_size", vocab_size, 2), ("seq_len", seq_len, 2), ("max_stride", max_stride, 1),
                                ("train_size", train_size, 1), ("val_size", val_size, 1), ("batch_size", batch_size, 1)):
            check_int(key, value, low)
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        train = ProgressionDataset(h.train_size, h.seq_len, h.vocab_size, h.max_stride, h.seed)
        shard = self.partition.shard(range(h.train_size), None, h.seed, "the synthetic train split")
        self.train_set = train if self.partition.scheme == "none" else Subset(train, shard)  # this client's share
        self.val_set = ProgressionDataset(h.val_size, h.seq_len, h.vocab_size, h.max_stride, h.seed + 1)

    def train_dataloader(self) -> DataLoader:
        sampler = EpochShuffle(len(self.train_set), self.hparams.seed)
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size)
