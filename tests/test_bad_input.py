"""Bad input fails early with one message format, ``name=value is not valid: <what is valid>``.

Model paths, model types, local data files (malformed JSON lines, non-UTF-8 text, an all-empty text column),
``max_length`` past the model's positions, and per-side adapter configs. Every model and tokenizer is built
here from a config or a word list: nothing is downloaded.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import pytest
import torch
from conftest import TINY_LLAMA, quiet_trainer, tiny_data
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

from hosl_lightning import HOSLModule, HOSLStrategy
from hosl_lightning.core.options import UserError
from hosl_lightning.data import PromptClassificationDataModule, TextLMDataModule, resolve_tokenizer
from hosl_lightning.lightning.callbacks import PredictionWriter
from hosl_lightning.models import add_adapters, deferred_weights, load_causal_lm, resolve_source

datasets.disable_progress_bars()

WORDS = ["<unk>", "<pad>", "</s>", "a", "the", "cat", "dog", "sat", "ran", "on", "mat", "park", "great", "bad", "movie",
         "film", "It", "was"]
FAMILIES = r"supported families: 'gpt2', 'gpt_neox', 'llama', 'mistral', 'opt', 'qwen2', 'qwen3'"
TINY_GPT2 = {"model_type": "gpt2", "vocab_size": len(WORDS), "n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 16}
TINY_T5 = T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)


def tokenizer(**kwargs: Any) -> PreTrainedTokenizerFast:
    """One token per word; no BOS."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                                   **kwargs)


def tiny(config: dict[str, Any]) -> Any:
    config = dict(config)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))


def write_lines(path: Path, lines: list[str], encoding: str = "utf-8") -> Path:
    path.write_bytes("".join(line + "\n" for line in lines).encode(encoding))
    return path


def text_dm(path: Path, **kwargs: Any) -> TextLMDataModule:
    kwargs.setdefault("train_file", str(path))
    return TextLMDataModule(kwargs.pop("tok", None) or tokenizer(), cache_dir=str(path.parent / "cache"), **kwargs)


# --- 1. model paths ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["/no/such/model", "./no-such-model", "../no-such-model", "~/no-such-model-xyz",
                                  "models/tiny/llama", "no-such-model.Q4_0.gguf"])
def test_a_path_that_does_not_exist_is_named(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    expected = rf"model='{re.escape(name)}' is not valid: no such file or directory; give a model directory"
    with pytest.raises(FileNotFoundError, match=expected):
        load_causal_lm(name)
    with deferred_weights(), pytest.raises(FileNotFoundError, match=expected):
        load_causal_lm(name)


def test_a_name_that_is_no_path_stays_a_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_source("owner/name") == ("owner/name", None)
    assert resolve_source("gpt2") == ("gpt2", None)
    (tmp_path / "owner" / "local").mkdir(parents=True)
    (tmp_path / "owner" / "local" / "config.json").write_text("{}")
    assert resolve_source("owner/local") == ("owner/local", None)  # an existing path wins, as in transformers


def test_a_directory_without_a_model_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"model='{folder}' is not valid: an empty directory"):
        load_causal_lm(str(folder))
    (folder / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=rf"model='{folder}' is not valid: the directory holds no config.json"):
        load_causal_lm(str(folder))
    tiny(TINY_GPT2).config.save_pretrained(folder)
    message = rf"model='{folder}' is not valid: the directory holds config.json but no \*.safetensors or \*.bin"
    with pytest.raises(FileNotFoundError, match=message):
        load_causal_lm(str(folder))
    with deferred_weights(), pytest.raises(FileNotFoundError, match=message):
        load_causal_lm(str(folder))


def test_a_file_that_is_no_gguf_and_a_missing_gguf_file_are_named(tmp_path: Path) -> None:
    tiny(TINY_GPT2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"config.json' is not valid: a file, but not a .gguf file"):
        load_causal_lm(str(tmp_path / "config.json"))
    with pytest.raises(FileNotFoundError, match=r"gguf_file='x.gguf' is not valid: no such file in .*; .gguf files there: \[\]"):
        load_causal_lm(str(tmp_path), gguf_file="x.gguf")


def test_a_missing_gguf_path_says_how_to_name_a_hub_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"a GGUF file on the hub is model='owner/name' with gguf_file="):
        resolve_source(str(tmp_path / "model.Q4_0.gguf"))


def test_a_tokenizer_path_that_does_not_exist_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=rf"tokenizer='{tmp_path}/tok' is not valid: no such file or directory"):
        resolve_tokenizer(str(tmp_path / "tok"))


# --- 2. model types ---------------------------------------------------------------------------------------


def test_a_model_that_is_not_a_causal_lm_is_refused(tmp_path: Path) -> None:
    message = rf"model_type='t5' \(in model_config\) is not valid: not a causal LM; {FAMILIES}"
    with pytest.raises(ValueError, match=message):
        load_causal_lm(model_config={"model_type": "t5"})
    with deferred_weights(), pytest.raises(ValueError, match=message):
        load_causal_lm(model_config={"model_type": "t5"})
    T5ForConditionalGeneration(TINY_T5).save_pretrained(tmp_path)
    message = rf"model_type='t5' \(of model='{tmp_path}'\) is not valid: not a causal LM; {FAMILIES}"
    with pytest.raises(ValueError, match=message):
        load_causal_lm(str(tmp_path))
    with deferred_weights(), pytest.raises(ValueError, match=message):
        load_causal_lm(str(tmp_path))
    with pytest.raises(ValueError, match=r"model_type='t5' \(of the T5ForConditionalGeneration given as model=\)"):
        HOSLModule(model=T5ForConditionalGeneration(TINY_T5))


def test_a_causal_lm_of_an_unsplittable_family_is_refused() -> None:
    with pytest.raises(ValueError, match=rf"model_type='bloom' .* a causal LM family that cannot be split yet; {FAMILIES}"):
        load_causal_lm(model_config={"model_type": "bloom", "n_layer": 1, "hidden_size": 8, "n_head": 2})


# --- 3 and 4. local data files ----------------------------------------------------------------------------


def test_a_malformed_json_line_names_the_file_and_the_line(tmp_path: Path) -> None:
    good = json.dumps({"text": "the cat sat"})
    path = write_lines(tmp_path / "train.jsonl", [good, good, '{"text": "a dog", oops}', good])
    with pytest.raises(ValueError, match=rf"train_file='{path}' is not valid: line 3 is not valid JSON \(.* at column "
                                         r"\d+\); each line must be one JSON object"):
        text_dm(path).setup("fit")
    path = write_lines(tmp_path / "validation.jsonl", [good, "[1, 2]"])
    with pytest.raises(ValueError, match=rf"validation_file='{path}' is not valid: line 2 holds a JSON list, not an object"):
        text_dm(path, train_file=None, validation_file=str(path)).setup("validate")


def test_a_malformed_json_array_file_names_the_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "train.json", ['[{"text": "the cat", "label": "positive"},', '{"text": }]'])
    dm = PromptClassificationDataModule(tokenizer(), train_file=str(path), label_words={"positive": " great", "x": " bad"},
                                        cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=rf"train_file='{path}' is not valid: not valid JSON at line 2, column \d+"):
        dm.setup("fit")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_file_that_is_not_utf8_is_named(tmp_path: Path, suffix: str) -> None:
    lines = [json.dumps({"text": "the cat sat"}), '{"text": "the caf\u00e9 sat"}'] if suffix == ".jsonl" else [
        "text", "the cat sat", "the caf\u00e9 sat"]
    path = write_lines(tmp_path / f"train{suffix}", lines, encoding="latin-1")
    line = 2 if suffix == ".jsonl" else 3
    with pytest.raises(ValueError, match=rf"train_file='{path}' is not valid: line {line} is not UTF-8 text \(byte 0xe9 "
                                         r"at column \d+\); save the file as UTF-8"):
        text_dm(path).setup("fit")


# --- 5. max_length ----------------------------------------------------------------------------------------


def test_max_length_past_the_tokenizers_real_limit_is_refused(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "train.jsonl", [json.dumps({"text": "the cat sat on the mat"})] * 2)
    with pytest.raises(ValueError, match=r"max_length=32 is not valid: the tokenizer \(its model_max_length\) takes at "
                                         r"most 16 positions; set max_length <= 16"):
        text_dm(path, tok=tokenizer(model_max_length=16), max_length=32).setup("fit")
    text_dm(path, max_length=10**6).setup("fit")  # a tokenizer's "no limit" placeholder is no limit


def test_max_length_past_the_config_beside_the_tokenizer_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    tokenizer().save_pretrained(folder)
    tiny(TINY_GPT2).config.save_pretrained(folder)
    path = write_lines(tmp_path / "train.jsonl", [json.dumps({"text": "the cat sat on the mat"})] * 2)
    with pytest.raises(ValueError, match=rf"max_length=32 is not valid: the model whose config is beside the tokenizer "
                                         rf"\('{folder}'\) takes at most 16 positions"):
        text_dm(path, tok=str(folder), max_length=32).setup("fit")


class _HoldsModel(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny(TINY_GPT2)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_max_length_past_the_models_positions_is_refused_before_training(tmp_path: Path) -> None:
    """Without the check, the first long batch raises an IndexError inside torch.embedding."""
    path = write_lines(tmp_path / "train.jsonl", [json.dumps({"text": " ".join(["the cat sat"] * 20)})] * 4)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    with pytest.raises(ValueError, match=r"max_length=32 is not valid: the model \(gpt2\) takes at most 16 positions"):
        trainer.fit(_HoldsModel(), datamodule=text_dm(path, max_length=32))
    strategy = HOSLStrategy(cut_layer=1, q=1)
    with pytest.raises(ValueError, match=r"max_length=128 is not valid: the model \(llama\) takes at most 64 positions"):
        quiet_trainer(strategy).fit(HOSLModule(model_config=TINY_LLAMA), datamodule=text_dm(path, max_length=128))


# --- 6. an all-empty text column --------------------------------------------------------------------------


def test_an_all_empty_text_column_is_refused(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "train.jsonl", [json.dumps({"text": ""}), json.dumps({"text": "  "})])
    with pytest.raises(ValueError, match=rf"text_column='text' is not valid: column 'text' is empty in all 2 examples "
                                         rf"of the train split \(file '{path}'\); name a column that holds the text"):
        text_dm(path).setup("fit")
    csv = write_lines(tmp_path / "validation.csv", ["text,label", '"",0', '"",1'])  # read back as None
    with pytest.raises(ValueError, match=r"text_column='text' is not valid: column 'text' is empty in all 2 examples "
                                         r"of the validation split"):
        text_dm(csv, train_file=None, validation_file=str(csv)).setup("validate")


def test_an_all_empty_prompt_column_is_refused(tmp_path: Path) -> None:
    rows = [json.dumps({"text": "", "hint": "", "label": label}) for label in ("positive", "negative")]
    path = write_lines(tmp_path / "train.jsonl", rows)
    words = {"positive": " great", "negative": " bad"}

    def dm(**kwargs: Any) -> PromptClassificationDataModule:
        return PromptClassificationDataModule(tokenizer(), train_file=str(path), label_words=words,
                                              cache_dir=str(tmp_path / "cache"), **kwargs)

    with pytest.raises(ValueError, match=r"text_column='text' is not valid: column 'text' is empty in all 2 examples "
                                         r"of the train split"):
        dm().setup("fit")
    with pytest.raises(ValueError, match=r"template='\{hint\} It was' is not valid: column 'hint' is empty"):
        dm(template="{hint} It was").setup("fit")


# --- 7. adapter configs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"client_adapter": 5}, TypeError, r"client_adapter=5 is not valid: give a peft config or a dict of its fields"),
        ({"server_adapter": {"rank": 8}}, ValueError,
         r"server_adapter=\{'rank': 8\} is not valid: .*unexpected keyword argument 'rank'"),
        ({"client_adapter": {"peft_type": "nope"}}, ValueError, r"client_adapter peft_type='NOPE' is not valid: choose"),
        ({"server_adapter": {"r": 0}}, ValueError, r"server_adapter r=0 is not valid: it must be an integer >= 1"),
        ({"client_adapter": {"lora_dropout": 1.5}}, ValueError,
         r"client_adapter lora_dropout=1.5 is not valid: it must be a number in \[0, 1\]"),
        ({"client_adapter": {"target_modules": ".*q_proj"}}, ValueError,
         r"client_adapter target_modules='.\*q_proj' is not valid: give a list of module names or 'all-linear'"),
    ],
)
def test_a_bad_adapter_config_names_its_side(options: dict[str, Any], error: type, message: str) -> None:
    pytest.importorskip("peft")
    with pytest.raises(error, match=message):
        HOSLStrategy(cut_layer=1, **options)


def test_an_adapter_that_fails_when_injected_names_its_side() -> None:
    pytest.importorskip("peft")
    model = tiny(TINY_LLAMA)
    with pytest.raises(ValueError, match=r"server_adapter is not valid for this model: "):
        add_adapters(model, 1, None, {"r": 2, "lora_alpha": "eight", "target_modules": ["q_proj"]})


# --- 8. from the bad-input probe: label words, classes, files, vocabularies, predict --------------------------

POLARITY = [{"text": "a great movie", "label": "positive"}, {"text": "a bad film", "label": "negative"}] * 2


def prompt_dm(tmp_path: Path, words: dict[str, str], **kwargs: Any) -> PromptClassificationDataModule:
    train = write_lines(tmp_path / "train.jsonl", [json.dumps(row) for row in POLARITY])
    kwargs.setdefault("validation_file", str(train))
    kwargs.setdefault("num_validation", 2)
    return PromptClassificationDataModule(tokenizer(), train_file=str(train), label_words=words,
                                          cache_dir=str(tmp_path / "cache"), **kwargs)


def test_a_label_word_the_tokenizer_does_not_know_is_refused(tmp_path: Path) -> None:
    """It became <unk>; with two such words both classes scored alike and val_loss stayed ln 2."""
    with pytest.raises(UserError, match=r"label_words \{'positive': ' superb'\} is not valid: the tokenizer does not "
                                        r"know ' superb' \(it becomes the unknown token '<unk>'\)"):
        prompt_dm(tmp_path, {"positive": " superb", "negative": " awful"}).setup("fit")


def test_label_words_with_the_same_token_ids_are_refused(tmp_path: Path) -> None:
    """' great' and 'great ' differ as strings, so the string check passed them; the model sees one token."""
    with pytest.raises(UserError, match=r"label_words \{'positive': ' great', 'negative': 'great '\} is not valid: both "
                                        r"words tokenise to the same ids \[12\]"):
        prompt_dm(tmp_path, {"positive": " great", "negative": "great "}).setup("fit")


def test_a_label_word_for_a_class_no_split_contains_warns(tmp_path: Path) -> None:
    words = {"positive": " great", "negative": " bad", "neutral": " movie"}
    with pytest.warns(UserWarning, match=r"label_words names class\(es\) \['neutral'\] that no split read \(train, "
                                         r"validation\) contains: the task is scored as 3 classes"):
        prompt_dm(tmp_path, words).setup("fit")
    (tmp_path / "two").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every class present: no warning
        prompt_dm(tmp_path / "two", {"positive": " great", "negative": " bad"}).setup("fit")


def test_a_data_dir_without_a_validation_file_fails_at_setup_naming_it(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    write_lines(folder / "train.jsonl", [json.dumps({"text": "the cat sat on the mat"})] * 4)
    dm = TextLMDataModule(tokenizer(), data_dir=str(folder), cache_dir=str(tmp_path / "cache"), batch_size=2)
    trainer = quiet_trainer(HOSLStrategy(cut_layer=1, q=1), limit_val_batches=1)
    with pytest.raises(UserError, match=rf"data_dir='{folder}' holds no validation file \(validation.jsonl, .json, .csv "
                                        r"or .parquet\), but the fit validates \(trainer.limit_val_batches=1\): add a "
                                        r"validation file, .* or set trainer.limit_val_batches=0"):
        trainer.fit(HOSLModule(model_config=TINY_LLAMA), datamodule=dm)
    assert trainer.global_step == 0


def test_a_model_vocabulary_smaller_than_the_tokenizers_is_refused_before_training(tmp_path: Path) -> None:
    """Without the check, the first batch with an id >= vocab_size raised an IndexError inside torch.embedding."""
    path = write_lines(tmp_path / "train.jsonl", [json.dumps({"text": "the dog ran on the mat"})] * 4)
    trainer = quiet_trainer(HOSLStrategy(cut_layer=1, q=1))
    with pytest.raises(UserError, match=rf"tokenizer=.* is not valid for this model: it has {len(WORDS)} tokens, but the "
                                        r"model \(llama\) has 8 rows in its embedding table \(vocab_size\)"):
        trainer.fit(HOSLModule(model_config=dict(TINY_LLAMA, vocab_size=8)), datamodule=text_dm(path, batch_size=2))
    assert trainer.global_step == 0


def test_predict_gives_the_label_word_predictions_that_test_scores(tmp_path: Path) -> None:
    rows = [json.dumps(row) for row in POLARITY]
    test = write_lines(tmp_path / "test.jsonl", rows + [json.dumps({"text": "the dog ran", "label": "positive"})])
    dm = prompt_dm(tmp_path, {"positive": " great", "negative": " bad"}, test_file=str(test), eval_batch_size=2)
    module = HOSLModule(model_config=dict(TINY_LLAMA, vocab_size=len(WORDS)))
    writer = PredictionWriter()
    trainer = quiet_trainer(HOSLStrategy(cut_layer=1, q=1), limit_test_batches=None, limit_predict_batches=None,
                            default_root_dir=str(tmp_path / "run"), callbacks=[writer])
    (scores,) = trainer.test(module, dm, verbose=False)
    batches = trainer.predict(module, dm)
    predicted = torch.cat([batch["prediction"] for batch in batches])
    assert predicted.shape == (5,) and torch.cat([b["scores"] for b in batches]).shape == (5, 2)
    assert torch.equal(predicted, torch.cat([b["scores"] for b in batches]).argmax(-1))
    gold = torch.tensor([0, 1, 0, 1, 0])  # positive = class 0
    assert scores["test_acc"] == pytest.approx(float((predicted == gold).float().mean()))
    written = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert [row["prediction"] for row in written] == predicted.tolist()
    assert [row["label"] for row in written] == [["positive", "negative"][i] for i in predicted.tolist()]


def test_predict_on_a_language_model_dataset_says_what_to_use_instead(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "test.jsonl", [json.dumps({"text": "the cat sat"})] * 2)
    dm = text_dm(path, train_file=None, test_file=str(path))
    hint = r"predict is not valid for this data: it predicts label words of a classification DataModule .* use validate or test"
    with pytest.raises(UserError, match=hint):
        quiet_trainer(HOSLStrategy(cut_layer=1, q=1)).predict(HOSLModule(model_config=TINY_LLAMA), dm)
    with pytest.raises(UserError, match=hint):  # a DataModule without predict batches: before Lightning's own refusal
        quiet_trainer(HOSLStrategy(cut_layer=1, q=1)).predict(HOSLModule(model_config=TINY_LLAMA), tiny_data())


def test_the_command_line_writes_label_word_predictions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hosl_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    tokenizer().save_pretrained(tmp_path / "tok")
    train = write_lines(tmp_path / "train.jsonl", [json.dumps(row) for row in POLARITY])
    test = write_lines(tmp_path / "test.jsonl", [json.dumps(row) for row in POLARITY[:3]])
    main(["predict", f"--model.model_config={json.dumps(dict(TINY_LLAMA, vocab_size=len(WORDS)))}",
          "--data=hosl_lightning.PromptClassificationDataModule", f"--data.init_args.tokenizer={tmp_path / 'tok'}",
          f"--data.init_args.train_file={train}", f"--data.init_args.test_file={test}",
          '--data.init_args.label_words={"positive": " great", "negative": " bad"}', "--trainer.logger=false",
          "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path / 'run'}"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert row["label"] == ["positive", "negative"][row["prediction"]]
        assert row["prediction"] == max(range(2), key=lambda c: row["scores"][c])
