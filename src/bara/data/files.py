"""Reading splits from disk: CSV, TSV and JSONL files, single or a folder of ``train``/``validation``/``test``.

Everything here returns labels as they are written (strings for classification, resolved answer indices
for multiple choice); turning label strings into ids is the task's business. Every problem with the input
is a ``BaraError`` naming the file, the line and the fix. Table lines count the header as line 1, the
way an editor numbers them; JSONL lines count from 1.
"""

from __future__ import annotations

import csv
import io
import json
import string
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..errors import BaraError

EXTENSIONS = (".csv", ".tsv", ".jsonl")
SPLIT_STEMS = {"train": ("train",), "validation": ("validation", "dev", "val"), "test": ("test",)}
LETTERS = string.ascii_uppercase
MISSING = ("nan", "-nan", "+nan")  # how pandas, numpy and JSON's NaN write a missing label
COLUMN_FLAGS = "--text-column/--label-column (text_column=/label_column= in Python)"


@dataclass
class Source:
    """Where a split's rows came from, so that an error can point at the line to fix."""

    path: Path
    lines: list[int]  # line on which each record starts, as an editor numbers them

    @property
    def is_table(self) -> bool:
        return self.path.suffix.lower() in (".csv", ".tsv")

    def where(self, index: int) -> str:
        """``'file, line N (...)'`` for record ``index`` (0-based, header not counted)."""
        line = self.lines[index] if index < len(self.lines) else index + 2
        if self.is_table:
            return f"{self.path}, line {line} (counting the header as line 1)"
        return f"{self.path}, line {line}"


@dataclass
class RawSplit:
    """One split as written on disk. ``labels``: label strings, or answer indices for multiple choice."""

    source: Source
    texts: list[str]
    labels: list
    choices: list[list[str]] | None = None

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class RawTask:
    name: str
    kind: str  # "classification" or "multiple_choice"
    splits: dict[str, RawSplit | None]  # train, validation, test; None where the folder has no such file


def read_local(path: Path, text_column: str = "text", label_column: str = "label") -> RawTask:
    """A single file (it becomes train) or a folder with ``train.*`` and optional validation/test files."""
    if path.is_dir():
        files = _split_files(path)
        name = path.resolve().name
    else:
        _check_extension(path)
        files = {"train": path, "validation": None, "test": None}
        name = path.stem
    kind = _detect_kind(files["train"])
    splits = {split: None if file is None else read_split(file, kind, text_column, label_column)
              for split, file in files.items()}
    if kind == "multiple_choice":
        _check_same_number_of_choices(splits)
    return RawTask(name=name, kind=kind, splits=splits)


def read_split(path: Path, kind: str = "classification", text_column: str = "text",
               label_column: str = "label") -> RawSplit:
    """Read one file; ``kind`` is ``"classification"`` or ``"multiple_choice"`` (JSONL only)."""
    if kind == "multiple_choice":
        if path.suffix.lower() != ".jsonl":
            raise BaraError(f"{path}: a multiple-choice task needs every split as JSONL, this is "
                            f"{path.suffix}; fix: convert it to JSONL with question, choices and answer")
        raw = _read_multiple_choice(path)
    elif path.suffix.lower() == ".jsonl":
        raw = _read_jsonl_classification(path, text_column, label_column)
    else:
        raw = _read_table(path, text_column, label_column)
    if not raw.texts:
        where = "line 1 (the header): no examples below the header" if raw.source.is_table else \
            "line 1: no JSON records in the file"
        raise BaraError(f"{path}, {where}, so the split is empty; fix: add examples, or delete the file to "
                        "have this split carved from train")
    return raw


# --- files and folders ---------------------------------------------------------------------------------

def _check_extension(path: Path) -> None:
    if path.suffix.lower() not in EXTENSIONS:
        raise BaraError(f"{path}: cannot read '{path.suffix or 'no extension'}' files; fix: save the data "
                        f"as one of {', '.join(EXTENSIONS)}")


def _split_files(folder: Path) -> dict[str, Path | None]:
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
    files: dict[str, Path | None] = {}
    for split, stems in SPLIT_STEMS.items():
        matches = [p for p in found if p.stem.lower() in stems]
        if len(matches) > 1:
            raise BaraError(f"{folder}: more than one {split} file ({', '.join(p.name for p in matches)}); "
                            "fix: keep only one of them in the folder")
        files[split] = matches[0] if matches else None
    if files["train"] is None:
        listed = ", ".join(p.name for p in sorted(folder.iterdir())) or "nothing"
        raise BaraError(f"{folder}: no train file (found {listed}); fix: name the training data "
                        f"train.csv, train.tsv or train.jsonl (validation/dev/val and test are optional)")
    return files


def _decode(path: Path) -> str:
    """The file as text; undecodable bytes are an error that says where they are."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BaraError(f"{path}: no such file; fix: check the path") from None
    bom = b"\xef\xbb\xbf"
    start = len(bom) if data.startswith(bom) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as error:
        offset = start + error.start
        line = data[:offset].count(b"\n") + 1
        counting = " (counting the header as line 1)" if path.suffix.lower() != ".jsonl" else ""
        raise BaraError(f"{path}, line {line}{counting}: the byte 0x{data[offset]:02X} at byte offset {offset} "
                        "is not valid UTF-8; fix: re-save the file as UTF-8 (e.g. 'CSV UTF-8' in a spreadsheet, "
                        "or iconv -f latin1 -t utf-8)") from None


def _separator(path: Path) -> str:
    return "\t" if path.suffix.lower() == ".tsv" else ","


def _scan_records(path: Path, text: str, separator: str) -> tuple[list[str], list[int], list[int]]:
    """The header, and the start line and number of fields of every data record (quoted fields may span
    lines, so a record's line is not its index + 2)."""
    csv.field_size_limit(2**31 - 1)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=separator)
    header: list[str] = []
    starts, widths, previous = [], [], 0
    for row in reader:
        if not row:  # pandas skips blank lines, so they are not records
            pass
        elif not header:
            header = row
        else:
            starts.append(previous + 1)
            widths.append(len(row))
        if separator == "\t" and any("\t" in f and "\n" in f for f in row):
            # A TSV field that holds a tab and a line break is a stray double quote swallowing rows.
            raise BaraError(f"{path}, line {previous + 1} (counting the header as line 1): a double quote opens a "
                            f"field that runs to line {reader.line_num} over tabs and line breaks, merging "
                            f"{reader.line_num - previous} lines into one; fix: remove the stray double quote "
                            "(or close it on the same line)")
        previous = reader.line_num
    return header, starts, widths


def _detect_kind(path: Path) -> str:
    """Multiple choice when the first JSONL record has ``question`` and ``choices``."""
    if path.suffix.lower() != ".jsonl":
        return "classification"
    for number, line in enumerate(_decode(path).split("\n"), start=1):
        if line.strip():
            record = _parse_json_line(path, number, line)
            return "multiple_choice" if {"question", "choices"} <= record.keys() else "classification"
    return "classification"


# --- tables --------------------------------------------------------------------------------------------

def _read_table(path: Path, text_column: str, label_column: str) -> RawSplit:
    text = _decode(path)
    separator = _separator(path)
    header, starts, widths = _scan_records(path, text, separator)
    if not header:
        raise BaraError(f"{path}, line 1: the file is empty; fix: write a header line with the columns "
                        f"'{text_column}' and '{label_column}', then one line per example")
    for role, column in (("text", text_column), ("label", label_column)):
        if column not in header:
            found = ", ".join(repr(c) for c in header)
            raise BaraError(f"{path}, line 1 (the header): no {role} column '{column}' (columns found: {found}); "
                            f"fix: rename the column or name it with {COLUMN_FLAGS}")
    # pandas silently shifts or drops the fields of a row longer than the header: a stray separator.
    for start, width in zip(starts, widths):
        if width > len(header):
            name = "tab" if separator == "\t" else "comma"
            raise BaraError(f"{path}, line {start} (counting the header as line 1): {width} fields, but the "
                            f'header has {len(header)}; fix: put the text in double quotes ("...") if it '
                            f"contains a {name}")
    try:
        frame = pd.read_csv(io.StringIO(text), sep=separator, dtype=str, keep_default_na=False, index_col=False)
    except pd.errors.ParserError as error:
        raise BaraError(f"{path}: cannot parse the file ({error}); fix: put fields that contain the separator "
                        "or a line break in double quotes") from None
    source = Source(path, lines=starts if len(starts) == len(frame) else [])
    raw = RawSplit(source, [t.strip() for t in frame[text_column]], [l.strip() for l in frame[label_column]])
    check_filled(raw, text_column, label_column)
    return raw


def check_filled(raw: RawSplit, text_column: str, label_column: str) -> None:
    for i, (text, label) in enumerate(zip(raw.texts, raw.labels)):
        if not text:
            raise BaraError(f"{raw.source.where(i)}: the text ('{text_column}') is empty; fix: fill it in or "
                            "delete the row")
        if label == "":
            raise BaraError(f"{raw.source.where(i)}: the label ('{label_column}') is empty; fix: fill it in or "
                            "delete the row")
        if label.lower() in MISSING:
            raise BaraError(f"{raw.source.where(i)}: the label ('{label_column}') is '{label}', a missing value; "
                            "fix: fill in the label or delete the row")


# --- JSONL ---------------------------------------------------------------------------------------------

def _parse_json_line(path: Path, number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise BaraError(f"{path}, line {number}: not valid JSON ({error.msg} at column {error.colno}); fix: "
                        "write one JSON object per line") from None
    if not isinstance(record, dict):
        raise BaraError(f"{path}, line {number}: expected a JSON object, found {type(record).__name__}; fix: "
                        "write one JSON object per line")
    return record


def _jsonl_records(path: Path) -> tuple[list[dict], list[int]]:
    records, lines = [], []
    for number, line in enumerate(_decode(path).split("\n"), start=1):
        if line.strip():
            records.append(_parse_json_line(path, number, line))
            lines.append(number)
    return records, lines


def _field(source: Source, i: int, record: dict, key: str, role: str) -> object:
    if key not in record:
        found = ", ".join(repr(k) for k in record) or "none"
        flags = f" or name it with {COLUMN_FLAGS}" if role in ("text", "label") else ""
        raise BaraError(f"{source.where(i)}: no {role} field '{key}' (fields found: {found}); fix: add the "
                        f"field{flags}")
    return record[key]


def _read_jsonl_classification(path: Path, text_column: str, label_column: str) -> RawSplit:
    records, lines = _jsonl_records(path)
    source = Source(path, lines=lines)
    texts, labels = [], []
    for i, record in enumerate(records):
        text = _field(source, i, record, text_column, "text")
        label = _field(source, i, record, label_column, "label")
        if not isinstance(text, str):
            raise BaraError(f"{source.where(i)}: the text '{text_column}' is {json.dumps(text)}, not a string; "
                            "fix: write the text as a JSON string")
        if isinstance(label, (list, dict)) or label is None:
            raise BaraError(f"{source.where(i)}: the label '{label_column}' is {json.dumps(label)}; fix: write "
                            "one label per example, as a string or a number")
        texts.append(text.strip())
        labels.append(label.strip() if isinstance(label, str) else str(label))
    raw = RawSplit(source, texts, labels)
    check_filled(raw, text_column, label_column)
    return raw


def _read_multiple_choice(path: Path) -> RawSplit:
    records, lines = _jsonl_records(path)
    source = Source(path, lines=lines)
    questions, answers, choices = [], [], []
    for i, record in enumerate(records):
        question = _field(source, i, record, "question", "question")
        options = _field(source, i, record, "choices", "choices")
        answer = _field(source, i, record, "answer", "answer")
        if not isinstance(question, str) or not question.strip():
            raise BaraError(f"{source.where(i)}: the question is empty or not a string; fix: write the "
                            "question as a non-empty JSON string")
        if (not isinstance(options, list) or len(options) < 2
                or not all(isinstance(o, str) and o.strip() for o in options)):
            raise BaraError(f"{source.where(i)}: 'choices' must be a list of at least 2 non-empty strings, "
                            f"found {json.dumps(options)[:80]}; fix: list the options as strings")
        if len(options) > len(LETTERS):
            raise BaraError(f"{source.where(i)}: {len(options)} choices, at most {len(LETTERS)} are "
                            "supported (one letter each); fix: drop some choices")
        questions.append(question.strip())
        choices.append([o.strip() for o in options])
        answers.append(_answer_index(source, i, answer, choices[-1]))
    return RawSplit(source, questions, answers, choices)


def _answer_index(source: Source, i: int, answer: object, options: list[str]) -> int:
    """An int index, the exact text of a choice, or a letter "A".. (a choice's own text wins over a letter)."""
    letters = LETTERS[:len(options)]
    if isinstance(answer, int) and not isinstance(answer, bool):
        if 0 <= answer < len(options):
            return answer
        raise BaraError(f"{source.where(i)}: answer {answer} is out of range for {len(options)} choices; fix: "
                        f"use an index from 0 to {len(options) - 1}, a letter {letters[0]}-{letters[-1]} or the "
                        "text of the correct choice")
    if isinstance(answer, str):
        if answer.strip() in options:
            return options.index(answer.strip())
        if len(answer.strip()) == 1 and answer.strip() in LETTERS:
            index = LETTERS.index(answer.strip())
            if index < len(options):
                return index
            raise BaraError(f"{source.where(i)}: answer '{answer}' is out of range for {len(options)} choices; "
                            f"fix: use a letter {letters[0]}-{letters[-1]}")
    raise BaraError(f"{source.where(i)}: answer {json.dumps(answer)} is not an index, a letter or one of the "
                    f"choices {options}; fix: use an index from 0 to {len(options) - 1}, a letter "
                    f"{letters[0]}-{letters[-1]} or the exact text of the correct choice")


def _check_same_number_of_choices(splits: dict[str, RawSplit | None]) -> None:
    expected = len(splits["train"].choices[0])
    first = splits["train"].source.where(0)
    for raw in splits.values():
        if raw is None:
            continue
        for i, options in enumerate(raw.choices):
            if len(options) != expected:
                raise BaraError(f"{raw.source.where(i)}: {len(options)} choices, but {first} has {expected}; "
                                "fix: give every question the same number of choices")
