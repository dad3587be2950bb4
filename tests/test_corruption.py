"""Input corruption (bara corrupt): seeded typos and word dropout whose strength follows the intensity, and the
finished runs of a benchmark scored on corrupted test splits without retraining."""

from __future__ import annotations

import difflib
import json
import math
import random
import re
import shutil
import warnings

import numpy as np
import pytest
import torch

from bara import bench, cli, corruption, runs
from bara.data.tasks import Split
from bara.errors import BaraError
from bara.runs import METRICS

from test_bench import PNG_MAGIC, tiny_preset

_WORDS = random.Random(1)
_VOCABULARY = ["transfer", "money", "card", "lost", "my", "please", "account", "why"]
TEXT = " ".join(_WORDS.choice(_VOCABULARY) for _ in range(400))


def test_no_corruption_at_intensity_zero_and_the_same_texts_for_the_same_seed():
    split = Split(texts=[TEXT, "hello world"], labels=[1, 0])
    for kind in corruption.KINDS:
        assert corruption.corrupt(split, kind, 0, seed=3).texts == split.texts
        once, again = corruption.corrupt(split, kind, 20, seed=3), corruption.corrupt(split, kind, 20, seed=3)
        assert once.texts == again.texts and once.labels == split.labels
        assert once.texts[0] != TEXT
        assert corruption.corrupt(split, kind, 20, seed=4).texts[0] != once.texts[0]  # the seed matters


def test_typos_grow_with_the_intensity_and_touch_only_letters():
    similarity = [difflib.SequenceMatcher(None, TEXT, corruption.typos(TEXT, rate, random.Random(0)),
                                      autojunk=False).ratio()
                  for rate in (0.0, 0.05, 0.2, 0.4)]
    assert similarity[0] == 1.0
    assert similarity[0] > similarity[1] > similarity[2] > similarity[3]
    assert 0.9 < similarity[1] < 0.99 and similarity[3] < 0.6
    assert corruption.typos("12 34 !?", 1.0, random.Random(0)) == "12 34 !?"  # no letters, nothing to mistype
    # each of the four errors happens: deletions shorten, doublings lengthen, at about rate / 4 of the letters each
    typed = corruption.typos("a" * 4000, 0.4, random.Random(0))
    assert abs(len(typed) - 4000) < 150 and set(typed) - {"a"}


def test_word_dropout_drops_the_given_share_and_keeps_a_word():
    words = TEXT.split()
    for rate in (0.1, 0.4):
        kept = corruption.word_dropout(TEXT, rate, random.Random(0)).split()
        assert abs(len(kept) / len(words) - (1 - rate)) < 0.06
        assert set(kept) <= set(words)
    assert len(corruption.word_dropout("one two three", 1.0, random.Random(0)).split()) == 1
    assert corruption.word_dropout("", 0.5, random.Random(0)) == ""


def test_bad_kind_or_intensity_names_the_fix():
    split = Split(texts=["a b"], labels=[0])
    with pytest.raises(BaraError, match="typos, word_dropout"):
        corruption.corrupt(split, "blur", 10, 0)
    with pytest.raises(BaraError, match=r"\[0, 100\]"):
        corruption.corrupt(split, "typos", 150, 0)


@pytest.fixture()
def finished_bench(tmp_path, tiny_bert, toy_data):
    preset = tiny_preset(tmp_path, tiny_bert, toy_data)
    out = tmp_path / "bench"
    bench.run_bench(str(preset), out, progress=False)
    return out


def test_corrupt_scores_every_chosen_run_and_resumes(finished_bench):
    out = finished_bench
    written = corruption.run_corrupt(out, ["toy"], intensities=[0, 40], progress_bar=False)
    assert [p.name for p in written] == ["corruption-toy.md", "corruption-toy.jsonl", "corruption-toy.png"]
    assert (out / "plots" / "corruption-toy.png").read_bytes()[:8] == PNG_MAGIC
    points = [json.loads(line) for line in (out / "corruption-toy.jsonl").read_text().splitlines()]
    assert len(points) == 2 * 2 * 2 * 2  # variants x seeds x kinds x intensities
    for point in points:
        folder = out / "runs" / "toy" / point["variant"] / point["run"]
        metrics = json.loads((folder / METRICS).read_text())
        if point["intensity"] == 0:  # the run's own test metrics
            assert (point["accuracy"], point["nll"]) == (metrics["accuracy"], metrics["nll"])
        else:  # 40 % of the letters or words changed: another prediction
            assert point["nll"] != metrics["nll"] and point["n"] == metrics["n_test"]
        assert ("fast_path" in point) == (point["variant"] == "bara-small")  # a sampling method's one pass too
    report = (out / "corruption-toy.md").read_text()
    assert "## typos" in report and "## word dropout" in report and "| bara-small |" in report
    # under the sampling method, its one-pass prediction on the same inputs; none for LoRA (it has only one)
    typos = report.split("## typos")[1].split("## word dropout")[0]
    one_pass = next(line for line in typos.splitlines() if line.startswith("| bara-small, one pass |"))
    passes = [p["fast_path"] for p in points if p["variant"] == "bara-small" and p["kind"] == "typos"
              and p["intensity"] == 40]
    assert len(passes) == 2 and one_pass.endswith(
        f"{100 * np.mean([p['accuracy'] for p in passes]):.1f} / {100 * np.mean([p['ece'] for p in passes]):.1f} / "
        f"{np.mean([p['nll'] for p in passes]):.3f} |")
    assert "| lora, one pass" not in report
    classes = json.loads((folder / METRICS).read_text())["num_labels"]  # the null to read the numbers against
    assert classes >= 2 and (f"a uniform prediction over the {classes} classes (it knows nothing), scores accuracy "
                             f"{100 / classes:.1f} %, NLL ln {classes} = {math.log(classes):.3f}") in report
    # a rerun scores nothing again; a lost point is scored again, to the same numbers
    run = out / "runs" / "toy" / points[-1]["variant"] / points[-1]["run"] / corruption.RUN_FILE
    before = json.loads(run.read_text())
    lost = dict(before)
    lost["word_dropout"] = {k: v for k, v in before["word_dropout"].items() if k != "40"}
    run.write_text(json.dumps(lost))
    corruption.run_corrupt(out, ["toy"], intensities=[0, 40], progress_bar=False)
    assert json.loads(run.read_text()) == before


def test_corrupt_cli_errors_name_the_fix(finished_bench, tmp_path, capsys):
    assert cli.main(["corrupt", "--bench", str(tmp_path / "nowhere"), "--data", "toy"]) == 2
    assert "has no results.jsonl" in capsys.readouterr().err
    store = tmp_path / "standard"
    (store / "runs").mkdir(parents=True)  # a benchmark store: run folders, no report
    assert cli.main(["corrupt", "--bench", str(store), "--data", "toy"]) == 2
    assert (f"has run folders but no results.jsonl (no report written here yet); fix: write it with 'bara bench "
            f"--preset PRESET --output {store} --report-only' (PRESET: the preset that made the runs, e.g. standard)"
            in " ".join(capsys.readouterr().err.split()))
    assert cli.main(["corrupt", "--bench", str(finished_bench), "--data", "banking77"]) == 2
    assert "no finished run of 'banking77'; fix: use one of toy" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["corrupt", "--bench", str(finished_bench), "--data", "toy", "--intensities", "5,x"])
    assert "percentages" in capsys.readouterr().err


def test_a_run_without_its_adapter_is_named_skipped_or_retrained_to_its_own_numbers(finished_bench, capsys):
    out = finished_bench
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    row = next(r for r in rows if r["variant"] == "bara-small")
    folder = out / "runs" / "toy" / row["variant"] / row["run"]
    weights = sorted(folder.rglob("*.safetensors"))
    kept = {w: w.read_bytes() for w in weights}
    for w in weights:  # a store's run from another machine: metrics, no weights
        w.unlink()
    assert not runs.has_weights(folder)
    assert cli.main(["corrupt", "--bench", str(out), "--data", "toy", "--intensities", "0,40", "--no-progress"]) == 2
    err = capsys.readouterr().err
    named = f"runs/toy/bara-small/{row['run']}"
    assert f"1 run(s) to score have no adapter here (trained on another machine?): {named}" in err
    assert "--retrain-missing" in err and "--skip-missing" in err and not (out / "corruption-toy.md").exists()

    assert cli.main(["corrupt", "--bench", str(out), "--data", "toy", "--intensities", "0,40", "--no-progress",
                     "--skip-missing"]) == 0
    report = (out / "corruption-toy.md").read_text()
    assert (f"Left out (their methods' means are over fewer seeds): bara-small/{row['run']} (no adapter here, "
            "--skip-missing).") in report
    points = [json.loads(line) for line in (out / "corruption-toy.jsonl").read_text().splitlines()]
    assert row["run"] not in {p["run"] for p in points} and len(points) == 3 * 2 * 2  # the other 3 runs
    assert not (folder / corruption.RUN_FILE).exists()
    capsys.readouterr()

    refused_elsewhere = {"cpu": "another CPU", "torch_threads": torch.get_num_threads(), "split": "test",
                         "stored": {"nll": 0.5}, "retrained": {"nll": 0.6}}
    (folder / corruption.REFUSED_FILE).write_text(json.dumps(refused_elsewhere))  # no bar to a retrain here
    assert cli.main(["corrupt", "--bench", str(out), "--data", "toy", "--intensities", "0,40", "--no-progress",
                     "--retrain-missing"]) == 0
    assert re.search(r"seed0-\w+: adapter retrained; (validation|test) accuracy [\d.]+, NLL [\d.]+ as stored",
                     capsys.readouterr().out)
    assert {w: w.read_bytes() for w in weights} == kept  # the very tensors it had: retrained bit for bit
    assert not (folder / ".retrain.partial").exists() and runs.has_weights(folder)
    assert not (folder / corruption.REFUSED_FILE).exists()  # a retrain that matches removes the refusal on record
    points = [json.loads(line) for line in (out / "corruption-toy.jsonl").read_text().splitlines()]
    assert len(points) == 4 * 2 * 2 and "Left out" not in (out / "corruption-toy.md").read_text()


def test_a_retrained_run_that_scores_other_numbers_is_left_out_and_not_retrained_again(finished_bench,
                                                                                     monkeypatch):
    out = finished_bench
    row = next(json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()
               if '"variant": "bara-small"' in line)
    folder = out / "runs" / "toy" / row["variant"] / row["run"]
    for w in folder.rglob("*.safetensors"):
        w.unlink()
    metrics = json.loads((folder / METRICS).read_text())
    block = metrics["validation"] if "validation" in metrics else metrics
    block["nll"] += 0.01  # as if it had trained elsewhere
    (folder / METRICS).write_text(json.dumps(metrics))
    with pytest.raises(BaraError, match=r"retrained to other (validation|test) numbers \(nll .* -> .*\).*fix: set "
                                        "OMP_NUM_THREADS"):
        corruption.retrain_adapter(folder, progress_bar=False)
    assert not runs.has_weights(folder) and (folder / ".retrain.partial" / METRICS).exists()
    record = json.loads((folder / corruption.REFUSED_FILE).read_text())  # committed with the run, unlike the retrain
    assert record["split"] in ("validation", "test") and record["torch_threads"] == torch.get_num_threads()
    assert record["cpu"] and record["stored"]["nll"] == pytest.approx(record["retrained"]["nll"] + 0.01)
    left_out = (f"bara-small/{row['run']} (retrained on {record['cpu']} at {record['torch_threads']} thread(s) to "
                f"other {record['split']} numbers than it stored, --retrain-missing; {corruption.REFUSED_FILE})")

    # the whole command goes on without it: the other runs scored, the run named in the report from its record
    trained, refused = [], json.loads((folder / ".retrain.partial" / METRICS).read_text())
    monkeypatch.setattr(runs, "run_train", lambda *a, **k: trained.append(a) or refused)
    corruption.run_corrupt(out, ["toy"], intensities=[0, 40], progress_bar=False, missing="retrain",
                           only_method=["lora"])  # another method's runs only: the refusal is named from its record
    assert left_out in (out / "corruption-toy.md").read_text() and not trained
    corruption.run_corrupt(out, ["toy"], intensities=[0, 40], progress_bar=False, missing="retrain")
    assert not trained  # refused on this kind of machine: not trained again
    assert left_out in (out / "corruption-toy.md").read_text()
    points = [json.loads(line) for line in (out / "corruption-toy.jsonl").read_text().splitlines()]
    assert row["run"] not in {p["run"] for p in points} and len(points) == 3 * 2 * 2
    assert not runs.has_weights(folder) and not (folder / corruption.RUN_FILE).exists()

    # a new clone of the store (no .retrain.partial): on the same kind of machine the record alone leaves the run
    # out, with no retrain and no warning, in any command's report; on another it is retrained
    shutil.rmtree(folder / ".retrain.partial")
    for report_only in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            corruption.run_corrupt(out, ["toy"], intensities=[0, 40], progress_bar=False, missing="retrain",
                                   report_only=report_only)
        assert left_out in (out / "corruption-toy.md").read_text() and not trained
    assert "Partial" not in (out / "corruption-toy.md").read_text()
    monkeypatch.setattr(torch, "get_num_threads", lambda: refused["torch_threads"] + 1)  # as the fix advises
    with pytest.warns(UserWarning, match="left out of the curves"):
        corruption.run_corrupt(out, ["toy"], intensities=[0, 40], progress_bar=False, missing="retrain")
    assert len(trained) == 1  # at another thread count it trains again

    def data_gone(*args, **kwargs):
        raise BaraError("no such dataset: toy; fix: fetch it")

    monkeypatch.setattr(runs, "run_train", data_gone)  # a retrain that fails for another reason says that one
    monkeypatch.setattr(torch, "get_num_threads", lambda: refused["torch_threads"] + 2)
    with pytest.warns(UserWarning, match="no such dataset"):
        corruption.run_corrupt(out, ["toy"], intensities=[0, 40], progress_bar=False, missing="retrain")
    report = (out / "corruption-toy.md").read_text()
    assert f"bara-small/{row['run']} (its retrain failed: no such dataset: toy" in report


def test_retrains_are_scored_one_by_one_and_a_retrain_cut_half_way_continues(finished_bench, monkeypatch):
    """A retrained adapter is not kept across machines, so each run is scored as soon as it is retrained (a command
    stopped later keeps its points), and a retrain stopped half-way continues from its checkpoint."""
    from bara import checkpoint

    out = finished_bench
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    folders = [out / "runs" / "toy" / r["variant"] / r["run"] for r in rows if r["variant"] == "bara-small"]
    kept = {}
    for folder in folders:  # from another machine: no weights; stored as checkpointing every step (not in the hash)
        kept.update({w: w.read_bytes() for w in folder.rglob("*.safetensors")})
        for w in folder.rglob("*.safetensors"):
            w.unlink()
        metrics = json.loads((folder / METRICS).read_text())
        metrics["config"]["train"]["checkpoint_every"] = 1
        (folder / METRICS).write_text(json.dumps(metrics))
    real_save = checkpoint.save

    def cut_second_retrain_at_step_2(output_dir, step, *args, **kwargs):
        real_save(output_dir, step, *args, **kwargs)
        if folders[1] in output_dir.parents and step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", cut_second_retrain_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        corruption.run_corrupt(out, ["toy"], intensities=[0, 40], progress_bar=False, missing="retrain")
    assert (folders[0] / corruption.RUN_FILE).exists() and runs.has_weights(folders[0])  # scored before the cut
    partial = folders[1] / ".retrain.partial"
    assert checkpoint.candidates(partial) and not (partial / METRICS).exists()
    assert not (folders[1] / corruption.RUN_FILE).exists()

    monkeypatch.setattr(checkpoint, "save", real_save)
    calls, real_train = [], runs.run_train
    monkeypatch.setattr(runs, "run_train", lambda *a, **k: calls.append(k) or real_train(*a, **k))
    corruption.run_corrupt(out, ["toy"], intensities=[0, 40], progress_bar=False, missing="retrain")
    assert [k.get("resume") for k in calls] == [True]  # continued, not trained from the start
    assert {w: w.read_bytes() for w in kept} == kept  # both retrained bit for bit, the cut one included
    assert runs.has_weights(folders[1]) and not partial.exists() and (folders[1] / corruption.RUN_FILE).exists()
    assert len((out / "corruption-toy.jsonl").read_text().splitlines()) == len(rows) * 2 * 2


def test_only_method_scores_those_runs_and_the_report_names_the_others(finished_bench, capsys):
    out = finished_bench
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert cli.main(["corrupt", "--bench", str(out), "--data", "toy", "--intensities", "0,40", "--no-progress",
                     "--only-method", "bara"]) == 0  # a method's name: its variant bara-small
    scored = {r["variant"] for r in rows
              if (out / "runs" / "toy" / r["variant"] / r["run"] / corruption.RUN_FILE).exists()}
    assert scored == {"bara-small"}
    report = (out / "corruption-toy.md").read_text()
    assert "**Partial**: 2 run(s) not scored yet" in report and "| bara-small (2 seeds) |" in report
    assert all(f"lora/{r['run']}" in report for r in rows if r["variant"] == "lora")
    assert cli.main(["corrupt", "--bench", str(out), "--data", "toy", "--only-method", "lora,blob"]) == 2
    assert "--only-method: 'blob' has no finished run here; fix: use some of bara, bara-small, lora" in \
        capsys.readouterr().err


def test_only_method_follows_bench_rule_where_a_name_is_a_variant_and_a_method():
    # ablations: `bara` is BaRA's default variant and the method of its other variants; as `bara bench --only-method
    # bara` trains that variant only, `bara corrupt --only-method bara` scores it only
    rows = {"toy": [{"variant": v, "method": m} for v, m in
                    (("bara", "bara"), ("bara-k1", "bara"), ("lora", "lora"), ("blob-small", "blob"))]}
    picked = lambda names: [r["variant"] for r in rows["toy"] if corruption._chosen(rows, names)(r)]
    with pytest.warns(UserWarning, match="selects the variant 'bara' only, not the method's other variant.s. bara-k1"):
        assert picked(["bara"]) == ["bara"]
    assert picked(["bara-k1", "lora"]) == ["bara-k1", "lora"]
    assert picked(["blob"]) == ["blob-small"]  # a method's name that no variant has: every variant of it
    assert picked(None) == ["bara", "bara-k1", "lora", "blob-small"]


def test_the_report_names_the_runs_not_scored_yet_and_report_only_scores_nothing(finished_bench, monkeypatch):
    out = finished_bench
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    scored_before = []
    real = corruption.corrupt_run

    def stop_after_one(folder, *args, **kwargs):  # the command stops (killed) after the first run
        if scored_before:
            raise KeyboardInterrupt
        scored_before.append(folder)
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(corruption, "corrupt_run", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        corruption.run_corrupt(out, ["toy"], intensities=[0, 40], progress_bar=False)
    report = (out / "corruption-toy.md").read_text()  # written after the one run it scored
    names = [f"{r['variant']}/{r['run']}" for r in rows]
    done = f"{scored_before[0].parent.name}/{scored_before[0].name}"
    assert f"**Partial**: {len(rows) - 1} run(s) not scored yet" in report
    assert all((name in report) == (name != done) for name in names)
    points = [json.loads(line) for line in (out / "corruption-toy.jsonl").read_text().splitlines()]
    assert {p["run"] for p in points} == {scored_before[0].name} and len(points) == 2 * 2
    assert f"| {scored_before[0].parent.name} (1 seed) |" in report  # a partial mean says over how many seeds

    monkeypatch.setattr(corruption, "corrupt_run", lambda *a, **k: pytest.fail("report-only scored a run"))
    for w in scored_before[0].rglob("*.safetensors"):  # no adapter needed to report: no error for one missing
        w.unlink()
    assert cli.main(["corrupt", "--bench", str(out), "--data", "toy", "--report", "--intensities", "0,40",
                     "--no-progress"]) == 0  # --report: argparse's abbreviation of --report-only

    def without_command(text):
        return [line for line in text.splitlines() if not line.startswith("`bara corrupt")]

    rewritten = (out / "corruption-toy.md").read_text()
    assert without_command(rewritten) == without_command(report)
    # it names the command that scores the points (to reproduce them), and itself
    scoring = f"bara corrupt --bench {out} --data toy --intensities 0,40 --no-progress"
    rewriting = f"bara corrupt --bench {out} --data toy --report --intensities 0,40 --no-progress"
    assert f"`{scoring}` (this report rewritten from the points it scored: `{rewriting}`)" in rewritten
    monkeypatch.setattr(corruption, "corrupt_run", real)
    corruption.run_corrupt(out, ["toy"], intensities=[0, 40], progress_bar=False, missing="skip")
    assert "Partial" not in (out / "corruption-toy.md").read_text()
    assert len((out / "corruption-toy.jsonl").read_text().splitlines()) == len(rows) * 2 * 2
