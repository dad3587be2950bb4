"""--report-to: accelerate's trackers get what history.jsonl gets."""

from __future__ import annotations

import importlib.util
import json

import pytest
from accelerate.tracking import GeneralTracker

from bara import runs
from bara.errors import BaraError
from bara.runs import RunConfig
from bara.trainer import TrainConfig


class Recording(GeneralTracker):
    """A tracker that keeps what it is given."""

    name = "recording"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.config, self.logged, self.finished = None, [], False

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values: dict):
        self.config = values

    def log(self, values: dict, step: int | None = None, **kwargs):
        self.logged.append({"step": step, **values})

    def finish(self):
        self.finished = True


def config(model: str, data: str) -> RunConfig:
    return RunConfig(model=model, data=data, method="bara", method_options={"r": 4},
                     train=TrainConfig(steps=3, batch_size=8, lr=5e-3, max_length=24, eval_batch_size=16, eval_every=2))


def test_the_tracker_gets_the_history_and_the_config(tiny_bert, toy_data, tmp_path):
    tracker = Recording()
    runs.run_train(config(tiny_bert, toy_data), tmp_path / "run", progress_bar=False, report_to=tracker)
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert tracker.logged == history and len(history) == 3 and "kl_local" in history[0]
    assert "val_accuracy" in history[1]  # validation records too
    assert tracker.config["method"] == "bara" and tracker.config["lr"] == 5e-3 and tracker.config["r"] == 4
    assert isinstance(tracker.config["target_modules"], str) and tracker.finished


def test_a_tracker_that_is_not_installed_is_refused_before_anything_loads(tiny_bert, toy_data, tmp_path,
                                                                           monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(BaraError, match=r"needs the package tensorboard.*fix: pip install 'bara-peft\[tensorboard\]'"):
        runs.run_train(config(tiny_bert, toy_data), tmp_path / "run", progress_bar=False, report_to="tensorboard")
    with pytest.raises(BaraError, match="--report-to must be none or one of tensorboard, wandb, mlflow"):
        runs.run_train(config(tiny_bert, toy_data), tmp_path / "run", progress_bar=False, report_to="aim")
    assert not (tmp_path / "run").exists()
