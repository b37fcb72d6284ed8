"""Tasks, templates and DataModules: exact prompts, the batch contract, truncation, sampling, loading, bad input.

Tokenizers are built in the test (no download): a word-level one (one token per word or punctuation mark,
so token counts are easy to read) with a BOS post-processor, and a GPT-2-style byte-level BPE trained on a
few sentences, whose label words carry a leading space as in real models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from hosl_lightning.data import (
    ASSETS_DIR,
    IGNORE_INDEX,
    TASK_NAMES,
    TASKS,
    EpochShuffle,
    PromptClassificationDataModule,
    TextLMDataModule,
    get_task,
    sample_train,
    seeded_order,
    special_prefix,
)

datasets.disable_progress_bars()

WORDS = (
    "a an the movie film plot was is it It great terrible fine bad good long text story no yes Yes No Maybe "
    "ok and of to in on that this does Does mean true or word same meaning these two sentences Suppose Can "
    "we infer previous sentence pronoun refer In he she cat dog sat mat ran park".split()
)


def word_tokenizer(bos: bool = True, pad: bool = False) -> PreTrainedTokenizerFast:
    """One token per known word or punctuation run; ``<s>`` prepended when ``bos``."""
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    punctuation = ['.', ',', '?', '"', '!', "'", ':', '?\n', '"?']
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*specials, *WORDS, *punctuation]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    kwargs = {"pad_token": "<pad>"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", **kwargs)


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style: no BOS, no pad token), trained on the bundled sample."""
    texts = [json.loads(line)["text"] for line in (ASSETS_DIR / "rotten_tomatoes" / "train.jsonl").open()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([*texts, "It was great. It was terrible."] * 2, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture
def wtok() -> PreTrainedTokenizerFast:
    return word_tokenizer()


@pytest.fixture(scope="module")
def btok() -> PreTrainedTokenizerFast:
    return bpe_tokenizer()


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


SENTIMENT = [
    {"text": "a great movie", "label": "positive"},
    {"text": "a bad film", "label": "negative"},
    {"text": "the plot was fine", "label": "positive"},
    {"text": "a long bad story", "label": "negative"},
    {"text": "good", "label": "positive"},
]
SENTIMENT_WORDS = {"negative": " terrible", "positive": " great"}


def sentiment_dm(tmp_path: Path, tokenizer: Any, rows: list[dict[str, Any]] | None = None, **kwargs: Any):
    train = write_jsonl(tmp_path / "train.jsonl", rows or SENTIMENT)
    kwargs.setdefault("label_words", SENTIMENT_WORDS)
    kwargs.setdefault("validation_file", str(write_jsonl(tmp_path / "validation.jsonl", rows or SENTIMENT)))
    return PromptClassificationDataModule(tokenizer, train_file=str(train), cache_dir=str(tmp_path / "cache"), **kwargs)


def answer_tokens(batch: dict[str, Any], row: int) -> list[int]:
    return [t for t in batch["labels"][row].tolist() if t != IGNORE_INDEX]


def real_tokens(batch: dict[str, Any], row: int) -> list[int]:
    return batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()


# --- templates ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "example", "prompt"),
    [
        ("sst2", {"sentence": "  a great movie ", "label": 1}, "a great movie It was"),
        ("rte", {"premise": "The cat sat.", "hypothesis": "A cat sat", "label": 0},
         'The cat sat.\nDoes this mean that "A cat sat" is true? Yes or No?\n'),
        ("cb", {"premise": "He ran.", "hypothesis": "he moved", "label": 2},
         'Suppose He ran. Can we infer that "he moved"? Yes, No, or Maybe?\n'),
        ("boolq", {"passage": "Cats purr.", "question": "do cats purr", "label": 1}, "Cats purr. Do cats purr?\n"),
        ("boolq", {"passage": "Cats purr.", "question": "Do cats purr?", "label": 1}, "Cats purr. Do cats purr?\n"),
        ("wsc", {"text": "Tom saw Bob. He waved.", "span1_text": "Tom", "span2_text": "He", "label": 1},
         'Tom saw Bob. He waved.\nIn the previous sentence, does the pronoun "he" refer to Tom? Yes or No?\n'),
        ("wic", {"word": "bank", "sentence1": "The river bank.", "sentence2": "The bank pays.", "label": 0},
         'Does the word "bank" have the same meaning in these two sentences? Yes, No?\n'
         "The river bank.\nThe bank pays.\n"),
        ("rotten_tomatoes", {"text": "Fun.", "label": "positive"}, "Fun. It was"),
    ],
)
def test_builtin_templates_render_mezo_prompts(task: str, example: dict[str, Any], prompt: str) -> None:
    assert TASKS[task].render(example).text == prompt


def test_builtin_label_words_follow_mezo() -> None:
    assert TASKS["sst2"].label_words == {0: " terrible", 1: " great"}
    assert TASKS["rte"].label_words == {0: "Yes", 1: "No"}
    assert TASKS["cb"].label_words == {0: "Yes", 1: "No", 2: "Maybe"}
    assert TASKS["boolq"].label_words == {0: "No", 1: "Yes"}
    assert TASKS["wsc"].label_words == {0: "No", 1: "Yes"}
    assert TASKS["wic"].label_words == {0: "No", 1: "Yes"}
    assert (TASKS["rte"].hub.path, TASKS["rte"].hub.config) == ("aps/super_glue", "rte")
    assert TASKS["wsc"].hub.config == "wsc.fixed" and TASKS["sst2"].hub.path == "nyu-mll/glue"
    assert set(TASK_NAMES) == {"generic", "sst2", "rte", "cb", "boolq", "wsc", "wic", "rotten_tomatoes"}


def test_generic_template_and_span() -> None:
    task = get_task("generic", label_words={0: " bad", 1: " good"}, text_column="review")
    assert task.template == "{review} It was" and task.columns == ["review", "label"]
    prompt = task.render({"review": " nice ", "label": 1})
    assert prompt.text == "nice It was" and prompt.text[slice(*prompt.span)] == "nice"
    custom = get_task("generic", label_words={0: " bad", 1: " good"}, template="Review: {text}\nSentiment:")
    assert custom.render({"text": "ok"}).text == "Review: ok\nSentiment:"
    # labels match by value, and by str() so YAML string keys find int labels
    assert custom.class_index(1) == 1 and custom.class_index("1") == 1 and custom.class_index(True) == 1


def test_overrides_of_a_builtin_task() -> None:
    task = get_task("sst2", label_words={0: " bad", 1: " good"}, template="Review: {sentence}\nIt was")
    assert task.words == [" bad", " good"] and task.truncate_column == "sentence"
    assert TASKS["sst2"].words == [" terrible", " great"]  # the registry is untouched


# --- task-level bad input -------------------------------------------------------------------------------


def test_task_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown task 'sst5'; valid tasks: \['generic', 'sst2'"):
        get_task("sst5")
    with pytest.raises(ValueError, match="task 'generic' needs label_words"):
        get_task("generic")
    valid = r"valid labels: \['negative', 'positive'\]"
    with pytest.raises(ValueError, match=r"label 'neutral' is not in the label-word map .* " + valid):
        get_task("generic", label_words=SENTIMENT_WORDS).class_index("neutral")
    with pytest.raises(ValueError, match="only applies to task 'generic'"):
        get_task("sst2", text_column="text")
    with pytest.raises(ValueError, match="needs label_words mapping at least 2"):
        get_task("generic", label_words={"x": " y"})
    with pytest.raises(ValueError, match="must be a non-empty string"):
        get_task("generic", label_words={0: "", 1: " good"})
    with pytest.raises(ValueError, match="names no column"):
        get_task("generic", label_words=SENTIMENT_WORDS, template="It was")
    with pytest.raises(ValueError, match="empty field"):
        get_task("generic", label_words=SENTIMENT_WORDS, template="{} It was")
    with pytest.raises(ValueError, match="same label word"):
        get_task("generic", label_words={0: " good", 1: " good"})


# --- tokenisation and the batch contract ----------------------------------------------------------------


def test_label_words_tokenise_as_continuations(tmp_path: Path, btok: PreTrainedTokenizerFast) -> None:
    dm = sentiment_dm(tmp_path, btok, task="generic")
    example = dm.dataset("train")[0]
    for word, answer in zip([" terrible", " great"], example.answers, strict=True):
        full = btok("a great movie It was" + word)["input_ids"]
        assert answer == full[len(full) - len(answer):] == btok(word)["input_ids"]
    assert special_prefix(btok) == [] and example.prompt == btok("a great movie It was")["input_ids"]
    assert btok.pad_token_id == btok.eos_token_id  # no pad token: EOS pads


def test_gold_batch_contract(tmp_path: Path, wtok: PreTrainedTokenizerFast) -> None:
    dm = sentiment_dm(tmp_path, wtok, batch_size=5, num_workers=0)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(v.dtype == torch.long and v.shape == batch["input_ids"].shape for v in batch.values())
    great, terrible, bos = wtok.convert_tokens_to_ids(["great", "terrible", "<s>"])
    order = list(EpochShuffle(5, 0))
    for row, index in enumerate(order):
        gold = great if SENTIMENT[index]["label"] == "positive" else terrible
        assert answer_tokens(batch, row) == [gold]
        ids = real_tokens(batch, row)
        assert ids[0] == bos and ids[-1] == gold
        assert wtok.decode(ids[1:-1]) == SENTIMENT[index]["text"] + " It was"
        # labels: only the answer position (the last real token under right padding) is not -100
        last = int(batch["attention_mask"][row].sum()) - 1
        assert (batch["labels"][row] != IGNORE_INDEX).nonzero().flatten().tolist() == [last]
        assert (batch["input_ids"][row, last + 1:] == wtok.pad_token_id).all()


def test_scoring_batch_contract(tmp_path: Path, wtok: PreTrainedTokenizerFast) -> None:
    dm = sentiment_dm(tmp_path, wtok, eval_batch_size=2)
    batch = next(iter(dm.val_dataloader()))
    great, terrible = wtok.convert_tokens_to_ids(["great", "terrible"])
    assert batch["input_ids"].shape[0] == 4 and batch["num_classes"] == 2
    assert batch["class_labels"].tolist() == [1, 0]  # validation keeps file order: positive, negative
    for b in range(2):
        for c, word in enumerate([terrible, great]):
            row = b * 2 + c  # example-major
            assert answer_tokens(batch, row) == [word]
            assert wtok.decode(real_tokens(batch, row)[1:-1]) == SENTIMENT[b]["text"] + " It was"
    assert dm.label_words == {0: " terrible", 1: " great"} and dm.class_names == ["negative", "positive"]


def test_classification_loss_trains_on_scoring_batches(tmp_path: Path, wtok: PreTrainedTokenizerFast) -> None:
    dm = sentiment_dm(tmp_path, wtok, loss="classification", batch_size=3)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 6 and batch["num_classes"] == 2 and batch["class_labels"].shape == (3,)


def test_left_padding_and_explicit_pad_token(tmp_path: Path) -> None:
    tok = word_tokenizer(pad=True)
    dm = sentiment_dm(tmp_path, tok, padding_side="left", eval_batch_size=5)
    batch = next(iter(dm.val_dataloader()))
    pad = tok.convert_tokens_to_ids("<pad>")
    assert tok.pad_token_id == pad
    mask = batch["attention_mask"]
    assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()  # real tokens flush right
    assert (batch["input_ids"][mask == 0] == pad).all() and (batch["labels"][mask == 0] == IGNORE_INDEX).all()
    assert (batch["labels"][:, -1] != IGNORE_INDEX).all()  # the answer is the last column


def test_multi_token_answers_and_multi_class(tmp_path: Path, wtok: PreTrainedTokenizerFast) -> None:
    rows = [{"text": "the cat sat", "label": c} for c in (0, 1, 2)]
    words = {0: " yes", 1: " no it was bad", 2: " Maybe"}
    dm = sentiment_dm(tmp_path, wtok, rows=rows, label_words=words, eval_batch_size=3)
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape[0] == 9 and batch["num_classes"] == 3
    assert [len(answer_tokens(batch, r)) for r in range(3)] == [1, 4, 1]
    assert batch["class_labels"].tolist() == [0, 1, 2]


# --- truncation -----------------------------------------------------------------------------------------


def test_truncation_cuts_the_text_from_the_left(tmp_path: Path, wtok: PreTrainedTokenizerFast) -> None:
    """The text part loses its first tokens; the template's " It was" and the answer stay whole."""
    long_text = " ".join(["a"] * 20 + ["the", "cat", "sat", "on", "the", "mat"])
    rows = [{"text": long_text, "label": "positive"}, {"text": "a bad film", "label": "negative"}]
    dm = sentiment_dm(tmp_path, wtok, rows=rows, max_length=10, eval_batch_size=2)
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape[1] == 10
    # 10 = <s> + the last 6 words of the text + "It was" + the answer: the text lost its first 20 words
    kept = wtok.convert_ids_to_tokens(real_tokens(batch, 1))
    assert kept == ["<s>", "the", "cat", "sat", "on", "the", "mat", "It", "was", "great"]
    assert answer_tokens(batch, 1) == wtok.convert_tokens_to_ids(["great"])
    short = wtok.convert_ids_to_tokens(real_tokens(batch, 2))
    assert short == ["<s>", "a", "bad", "film", "It", "was", "terrible"]  # untouched


def test_truncation_of_a_middle_field_keeps_the_rest(tmp_path: Path, wtok: PreTrainedTokenizerFast) -> None:
    premise = " ".join(["the dog ran"] * 10) + " in the park."
    rows = [{"premise": premise, "hypothesis": "a dog ran", "label": 0}]
    dm = sentiment_dm(tmp_path, wtok, rows=rows, task="rte", label_words=None, max_length=30)
    example = dm.dataset("train")[0]
    assert len(example.prompt) + max(map(len, example.answers)) == 30
    text = wtok.decode(example.prompt[1:])
    assert text.endswith('the park . Does this mean that " a dog ran " is true ? Yes or No ?')


def test_truncation_error_when_template_and_answer_do_not_fit(tmp_path: Path, wtok: PreTrainedTokenizerFast) -> None:
    dm = sentiment_dm(tmp_path, wtok, max_length=3)  # <s> + "It was" + answer needs 4
    match = r"example 0 of the train split .* does not fit max_length=3 even with column 'text' cut away"
    with pytest.raises(ValueError, match=match):
        dm.setup("fit")


# --- sampling -------------------------------------------------------------------------------------------


def test_seeded_order_matches_mezo_numpy_permutation() -> None:
    import numpy as np

    np.random.seed(7)
    assert seeded_order(10, 7) == np.random.permutation(10).tolist()


def test_k_shot_is_balanced_and_seeded() -> None:
    classes = [0] * 30 + [1] * 10 + [2] * 5
    names = ["a", "b", "c"]
    first, _ = sample_train(classes, seed=1, names=names, where="x", k_shot=4)
    again, _ = sample_train(classes, seed=1, names=names, where="x", k_shot=4)
    other, _ = sample_train(classes, seed=2, names=names, where="x", k_shot=4)
    assert first == again and first != other and len(set(first)) == 12
    assert sorted(classes[i] for i in first) == [0] * 4 + [1] * 4 + [2] * 4
    with pytest.raises(ValueError, match=r"k_shot=6 .* fewer for labels \{'c': 5\}"):
        sample_train(classes, seed=1, names=names, where="x", k_shot=6)


def test_carved_validation_is_disjoint_and_follows_mezo() -> None:
    classes = [0, 1] * 10
    order = seeded_order(20, 3)
    train, validation = sample_train(classes, seed=3, names=[0, 1], where="x", num_train=8, carve=5)
    assert train == order[:8] and validation == order[8:13]
    train, validation = sample_train(classes, seed=3, names=[0, 1], where="x", carve=5)
    assert sorted(train + validation) == list(range(20)) and validation == order[15:]
    train, validation = sample_train(classes, seed=3, names=[0, 1], where="x", k_shot=2, carve=4)
    assert not set(train) & set(validation) and len(validation) == 4


def test_datamodule_k_shot_and_caps(tmp_path: Path, wtok: PreTrainedTokenizerFast) -> None:
    rows = [{"text": f"the cat sat {i}", "label": "positive" if i % 3 else "negative"} for i in range(30)]
    dm = sentiment_dm(tmp_path, wtok, rows=rows, k_shot=4, num_validation=7, seed=5)
    dm.setup("fit")
    labels = [ex.label for ex in dm.dataset("train")]
    assert sorted(labels) == [0] * 4 + [1] * 4 and len(dm.dataset("validation")) == 7
    dm2 = sentiment_dm(tmp_path, wtok, rows=rows, k_shot=4, num_validation=7, seed=5)
    assert [ex.prompt for ex in dm2.dataset("train")] == [ex.prompt for ex in dm.dataset("train")]
    with pytest.raises(ValueError, match=r"k_shot=11 .* fewer for labels \{'negative': 10\}"):
        sentiment_dm(tmp_path, wtok, rows=rows, k_shot=11).setup("fit")
    with pytest.warns(UserWarning, match="num_train=100 but the train split"):
        assert len(sentiment_dm(tmp_path, wtok, rows=rows, num_train=100).dataset("train")) == 30


def test_validation_carved_from_the_train_file(tmp_path: Path, wtok: PreTrainedTokenizerFast) -> None:
    rows = [{"text": f"the cat sat {i}", "label": "positive" if i % 2 else "negative"} for i in range(20)]
    train = str(write_jsonl(tmp_path / "all.jsonl", rows))
    dm = PromptClassificationDataModule(wtok, label_words=SENTIMENT_WORDS, train_file=train, validation_file=train,
                                        num_validation=6, cache_dir=str(tmp_path / "c"))
    dm.setup("fit")
    assert len(dm.dataset("train")) == 14 and len(dm.dataset("validation")) == 6
    assert not set(dm._indices["train"]) & set(dm._indices["validation"])
    with pytest.raises(ValueError, match="carves its validation examples out of the train split .* set num_validation"):
        PromptClassificationDataModule(wtok, label_words=SENTIMENT_WORDS, train_file=train, validation_file=train)


def test_training_shuffle_is_seeded_by_epoch(tmp_path: Path, wtok: PreTrainedTokenizerFast) -> None:
    loader = sentiment_dm(tmp_path, wtok, seed=3).train_dataloader()
    assert isinstance(loader.sampler, EpochShuffle)
    first = list(loader.sampler)
    loader.sampler.set_epoch(1)
    assert list(loader.sampler) != first and sorted(loader.sampler) == first.__class__(range(5))


def test_shuffle_seed_reorders_the_same_examples(tmp_path: Path, wtok: PreTrainedTokenizerFast) -> None:
    rows = [{"text": f"the cat sat {i}", "label": "positive" if i % 2 else "negative"} for i in range(40)]
    plain = sentiment_dm(tmp_path, wtok, rows=rows, num_train=20, seed=3)
    same = sentiment_dm(tmp_path, wtok, rows=rows, num_train=20, seed=3, shuffle_seed=3)
    other = sentiment_dm(tmp_path, wtok, rows=rows, num_train=20, seed=3, shuffle_seed=4)
    for dm in (plain, same, other):
        dm.setup("fit")
    assert plain._indices["train"] == other._indices["train"]  # the same sample
    assert list(plain.train_dataloader().sampler) == list(same.train_dataloader().sampler)
    assert list(plain.train_dataloader().sampler) != list(other.train_dataloader().sampler)
    with pytest.raises(ValueError, match=r"shuffle_seed='4' is not valid: it must be an integer, or None for seed"):
        sentiment_dm(tmp_path, wtok, shuffle_seed="4")


# --- loading --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", ["jsonl", "csv", "parquet"])
def test_local_formats_by_extension(tmp_path: Path, wtok: PreTrainedTokenizerFast, ext: str) -> None:
    frame = pd.DataFrame(SENTIMENT)
    for split in ("train", "validation", "test"):
        path = tmp_path / f"{split}.{ext}"
        if ext == "jsonl":
            frame.to_json(path, orient="records", lines=True)
        elif ext == "csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_parquet(path)
    dm = PromptClassificationDataModule(wtok, data_dir=str(tmp_path), label_words=SENTIMENT_WORDS,
                                        cache_dir=str(tmp_path / "c"))
    dm.setup()
    assert [len(dm.dataset(s)) for s in ("train", "validation", "test")] == [5, 5, 5]
    assert [ex.label for ex in dm.dataset("test")] == [1, 0, 1, 0, 1]


def test_int_labels_from_csv_with_string_keys(tmp_path: Path, wtok: PreTrainedTokenizerFast) -> None:
    frame = pd.DataFrame({"review": ["a great movie", "a bad film"], "stars": [1, 0]})
    frame.to_csv(tmp_path / "train.csv", index=False)
    dm = PromptClassificationDataModule(wtok, train_file=str(tmp_path / "train.csv"), text_column="review",
                                        label_column="stars", label_words={"0": " terrible", "1": " great"},
                                        cache_dir=str(tmp_path / "c"))
    assert sorted(ex.label for ex in dm.dataset("train")) == [0, 1]


def test_bundled_rotten_tomatoes_sample(btok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    dm = PromptClassificationDataModule(btok, task="generic", data_dir=str(ASSETS_DIR / "rotten_tomatoes"),
                                        label_words=SENTIMENT_WORDS, max_length=64, cache_dir=str(tmp_path / "c"))
    dm.setup()
    sizes = [len(dm.dataset(s)) for s in ("train", "validation", "test")]
    assert sizes == [512, 200, 200]
    assert sum(ex.label for ex in dm.dataset("train")) == 290  # positives in the first 512 lines
    batch = next(iter(dm.val_dataloader()))
    assert btok.decode(real_tokens(batch, 1)).endswith(" It was great") and batch["input_ids"].shape[1] <= 64
    named = PromptClassificationDataModule(btok, task="rotten_tomatoes", num_train=64, cache_dir=str(tmp_path / "c"))
    assert len(named.dataset("train")) == 64 and named.label_words == {0: " terrible", 1: " great"}
    assert (ASSETS_DIR / "rotten_tomatoes" / "SOURCE.md").is_file()


def test_hub_task_loads_by_name(monkeypatch: pytest.MonkeyPatch, wtok: PreTrainedTokenizerFast) -> None:
    """The hub code path, with datasets.load_dataset faked: MeZO's splits (dev carved from train, test = validation)."""
    calls = []
    data = {split: datasets.Dataset.from_list(
        [{"premise": f"the cat sat {i}", "hypothesis": "a cat sat", "idx": i, "label": i % 2} for i in range(n)])
        for split, n in (("train", 12), ("validation", 6))}

    def fake_load_dataset(path: str, name: str | None = None, *, split: str, **kwargs: Any) -> datasets.Dataset:
        calls.append((path, name, split, kwargs.get("revision")))
        return data[split]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dm = PromptClassificationDataModule(wtok, task="rte", num_train=8, num_validation=4, num_test=5)
    dm.setup()
    assert [len(dm.dataset(s)) for s in ("train", "validation", "test")] == [8, 4, 5]
    assert ("aps/super_glue", "rte", "train", "refs/convert/parquet") in calls
    assert ("aps/super_glue", "rte", "validation", "refs/convert/parquet") in calls  # our test = hub validation
    with pytest.raises(ValueError, match="carves its validation .* set num_validation"):
        PromptClassificationDataModule(wtok, task="sst2")


# --- bad input ------------------------------------------------------------------------------------------


def test_label_not_in_map(tmp_path: Path, wtok: PreTrainedTokenizerFast) -> None:
    rows = [*SENTIMENT, {"text": "ok", "label": "neutral"}]
    dm = sentiment_dm(tmp_path, wtok, rows=rows)
    with pytest.raises(ValueError, match=r"example 5 of the train split \(file .*train.jsonl'\): label 'neutral' "
                                         r"is not in the label-word map .* valid labels: \['negative', 'positive'\]"):
        dm.setup("fit")


def test_empty_files_and_splits(tmp_path: Path, wtok: PreTrainedTokenizerFast) -> None:
    (tmp_path / "train.jsonl").write_text("")
    dm = PromptClassificationDataModule(wtok, train_file=str(tmp_path / "train.jsonl"), label_words=SENTIMENT_WORDS)
    with pytest.raises(ValueError, match=r"train split is empty: file '.*train.jsonl' holds no examples"):
        dm.setup("fit")
    (tmp_path / "test.csv").write_text("text,label\n")
    dm = PromptClassificationDataModule(wtok, test_file=str(tmp_path / "test.csv"), label_words=SENTIMENT_WORDS,
                                        cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"test split is empty: file '.*test.csv' holds no examples"):
        dm.setup("test")
    with pytest.raises(ValueError, match=r"stage 'validate' needs a validation split, but none was given"):
        dm.setup("validate")
    with pytest.raises(ValueError, match="task 'generic' has no data"):
        PromptClassificationDataModule(wtok, label_words=SENTIMENT_WORDS)
    with pytest.raises(ValueError, match="unknown extension '.txt'"):
        dm = PromptClassificationDataModule(wtok, train_file=str(tmp_path / "x.txt"), label_words=SENTIMENT_WORDS)
        dm.setup("fit")


def test_template_naming_a_missing_column(tmp_path: Path, wtok: PreTrainedTokenizerFast) -> None:
    dm = sentiment_dm(tmp_path, wtok, template="{review} It was")
    match = (r"the template '\{review\} It was' names column\(s\) \['review'\] missing from the train split .* "
             r"available columns: \['text', 'label'\]")
    with pytest.raises(ValueError, match=match):
        dm.setup("fit")
    with pytest.raises(ValueError, match=r"label_column names column\(s\) \['stars'\]"):
        sentiment_dm(tmp_path, wtok, label_column="stars").setup("fit")


def test_missing_field_value(tmp_path: Path, wtok: PreTrainedTokenizerFast) -> None:
    dm = sentiment_dm(tmp_path, wtok, rows=[*SENTIMENT, {"text": None, "label": "positive"}])
    with pytest.raises(ValueError, match="example 5 of the train split .* has no value in column 'text'"):
        dm.setup("fit")


def test_label_word_that_tokenises_to_nothing(tmp_path: Path, wtok: PreTrainedTokenizerFast) -> None:
    dm = sentiment_dm(tmp_path, wtok, label_words={"negative": "  ", "positive": " great"})
    with pytest.raises(ValueError, match=r"label word '  ' of label 'negative' .* tokenises to nothing"):
        dm.setup("fit")


def test_invalid_options(wtok: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="loss='mse' is not valid: choose one of 'lm', 'classification'"):
        PromptClassificationDataModule(wtok, label_words=SENTIMENT_WORDS, loss="mse")
    with pytest.raises(ValueError, match=r"padding_side='middle' is not valid"):
        PromptClassificationDataModule(wtok, label_words=SENTIMENT_WORDS, padding_side="middle")
    with pytest.raises(ValueError, match="k_shot=0 is not valid: it must be an integer >= 1, or None for no per-class"):
        PromptClassificationDataModule(wtok, label_words=SENTIMENT_WORDS, k_shot=0)
    with pytest.raises(ValueError, match="num_test=0 is not valid: it must be an integer >= 1, or None for the whole"):
        PromptClassificationDataModule(wtok, label_words=SENTIMENT_WORDS, num_test=0)
    with pytest.raises(ValueError, match="both choose the training sample"):
        PromptClassificationDataModule(wtok, label_words=SENTIMENT_WORDS, k_shot=2, num_train=4)
    with pytest.raises(ValueError, match="no tokenizer"):
        _ = PromptClassificationDataModule(None, task="rotten_tomatoes").tokenizer


def test_tokenizer_can_be_handed_over_later(tmp_path: Path, wtok: PreTrainedTokenizerFast) -> None:
    dm = sentiment_dm(tmp_path, None)
    dm.tokenizer = wtok
    assert dm.tokenizer is wtok and len(dm.dataset("train")) == 5


# --- plain causal-LM data ----------------------------------------------------------------------------


def test_text_lm_datamodule(tmp_path: Path, wtok: PreTrainedTokenizerFast) -> None:
    rows = [{"text": "the cat sat on the mat"}, {"text": "a dog ran"}, {"text": ""}, {"text": " ".join(["a"] * 30)}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    cache = str(tmp_path / "c")
    dm = TextLMDataModule(wtok, train_file=str(tmp_path / "train.jsonl"), max_length=8, batch_size=4, cache_dir=cache)
    with pytest.warns(UserWarning, match="dropped 1 texts of fewer than 2 tokens"):
        dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, EpochShuffle)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (3, 8)  # the 31-token text is cut to max_length
    mask = batch["attention_mask"].bool()
    assert torch.equal(batch["labels"][mask], batch["input_ids"][mask])
    assert (batch["labels"][~mask] == IGNORE_INDEX).all() and (~mask).any()
    assert dm.val_dataloader() == []  # no validation split: Lightning skips validation
    with pytest.raises(ValueError, match=r"text_column names column\(s\) \['body'\] missing"):
        TextLMDataModule(wtok, train_file=str(tmp_path / "train.jsonl"), text_column="body", cache_dir=cache).setup()
    write_jsonl(tmp_path / "validation.jsonl", [{"text": "a"}])  # one token without BOS: no next-token target
    with pytest.raises(ValueError, match="validation split is empty after dropping"):
        TextLMDataModule(word_tokenizer(bos=False), validation_file=str(tmp_path / "validation.jsonl"),
                         cache_dir=cache).setup("validate")


# --- with a Trainer -------------------------------------------------------------------------------------


class _CountBatches(L.LightningModule):
    """Consumes batches without a model: checks the DataModule drives fit and validate end to end."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.rows: dict[str, int] = {"train": 0, "val": 0}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.rows["train"] += batch["input_ids"].shape[0]
        return self.weight * batch["labels"].ne(IGNORE_INDEX).sum()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        assert batch["input_ids"].shape[0] == batch["class_labels"].shape[0] * batch["num_classes"]
        self.rows["val"] += batch["class_labels"].shape[0]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_fit_with_a_trainer(tmp_path: Path, wtok: PreTrainedTokenizerFast) -> None:
    dm = sentiment_dm(tmp_path, wtok, batch_size=2, eval_batch_size=3)
    module = _CountBatches()
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu")
    trainer.fit(module, datamodule=dm)
    assert module.rows == {"train": 5, "val": 5}


def test_inside_tokenized_once_alike_datamodules_tokenise_a_split_once(
    tmp_path: Path, wtok: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hosl_lightning.data import tokenized_once

    built: list[str] = []
    original = PromptClassificationDataModule._build
    monkeypatch.setattr(PromptClassificationDataModule, "_build",
                        lambda self, split: built.append(split) or original(self, split))
    with tokenized_once():
        first = sentiment_dm(tmp_path, wtok).dataset("train")
        again = sentiment_dm(tmp_path, wtok).dataset("train")  # a new DataModule configured alike
        assert built == ["train"] and [a is b for a, b in zip(first, again)] == [True] * len(first)
        assert again is not first  # its own dataset object, over the same examples
        sentiment_dm(tmp_path, wtok, batch_size=2, num_workers=0).dataset("train")  # loader options only: shared
        assert built == ["train"]
        shorter = sentiment_dm(tmp_path, wtok, max_length=4).dataset("train")  # another hyperparameter
        assert built == ["train", "train"] and shorter[0].prompt != first[0].prompt
        sentiment_dm(tmp_path, word_tokenizer()).dataset("train")  # another tokenizer instance
        assert built == ["train"] * 3
    sentiment_dm(tmp_path, wtok).dataset("train")  # outside: built again
    assert built == ["train"] * 4
