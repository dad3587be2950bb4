"""BIG-bench multiple-choice tasks, fetched once from the ``bigbench==1.0.0`` source distribution on PyPI.

``bara data fetch bigbench`` downloads the sdist (358 MB) from PyPI, checks its pinned sha256, reads
``*/bigbench/benchmark_tasks/<task>/task.json`` for the tasks in :data:`TASKS`, converts each to the package's
multiple-choice JSONL and deletes the download. ``load_task("bigbench/<task>")`` then reads

    $BARA_CACHE/bigbench/<task>/train.jsonl, test.jsonl      (default ~/.cache/bara, as for the models)

one record per line: ``{"question": input, "choices": [...], "answer": index}``; the validation split is
carved from train by :func:`bara.data.load_task` (10 %, stratified, seeded by the run's seed).

Conversion of a ``task.json`` (every task here is scored by ``target_scores``):

- question = the example's ``input``; choices = the keys of ``target_scores`` in their stored order (BIG-bench
  already varies the position of the right answer; for yes/no tasks the order is the same in every example,
  so "A" always means the same choice); answer = the index of the one choice with the top score.
- Dropped: examples without exactly one top-scored choice; examples whose number of choices differs from the
  task's usual one (a task needs one number of choices); repeated (question, choices) pairs, keeping one copy
  when the copies agree on the answer and none when they disagree (a repeat could otherwise sit in train and
  test at once).
- The task's ``task_prefix`` (one instruction shared by every example) is left out: fine-tuning learns the
  task from the labels, and the prefix would take 15 to 25 tokens of every prompt.
- Split: test = 20 % of the examples, stratified by answer and seeded by 0, so the split is the same on
  every machine and for every run seed; train = the rest, in the task's order.

Tasks with subtasks (``fact_checker``: fever, politifact, covid19_scientific) have no examples of their own;
each subtask is a task here (``bigbench/fact_checker/fever``). A few tasks tag each example with its kind, and each
kind is a task here too (:data:`DERIVED`: ``bigbench/navigate/turns`` holds navigate's examples whose
``inst_type`` is ``turns``), so that a model trained on one kind can be tested on another, with the same question
and choices: a dataset shift inside one task. They are converted and split like any task.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import urlopen

from ..cache import cache_dir
from ..errors import BaraError
from . import sampling
from .files import RawTask, read_local

VERSION = "1.0.0"
PREFIX = "bigbench/"
# Checked on bigbench 1.0.0 (logical_fallacy_detection to sports_understanding on verbatim copies of its task.json,
# docs/experiments.md §32): each is scored by target_scores with one right choice.
TASKS = ("social_iqa", "strategyqa", "winowhy", "epistemic_reasoning", "logical_fallacy_detection", "implicatures",
         "presuppositions_as_nli", "navigate", "sports_understanding", "fact_checker/fever",
         "fact_checker/politifact", "fact_checker/covid19_scientific", "vitaminc_fact_verification",
         # MultiEmo's English sentences (4 sentiments) in four domains: a dataset shift with one label space
         "multiemo/hotels_sentence_en", "multiemo/medicine_sentence_en", "multiemo/products_sentence_en",
         "multiemo/reviews_sentence_en",
         # navigate's two kinds of instructions (turns and steps, or steps in four directions facing forward)
         "navigate/turns", "navigate/face_forward")
# Tasks made of one task's examples of one kind (BIG-bench tags them but has no subtasks for them): the task, then
# the example's field and its value.
DERIVED = {"navigate/turns": ("navigate", "inst_type", "turns"),
           "navigate/face_forward": ("navigate", "inst_type", "face_forward")}
TEST_FRACTION = 0.2
SPLIT_SEED = 0
SPLIT_STREAM = 100  # a stream of sampling's generator that no other split uses
FILES = ("train.jsonl", "test.jsonl")
FETCH_HINT = "run 'bara data fetch bigbench' (downloads the bigbench sdist from PyPI once, about 360 MB)"
# Where PyPI refuses the sdist (this workplace's registry has answered 403 "This package version is not available"
# since 2026-12-05), the same task.json files come from the sdist fetched elsewhere or from a BIG-bench checkout.
ELSEWHERE = (f"download bigbench-{VERSION}.tar.gz (sha256 {{sha}}) or clone https://github.com/google/BIG-bench on a "
             "machine that can, and pass it with 'bara data fetch bigbench --sdist PATH' (the .tar.gz or the "
             "checkout's folder)")
# The sdist on PyPI (its sha256 as pip reported it when checking a download against a pinned hash, 2026-12-01).
SDIST_URL = ("https://files.pythonhosted.org/packages/95/f8/"
             f"c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/bigbench-{VERSION}.tar.gz")
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
MEMBER = re.compile(r"(?:.*/)?bigbench/benchmark_tasks/(.+)/task\.json")


def cache_root() -> Path:
    """Where the converted tasks live: ``$BARA_CACHE/bigbench``."""
    return cache_dir() / "bigbench"


def names() -> list[str]:
    """The names ``load_task`` accepts for BIG-bench tasks, fetched or not."""
    return [PREFIX + task for task in TASKS]


def is_bigbench(spec: str) -> bool:
    return str(spec).lower().startswith(PREFIX)


def converted(folder: Path) -> bool:
    """Whether ``folder`` holds a whole converted task (:func:`write_task` swaps it in only once complete)."""
    return all((folder / name).is_file() for name in FILES)


def task_folder(spec: str) -> Path:
    """The folder of a fetched task; a BaraError naming the fix when it is unknown or not fetched."""
    task = str(spec)[len(PREFIX):].strip("/")
    if task not in TASKS:
        raise BaraError(f"{spec}: not a BIG-bench task of bara; fix: use one of {', '.join(names())}")
    folder = cache_root() / task
    if not converted(folder):
        raise BaraError(f"{spec} is not fetched yet (no {folder / FILES[0]}); fix: {FETCH_HINT}")
    return folder


def read_bigbench(spec: str) -> RawTask:
    raw = read_local(task_folder(spec))
    raw.name = PREFIX + str(spec)[len(PREFIX):].strip("/")
    return raw


# -- conversion ---------------------------------------------------------------------------------------------
@dataclass
class Converted:
    records: list[dict]  # question, choices, answer
    examples: int  # in task.json
    no_single_answer: int = 0
    other_choice_count: int = 0
    duplicates: int = 0
    conflicting: int = 0

    @property
    def dropped(self) -> int:
        return self.examples - len(self.records)


def convert(task: dict, name: str = "task") -> Converted:
    """A BIG-bench ``task.json`` (parsed) as multiple-choice records; see the module docstring for the rules."""
    examples = task.get("examples")
    if not isinstance(examples, list) or not examples:
        subtasks = [s.get("name") for s in task.get("subtasks", []) if isinstance(s, dict)]
        raise BaraError(f"{name}: task.json holds no examples" + (f" (its subtasks: {', '.join(subtasks)})"
                        if subtasks else "") + "; fix: convert a task or subtask with examples")
    out = Converted(records=[], examples=len(examples))
    candidates = []
    for example in examples:
        scores = example.get("target_scores") if isinstance(example, dict) else None
        question = example.get("input") if isinstance(example, dict) else None
        if not isinstance(scores, dict) or len(scores) < 2 or not isinstance(question, str) or not question.strip():
            out.no_single_answer += 1
            continue
        top = max(scores.values())
        winners = [i for i, value in enumerate(scores.values()) if value == top]
        if len(winners) != 1:
            out.no_single_answer += 1
            continue
        candidates.append({"question": question.strip(), "choices": [str(c).strip() for c in scores],
                           "answer": winners[0]})
    if not candidates:
        raise BaraError(f"{name}: no example of task.json has exactly one top-scored choice; fix: use a "
                        "multiple-choice task scored by target_scores")
    usual = Counter(len(r["choices"]) for r in candidates).most_common(1)[0][0]
    kept = [r for r in candidates if len(r["choices"]) == usual]
    out.other_choice_count = len(candidates) - len(kept)
    copies: dict[tuple, list[dict]] = {}
    for record in kept:
        copies.setdefault((record["question"], tuple(record["choices"])), []).append(record)
    for group in copies.values():  # dicts keep insertion order: the records stay in the task's order
        if len({r["answer"] for r in group}) == 1:
            out.records.append(group[0])
            out.duplicates += len(group) - 1
        else:
            out.conflicting += len(group)
    return out


def of_kind(task: dict, name: str) -> dict:
    """``task`` (a parsed task.json) with only the examples of the kind that the derived task ``name`` holds
    (:data:`DERIVED`); any other task as it is."""
    if name not in DERIVED:
        return task
    _, field, value = DERIVED[name]
    examples = [e for e in task.get("examples") or [] if isinstance(e, dict) and e.get(field) == value]
    if not examples:
        raise BaraError(f"{name}: no example of {DERIVED[name][0]}'s task.json has {field} = {value!r}; fix: use "
                        f"the bigbench {VERSION} task.json")
    return {**task, "examples": examples}


def split(records: list[dict], seed: int = SPLIT_SEED, test_fraction: float = TEST_FRACTION) \
        -> tuple[list[dict], list[dict]]:
    """(train, test): ``test_fraction`` of the records (at least 1), stratified by answer and seeded."""
    answers = [r["answer"] for r in records]
    n_test = min(max(1, math.floor(test_fraction * len(records) + 0.5)), len(records) - 1)
    test = set(sampling.stratified_sample(answers, n_test, seed, SPLIT_STREAM))
    return ([r for i, r in enumerate(records) if i not in test], [r for i, r in enumerate(records) if i in test])


def write_task(records: list[dict], folder: Path) -> dict:
    """train.jsonl and test.jsonl into ``folder``, replacing it whole (a half-written task is never seen)."""
    train, test = split(records)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    tmp.chmod(0o755)  # mkdtemp's 0o700 would otherwise become the task folder's mode
    try:
        for name, part in zip(FILES, (train, test)):
            (tmp / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
        if folder.exists():
            for child in folder.iterdir():  # the folders of its derived tasks (navigate/turns) stay
                if child.is_dir() and not child.name.startswith("."):
                    os.replace(child, tmp / child.name)
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"train": len(train), "test": len(test)}


# -- extraction ---------------------------------------------------------------------------------------------
def read_task_files(source: Path, tasks: list[str]) -> dict[str, dict]:
    """The parsed ``task.json`` of each of ``tasks`` from the sdist ``source`` (a .tar.gz, read in place and
    never unpacked) or from a folder that holds the unpacked sdist."""
    wanted, found = set(tasks), {}
    if source.is_dir():
        for base in _benchmark_folders(source):
            for task in wanted - set(found):
                path = base / task / "task.json"
                if path.is_file():
                    found[task] = _parse(path.read_bytes(), path)
    else:
        try:
            with tarfile.open(source, "r:*") as archive:
                for member in archive:
                    match = MEMBER.fullmatch(member.name)
                    if match and match[1] in wanted and match[1] not in found and member.isfile():
                        found[match[1]] = _parse(archive.extractfile(member).read(), f"{source}:{member.name}")
        except (tarfile.TarError, OSError) as err:
            raise BaraError(f"{source}: cannot read it as the bigbench sdist ({err}); fix: run 'bara data fetch "
                            "bigbench --force' to download it again") from None
    missing = [t for t in tasks if t not in found]
    if missing:
        others = f" (nor one of {', '.join(missing[1:])})" if len(missing) > 1 else ""
        held = f", or convert the tasks it holds with --tasks {','.join(t for t in tasks if t in found)}" if found \
            else ""
        raise BaraError(f"{source}: no bigbench/benchmark_tasks/{missing[0]}/task.json in it{others}; fix: use the "
                        f"bigbench {VERSION} sdist ({SDIST_URL}){held}")
    return found


def _benchmark_folders(folder: Path) -> list[Path]:
    """``bigbench/benchmark_tasks`` folders at most three levels below ``folder`` (an unpacked sdist)."""
    found = []
    for depth in range(4):
        found += [p for p in folder.glob("/".join(["*"] * depth + ["bigbench", "benchmark_tasks"])) if p.is_dir()]
    return found


def _parse(data: bytes, where) -> dict:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BaraError(f"{where}: not valid JSON ({err}); fix: fetch again with --force") from None


def extract(source: Path, tasks: list[str], root: Path | None = None) -> dict[str, dict]:
    """Convert ``tasks`` from the sdist ``source`` into ``root`` (default :func:`cache_root`); per task the
    counts of examples in task.json, kept, dropped, train and test."""
    root = cache_root() if root is None else root
    sources = [DERIVED[t][0] if t in DERIVED else t for t in tasks]
    summary, contents = {}, read_task_files(source, list(dict.fromkeys(sources)))
    for task, source_task in zip(tasks, sources):
        converted = convert(of_kind(contents[source_task], task), task)
        sizes = write_task(converted.records, root / task)
        summary[task] = {"examples": converted.examples, "kept": len(converted.records),
                         "dropped": converted.dropped, "no_single_answer": converted.no_single_answer,
                         "other_choice_count": converted.other_choice_count, "duplicates": converted.duplicates,
                         "conflicting": converted.conflicting,
                         "choices": len(converted.records[0]["choices"]), **sizes}
    return summary


# -- download -----------------------------------------------------------------------------------------------
def download(workdir: Path, progress: bool = True) -> Path:
    """The bigbench sdist downloaded into ``workdir`` from PyPI's file host and checked against its pinned sha256.

    Nothing of it runs: no pip, no build, no ``setup.py``; :func:`read_task_files` reads the task.json files
    out of the archive with tarfile, without unpacking it."""
    from tqdm.auto import tqdm

    target = workdir / SDIST_URL.rsplit("/", 1)[1]
    digest = hashlib.sha256()
    try:
        with urlopen(SDIST_URL, timeout=60) as response, target.open("wb") as out:
            size = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, desc=target.name, unit="B", unit_scale=True, unit_divisor=1024,
                      disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except HTTPError as err:  # the host answered: retrying will not help, the file must come from elsewhere
        body = err.read(200).decode("utf-8", "replace").strip()
        raise BaraError(f"PyPI refused {SDIST_URL} (HTTP {err.code}{': ' + body if body else ''}); fix: "
                        + ELSEWHERE.format(sha=SDIST_SHA256)) from None
    except (URLError, OSError) as err:
        raise BaraError(f"could not download {SDIST_URL} ({getattr(err, 'reason', err)}); fix: check the connection "
                        "to PyPI, or download the sdist elsewhere and pass it with --sdist FILE") from None
    if digest.hexdigest() != SDIST_SHA256:
        raise BaraError(f"the download of {SDIST_URL} has sha256 {digest.hexdigest()}, not the pinned {SDIST_SHA256}; "
                        "fix: fetch again (a proxy may have changed it), or pass a verified sdist with --sdist FILE")
    return target


def fetch(tasks: list[str] | None = None, force: bool = False, sdist: Path | None = None,
          progress: bool = True, root: Path | None = None) -> dict[str, dict]:
    """Fetch and convert ``tasks`` (default: all of :data:`TASKS`; a parent such as ``fact_checker`` means its
    subtasks) into ``root``; tasks already there are kept unless ``force``. With ``sdist`` (a bigbench
    .tar.gz or unpacked folder) nothing is downloaded and the file is left in place; a download is deleted
    once converted. Returns the counts per converted task (empty when everything was there already)."""
    root = cache_root() if root is None else root
    chosen = resolve_tasks(tasks)
    todo = [t for t in chosen if force or not converted(root / t)]
    if not todo:
        return {}
    if sdist is not None:
        if not Path(sdist).exists():
            raise BaraError(f"--sdist {sdist}: no such file or folder; fix: give the path of bigbench-{VERSION}.tar.gz")
        return extract(Path(sdist), todo, root)
    root.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(dir=root, prefix=".download-"))  # beside the cache: same disk, cleaned up
    try:
        print(f"downloading bigbench=={VERSION} from PyPI (about 360 MB, checked by sha256; only {len(todo)} "
              f"task.json file{'s are' if len(todo) > 1 else ' is'} kept)", flush=True)
        source = download(workdir, progress)
        return extract(source, todo, root)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def resolve_tasks(tasks: list[str] | None) -> list[str]:
    if not tasks:
        return list(TASKS)
    chosen = []
    for name in tasks:
        name = name[len(PREFIX):] if is_bigbench(name) else name
        matches = [t for t in TASKS if t == name or t.startswith(name.rstrip("/") + "/")]
        if not matches:
            raise BaraError(f"--tasks: '{name}' is not a BIG-bench task of bara; fix: use some of {', '.join(TASKS)}")
        chosen += [t for t in matches if t not in chosen]
    return chosen
