"""What a first-time user of the command line meets: per-method help, defaults, the benchmark's plan, plot titles,
file modes, the demo."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from bara import bench, cli, plots, runs
from bara.runs import RunConfig
from bara.trainer import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def help_text(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit):
        cli.main(argv)
    return capsys.readouterr().out


def test_train_help_lists_the_options_of_the_method_asked_for(capsys):
    everything = help_text(capsys, ["train", "--help"])
    bara_only = help_text(capsys, ["train", "--method", "bara", "--help"])
    lora_only = help_text(capsys, ["train", "--help", "--method=lora"])
    for flag in ("--gate", "--kl-lr", "--members", "--lbfgs-iters", "--target-r"):
        assert flag in everything
    assert "--gate" in bara_only and "--kl-lr" in bara_only and "options of --method bara" in bara_only
    assert "--members" not in bara_only and "--lbfgs-iters" not in bara_only and "--target-r" not in bara_only
    assert "--r " in lora_only and "--gate" not in lora_only and "--kl-lr" not in lora_only
    assert "--method M --help" in everything  # says how to get one method's list


def test_default_data_is_not_trec():
    args = cli.parser().parse_args(["train", "--output", "x"])
    assert args.data == RunConfig().data == "banking77"


def test_bench_says_how_many_runs_and_how_long_before_training(tmp_path, tiny_bert, toy_data, capsys):
    from test_bench import tiny_preset

    preset = tiny_preset(tmp_path, tiny_bert, toy_data)
    out = tmp_path / "bench"
    bench.run_bench(str(preset), out, progress=False, announce=True)
    first = capsys.readouterr().out.splitlines()[0]
    # 2 methods x 2 seeds x 3 steps, at the guess (nothing finished yet)
    assert first.startswith("bara bench: 4 runs to train, 12 steps: about 0.0 h at 0.50 s per step (a guess")
    bench.run_bench(str(preset), tmp_path / "again", progress=False, announce=True, only_method="lora")
    assert capsys.readouterr().out.startswith("bara bench: 2 runs to train, 6 steps")
    bench.run_bench(str(preset), out, progress=False, announce=True)  # finished: measured, nothing left
    assert re.match(r"bara bench: 0 runs to train, 0 steps: about 0.0 h \(the median wall time per step of each "
                    r"method's finished runs here, of the same dataset where it has some \(at the same max length and "
                    r"mixed precision where there are\), else scaled by that dataset's cost against the others, "
                    r"evaluation included; over all datasets: all \d+\.\d\d s\)", capsys.readouterr().out)
    # Runs that --reuse copies are not counted, and the source's finished runs time the ones that are.
    source = tmp_path / "source"
    shutil.copytree(out, source)
    bara_copy = next(s for s in bench.expand(str(preset)) if s.variant == "bara-small")
    shutil.rmtree(source / bara_copy.folder)
    bench.run_bench(str(preset), tmp_path / "copied", progress=False, announce=True, reuse=source)
    assert re.match(r"bara bench: 1 run to train, 3 steps: about \d+\.\d h \(the median wall time per step",
                    capsys.readouterr().out)
    # A method with finished runs is estimated at its own time per step, evaluation included.
    bara_runs = [s for s in bench.expand(str(preset)) if s.variant == "bara-small"]
    walls = [json.loads((out / s.folder / "metrics.json").read_text())["wall_seconds"] / 3 for s in bara_runs]
    shutil.rmtree(out / bara_runs[1].folder)
    bench.run_bench(str(preset), out, progress=False, announce=True, only_method="bara-small")
    text = capsys.readouterr().out
    assert text.startswith(f"bara bench: 1 run to train, 3 steps: about {walls[0] * 3 / 3600:.1f} h (")
    assert f"over all datasets: bara {walls[0]:.2f} s)" in text.splitlines()[0]
    # Runs of the same data in another precision (here 10^6 times slower a step) do not time this one's.
    shutil.rmtree(out / bara_runs[1].folder)  # trained again above
    bf16 = out / "runs" / "toy" / "bara-small" / "seed9-bf16"
    shutil.copytree(out / bara_runs[0].folder, bf16)
    metrics = json.loads((bf16 / "metrics.json").read_text())
    (bf16 / "metrics.json").write_text(json.dumps({**metrics, "wall_seconds": metrics["wall_seconds"] * 1e6,
                                                   "config": {**metrics["config"], "mixed_precision": "bf16"}}))
    bench.run_bench(str(preset), out, progress=False, announce=True, only_method="bara-small")
    hours = walls[0] * 3 / 3600  # mixed in, the median of the two would make it hundreds of hours
    assert capsys.readouterr().out.startswith(f"bara bench: 1 run to train, 3 steps: about {hours:.1f} h (")
    shutil.rmtree(bf16)
    # Another dataset's runs of the method (here 10^6 times slower a step) do not count where this one has some.
    other = out / "runs" / "other" / "bara-small" / "seed0-x"
    shutil.copytree(out / bara_runs[0].folder, other)
    metrics = json.loads((other / "metrics.json").read_text())
    other_data = {**metrics["config"], "data": "other-data"}  # runs of other data, under another name
    (other / "metrics.json").write_text(json.dumps({**metrics, "wall_seconds": metrics["wall_seconds"] * 1e6,
                                                    "config": other_data}))
    shutil.rmtree(out / bara_runs[1].folder)  # trained again above
    bench.run_bench(str(preset), out, progress=False, announce=True, only_method="bara-small")
    text = capsys.readouterr().out.splitlines()[0]
    assert text.startswith(f"bara bench: 1 run to train, 3 steps: about {walls[0] * 3 / 3600:.1f} h (") and \
        "over all datasets: bara " in text and f"bara {walls[0]:.2f} s)" not in text
    # A method with no run on this dataset: its runs elsewhere, scaled by what LoRA costs here against there (here
    # the other dataset is 10^6 times slower for LoRA too, so the estimate is this dataset's, not 10^6 times it).
    lora_run = next(s for s in bench.expand(str(preset)) if s.variant == "lora")
    for seed in (0, 1):  # two slow LoRA runs elsewhere, so that the median elsewhere is theirs
        slow = out / "runs" / "other" / "lora" / f"seed{seed}-y"
        shutil.copytree(out / lora_run.folder, slow)
        metrics = json.loads((slow / "metrics.json").read_text())
        (slow / "metrics.json").write_text(json.dumps({**metrics, "wall_seconds": metrics["wall_seconds"] * 1e6,
                                                       "config": {**metrics["config"], "data": "other-data"}}))
    for s in bara_runs:
        shutil.rmtree(out / s.folder)
    bara_there = json.loads((other / "metrics.json").read_text())["wall_seconds"] / 3
    bench.run_bench(str(preset), out, progress=False, announce=True, only_method="bara-small")
    expected = 2 * 3 * bara_there / 1e6 / 3600  # LoRA's time per step here over there: about 1e-6
    assert f"{bara_there * 6 / 3600:.1f}" != f"{expected:.1f}"  # unscaled it would be hundreds of hours
    assert capsys.readouterr().out.startswith(f"bara bench: 2 runs to train, 6 steps: about {expected:.1f} h (")
    # Temperature scaling at LoRA's rate trains nothing of its own: its steps are not counted.
    preset = tiny_preset(tmp_path, tiny_bert, toy_data, methods='{ lora = "lora", ts = "temperature" }')
    bench.run_bench(str(preset), tmp_path / "posthoc", progress=False, announce=True)
    assert capsys.readouterr().out.startswith("bara bench: 4 runs to train (2 of them post-hoc on a LoRA run's "
                                              "fit), 6 steps")
    # A learning-rate grid: its 2 candidates (seed 0) and the other seed once chosen; after the candidates, the seed.
    preset = tiny_preset(tmp_path, tiny_bert, toy_data, methods='{ lora = "lora" }', lr="default = [5e-3, 1e-2]")
    bench.run_bench(str(preset), tmp_path / "grid", progress=False, announce=True, only_method="lora")
    assert capsys.readouterr().out.startswith("bara bench: 3 runs to train, 9 steps")
    for folder in (tmp_path / "grid" / "runs" / "toy" / "lora").glob("seed1-*"):
        shutil.rmtree(folder)
    bench.run_bench(str(preset), tmp_path / "grid", progress=False, announce=True, only_method="lora")
    assert capsys.readouterr().out.startswith("bara bench: 1 run to train, 3 steps")
    # Temperature at LoRA's rate, still to be chosen: its seed-0 run reads the chosen candidate's fit, and its seed-1
    # run the fit of LoRA's seed-1 run; only LoRA's 2 candidates and its seed 1 train.
    preset = tiny_preset(tmp_path, tiny_bert, toy_data, methods='{ lora = "lora", ts = "temperature" }',
                         lr='default = [5e-3, 1e-2]\nts = "lora"')
    bench.run_bench(str(preset), tmp_path / "grid-posthoc", progress=False, announce=True)
    assert capsys.readouterr().out.startswith("bara bench: 5 runs to train (2 of them post-hoc on a LoRA run's "
                                              "fit), 9 steps")


def test_plot_titles_say_what_they_show(tmp_path, tiny_bert, toy_data, monkeypatch):
    texts = {}

    def record(fig, path):
        texts[Path(path).name] = [fig._suptitle.get_text() if fig._suptitle else ""] + \
            [t for ax in fig.axes for t in (ax.get_title(), ax.get_xlabel())]
        return Path(path)

    monkeypatch.setattr(plots, "_save", record)
    config = RunConfig(model=tiny_bert, data=toy_data, method="blob", train=TrainConfig(
        steps=2, batch_size=8, max_length=24, eval_batch_size=16, seed=3))
    runs.run_train(config, tmp_path / "blob", progress_bar=False, validation=False)
    assert set(texts) == {"reliability.png", "reliability-one-pass.png", "rank.png"}
    sampled, one_pass = (" | ".join(texts[name]) for name in ("reliability.png", "reliability-one-pass.png"))
    assert re.search(r"blob on \S+, seed 3: 10 samples — ECE", sampled)
    assert re.search(r"blob on \S+, seed 3: one pass — ECE", one_pass)
    rank = texts["rank.png"]
    assert rank[0].startswith("blob on ") and "seed 3: joint expected rank" in rank[0] and "BaRA" not in rank[0]
    assert any(t.startswith("hard rank per instance") for t in rank)  # the histogram's axis
    assert any(t.startswith("hard rank: mean") for t in rank)


def test_outputs_are_readable_by_others(tmp_path, tiny_bert, toy_data):
    previous = os.umask(0o022)
    try:
        config = RunConfig(model=tiny_bert, data=toy_data, method="lora", train=TrainConfig(
            steps=2, batch_size=8, max_length=24, eval_batch_size=16))
        runs.run_train(config, tmp_path / "run", progress_bar=False)
    finally:
        os.umask(previous)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert {"metrics.json", "adapter_model.safetensors", "bara_config.json", "reliability.png"} <= set(modes)
    assert set(modes.values()) == {"0o644"}, modes


def test_demo_trains_bara_and_the_table_shows_its_diagnostics():
    demo = re.search(r"^demo:.*?(?=^\S)", (ROOT / "Makefile").read_text(), re.S | re.M).group(0)
    assert "--method bara" in demo and "--data banking77" in demo
    metrics = {"method": "bara", "data": "banking77", "n_test": 10, "samples": 10, "accuracy": 0.5, "ece": 0.1,
               "nll": 1.0, "brier": 0.6, "fast_path": {"accuracy": 0.6, "ece": 0.05, "nll": 0.9},
               "diagnostics": {"joint_effective_rank": 5.25, "gate_mi": 0.125, "layers": {}, "r_max": 16}}
    table = cli.table(metrics)
    assert "one-pass: accuracy 60.00%" in table
    assert "diagnostics: joint_effective_rank 5.25, gate_mi 0.125, r_max 16" in table
