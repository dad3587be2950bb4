"""The Python API (bara.get_model, bara.Trainer, bara.from_pretrained) on tiny random transformers models."""

from __future__ import annotations

import contextlib
import io
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification,
                          LlamaConfig, LlamaForCausalLM, TrainingArguments)

import bara
from bara.errors import BaraError
from bara.methods.bara import BaraLinear

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def bert(num_labels: int = 3, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**TINY, num_labels=num_labels))


def llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY, num_key_value_heads=2))


def batch(n: int = 4, length: int = 8, seed: int = 0) -> dict:
    ids = torch.randint(5, 100, (n, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 0] % 3}


def readme_script() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_readme_script_trains_saves_and_reloads(dtype):
    code = readme_script()
    assert code.count("\n") <= 30  # the "25-line script"
    code = code.replace("DTYPE = torch.float32", f"DTYPE = torch.{dtype}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the README's own example
    lines = [line for line in out.getvalue().splitlines() if "reloaded" in line]
    assert lines == [f"{arch} {config} reloaded: same one-pass predictions, finite S = 10"
                     for arch in ("bert", "llama") for config in ("BaraConfig", "BlobConfig")]


def test_version_and_exports():
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", bara.__version__)
    assert bara.BaraConfig().r == 16 and bara.BlobConfig().sigma_param == "rho2"
    with pytest.raises(AttributeError):
        bara.no_such_name  # noqa: B018


def test_get_model_freezes_the_base_and_adapts_the_targets():
    model = bara.get_model(bert(), bara.BaraConfig(r=4, target_modules=["query", "value"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".bara_" in n or ".classifier." in n for n in trainable)
    layers = [m for m in model.modules() if isinstance(m, BaraLinear)]
    assert len(layers) == 4  # query and value of 2 layers
    assert not any(p.requires_grad for layer in layers for p in layer.base.parameters())
    assert {n.rsplit(".", 1)[0] for n in trainable if ".classifier." in n} == {"classifier.backbone.classifier"}


def test_training_loss_is_the_method_objective_with_its_kl():
    model = bara.get_model(bert(), bara.BaraConfig(r=4)).train()
    b = batch()
    with pytest.raises(BaraError, match="fix: "):
        model(**b)  # training without knowing N and the number of steps
    model.start_training(total_steps=10, num_train=100, batch_size=4, step=5)
    torch.manual_seed(1)
    out = model(**b)
    torch.manual_seed(1)
    expected, logs = model.method.loss(model.classifier, b, model.progress)
    assert out.logits.shape == (4, 3)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert logs["kl_local"] > 0 and out.loss.item() > logs["nll"]  # the tempered local KL is in the loss
    assert out.loss.requires_grad


def test_eval_forward_is_the_one_pass_prediction():
    model = bara.get_model(bert(), bara.BaraConfig(r=4)).eval()
    b = batch()
    out = model(**b)
    probs = model.predict(**b, samples=0)
    assert torch.allclose(out.logits.softmax(-1), probs, atol=1e-6)
    assert out.loss.item() == pytest.approx(torch.nn.functional.nll_loss(probs.log(), b["labels"]).item(), rel=1e-5)


def test_trainer_uses_the_method_groups_and_runs_the_kl_step(tmp_path):
    model = bara.get_model(bert(), bara.BaraConfig(r=4))
    layer = next(m for m in model.modules() if isinstance(m, BaraLinear))
    alpha = layer.bara_pi_alpha.clone()
    steps = []
    step_end = model.method.on_step_end
    model.method.on_step_end = lambda classifier, progress: (steps.append(
        (progress.step, all(p.grad is not None for p in classifier.parameters() if p.requires_grad))),
        step_end(classifier, progress))
    b = batch(16)
    data = [{k: v[i] for k, v in b.items()} for i in range(16)]
    args = TrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to="none",
                             learning_rate=5e-3, disable_tqdm=True)
    trainer = bara.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert model.progress.step == 3 and model.progress.total_steps == 3 and model.progress.num_train == 16
    # Factors and head at the Trainer's rate, the gate network at gate_lr; sigma_A in no group.
    assert [g["initial_lr"] for g in trainer.optimizer.param_groups] == [5e-3, model.method.config.gate_lr]
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert id(layer.bara_A_log_sigma) not in in_optimizer  # only the KL step moves sigma_A (kl_step=sgd)
    assert steps == [(1, True), (2, True), (3, True)]  # after every optimiser step, before zero_grad
    assert not torch.equal(layer.bara_pi_alpha, alpha)  # q(pi)'s SVI step ran
    with pytest.raises(BaraError, match="fix: "):
        bara.Trainer(model=bert(), args=args, train_dataset=data)
    # transformers' default rate (5e-5) is a full fine-tuning rate: the method's own is named, once
    default = TrainingArguments(str(tmp_path), report_to="none")
    with pytest.warns(UserWarning, match=r"transformers' default 5e-05, but bara's own rate .* is 0\.01.*"
                                         r"fix: TrainingArguments\(learning_rate=0\.01\)"):
        bara.Trainer(model=model, args=default, train_dataset=data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a rate the user chose: no warning
        bara.Trainer(model=model, args=args, train_dataset=data)


def test_save_and_reload_records_an_absolute_base_path(tmp_path, monkeypatch):
    bert().save_pretrained(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    model = bara.get_model(BertForSequenceClassification.from_pretrained("base"), bara.BaraConfig(r=4))
    model.save_pretrained("adapter")
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert meta["base_model"] == str((tmp_path / "base").resolve()) and meta["method"] == "bara"
    assert meta["method_config"]["r"] == 4 and meta["label_names"] == ["LABEL_0", "LABEL_1", "LABEL_2"]
    reloaded = bara.from_pretrained(None, tmp_path / "adapter")  # the recorded base
    b = batch()
    assert torch.equal(model.eval().predict(**b, samples=0), reloaded.predict(**b, samples=0))
    with pytest.raises(BaraError, match="num_labels=3"):
        bara.from_pretrained(bert(num_labels=5), tmp_path / "adapter")
    meta["method_config"]["r"] = 10 ** 6  # an edited config: refused before gigabytes are allocated
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(BaraError, match="implies an adapter of .* more than the base model's .*fix: restore"):
        bara.from_pretrained(bert(), tmp_path / "adapter")


def test_bara_eval_scores_an_adapter_saved_by_the_python_api(tiny_bert, toy_data, tmp_path, capsys):
    """An API adapter records no dataset: `bara eval` asks for --data once, then scores it as the API predicts."""
    from transformers import AutoTokenizer

    from bara import cli, runs
    from bara.data import load_task

    torch.manual_seed(0)
    labels = load_task(toy_data).label_names
    base = BertForSequenceClassification.from_pretrained(tiny_bert, num_labels=3, id2label=dict(enumerate(labels)))
    model = bara.get_model(base, bara.get_method("lora", {"r": 4}).config,
                           tokenizer=AutoTokenizer.from_pretrained(tiny_bert))
    with torch.no_grad():  # a trained-looking adapter: not the zero update of a fresh LoRA
        for name, p in model.classifier.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    model.save_pretrained(tmp_path / "adapter")
    assert cli.main(["eval", "--adapter", str(tmp_path / "adapter"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "saved by the Python API" in err and "fix: pass --data" in err and ", ".join(labels) in err, err
    metrics = runs.run_eval(tmp_path / "adapter", data=toy_data, progress_bar=False)
    assert metrics["n_test"] == 24 and metrics["method"] == "lora" and metrics["model"] == tiny_bert
    test = load_task(toy_data).test  # the in-memory model on the same batches: the loaded adapter is this one
    probs = torch.cat([model.eval().method.predict(model.classifier, b, 0)[0]
                       for b in runs.batches(model.classifier, test, 16)])
    accuracy = (probs.argmax(-1) == torch.tensor(test.labels)).double().mean().item()
    assert metrics["accuracy"] == pytest.approx(accuracy) and 0 < accuracy < 1
    assert cli.main(["eval", "--adapter", str(tmp_path / "adapter"), "--data", toy_data, "--no-progress"]) == 0


def test_causal_lm_predicts_the_next_token_or_the_label_tokens():
    base = llama()
    b = batch()
    right = b["attention_mask"].clone()
    right[0, -3:] = 0  # right padding: the last real token of row 0 is at position 4
    with torch.no_grad():
        expected = base(input_ids=b["input_ids"], attention_mask=right).logits.softmax(-1)
    model = bara.get_model(base, bara.BaraConfig(r=4))  # B starts at 0: the adapter changes nothing yet
    probs = model.predict(input_ids=b["input_ids"], attention_mask=right, samples=0)
    assert probs.shape == (4, 100)
    assert torch.allclose(probs[0], expected[0, 4], atol=1e-5) and torch.allclose(probs[1], expected[1, -1], atol=1e-5)
    choices = bara.get_model(llama(), "lora", label_tokens=[7, 8, 9])
    scored = choices.predict(input_ids=b["input_ids"], attention_mask=right)
    assert scored.shape == (4, 3) and torch.allclose(scored.sum(-1), torch.ones(4))
    last = torch.stack([expected[0, 4], *expected[1:, -1]])[:, 7:10]
    assert torch.allclose(scored, last / last.sum(-1, keepdim=True), atol=1e-5)


def test_gpt2_conv1d_is_adapted():
    torch.manual_seed(0)
    base = GPT2ForSequenceClassification(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, num_labels=2,
                                                    pad_token_id=0))
    model = bara.get_model(base, bara.BaraConfig(r=4))  # peft's default target for GPT-2: c_attn (a Conv1D)
    layers = [m for m in model.modules() if isinstance(m, BaraLinear)]
    assert len(layers) == 2 and (layers[0].in_features, layers[0].out_features) == (32, 96)
    assert {n for n, p in model.named_parameters() if p.requires_grad and "bara_" not in n} == \
        {"classifier.backbone.score.weight"}  # GPT-2's head is "score"
    model.start_training(total_steps=2, num_train=8)
    out = model.train()(**{**batch(), "labels": batch()["labels"] % 2})
    out.loss.backward()
    assert layers[0].bara_B.grad.abs().sum() > 0


def test_prune_and_diagnostics():
    model = bara.get_model(bert(), bara.BaraConfig(r=4))
    layers = [m for m in model.modules() if isinstance(m, BaraLinear)]
    for layer in layers:  # factor 0 switched off globally: E[pi] = 0.001
        layer.bara_pi_alpha[0], layer.bara_pi_beta[0] = 0.001, 0.999
    diagnostics = model.diagnostics(**batch())
    assert diagnostics["r_max"] == 4 and 0 < diagnostics["joint_effective_rank"] <= 4
    assert len(diagnostics["layers"]) == 4
    assert model.prune() == {name: 3 for name in model.method.layers}
    assert all(layer.rank == 3 for layer in layers)
    with pytest.raises(BaraError, match="fix: "):
        bara.get_model(bert(), "lora").prune()
    with pytest.raises(BaraError, match="labels"):
        model.diagnostics(input_ids=batch()["input_ids"])


def test_pruned_adapter_reloads(tmp_path):
    model = bara.get_model(bert(), bara.BaraConfig(r=4))
    for layer in (m for m in model.modules() if isinstance(m, BaraLinear)):
        layer.bara_pi_alpha[1], layer.bara_pi_beta[1] = 0.001, 0.999
        torch.nn.init.normal_(layer.bara_B)  # a trained B: the factors matter
    model.prune()
    model.save_pretrained(tmp_path)
    reloaded = bara.from_pretrained(bert(), tmp_path)
    assert all(m.rank == 3 for m in reloaded.modules() if isinstance(m, BaraLinear))
    assert reloaded.prune() == {name: 3 for name in reloaded.method.layers}
    b = batch()
    assert torch.equal(model.eval().predict(**b, samples=0), reloaded.predict(**b, samples=0))


def test_bad_input_is_one_error_with_a_fix():
    from transformers import BertModel

    with pytest.raises(BaraError, match="fix: .*AutoModelForSequenceClassification"):
        bara.get_model(BertModel(BertConfig(**TINY)), bara.BaraConfig())
    with pytest.raises(BaraError, match="fix: "):
        bara.get_model(bert(), object())
    with pytest.raises(BaraError, match="fix: "):
        bara.get_model(bert(), bara.BaraConfig(r=4)).predict(**batch(), samples=-1)
    with pytest.raises(BaraError, match="fix: "):
        bara.get_model(bert(), bara.BaraConfig(r=4))(**batch(), pixel_values=torch.zeros(1))


@pytest.mark.parametrize("model,data,method",
                         [("tiny_bert", "toy_data", "lora"), ("tiny_llama", "toy_choices", "bara")])
def test_from_pretrained_loads_a_bara_train_adapter(request, tmp_path, model, data, method):
    from bara import runs
    from bara.data import load_task
    from bara.runs import RunConfig
    from bara.trainer import TrainConfig

    model, data = request.getfixturevalue(model), request.getfixturevalue(data)
    config = RunConfig(model=model, data=data, method=method, method_options={"r": 4},
                       train=TrainConfig(steps=2, batch_size=8, max_length=48, eval_batch_size=16))
    runs.run_train(config, tmp_path / "run", progress_bar=False, validation=False)
    classifier, cli_method, _ = runs.load_adapter(tmp_path / "run")
    test = load_task(data).test
    b = classifier.encode(test, list(range(min(6, len(test)))))
    expected = cli_method.predict(classifier, b, 0)[0]
    loaded = bara.from_pretrained(None, tmp_path / "run")  # the recorded base; a causal LM's label tokens
    assert loaded.method.name == method and loaded.classifier.label_names == classifier.label_names
    assert torch.allclose(loaded.predict(**b, samples=0), expected, atol=1e-6)


def test_trainer_checkpoints_hold_the_adapter_and_resume_from_it(tmp_path):
    b = batch(16)
    data = [{k: v[i] for k, v in b.items()} for i in range(16)]
    args = TrainingArguments(str(tmp_path), max_steps=4, per_device_train_batch_size=4, report_to="none",
                             save_strategy="steps", save_steps=4, disable_tqdm=True, learning_rate=5e-3)
    trained = bara.get_model(bert(), bara.BaraConfig(r=4))
    bara.Trainer(model=trained, args=args, train_dataset=data).train()
    checkpoint = tmp_path / "checkpoint-4"
    assert (checkpoint / "adapter_model.safetensors").exists() and not (checkpoint / "model.safetensors").exists()
    torch.manual_seed(5)  # another adapter initialisation: only the checkpoint can make it the trained one
    fresh = bara.get_model(bert(), bara.BaraConfig(r=4))
    trained.eval()
    assert not torch.equal(fresh.eval().predict(**b, samples=0), trained.predict(**b, samples=0))
    bara.Trainer(model=fresh, args=args, train_dataset=data).train(resume_from_checkpoint=str(checkpoint))
    assert torch.equal(fresh.eval().predict(**b, samples=0), trained.predict(**b, samples=0))
    assert fresh.progress.step == 4


def test_load_best_model_at_end_restores_the_best_checkpoints_adapter(tmp_path):
    from safetensors.torch import load_file

    b = batch(16)
    data = [{k: v[i] for k, v in b.items()} for i in range(16)]
    # "Best" = the highest eval loss: an early checkpoint while training lowers the loss, so not the last state.
    args = TrainingArguments(str(tmp_path), max_steps=4, per_device_train_batch_size=4, report_to="none",
                             learning_rate=5e-2, disable_tqdm=True, eval_strategy="steps", eval_steps=1,
                             save_strategy="steps", save_steps=1, load_best_model_at_end=True,
                             metric_for_best_model="loss", greater_is_better=True)
    model = bara.get_model(bert(), "lora")
    trainer = bara.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name != "checkpoint-4"
    saved = load_file(best / "adapter_model.safetensors")
    last = load_file(tmp_path / "checkpoint-4" / "adapter_model.safetensors")
    assert any(not torch.equal(saved[k], last[k]) for k in saved)
    model.save_pretrained(tmp_path / "final")
    own = load_file(tmp_path / "final" / "adapter_model.safetensors")
    assert set(own) == set(saved) and all(torch.equal(own[k], saved[k]) for k in saved)


@pytest.mark.parametrize("method", ["temperature", "laplace"])
def test_post_hoc_methods_evaluate_as_trained_until_fit_posthoc(method, tmp_path):
    # Laplace with its evidence fit: prior_fit=val, the default, may pick a point mass for a barely trained model.
    config = bara.get_method("laplace", {"prior_fit": "marglik"}).config if method == "laplace" else method
    model = bara.get_model(bert(), config)
    b = batch(16)
    data = [{k: v[i] for k, v in b.items()} for i in range(16)]
    args = TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to="none",
                             learning_rate=5e-3, disable_tqdm=True)
    trainer = bara.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    assert np.isfinite(trainer.evaluate()["eval_loss"])  # a Trainer's evaluation before the post-hoc step
    model.eval()
    with torch.no_grad():
        trained = model.classifier(b["input_ids"], b["attention_mask"]).float().softmax(-1)
    assert torch.allclose(model(**b).logits.exp(), trained, atol=1e-6)  # the trained model's prediction
    with pytest.raises(BaraError, match=r"is not fitted.*model\.fit_posthoc"):
        model.predict(**b)
    halves = [{k: v[:8] for k, v in b.items()}, {k: v[8:] for k, v in b.items()}]
    assert model.fit_posthoc(train=halves, validation=halves) is model
    probs = model.predict(**b, samples=0)
    assert probs.shape == (16, 3) and torch.allclose(probs.sum(-1), torch.ones(16))
    assert not torch.allclose(probs, trained, atol=1e-4)  # T != 1, or the linearised posterior's spread
    with pytest.raises(BaraError, match="labelled batches"):
        model.fit_posthoc(train=[{"input_ids": b["input_ids"]}], validation=halves)
