"""Where a split's rows come from: local files, a folder of split files, the bundled assets, or the hub.

Local files are jsonl/json, csv or parquet, chosen by extension; the built-in benchmark tasks download
from the Hugging Face hub by name. Every loading failure names the split and the file, and the line
of a non-UTF-8 byte or a malformed JSON line.

``datasets`` (and with it pandas and pyarrow) is imported only when rows are first read, so the task
definitions, which name their hub source, and the synthetic data load without it.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from hosl_lightning.core.options import MissingFileError, UserError

if TYPE_CHECKING:
    import datasets

#: File extensions read from local data, and the ``datasets`` builder that reads each.
FILE_BUILDERS: dict[str, str] = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

#: The three splits a DataModule knows about.
SPLITS: tuple[str, ...] = ("train", "validation", "test")

#: Data bundled with the package (shipped as package data), e.g. ``ASSETS_DIR / "rotten_tomatoes"``.
ASSETS_DIR = Path(__file__).parent.parent / "assets"


@dataclass(frozen=True)
class HubSource:
    """Where a task lives on the Hugging Face hub, and which hub split feeds each of our splits.

    A split mapped to ``None`` is not read from the hub. For ``validation`` that means "carved out of the
    training split, disjoint from the training sample", which is MeZO's protocol: the GLUE/SuperGLUE test
    sets have no public labels, so MeZO trains and early-stops on disjoint samples of ``train`` and reports
    accuracy on the official ``validation`` split (our ``test``).
    """

    path: str
    config: str | None = None
    revision: str | None = None
    splits: Mapping[str, str | None] = field(
        default_factory=lambda: {"train": "train", "validation": None, "test": "validation"}
    )

    def describe(self, split: str) -> str:
        config = f"/{self.config}" if self.config else ""
        return f"hub dataset {self.path}{config} split {self.splits.get(split)!r}"

    def load(self, split: str, cache_dir: str | None = None) -> datasets.Dataset:
        """Downloads (or reads from the local cache) the hub split behind ``split``. Needs network once."""
        import datasets  # deferred: see the module docstring

        hub_split = self.splits.get(split)
        if hub_split is None:
            raise UserError(f"{self.path} has no hub split for {split!r}; hub splits: {dict(self.splits)}")
        return datasets.load_dataset(
            self.path, self.config, split=hub_split, revision=self.revision, cache_dir=cache_dir
        )


# --- local files ----------------------------------------------------------------------------------------


def find_split_files(data_dir: str | Path) -> dict[str, Path]:
    """``{split: file}`` for the ``train``/``validation``/``test`` files in ``data_dir`` (any known extension)."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise MissingFileError(f"data_dir {str(folder)!r} is not a directory")
    found: dict[str, Path] = {}
    for split in SPLITS:
        matches = [folder / f"{split}{ext}" for ext in FILE_BUILDERS if (folder / f"{split}{ext}").is_file()]
        if len(matches) > 1:
            names = [match.name for match in matches]
            raise UserError(f"data_dir {str(folder)!r} has several {split} files, keep one: {names}")
        if matches:
            found[split] = matches[0]
    if not found:
        raise MissingFileError(
            f"data_dir {str(folder)!r} holds no train/validation/test file with extension {list(FILE_BUILDERS)}"
        )
    return found


def load_local_split(path: str | Path, split: str, cache_dir: str | None = None) -> datasets.Dataset:
    """Reads one local file (json/jsonl, csv or parquet, by extension) into a ``datasets.Dataset``.

    Empty files are refused here with the split and file named, instead of the reader's opaque errors.
    """
    import datasets  # deferred: see the module docstring

    file = Path(path)
    builder = FILE_BUILDERS.get(file.suffix.lower())
    if builder is None:
        raise UserError(
            f"{split} file {str(file)!r} has an unknown extension {file.suffix!r}; valid: {list(FILE_BUILDERS)}"
        )
    if not file.is_file():
        raise MissingFileError(f"{split} file {str(file)!r} does not exist")
    if builder != "parquet":
        _check_utf8(file, split)  # readers may load bad bytes and fail only when a row is read, naming no file
        if not _has_rows(file, header=builder == "csv"):
            raise UserError(f"{split} split is empty: file {str(file)!r} holds no examples")
    try:
        dataset = datasets.load_dataset(builder, data_files=str(file), split="train", cache_dir=cache_dir)
    except Exception as error:  # the readers' own errors do not say which file or split
        if builder == "json":
            _raise_json_fault(file, split)
        raise UserError(f"could not read {split} file {str(file)!r} as {builder}: {error!r}") from error
    if len(dataset) == 0:
        raise UserError(f"{split} split is empty: file {str(file)!r} holds no examples")
    return dataset


def _check_utf8(file: Path, split: str, chunk_size: int = 1 << 20) -> None:
    """Refuses a text file that is not UTF-8, naming the file and the line of the first bad byte.

    Up front: a reader may load bad bytes and fail only when a row is read, with a message naming no file.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    with file.open("rb") as handle:
        try:
            while chunk := handle.read(chunk_size):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
            return
        except UnicodeDecodeError:
            handle.seek(0)
        for number, raw in enumerate(handle, 1):  # a newline byte never sits inside a UTF-8 character
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise UserError(f"{split}_file={str(file)!r} is not valid: line {number} is not UTF-8 text (byte "
                                 f"{raw[error.start]:#04x} at column {error.start + 1}); save the file as UTF-8") from None


def _raise_json_fault(file: Path, split: str) -> None:
    """After the reader failed: names the first line that is not one JSON object (JSON lines), or where a
    JSON array file breaks. The reader names neither file nor line (pyarrow counts rows within a block)."""
    option = f"{split}_file={str(file)!r} is not valid"
    with file.open(encoding="utf-8") as handle:
        first = next((line for line in handle if line.strip()), "")
    if first.lstrip().startswith("["):  # one JSON array of objects, judged whole
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise UserError(f"{option}: not valid JSON at line {error.lineno}, column {error.colno} ({error.msg}); "
                             "the file must hold one JSON array of objects, or one JSON object per line") from None
        return
    example = 'each line must be one JSON object, e.g. {"text": "...", "label": 0}'
    with file.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{option}: line {number} is not valid JSON ({error.msg} at column {error.colno}); "
                                 f"{example}") from None
            if isinstance(row, dict):
                continue
            raise UserError(f"{option}: line {number} holds a JSON {type(row).__name__}, not an object; {example}")


def _has_rows(file: Path, header: bool) -> bool:
    """Whether a text file has a non-blank line beyond its header (read lazily: files can be large)."""
    needed = 2 if header else 1
    with file.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.strip():
                needed -= 1
                if needed == 0:
                    return True
    return False


# --- one split's source ---------------------------------------------------------------------------------


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
            raise UserError(f"{self.split} split is empty: {self.describe()} holds no examples")
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
    """Refuses a dataset that lacks a column the task reads, naming the split, its source and what it has."""
    missing = [column for column in needed if column not in dataset.column_names]
    if missing:
        raise UserError(
            f"{what} names column(s) {missing} missing from the {source.split} split ({source.describe()}); "
            f"available columns: {dataset.column_names}"
        )


def check_has_text(values: Sequence[object], option: str, column: str, source: SplitSource) -> None:
    """Refuses a text column with no text in any example (CSV readers give None for an empty cell): the run
    would train on the template alone, or find no row to train on, and say neither which column nor where."""
    if values and all(value is None or (isinstance(value, str) and not value.strip()) for value in values):
        raise UserError(
            f"{option} is not valid: column {column!r} is empty in all {len(values)} examples of the {source.split} "
            f"split ({source.describe()}); name a column that holds the text"
        )
