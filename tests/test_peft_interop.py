"""Adapters of the LoRA-family methods are peft adapters: peft loads them and predicts what bara predicts."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from bara import cli, runs
from bara.data import load_task
from bara.runs import RunConfig
from bara.trainer import TrainConfig


def train(model: str, data: str, method: str, out, steps: int = 6, **options):
    config = RunConfig(model=model, data=data, method=method, method_options=options,
                       train=TrainConfig(steps=steps, batch_size=8, lr=5e-3, max_length=24, eval_batch_size=16))
    return runs.run_train(config, out, progress_bar=False)


def peft_logits(base_folder: str, adapter, batch: dict) -> torch.Tensor:
    base = AutoModelForSequenceClassification.from_pretrained(base_folder, num_labels=3)
    model = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("method,options", [("lora", {}), ("mcdropout", {}), ("temperature", {}),
                                            ("adalora", {"tinit": 0.0, "tfinal": 0.0, "target_r": 2})])
def test_peft_loads_the_adapter_and_predicts_as_bara(tiny_bert, toy_data, tmp_path, method, options):
    out = tmp_path / method
    metrics = train(tiny_bert, toy_data, method, out, **options)
    peft_config = json.loads((out / runs.ADAPTER_CONFIG).read_text())
    assert peft_config["peft_type"] == ("ADALORA" if method == "adalora" else "LORA")
    assert json.loads((out / runs.BARA_CONFIG).read_text())["method"] == method
    classifier, loaded, _ = runs.load_adapter(out)
    test = load_task(toy_data).test
    batch = classifier.encode(test, list(range(len(test))))
    with torch.no_grad():
        ours = classifier(batch["input_ids"], batch["attention_mask"])  # the adapter's logits (no temperature)
    theirs = peft_logits(tiny_bert, out, batch)
    assert torch.equal(ours, theirs)
    if method == "lora":  # bara eval's test accuracy, exactly, from peft's model
        accuracy = (theirs.argmax(-1) == batch["labels"]).double().mean().item()
        assert accuracy == metrics["accuracy"]
    if method == "temperature":  # bara's own state beside peft's files
        assert (out / runs.BARA_STATE).exists() and loaded.diagnostics(classifier, [])["temperature"] != 1.0


def test_every_ensemble_member_is_a_peft_adapter(tiny_bert, toy_data, tmp_path):
    out = tmp_path / "ensemble"
    train(tiny_bert, toy_data, "ensemble", out, steps=4, members=2)
    classifier, method, _ = runs.load_adapter(out)
    test = load_task(toy_data).test
    batch = classifier.encode(test, list(range(8)))
    with torch.no_grad():
        members = method.member_logits(classifier, batch)
    for k in range(2):
        assert torch.equal(peft_logits(tiny_bert, out / f"member{k}", batch), members[k])
    assert not torch.equal(members[0], members[1])


def merged_logits(folder, batch: dict) -> torch.Tensor:
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("method,options", [("lora", {}), ("blob", {}), ("bara", {"gate": "global", "r": 4})])
def test_export_merge_predicts_as_the_one_pass_prediction(tiny_bert, toy_data, tmp_path, method, options):
    out = tmp_path / method
    metrics = train(tiny_bert, toy_data, method, out, **options)
    classifier, loaded, _ = runs.load_adapter(out)
    test = load_task(toy_data).test
    batch = classifier.encode(test, list(range(len(test))))
    ours = loaded.predict(classifier, batch, 0)[0]
    assert cli.main(["export", "--adapter", str(out), "--merge", str(tmp_path / "merged")]) == 0
    theirs = merged_logits(tmp_path / "merged", batch).softmax(-1)
    assert torch.allclose(ours, theirs, atol=1e-5)
    one_pass = metrics if method == "lora" else metrics["fast_path"]  # bara train's test accuracy
    assert (theirs.argmax(-1) == batch["labels"]).double().mean().item() == one_pass["accuracy"]
    saved = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert sorted(saved["id2label"].values()) == sorted(classifier.label_names)


@pytest.mark.parametrize("method,reason", [("bara", "switches factors per input"), ("ensemble", "not one set of"),
                                           ("temperature", "divides the logits")])
def test_export_merge_says_why_not(tiny_bert, toy_data, tmp_path, capsys, method, reason):
    out = tmp_path / method
    train(tiny_bert, toy_data, method, out, steps=2)
    capsys.readouterr()
    assert cli.main(["export", "--adapter", str(out), "--merge", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bara: error:") and reason in err and "fix:" in err and "\n" not in err
    assert not (tmp_path / "merged").exists()
