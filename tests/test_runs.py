"""End to end: train -> outputs -> eval, resume, output protection, the CLI, data-parallel, real MiniLM."""

from __future__ import annotations

import json
import os
import subprocess
import warnings
import sys
from pathlib import Path

import pytest
import torch

from bara import checkpoint, cli, runs
from bara.errors import BaraError
from bara.runs import RunConfig
from bara.trainer import TrainConfig

BIN = Path(sys.executable).parent


def config(model: str, data: str, method: str = "lora", steps: int = 12, **options) -> RunConfig:
    return RunConfig(model=model, data=data, method=method, method_options=options,
                     train=TrainConfig(steps=steps, batch_size=8, lr=5e-3, max_length=24, eval_batch_size=16))


def test_train_writes_outputs_and_eval_reproduces(tiny_bert, toy_data, tmp_path):
    out = tmp_path / "run"
    metrics = runs.run_train(config(tiny_bert, toy_data), out, progress_bar=False)
    for name in ("metrics.json", "adapter_config.json", "adapter_model.safetensors", "bara_config.json",
                 "reliability.png", "history.jsonl"):
        assert (out / name).exists(), name
    assert not (out / checkpoint.NAME).exists()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["n_test"] == 24 and saved["num_labels"] == 3 and saved["method"] == "lora"
    assert 0 <= saved["accuracy"] <= 1 and 0 <= saved["ece"] <= 1 and saved["nll"] > 0
    assert saved["trainable_params"] == metrics["trainable_params"] > 0
    assert saved["versions"]["torch"].startswith("2.13")
    assert saved["torch_threads"] == torch.get_num_threads() >= 1
    assert set(saved["validation"]) >= {"accuracy", "ece", "nll", "brier"}  # bara train scores validation
    assert len((out / "history.jsonl").read_text().splitlines()) == 12
    assert not (out / "curve.png").exists()  # no validation during training: no learning curve
    again = runs.run_eval(out, progress_bar=False)
    for key in ("accuracy", "ece", "nll", "brier"):
        assert again[key] == pytest.approx(saved[key], abs=1e-6), key


def test_validation_during_training_is_logged_and_plotted(tiny_bert, toy_data, tmp_path):
    run = config(tiny_bert, toy_data, steps=6)
    run.train.eval_every = 3
    out = tmp_path / "curve"
    runs.run_train(run, out, progress_bar=False)
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "val_accuracy" in h] == [3, 6]
    assert all(0 <= h["val_accuracy"] <= 1 and h["val_nll"] > 0 for h in history if "val_accuracy" in h)
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_causal_lm_multiple_choice(tiny_llama, toy_choices, tmp_path):
    out = tmp_path / "mc"
    metrics = runs.run_train(config(tiny_llama, toy_choices, steps=4), out, progress_bar=False)
    assert metrics["num_labels"] == 3
    assert runs.run_eval(out, progress_bar=False)["nll"] == pytest.approx(metrics["nll"], abs=1e-6)


def test_resume_gives_the_same_metrics(tiny_bert, toy_data, tmp_path, monkeypatch):
    cfg = config(tiny_bert, toy_data, steps=14, lora_dropout=0.1)
    cfg.train.checkpoint_every = 5
    full = runs.run_train(cfg, tmp_path / "full", progress_bar=False)

    real_save = checkpoint.save

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        if args[1] == 10:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        runs.run_train(cfg, tmp_path / "cut", progress_bar=False)
    monkeypatch.setattr(checkpoint, "save", real_save)
    assert not (tmp_path / "cut" / "metrics.json").exists()
    with pytest.raises(BaraError, match="unfinished run"):
        runs.run_train(cfg, tmp_path / "cut", progress_bar=False)
    resumed = runs.run_train(cfg, tmp_path / "cut", resume=True, progress_bar=False)
    for key in ("accuracy", "ece", "nll", "brier"):
        assert resumed[key] == pytest.approx(full[key], abs=1e-6), key


def test_finished_output_is_protected(tiny_bert, toy_data, tmp_path):
    out = tmp_path / "run"
    runs.run_train(config(tiny_bert, toy_data, steps=2), out, progress_bar=False)
    before = (out / "metrics.json").read_text()
    with pytest.raises(BaraError, match="finished run"):
        runs.run_train(config(tiny_bert, toy_data, steps=2), out, progress_bar=False)
    assert (out / "metrics.json").read_text() == before
    runs.run_train(config(tiny_bert, toy_data, steps=3), out, overwrite=True, progress_bar=False)
    assert json.loads((out / "metrics.json").read_text())["config"]["train"]["steps"] == 3


def untimed(values):
    """``values`` without its timings (nested too), which no two runs share."""
    if isinstance(values, dict):
        return {k: untimed(v) for k, v in values.items() if "seconds" not in k}
    return values


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {f"{f.relative_to(folder)}:{k}": v for f in sorted(folder.rglob("*.safetensors"))
            for k, v in load_file(f).items()}


@pytest.mark.parametrize("method, options", [("temperature", {}), ("laplace", {"ggn": "sampled"}), ("tfb", {})])
def test_post_hoc_method_on_a_finished_lora_run_is_the_run_trained_here(tiny_bert, toy_data, tmp_path, method,
                                                                         options):
    """A post-hoc method trains LoRA exactly as `lora` does; read from a finished LoRA run, its fit gives the same
    adapter, post-hoc fit (sampled GGN, TFB's sampled search) and metrics as training it again."""
    runs.run_train(config(tiny_bert, toy_data), tmp_path / "lora", progress_bar=False)
    here = runs.run_train(config(tiny_bert, toy_data, method, **options), tmp_path / "here", progress_bar=False)
    read = runs.run_train(config(tiny_bert, toy_data, method, **options), tmp_path / "read", progress_bar=False,
                          trained_from=tmp_path / "lora")
    lora, trained, reused = (_tensors(tmp_path / n) for n in ("lora", "here", "read"))
    assert set(trained) == set(reused) and all(torch.equal(trained[k], reused[k]) for k in trained)
    shared = {k for k in lora if k in trained}  # the LoRA factors and the head: what both trained
    assert len(shared) >= 4 and all(torch.equal(lora[k], trained[k]) for k in shared)
    assert len(trained) > len(shared) or method == "laplace"  # T or sigma beside them (Laplace: its own file)
    for key in ("accuracy", "ece", "nll", "brier", "convergence", "trainable_params"):
        assert read[key] == here[key], key
    assert untimed(read["validation"]) == untimed(here["validation"])
    assert (tmp_path / "read" / "history.jsonl").read_text() == (tmp_path / "here" / "history.jsonl").read_text()
    assert read["trained_from"] == str(tmp_path / "lora") and "trained_from" not in here
    assert read["train_seconds"] >= json.loads((tmp_path / "lora" / "metrics.json").read_text())["train_seconds"]


def test_trained_from_refuses_a_run_that_trained_something_else(tiny_bert, toy_data, tmp_path, capsys):
    runs.run_train(config(tiny_bert, toy_data), tmp_path / "lora", progress_bar=False)
    other_lr = config(tiny_bert, toy_data, "temperature")
    other_lr.train.lr = 1e-2
    cases = [(other_lr, "lr: 0.01 vs 0.005"), (config(tiny_bert, toy_data, "temperature", steps=13), "steps: 13 vs 12"),
             (config(tiny_bert, toy_data, "laplace", r=4), "r: 4 vs 8"),
             (config(tiny_bert, toy_data, "map"), "map trains its own objective")]
    for cfg, why in cases:
        with pytest.raises(BaraError, match=why):
            runs.run_train(cfg, tmp_path / "out", progress_bar=False, trained_from=tmp_path / "lora")
        assert not (tmp_path / "out").exists()
    with pytest.raises(BaraError, match="no finished run"):
        runs.run_train(config(tiny_bert, toy_data, "temperature"), tmp_path / "out", progress_bar=False,
                       trained_from=tmp_path / "nothing")
    argv = ["train", "--model", tiny_bert, "--data", toy_data, "--method", "temperature", "--steps", "12",
            "--batch-size", "8", "--max-length", "24", "--lr", "0.005", "--output", str(tmp_path / "cli"),
            "--trained-from", str(tmp_path / "lora"), "--no-progress", "--no-validation"]
    capsys.readouterr()
    assert cli.main(argv[:-4] + ["--lr", "0.01"] + argv[-4:]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bara: error: --trained-from") and "lr: 0.01 vs 0.005" in err and "\n" not in err, err
    assert cli.main(argv) == 0
    assert json.loads((tmp_path / "cli" / "metrics.json").read_text())["trained_from"] == str(tmp_path / "lora")


def test_cli_user_errors_are_one_line(tmp_path, capsys, tiny_bert, toy_data):
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\nhello\ta\n")
    cases = [
        ["train", "--model", tiny_bert, "--data", str(bad), "--output", str(tmp_path / "o1")],
        ["train", "--model", str(tmp_path / "nope"), "--data", toy_data, "--output", str(tmp_path / "o2")],
        ["train", "--model", tiny_bert, "--data", toy_data, "--method", "lora", "--gate", "none",
         "--output", str(tmp_path / "o3")],
        ["train", "--model", tiny_bert, "--data", toy_data, "--method", "bara", "--gate", "sometimes",
         "--output", str(tmp_path / "o4")],
        ["eval", "--adapter", str(tmp_path / "missing")],
    ]
    for argv in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("bara: error:") and "\n" not in err and "fix" in err, err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_cli_help_lists_methods_and_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    for word in ("--method", "--max-train", "--resume", "--seed", "bara", "blob", "--gate"):
        assert word in text


def test_data_parallel_two_processes(tiny_bert, toy_data, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "bara.cli", "train", "--model", tiny_bert,
               "--data", toy_data, "--steps", "4", "--batch-size", "4", "--output", str(out), "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_test"] == 24
    assert metrics["num_processes"] == 2


def test_validation_can_be_skipped_at_training_and_added_by_eval(tiny_bert, toy_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--model", tiny_bert, "--data", toy_data, "--method", "bara", "--r", "4", "--steps", "2",
                     "--batch-size", "4", "--output", str(out), "--no-progress", "--no-validation"]) == 0
    assert "validation" not in json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert cli.main(["eval", "--adapter", str(out), "--validation", "--data", toy_data]) == 2
    assert "--data cannot go with it; fix: drop --data" in capsys.readouterr().err
    assert cli.main(["eval", "--adapter", str(out), "--validation", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    validation = metrics["validation"]
    assert validation["samples"] == 10 and "fast_path" in validation and "gate_mi" in validation["diagnostics"]
    assert f"(validation, n={validation['n']}, S=10)" in printed and f"{100 * validation['accuracy']:.2f}%" in printed
    # The same numbers a run scoring validation at training gets.
    trained = tmp_path / "with"
    cli.main(["train", "--model", tiny_bert, "--data", toy_data, "--method", "bara", "--r", "4", "--steps", "2",
              "--batch-size", "4", "--output", str(trained), "--no-progress"])
    again = json.loads((trained / "metrics.json").read_text())["validation"]
    assert (again["nll"], again["fast_path"]["nll"]) == (validation["nll"], validation["fast_path"]["nll"])


def test_eval_all_examples_scores_a_shift_set_whole_and_refuses_the_training_data(tiny_bert, toy_data, tmp_path,
                                                                                  capsys):
    import shutil

    out, shift = tmp_path / "run", tmp_path / "shift"
    shutil.copytree(toy_data, shift)  # another dataset with the same labels: 60 + 15 + 24 examples
    assert cli.main(["train", "--model", tiny_bert, "--data", toy_data, "--method", "lora", "--steps", "2",
                     "--batch-size", "4", "--output", str(out), "--no-progress", "--no-validation"]) == 0
    capsys.readouterr()
    assert cli.main(["eval", "--adapter", str(out), "--data", str(shift), "--all-examples", "--max-eval", "30",
                     "--output", str(tmp_path / "ev"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((tmp_path / "ev" / "eval_metrics.json").read_text())
    assert (metrics["split"], metrics["n_test"]) == ("all", 30) and "(all examples, n=30, S=0)" in printed
    whole = runs.run_eval(out, str(shift), all_examples=True, progress_bar=False, extras=False)
    assert (whole["split"], whole["n_test"]) == ("all", 99)
    assert runs.run_eval(out, str(shift), progress_bar=False, extras=False)["n_test"] == 24  # its test split
    (tmp_path / "link").symlink_to(toy_data)  # the training folder spelled another way is refused all the same
    for argv, expected in (([], "was trained on"), (["--data", str(tmp_path / "link" / ".")], "was trained on"),
                           (["--validation"], "--all-examples cannot go with it")):
        assert cli.main(["eval", "--adapter", str(out), "--all-examples", "--no-progress", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and "fix:" in err and "\n" not in err, err


def test_a_run_trained_without_its_test_split_scores_it_later_with_the_same_numbers(tiny_bert, toy_data, tmp_path):
    # A benchmark's grid candidate: validation only at training; add_test scores test and OOD from the adapter.
    cfg = config(tiny_bert, toy_data, method="bara", steps=3, r=4)
    full = runs.run_train(cfg, tmp_path / "full", ood_data=toy_data, progress_bar=False)
    late = tmp_path / "late"
    deferred = runs.run_train(cfg, late, ood_data=toy_data, progress_bar=False, test=False)
    assert deferred["test_deferred"] is True and runs.test_deferred(late)
    assert "accuracy" not in deferred and "diagnostics" not in deferred and not (late / "reliability.png").exists()
    assert deferred["validation"]["nll"] == full["validation"]["nll"]
    from bara.report import load_runs
    assert load_runs([late]) == []  # not a finished run until its test split is scored
    scored = runs.add_test(late, toy_data, progress_bar=False)
    assert not runs.test_deferred(late) and json.loads((late / "metrics.json").read_text()) == scored
    for key in ("accuracy", "ece", "nll", "ood_auroc", "samples"):
        assert scored[key] == pytest.approx(full[key], abs=1e-6), key
    assert scored["fast_path"]["nll"] == pytest.approx(full["fast_path"]["nll"], abs=1e-6)
    assert scored["diagnostics"]["gate_mi"] == pytest.approx(full["diagnostics"]["gate_mi"], abs=1e-6)
    assert scored["wall_seconds"] > deferred["wall_seconds"] and scored["validation"] == deferred["validation"]
    assert (late / "reliability.png").exists() and (late / "reliability-one-pass.png").exists()
    assert [r["run"] for r in load_runs([late])] == ["late"]
    with pytest.raises(ValueError, match="test split, its validation split or both"):
        runs.run_train(cfg, tmp_path / "none", progress_bar=False, test=False, validation=False)


def test_real_minilm_smoke(tmp_path):
    out = tmp_path / "minilm"
    cfg = RunConfig(model="minilm", data="stackoverflow", max_train=60, max_eval=60,
                    train=TrainConfig(steps=3, batch_size=16, max_length=32))
    metrics = runs.run_train(cfg, out, progress_bar=False)
    assert metrics["n_test"] == 60 and metrics["num_labels"] == 20
    assert metrics["trainable_params"] == 2 * 6 * (8 * 384 * 2) + 384 * 20 + 20  # LoRA on q,v in 6 layers + head


# --- nothing lost: overwrite and resume -------------------------------------------------------------------

def test_overwrite_keeps_the_old_run_until_the_new_one_is_finished(tiny_bert, toy_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    first = config(tiny_bert, toy_data, steps=4)
    first.train.eval_every = 2
    runs.run_train(first, out, progress_bar=False)
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "curve.png" in before

    def file_too_large(*args, **kwargs):
        raise OSError(27, "File too large")  # as under prlimit --fsize

    monkeypatch.setattr(runs, "save_file", file_too_large)  # the new run fails when it writes its adapter
    with pytest.raises(BaraError, match=r"cannot write .*\.run\.new/adapter_model.safetensors .*File too large"):
        runs.run_train(config(tiny_bert, toy_data, steps=3), out, overwrite=True, progress_bar=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing half-written beside it
    monkeypatch.undo()
    runs.run_train(config(tiny_bert, toy_data, steps=3), out, overwrite=True, progress_bar=False)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "bara_config.json", "history.jsonl", "metrics.json", "notes.txt",
                                                      "reliability.png"]  # no stale curve.png
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "metrics.json").read_text())["config"]["train"]["steps"] == 3
    assert len((out / "history.jsonl").read_text().splitlines()) == 3
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def _crash_at(monkeypatch, step: int) -> None:
    real_save = checkpoint.save

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        if args[1] == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save_then_crash)


SCORES = ("accuracy", "ece", "nll", "brier")


def _same_run(a: Path, b: Path) -> None:
    """The same history, adapter and scores (timings aside; checkpoint_every may differ)."""
    for name in ("history.jsonl", "adapter_model.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ca, cb = (json.loads(runs.meta_file(p).read_text()) for p in (a, b))
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (a, b))
    for values in (ca["run"], cb["run"], ma["config"], mb["config"]):
        values["train"].pop("checkpoint_every")
    assert ca == cb
    assert {k: ma[k] for k in SCORES + ("n_train", "n_test", "config")} == \
        {k: mb[k] for k in SCORES + ("n_train", "n_test", "config")}
    assert {k: ma["validation"][k] for k in SCORES} == {k: mb["validation"][k] for k in SCORES}


@pytest.fixture()
def cut_run(tiny_bert, toy_data, tmp_path, monkeypatch):
    """A run of 14 steps (checkpoints every 5, validation every 7) finished, and the same run cut at step 10."""
    cfg = config(tiny_bert, toy_data, steps=14, lora_dropout=0.1)
    cfg.train.checkpoint_every, cfg.train.eval_every = 5, 7
    runs.run_train(cfg, tmp_path / "full", progress_bar=False)
    _crash_at(monkeypatch, 10)
    with pytest.raises(KeyboardInterrupt):
        runs.run_train(cfg, tmp_path / "cut", progress_bar=False)
    monkeypatch.undo()
    return cfg, tmp_path / "full", tmp_path / "cut"


def test_resume_keeps_the_history_and_refuses_another_run(cut_run, toy_choices, tmp_path):
    import copy

    cfg, full, cut = cut_run
    changes = [("lr", 1e-2, "--lr 0.005 there, 0.01 now"), ("seed", 1, "--seed 0 there, 1 now"),
               ("batch_size", 4, "--batch-size 8 there, 4 now"), ("steps", 8, "--steps 14 there, 8 now")]
    for option, value, expected in changes:
        other = copy.deepcopy(cfg)
        setattr(other.train, option, value)
        with pytest.raises(BaraError, match=f"belongs to another run \\({expected}\\); fix: resume with") as err:
            runs.run_train(other, cut, resume=True, progress_bar=False)
        assert "\n" not in str(err.value)
    for field, value, flag in (("method", "mcdropout", "--method lora there, mcdropout now"),
                               ("data", toy_choices, "--data ")):
        other = copy.deepcopy(cfg)
        setattr(other, field, value)
        with pytest.raises(BaraError, match=flag):
            runs.run_train(other, cut, resume=True, progress_bar=False)
    same = copy.deepcopy(cfg)
    same.train.checkpoint_every = 4  # how often it checkpoints does not change the run
    runs.run_train(same, cut, resume=True, progress_bar=False)
    assert len((cut / "history.jsonl").read_text().splitlines()) == 14
    _same_run(full, cut)


def test_resume_without_a_checkpoint_is_refused(tiny_bert, toy_data, tmp_path):
    cfg = config(tiny_bert, toy_data, steps=2)
    with pytest.raises(BaraError, match="--resume: .* has no run to continue: there is no checkpoint; fix: drop"):
        runs.run_train(cfg, tmp_path / "new", resume=True, progress_bar=False)
    assert not (tmp_path / "new").exists()
    runs.run_train(cfg, tmp_path / "done", progress_bar=False)
    with pytest.raises(BaraError, match="already holds a finished run"):
        runs.run_train(cfg, tmp_path / "done", resume=True, progress_bar=False)


def test_damaged_checkpoint_falls_back_to_the_previous_one(cut_run):
    cfg, full, cut = cut_run
    weights = cut / checkpoint.NAME / "state.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    assert checkpoint.read(cut / f".{checkpoint.NAME}.old")["step"] == 5
    with pytest.warns(UserWarning, match="state.safetensors is missing or not the file that was written; resuming "
                                         "from the previous checkpoint"):
        runs.run_train(cfg, cut, resume=True, progress_bar=False)
    _same_run(full, cut)


def test_empty_state_json_everywhere_is_one_error(cut_run):
    cfg, _, cut = cut_run
    for folder in checkpoint.candidates(cut):
        (folder / "state.json").write_text("")
    with pytest.raises(BaraError, match=r"its checkpoints are damaged \(.*state.json is unreadable.*fix: drop "
                                        r"--resume .* or pass --overwrite"):
        runs.run_train(cfg, cut, resume=True, progress_bar=False)


# --- one line instead of a traceback -------------------------------------------------------------------------

@pytest.fixture()
def trained(tiny_bert, toy_data, tmp_path) -> Path:
    out = tmp_path / "trained"
    runs.run_train(config(tiny_bert, toy_data, steps=2), out, progress_bar=False)
    return out


def _damaged_copy(trained: Path, tmp_path: Path, name: str, damage) -> str:
    import shutil

    folder = tmp_path / name
    shutil.copytree(trained, folder)
    damage(folder)
    return str(folder)


def _edit_config(folder: Path, edit) -> None:
    meta = json.loads(runs.meta_file(folder).read_text())
    edit(meta)
    runs.meta_file(folder).write_text(json.dumps(meta))


def _nan_weights(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / runs.ADAPTER_WEIGHTS)
    next(iter(tensors.values()))[0] = float("nan")
    save_file(tensors, folder / runs.ADAPTER_WEIGHTS)


def test_cli_bad_input_is_one_line_not_a_traceback(tmp_path, capsys, tiny_bert, toy_data, trained):
    afile = tmp_path / "afile"
    afile.write_text("x")
    train = ["train", "--model", tiny_bert, "--data", toy_data, "--steps", "2", "--output", str(tmp_path / "o")]
    adapter = str(trained)
    cases = [
        (train + ["--batch-size", "0"], "--batch-size must be a whole number >= 1"),
        (train + ["--batch-size", "-3"], "--batch-size must be"),
        (train + ["--max-length", "0"], "--max-length must be a whole number >= 1"),
        (train + ["--max-length", "1000"], "--max-length 1000 is more than the 128 positions"),
        (train + ["--epochs", "0"], "--epochs must be a number above 0"),
        (train + ["--epochs", "-1"], "--epochs must be"),
        (train + ["--steps", "-5"], "--steps must be a whole number >= 0"),
        (train + ["--lr", "-0.001"], "--lr must be a number above 0"),
        (train + ["--lr", "nan"], "--lr must be a number above 0, got nan"),
        (train + ["--warmup-ratio", "1.5"], "--warmup-ratio must be a fraction from 0 to 1"),
        (train + ["--checkpoint-every", "-1"], "--checkpoint-every must be"),
        (train + ["--text-column", "label"], "the text and the label column are both 'label'"),
        (train + ["--resume"], "has no run to continue: there is no checkpoint"),
        (["train", "--model", str(tmp_path / "no-model"), "--data", toy_data, "--output", str(afile / "o")],
         "is under " + str(afile) + ", which is a file"),  # checked before the model is loaded
        (["eval", "--adapter", adapter, "--output", str(afile)], f"--output {afile} is a file"),
        (["eval", "--adapter", adapter, "--samples", "-1"], "--samples must be a whole number >= 0"),
        (["eval", "--adapter", _damaged_copy(trained, tmp_path, "nolabels", lambda f: _edit_config(
            f, lambda m: m.pop("label_names")))], "is not a valid adapter config (KeyError: 'label_names')"),
        (["eval", "--adapter", _damaged_copy(trained, tmp_path, "onelabel", lambda f: _edit_config(
            f, lambda m: m.update(label_names=["x"])))], "not a list of 2 or more strings"),
        (["eval", "--adapter", _damaged_copy(trained, tmp_path, "truncated", lambda f: (f / runs.ADAPTER_WEIGHTS)
                                             .write_bytes((f / runs.ADAPTER_WEIGHTS).read_bytes()[:200]))],
         "adapter_model.safetensors is damaged or truncated"),
        (["eval", "--adapter", _damaged_copy(trained, tmp_path, "nan", _nan_weights)], "holds NaN or infinite values"),
        (["eval", "--adapter", _damaged_copy(trained, tmp_path, "huge", lambda f: _edit_config(
            f, lambda m: (m["method_config"].update(r=1000000), m["run"]["method_options"].update(r=1000000))))],
         "its config implies an adapter of 256,000,000 values (backbone.base_model.model.bert.encoder.layer.0."
         "attention.self.query.lora_A.default.weight: (1000000, 32)), more than the base model's"),
    ]
    capsys.readouterr()  # what training the fixture printed
    for argv, expected in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("bara: error:") and "\n" not in err and "fix:" in err, err
        assert expected in err, err[-300:]
    assert not (tmp_path / "o").exists()


def test_adapter_loads_from_another_folder(tiny_bert, toy_data, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(toy_data, tmp_path / "work" / "toy")
    shutil.copytree(tiny_bert, tmp_path / "work" / "model")
    monkeypatch.chdir(tmp_path / "work")
    metrics = runs.run_train(config("model", "toy", steps=2), Path("run"), progress_bar=False)
    meta = json.loads(runs.meta_file(Path("run")).read_text())
    assert meta["base_model"] == meta["run"]["model"] == str(tmp_path / "work" / "model")
    assert meta["run"]["data"] == str(tmp_path / "work" / "toy")
    monkeypatch.chdir(tmp_path)
    again = runs.run_eval(tmp_path / "work" / "run", progress_bar=False)
    assert again["nll"] == pytest.approx(metrics["nll"], abs=1e-6)


def test_killed_six_times_resumes_to_the_same_run(tiny_bert, toy_data, tmp_path, monkeypatch):
    """Interrupted at random training steps and inside checkpoint writes (before each fsync of a file, of the
    folder, and after the swap), then resumed: the same history, adapter and metrics as an uninterrupted run."""
    import random

    from bara import trainer

    cfg = config(tiny_bert, toy_data, steps=16, lora_dropout=0.1)
    cfg.train.checkpoint_every, cfg.train.eval_every = 3, 4
    runs.run_train(cfg, tmp_path / "full", progress_bar=False)
    out, rng, kills, reached = tmp_path / "killed", random.Random(0), [], []
    real_progress, real_fsync = trainer.Progress, checkpoint.fsync

    def killer(real, where: str, at: int):
        calls = []

        def wrapped(*args, **kwargs):
            calls.append(1)
            if len(calls) == at:
                kills.append(where)
                raise KeyboardInterrupt
            return real(*args, **kwargs)
        return wrapped

    for session in range(6):
        if session % 2:  # the n-th fsync of this session: inside the first or second checkpoint write
            monkeypatch.setattr(checkpoint, "fsync", killer(real_fsync, "write", rng.randint(1, 12)))
        else:  # Progress is made twice per training step
            monkeypatch.setattr(trainer, "Progress", killer(real_progress, "step", rng.randint(1, 10)))
        with pytest.raises(KeyboardInterrupt):
            runs.run_train(cfg, out, resume=bool(checkpoint.candidates(out)), progress_bar=False)
        monkeypatch.undo()
        assert not (out / "metrics.json").exists()
        whole = checkpoint.newest_whole(out)
        reached.append(checkpoint.read(whole)["step"] if whole else 0)
    assert kills == ["step", "write"] * 3
    assert reached == [3, 6, 6, 6, 9, 12]  # the step of the newest whole checkpoint after each kill
    runs.run_train(cfg, out, resume=True, progress_bar=False)
    _same_run(tmp_path / "full", out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "full").iterdir())


def test_cli_prints_the_rows_read_and_keeps_them(tiny_bert, toy_data, tmp_path, capsys):
    argv = ["train", "--model", tiny_bert, "--data", toy_data, "--steps", "2", "--output", str(tmp_path / "o"),
            "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == [f"data: {Path(toy_data) / name}: {n} rows read" for name, n in
                       (("train.tsv", 60), ("dev.tsv", 15), ("test.tsv", 24))]
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["data_notes"] == [line[6:] for line in out[:3]]


def test_unwritable_output_is_refused_before_loading(tmp_path, monkeypatch, toy_data):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.access(locked, os.W_OK):  # root writes anywhere: pretend the folder is read-only for it too
        monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked)
    cfg = config(str(tmp_path / "no-such-model"), toy_data)  # loading it would fail with another message
    with pytest.raises(BaraError, match=f"--output {locked / 'run'}: {locked} is not writable; fix: choose"):
        runs.run_train(cfg, locked / "run", progress_bar=False)
    locked.chmod(0o755)


def test_overwrite_of_the_current_folder_is_refused(tiny_bert, toy_data, tmp_path, monkeypatch):
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "metrics.json").write_text("{}")
    monkeypatch.chdir(tmp_path / "here")
    with pytest.raises(BaraError, match="holds the current folder; fix: run the command from another folder"):
        runs.run_train(config(tiny_bert, toy_data, steps=2), Path("."), overwrite=True, progress_bar=False)
    assert (tmp_path / "here" / "metrics.json").read_text() == "{}"


def test_a_run_stopped_too_early_says_so_and_a_converged_one_does_not(tiny_bert, toy_data, tmp_path):
    def run(steps: int, name: str) -> dict:
        cfg = config(tiny_bert, toy_data, steps=steps)
        cfg.train.lr = 2e-2
        return runs.run_train(cfg, tmp_path / name, progress_bar=False)

    # The toy task sits on a plateau at log 3 for its first ~40 steps, learns by step 100, is done by 150.
    with pytest.warns(UserWarning, match=r"about the chance level log 3 = 1.099: the run has not learned the task"):
        assert run(12, "stuck")["convergence"]["verdict"] == "not learning"
    with pytest.warns(UserWarning, match="validation NLL still falling over the last 20 % of the steps"):
        metrics = run(60, "short")
    budget = metrics["convergence"]
    assert budget["verdict"] == "still falling" and budget["change"] < -0.02
    history = [json.loads(line) for line in (tmp_path / "short" / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "val_nll" in h] == [48, 60]  # one-pass scores for the check only
    assert budget["val_nll_at_end"] == history[-1]["val_nll"]
    assert json.loads((tmp_path / "short" / "metrics.json").read_text())["convergence"] == budget
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no budget warning
        metrics = run(150, "long")
    assert metrics["convergence"]["verdict"] == "converged" and metrics["accuracy"] == 1.0


def test_train_without_lr_uses_the_methods_own_default_for_the_model(tiny_bert, tiny_llama, toy_data, tmp_path,
                                                                     capsys):
    from bara.methods import METHODS

    # The standard benchmark's validation choices on MiniLM (benchmarks/results/standard/results.md), and
    # multiple-choice's on SmolLM2 (benchmarks/results/multiple-choice/results.md: 3e-3 on all three sets).
    lora_like = {"encoder": 5e-3, "causal": 3e-3}
    assert {name: m.default_lr for name, m in METHODS.items()} == {
        **{name: lora_like for name in ("lora", "map", "mcdropout", "ensemble", "temperature", "laplace", "blob",
                                         "monteclora", "tfb")},
        "adalora": {"encoder": 1e-2}, "bara": {"encoder": 1e-2, "causal": 3e-3}}
    assert runs.default_lr("minilm", "bara") == runs.default_lr(tiny_bert, "adalora") == 1e-2  # encoders
    assert runs.default_lr(tiny_bert, "tfb") == 5e-3
    assert runs.default_lr("smollm2", "bara") == runs.default_lr(tiny_llama, "lora") == 3e-3  # causal LMs
    # AdaLoRA, never run on a causal LM, and a model whose kind cannot be read: the shared rate
    assert runs.default_lr(tiny_llama, "adalora") == TrainConfig.lr == 1e-3
    assert runs.default_lr(str(tmp_path / "no-model"), "bara") == 1e-3  # unreadable: loading it says why, later
    with pytest.raises(BaraError, match="unknown method 'nope'; fix: use one of"):
        runs.default_lr("minilm", "nope")

    def trained_lr(name: str, *flags: str) -> float:
        argv = ["train", "--model", tiny_bert, "--data", toy_data, "--method", "adalora", "--steps", "3",
                "--max-length", "24", "--output", str(tmp_path / name), "--no-progress", *flags]
        assert cli.main(argv) == 0
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics["config"]["train"]["lr"] == json.loads(
            runs.meta_file(tmp_path / name).read_text())["run"]["train"]["lr"]  # the adapter's record too
        return metrics["config"]["train"]["lr"]

    capsys.readouterr()
    assert trained_lr("default") == 1e-2
    assert "lr: 0.01, adalora's default for this model (--lr sets another)\n" in capsys.readouterr().out
    assert trained_lr("given", "--lr", "0.002") == 0.002
    assert "default for this model" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["train", "--method", "adalora", "--help"])
    assert " ".join(capsys.readouterr().out.split()).count(
        "peak learning rate (default for --method adalora: 0.01 on encoders such as minilm; 0.001 on causal LMs "
        "such as smollm2 (none measured for it yet))") == 1
    with pytest.raises(SystemExit):
        cli.main(["train", "--method", "bara", "--help"])
    assert "(default for --method bara: 0.01 on encoders such as minilm; 0.003 on causal LMs such as smollm2)" in \
        " ".join(capsys.readouterr().out.split())
