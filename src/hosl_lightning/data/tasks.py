"""Prompt-based classification tasks: templates, label words, and the built-in tasks.

A task turns an example (a row of a ``datasets.Dataset``) into a prompt string, and names one label word
(or short phrase) per class. The model answers by continuing the prompt: it is trained on the label word
of the gold class and evaluated by which class's label word it finds most likely. This is how MeZO
(Malladi et al. 2023) and the HOSL paper fine-tune and score OPT on SST-2, RTE, CB, BoolQ, WSC and WIC.

Templates are ``str.format`` strings over column names, plus an optional ``preprocess`` function for the
few tasks that edit a field first (BoolQ capitalises the question). A format string rather than free code
because the tokeniser needs to know where each field sits in the prompt: when a prompt is too long, only
the ``truncate_column`` field is cut, from its left, so the template's own words around it (e.g. the
" It was" after an SST-2 sentence) and the answer always survive.

Where a task's rows come from (local files, the bundled assets, the hub) is :mod:`hosl_lightning.data.sources`.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from hosl_lightning.core.options import UserError
from hosl_lightning.data.sources import ASSETS_DIR, HubSource

_FORMATTER = string.Formatter()


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt and the character span ``[start, end)`` of its truncatable field."""

    text: str
    span: tuple[int, int]


@dataclass(frozen=True)
class ClassificationTask:
    """One prompt-based classification task.

    Args:
        name: registry name.
        template: ``str.format`` string over column names, e.g. ``"{sentence} It was"``. The prompt ends
            where the answer begins: the label word is appended to it verbatim, so put the space between
            prompt and answer into the label word (``" great"``), as MeZO does.
        label_words: label VALUE (as stored in ``label_column``: an int, a string, a bool) -> label word.
            The class index of a value is its position in this mapping, so ``{0: ..., 1: ...}`` keeps
            class index == label value. Keys also match by ``str()``, so YAML's ``"0"`` finds label ``0``.
        label_column: the column holding the label value.
        truncate_column: the field cut (from its left) when a prompt is too long; default: the
            template's first field.
        preprocess: optional ``fields -> fields`` edit applied before formatting (same keys).
        hub: where to download the task by name (``None``: local files only).
        data_dir: a default local folder with ``train``/``validation``/``test`` files (bundled data).
        source: where the template comes from, for the reader.
    """

    name: str
    template: str
    label_words: Mapping[Hashable, str]
    label_column: str = "label"
    truncate_column: str | None = None
    preprocess: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    hub: HubSource | None = None
    data_dir: str | None = None
    source: str = ""

    def __post_init__(self) -> None:
        fields = self.fields  # validates the template
        if self.truncate_column is None:
            object.__setattr__(self, "truncate_column", fields[0])
        elif self.truncate_column not in fields:
            raise UserError(
                f"truncate_column={self.truncate_column!r} is not a field of the template {self.template!r}; "
                f"fields: {fields}"
            )
        _check_label_words(self.name, self.label_words)

    @property
    def fields(self) -> list[str]:
        """Column names the template reads, in order of first appearance."""
        names: list[str] = []
        for _, name, _, _ in _parse(self.template):
            if name is not None and name not in names:
                names.append(name)
        if not names:
            raise UserError(f"template {self.template!r} names no column; write e.g. '{{text}} It was'")
        return names

    @property
    def columns(self) -> list[str]:
        """Every column the task reads: the template's fields and the label column."""
        return [*self.fields, self.label_column]

    @property
    def num_classes(self) -> int:
        return len(self.label_words)

    @property
    def label_values(self) -> list[Hashable]:
        """Label value of each class index."""
        return list(self.label_words)

    @property
    def words(self) -> list[str]:
        """Label word of each class index."""
        return list(self.label_words.values())

    def class_index(self, value: Any) -> int:
        """Class index of a label value; a clear error listing the valid labels when it has none."""
        values = self.label_values
        if value is not None:
            for index, known in enumerate(values):
                if value == known:
                    return index
            by_str = {str(known): index for index, known in enumerate(values)}
            if str(value) in by_str:
                return by_str[str(value)]
        raise UserError(f"label {value!r} is not in the label-word map of task {self.name!r}; valid labels: {values}")

    def render(self, example: Mapping[str, Any]) -> Prompt:
        """The prompt of one example (the answer is not part of it) and its truncatable span."""
        values = {name: example[name] for name in self.fields}
        if self.preprocess is not None:
            values = self.preprocess(values)
        parts: list[str] = []
        length, span = 0, None
        for literal, name, spec, conversion in _parse(self.template):
            parts.append(literal)
            length += len(literal)
            if name is None:
                continue
            text = _FORMATTER.format_field(_FORMATTER.convert_field(values[name], conversion), spec or "")
            if name == self.truncate_column and span is None:
                span = (length, length + len(text))
            parts.append(text)
            length += len(text)
        assert span is not None  # __post_init__ checked that truncate_column is a field
        return Prompt("".join(parts), span)

    def replace(self, **changes: Any) -> ClassificationTask:
        """A copy with some fields changed (and validated again)."""
        if "template" in changes and "truncate_column" not in changes:
            changes["truncate_column"] = None  # re-derive from the new template
        return dataclasses.replace(self, **changes)


def _parse(template: str) -> list[tuple[str, str | None, str | None, str | None]]:
    try:
        pieces = list(_FORMATTER.parse(template))
    except ValueError as error:
        raise UserError(f"template {template!r} is not a valid format string: {error}") from None
    for _, name, _, _ in pieces:
        if name is not None and name.strip() == "":
            raise UserError(f"template {template!r} has an empty field '{{}}': name a column, e.g. '{{text}}'")
    return pieces


def _check_label_words(task: str, label_words: Mapping[Hashable, str]) -> None:
    if not isinstance(label_words, Mapping) or len(label_words) < 2:
        raise UserError(
            f"task {task!r} needs label_words mapping at least 2 label values to words, "
            f"e.g. {{'negative': ' terrible', 'positive': ' great'}}; got {label_words!r}"
        )
    for value, word in label_words.items():
        if not isinstance(word, str) or word == "":
            raise UserError(f"label word of label {value!r} in task {task!r} must be a non-empty string, got {word!r}")
    as_str = [str(value) for value in label_words]
    if len(set(as_str)) != len(as_str):
        raise UserError(f"label values of task {task!r} collide when compared as strings: {list(label_words)}")
    if len(set(label_words.values())) != len(label_words):
        raise UserError(f"task {task!r} gives two classes the same label word: {dict(label_words)}")


# --- field edits used by the built-in templates -------------------------------------------------------


def strip_strings(values: dict[str, Any]) -> dict[str, Any]:
    """Strip surrounding whitespace from every string field (MeZO strips the SST-2 sentence)."""
    return {name: value.strip() if isinstance(value, str) else value for name, value in values.items()}


def boolq_question(values: dict[str, Any]) -> dict[str, Any]:
    """MeZO's BoolQ edit: the question gets a capital first letter and a trailing '?'."""
    question = str(values["question"])
    if not question.endswith("?"):
        question += "?"
    return {**values, "question": question[:1].upper() + question[1:]}


def wsc_pronoun(values: dict[str, Any]) -> dict[str, Any]:
    """MeZO's WSC edit: the pronoun (span2) is lower-cased."""
    return {**values, "span2_text": str(values["span2_text"]).lower()}


# --- built-in tasks -----------------------------------------------------------------------------------
# Templates and label words follow MeZO (Malladi et al. 2023), princeton-nlp/MeZO,
# large_models/templates.py (SST2Template, RTETemplate, CBTemplate, BoolQTemplateV3 -- MeZO's default
# for BoolQ, WSCTemplate, WICTemplate) and large_models/tasks.py (datasets and label orders). MeZO
# appends each candidate to the prompt as is: the SST-2 words carry their leading space, while the
# SuperGLUE prompts end in a newline and their answers ("Yes", "No", "Maybe") carry none.
#
# Hub ids: GLUE lives at nyu-mll/glue in parquet. SuperGLUE's hub repository (aps/super_glue) is a
# loading script, which datasets>=4 no longer runs, so we read the hub's parquet export of it
# (revision refs/convert/parquet). Both need network once; tests never touch them.

_MEZO = "MeZO (princeton-nlp/MeZO, large_models/templates.py)"
_SUPER_GLUE = "aps/super_glue"
_PARQUET = "refs/convert/parquet"

TASKS: dict[str, ClassificationTask] = {
    task.name: task
    for task in (
        ClassificationTask(
            name="sst2",
            template="{sentence} It was",
            label_words={0: " terrible", 1: " great"},
            preprocess=strip_strings,
            hub=HubSource("nyu-mll/glue", "sst2"),
            source=f"{_MEZO}, SST2Template",
        ),
        ClassificationTask(
            name="rte",
            template='{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n',
            label_words={0: "Yes", 1: "No"},  # 0 = entailment
            hub=HubSource(_SUPER_GLUE, "rte", _PARQUET),
            source=f"{_MEZO}, RTETemplate (from PromptSource)",
        ),
        ClassificationTask(
            name="cb",
            template='Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\n',
            label_words={0: "Yes", 1: "No", 2: "Maybe"},  # entailment, contradiction, neutral
            hub=HubSource(_SUPER_GLUE, "cb", _PARQUET),
            source=f"{_MEZO}, CBTemplate (from PromptSource)",
        ),
        ClassificationTask(
            name="boolq",
            template="{passage} {question}\n",
            label_words={0: "No", 1: "Yes"},  # super_glue/boolq: 1 = True
            preprocess=boolq_question,
            hub=HubSource(_SUPER_GLUE, "boolq", _PARQUET),
            source=f"{_MEZO}, BoolQTemplateV3 (MeZO's default for BoolQ)",
        ),
        ClassificationTask(
            name="wsc",
            template=(
                '{text}\nIn the previous sentence, does the pronoun "{span2_text}" refer to {span1_text}? '
                "Yes or No?\n"
            ),
            label_words={0: "No", 1: "Yes"},
            preprocess=wsc_pronoun,
            hub=HubSource(_SUPER_GLUE, "wsc.fixed", _PARQUET),
            source=f"{_MEZO}, WSCTemplate (from PromptSource)",
        ),
        ClassificationTask(
            name="wic",
            template=(
                'Does the word "{word}" have the same meaning in these two sentences? Yes, No?\n'
                "{sentence1}\n{sentence2}\n"
            ),
            label_words={0: "No", 1: "Yes"},
            truncate_column="sentence1",
            hub=HubSource(_SUPER_GLUE, "wic", _PARQUET),
            source=f"{_MEZO}, WICTemplate (from PromptSource)",
        ),
        ClassificationTask(
            name="rotten_tomatoes",
            template="{text} It was",
            label_words={"negative": " terrible", "positive": " great"},
            preprocess=strip_strings,
            data_dir=str(ASSETS_DIR / "rotten_tomatoes"),
            source="the generic template with SST-2's label words, on the sample bundled in assets/rotten_tomatoes",
        ),
    )
}

#: Template of the generic task when none is given; ``{text}`` stands for the text column.
GENERIC_TEMPLATE = "{text} It was"

#: Every name ``get_task`` accepts.
TASK_NAMES: tuple[str, ...] = ("generic", *TASKS)


def generic_task(
    label_words: Mapping[Hashable, str] | None,
    template: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
) -> ClassificationTask:
    """A task for any local dataset with a text column and a label column.

    ``label_words`` maps each label value of the data to its word, e.g.
    ``{"negative": " terrible", "positive": " great"}``. Without a template, the prompt is
    ``"<text> It was"`` (MeZO's SST-2 template), the text stripped of surrounding whitespace.
    """
    if label_words is None:
        raise UserError(
            "task 'generic' needs label_words: a mapping from each label value of your data to its word, "
            "e.g. {'negative': ' terrible', 'positive': ' great'}"
        )
    if template is None:
        template = GENERIC_TEMPLATE.replace("{text}", "{" + text_column + "}")
    return ClassificationTask(
        name="generic",
        template=template,
        label_words=dict(label_words),
        label_column=label_column,
        truncate_column=text_column if text_column in _template_fields(template) else None,
        preprocess=strip_strings,
        source="generic template",
    )


def _template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in _parse(template) if name is not None]


def get_task(
    name: str,
    *,
    template: str | None = None,
    label_words: Mapping[Hashable, str] | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
) -> ClassificationTask:
    """The task called ``name``, with any of its template, label words or label column overridden.

    ``text_column`` only applies to ``"generic"``: a built-in task's template already names its columns
    (pass ``template`` to change them).
    """
    if name == "generic":
        return generic_task(label_words, template, text_column or "text", label_column or "label")
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; valid tasks: {list(TASK_NAMES)}")
    if text_column is not None:
        raise UserError(
            f"text_column={text_column!r} only applies to task 'generic'; task {name!r} reads the columns "
            f"{TASKS[name].fields} of its template (pass template=... to change them)"
        )
    changes: dict[str, Any] = {}
    if template is not None:
        changes["template"] = template
    if label_words is not None:
        changes["label_words"] = dict(label_words)
    if label_column is not None:
        changes["label_column"] = label_column
    return TASKS[name].replace(**changes) if changes else TASKS[name]
