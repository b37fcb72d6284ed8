"""The accuracy studies' model, tasks and prompts: what every run of the claims and convergence studies shares."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hosl_lightning import PromptClassificationDataModule

from .environment import ROOT

DEFAULT_DATA = ROOT.parent / "shared" / "data"
MODEL = "smollm2-135m"
MODEL_NAME = "SmolLM2-135M-Instruct"
CUT, MU = 2, 1e-3  # as configs/quickstart.yaml
BATCH, EVAL_BATCH, MAX_LENGTH = 8, 16, 64
# sms_spam: chosen by zero-shot on 160 validation messages among 8 candidates (see benchmarks/README.md, "Retired
# studies": the 16-step accuracy study). "<text> It was" + great/terrible answered "ham" to nearly everything.
SMS_TEMPLATE = "Message: {text}\nIs this message spam or not? Answer:"
SMS_WORDS = {"ham": " No", "spam": " Yes"}
# bbc_news: five topics, articles of ~380 words, left-truncated to fit max_length
BBC_TEMPLATE = "Article: {text}\nTopic:"
BBC_WORDS = {"business": " business", "entertainment": " entertainment", "politics": " politics", "sport": " sport",
             "tech": " technology"}


@dataclass(frozen=True)
class DataSpec:
    """A dataset folder of ``../shared/data`` and how its examples become prompts."""

    name: str
    task: str
    template: str | None = None
    label_words: dict[str, str] | None = None


DATASETS = (  # the convergence study's
    DataSpec("rotten_tomatoes", "rotten_tomatoes"),
    DataSpec("sms_spam", "generic", SMS_TEMPLATE, SMS_WORDS),
)
ALL_DATASETS = (*DATASETS, DataSpec("bbc_news", "generic", BBC_TEMPLATE, BBC_WORDS))  # the claims study's


def datamodule(spec: DataSpec, data_dir: Path, tokenizer: Any, seed: int, **limits: int) -> PromptClassificationDataModule:
    """The prompts of ``spec`` at the studies' batch and length; ``limits``: num_train, num_validation, num_test."""
    return PromptClassificationDataModule(
        tokenizer=tokenizer, task=spec.task, data_dir=str(data_dir / spec.name), template=spec.template,
        label_words=spec.label_words, max_length=MAX_LENGTH, batch_size=BATCH, eval_batch_size=EVAL_BATCH, seed=seed,
        **limits,
    )
