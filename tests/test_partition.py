"""Each client's own share of a training split: disjoint shards that cover it, seeded, and label skew that follows
alpha; in every DataModule, keyed by the client's index (or torchrun's RANK) and the number of clients."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_tasks import SENTIMENT_WORDS, word_tokenizer, write_jsonl

from hosl_lightning.data import Partition, PromptClassificationDataModule, SyntheticLMDataModule, TextLMDataModule

CLIENTS, CLASSES = 5, 4
LABELS = [i % CLASSES for i in range(2000)]


def shards(scheme: str, alpha: float | None = None, seed: int = 0, indices=None) -> list[list[int]]:
    indices = list(range(len(LABELS))) if indices is None else indices
    return [Partition(scheme, alpha, k, CLIENTS).shard(indices, LABELS, seed, "the test split") for k in range(CLIENTS)]


def label_skew(parts: list[list[int]]) -> float:
    """Mean total-variation distance between each client's label distribution and the whole split's."""
    whole = np.bincount(LABELS, minlength=CLASSES) / len(LABELS)
    return float(np.mean([0.5 * np.abs(np.bincount([LABELS[i] for i in p], minlength=CLASSES) / len(p) - whole).sum()
                          for p in parts]))


@pytest.mark.parametrize(("scheme", "alpha"), [("iid", None), ("dirichlet", 0.1), ("dirichlet", 1.0)])
def test_shards_are_disjoint_cover_the_split_and_keep_its_order(scheme: str, alpha: float | None) -> None:
    indices = [int(i) for i in np.random.RandomState(3).permutation(len(LABELS))[:1500]]  # a sample, in its order
    parts = shards(scheme, alpha, indices=indices)
    assert sum(len(p) for p in parts) == len(indices) and set().union(*map(set, parts)) == set(indices)
    assert all(p for p in parts)
    position = {i: n for n, i in enumerate(indices)}
    assert all([position[i] for i in p] == sorted(position[i] for i in p) for p in parts)
    assert parts == shards(scheme, alpha, indices=indices)  # seeded: every client draws the same partition
    assert parts != shards(scheme, alpha, seed=1, indices=indices)


def test_iid_shards_are_equal_and_balanced() -> None:
    parts = shards("iid")
    assert {len(p) for p in parts} == {len(LABELS) // CLIENTS}
    assert label_skew(parts) < 0.05


def test_label_skew_grows_as_alpha_shrinks() -> None:
    skews = [label_skew(shards("dirichlet", alpha)) for alpha in (100.0, 1.0, 0.1)]
    assert skews[0] < 0.05 < skews[1] < skews[2], skews


def test_none_gives_every_client_everything() -> None:
    assert Partition().shard([4, 2, 9], None, 0, "x") == [4, 2, 9]


def test_client_and_clients_come_from_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", str(CLIENTS + 1))  # rank 0 is the server
    assert Partition("iid").shard(range(len(LABELS)), None, 0, "x") == shards("iid")[2]
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=r"^partition='iid' needs this client's index and the number of clients: set "
                                         r"client_index and num_clients, .*RANK='0', WORLD_SIZE='6'"):
        Partition("iid").shard(range(10), None, 0, "x")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"scheme": "random"}, r"^partition='random' is not valid: choose one of 'none', 'iid', 'dirichlet'$"),
    ({"scheme": "iid", "alpha": 0.5}, r"^alpha=0.5 is not valid with partition='iid', which does not use it"),
    ({"scheme": "dirichlet", "alpha": 0.0}, r"^alpha=0.0 is not valid: it must be a number > 0"),
    ({"scheme": "none", "num_clients": 2}, r"^num_clients=2 is not valid with partition='none'"),
    ({"scheme": "iid", "client_index": 2, "num_clients": 2}, r"^client_index=2 is not valid: it must be below num_clients=2"),
])
def test_bad_partition_options_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Partition(**kwargs)


def test_dirichlet_needs_classes() -> None:
    with pytest.raises(ValueError, match=r"^partition='dirichlet' is not valid for the train split: .*use partition='iid'"):
        Partition("dirichlet", None, 0, 2).shard(range(10), None, 0, "the train split")


def _rows(n: int) -> list[dict]:
    words = ["a great movie", "a bad film", "good", "the plot was fine"]
    return [{"text": words[i % 4], "label": "positive" if i % 3 else "negative"} for i in range(n)]


def test_the_classification_datamodule_gives_each_client_its_shard(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", _rows(60))
    tokenizer = word_tokenizer()

    def texts(**kwargs) -> list[list[int]]:
        dm = PromptClassificationDataModule(tokenizer, train_file=str(train), label_words=SENTIMENT_WORDS, **kwargs)
        dm.setup("fit")
        return dm._sample("train")

    whole = texts()
    parts = [texts(partition="dirichlet", alpha=0.5, client_index=k, num_clients=3) for k in range(3)]
    assert sorted(i for p in parts for i in p) == sorted(whole) and all(p for p in parts)
    assert len({i for p in parts for i in p}) == len(whole)


def test_the_text_and_synthetic_datamodules_give_each_client_its_shard(tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"the cat sat on the mat {'a ' * i}"}) + "\n" for i in range(12)))

    def rows(**kwargs) -> list[tuple[int, ...]]:
        dm = TextLMDataModule(word_tokenizer(), train_file=str(train), **kwargs)
        return [tuple(r) for r in dm.dataset("train").items]

    parts = [rows(partition="iid", client_index=k, num_clients=3) for k in range(3)]
    assert sorted(r for p in parts for r in p) == sorted(rows()) and [len(p) for p in parts] == [4, 4, 4]

    def sequences(**kwargs) -> list[tuple[int, ...]]:
        dm = SyntheticLMDataModule(train_size=30, **kwargs)
        dm.setup("fit")
        return [tuple(dm.train_set[i]["input_ids"].tolist()) for i in range(len(dm.train_set))]

    parts = [sequences(partition="iid", client_index=k, num_clients=3) for k in range(3)]
    assert sorted(s for p in parts for s in p) == sorted(sequences()) and [len(p) for p in parts] == [10, 10, 10]
    for module, data in ((TextLMDataModule, {"train_file": str(train)}), (SyntheticLMDataModule, {})):
        with pytest.raises(ValueError, match=r"^partition='dirichlet' is not valid: choose one of 'none', 'iid'$"):
            module(**({"tokenizer": word_tokenizer()} if data else {}), **data, partition="dirichlet")
