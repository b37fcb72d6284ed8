"""Tokenisation for prompt classification: the tokenizer, prompts and label words as token ids, truncation.

The prompt is tokenised on its own and each label word as the continuation of the prompt (the tail of the
tokens of prompt + word, so a SentencePiece tokenizer's word-boundary marks come out as they would in
running text); when the two disagree on the prompt's tokens, the word's own tokens are used. Trailing
special tokens (an EOS some tokenizers append) are left off: nothing is predicted after the answer.

Truncation never cuts the answer. With ``max_length``, a prompt that does not fit beside its longest label
word loses tokens from the LEFT of one field, the task's ``truncate_column`` (the SST-2 sentence, the RTE
premise, the BoolQ passage): the template's own words, the other fields and the answer are kept whole, so
"... the end of a long review It was great" keeps " It was". When even an empty field leaves too many
tokens, the error names the example.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from hosl_lightning.core.options import UserError
from hosl_lightning.data.tasks import ClassificationTask, Prompt
from hosl_lightning.models import resolve_source


def resolve_tokenizer(tokenizer: str | PreTrainedTokenizerBase, **kwargs: Any) -> PreTrainedTokenizerBase:
    """A tokenizer instance (loaded by name or path when given a string) with a pad token.

    A tokenizer without a pad token gets its EOS token as pad: padded positions are masked out of
    attention and labels, so which id fills them does not matter, only that it is a real token id.
    """
    if isinstance(tokenizer, str):  # hub id, local path, .gguf file or alias, as for the model
        gguf_file = kwargs.pop("gguf_file", None)
        source, gguf = resolve_source(tokenizer, gguf_file, option="tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf} if gguf else {}), **kwargs)
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        kind = type(tokenizer).__name__
        raise TypeError(f"tokenizer must be a name, a path or a PreTrainedTokenizerBase, got {kind}")
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise UserError(
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


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of one classification example: its prompt (with leading special tokens) and each class's answer."""

    prompt: list[int]
    answers: list[list[int]]
    label: int


class PromptEncoder:
    """Token ids for prompts and label words of one task, with answer-preserving truncation (module docstring)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, task: ClassificationTask, max_length: int | None) -> None:
        self.tokenizer, self.task, self.max_length = tokenizer, task, max_length
        self.prefix = special_prefix(tokenizer)
        self.word_ids = [self._word_ids(value, word) for value, word in task.label_words.items()]
        self._check_distinct()
        self.truncated = 0

    def _check_distinct(self) -> None:
        """Refuse label words the model could not tell apart: a word the tokenizer does not know (it becomes the
        unknown token) or two words with the same token ids. Both score identical classes; the run would exit 0
        with a loss stuck at ln(classes). Strings that differ are no proof: tokens are what the model sees."""
        unknown = self.tokenizer.unk_token_id
        words = list(self.task.label_words.items())
        for (value, word), ids in zip(words, self.word_ids, strict=True):
            if unknown is not None and unknown in ids:
                raise UserError(f"label_words {{{value!r}: {word!r}}} is not valid: the tokenizer does not know "
                                f"{word!r} (it becomes the unknown token {self.tokenizer.unk_token!r}); choose a word "
                                f"the tokenizer has (task {self.task.name!r})")
        seen: dict[tuple[int, ...], tuple[Hashable, str]] = {}
        for (value, word), ids in zip(words, self.word_ids, strict=True):
            if tuple(ids) in seen:
                other, other_word = seen[tuple(ids)]
                raise UserError(f"label_words {{{other!r}: {other_word!r}, {value!r}: {word!r}}} is not valid: both "
                                f"words tokenise to the same ids {list(ids)}, so the two classes cannot be told apart; "
                                f"choose words with different tokens (task {self.task.name!r})")
            seen[tuple(ids)] = (value, word)

    def _word_ids(self, value: Hashable, word: str) -> list[int]:
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise UserError(
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
            raise UserError(
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
            raise UserError("truncating a prompt needs character offsets, which only fast tokenizers give; "
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
