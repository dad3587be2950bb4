"""The baselines of SPEC §2 beyond LoRA: MC dropout, deep ensemble, temperature scaling, AdaLoRA, and the newer
Bayesian LoRAs MonteCLoRA (peft's) and TFB.
Each trains, predicts, saves and reloads on the tiny models; each method's own mechanism is checked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bara import cli, report, runs
from bara.data import Split, load_task
from bara.errors import BaraError
from bara.methods import Progress, get_method
from bara.methods.temperature import fit_temperature
from bara.runs import RunConfig
from bara.trainer import TrainConfig

# method -> default samples
BASELINES = {"mcdropout": 10, "ensemble": 3, "temperature": 0, "adalora": 0, "monteclora": 10, "tfb": 10}
FAST = {"adalora": {"r": 6, "target_r": 2, "tinit": 2, "tfinal": 2, "delta_t": 1}}


def config(model: str, data: str, method: str, steps: int = 8, seed: int = 0, **options) -> RunConfig:
    return RunConfig(model=model, data=data, method=method, method_options=options,
                     train=TrainConfig(steps=steps, batch_size=8, lr=5e-3, max_length=24, eval_batch_size=16,
                                       seed=seed))


def build(model: str, method: str, seed: int = 0, **options):
    return runs.build(RunConfig(model=model, method=method, method_options=options,
                                train=TrainConfig(max_length=16, seed=seed)), ["red", "green", "blue"])


def batch_of(classifier, n: int = 6) -> dict:
    split = Split(texts=[f"the {w} car number {i}" for i, w in zip(range(n), ["red", "green", "blue"] * 4)],
                  labels=[i % 3 for i in range(n)])
    return classifier.encode(split, list(range(n)))


def make_lora_visible(classifier) -> None:
    """LoRA's (and BaRA's) B starts at zero, so the adapter changes nothing until trained; draw it instead."""
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in classifier.named_parameters():
            if "lora_B" in name or "bara_B" in name:
                p.normal_(std=0.5)


@pytest.mark.parametrize("method", sorted(BASELINES))
def test_train_predict_save_load(method, tiny_bert, toy_data, tmp_path):
    out = tmp_path / method
    metrics = runs.run_train(config(tiny_bert, toy_data, method, **FAST.get(method, {})), out, progress_bar=False)
    assert metrics["method"] == method and metrics["samples"] == BASELINES[method]
    assert 0 <= metrics["accuracy"] <= 1 and metrics["nll"] > 0 and metrics["trainable_params"] > 0
    again = runs.run_eval(out, progress_bar=False)
    for key in ("accuracy", "ece", "nll", "brier"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-6), key
    for key, value in again.get("diagnostics", {}).items():  # a loaded adapter reports what training did
        assert value == (pytest.approx(metrics["diagnostics"][key]) if isinstance(value, (float, list))
                         else metrics["diagnostics"][key]), key

    classifier, loaded, _ = runs.load_adapter(out)
    batch = classifier.encode(load_task(toy_data).test, list(range(10)))
    for samples in (0, loaded.default_samples):
        probs = loaded.predict(classifier, batch, samples)
        assert probs.shape == (max(samples, 1), 10, 3)
        assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:2]), atol=1e-5)
        assert (probs >= 0).all()


@pytest.mark.parametrize("method", sorted(BASELINES))
def test_causal_lm_multiple_choice(method, tiny_llama, toy_choices, tmp_path):
    out = tmp_path / method
    options = dict(FAST.get(method, {}), **({"tinit": 1, "tfinal": 1} if method == "adalora" else {}))
    metrics = runs.run_train(config(tiny_llama, toy_choices, method, steps=4, **options), out, progress_bar=False)
    assert metrics["num_labels"] == 3 and metrics["samples"] == BASELINES[method]
    assert runs.run_eval(out, progress_bar=False)["nll"] == pytest.approx(metrics["nll"], abs=1e-6)


def test_wrapping_a_causal_lm_with_peft_says_nothing_a_user_cannot_act_on(tiny_llama, recwarn):
    classifier, _ = build(tiny_llama, "lora")
    assert classifier.backbone.__class__.__name__.startswith("Peft")  # wrapped by peft, where the warning came from
    assert [str(w.message) for w in recwarn if issubclass(w.category, FutureWarning)] == []


def test_cli_lists_the_baselines_and_their_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    for word in ("mcdropout", "ensemble", "temperature", "adalora", "--members", "--target-r", "--tinit",
                 "--tfinal", "--delta-t", "--orth-reg-weight", "--lbfgs-iters", "monteclora", "--monteclora-samples",
                 "--sample-scaler", "--kl-loss-weight", "tfb", "--tolerance", "--search-metric", "--sigma FLOAT"):
        assert word in text, word


# -- MC dropout ---------------------------------------------------------------------------------------
def test_mcdropout_samples_only_the_lora_dropout(tiny_bert):
    classifier, method = build(tiny_bert, "mcdropout")
    assert method.config.lora_dropout == 0.1 and method.default_samples == 10
    assert classifier.backbone.config.hidden_dropout_prob > 0  # the backbone has dropout of its own
    batch = batch_of(classifier)
    # B = 0: the LoRA dropout cannot change anything, so identical samples prove the backbone's is off
    fresh = method.predict(classifier, batch, 4)
    assert torch.allclose(fresh, fresh[:1].expand_as(fresh), atol=1e-6)

    make_lora_visible(classifier)
    torch.manual_seed(0)
    probs = method.predict(classifier, batch, 5)
    assert probs.shape == (5, 6, 3)
    assert torch.allclose(probs.sum(-1), torch.ones(5, 6), atol=1e-5)
    assert (probs[0] - probs[1]).abs().max() > 1e-4  # different dropout masks per copy
    torch.manual_seed(0)
    assert torch.equal(method.predict(classifier, batch, 5), probs)  # reproducible under a seed
    one = method.predict(classifier, batch, 0)
    assert torch.equal(one, method.predict(classifier, batch, 0))  # samples = 0: dropout off, deterministic
    classifier.eval()
    with torch.no_grad():
        assert torch.allclose(one[0], torch.softmax(classifier(batch["input_ids"], batch["attention_mask"]), -1))
    assert not any(m.training for m in classifier.modules())  # nothing left in train mode


def test_mcdropout_needs_dropout():
    with pytest.raises(BaraError, match="lora_dropout > 0"):
        get_method("mcdropout", {"lora_dropout": 0.0})


@pytest.mark.parametrize("name", ["mcdropout", "bara"])
def test_sampling_methods_split_many_copies_into_passes(tiny_bert, monkeypatch, name):
    from bara.methods import base

    classifier, method = build(tiny_bert, name)
    make_lora_visible(classifier)
    calls = []
    classifier.register_forward_hook(lambda module, args, out: calls.append(out.shape[0]))
    monkeypatch.setattr(base, "MAX_ROWS", 12)
    probs = method.predict(classifier, batch_of(classifier), 5)
    assert probs.shape == (5, 6, 3) and calls == [12, 12, 6]
    assert torch.allclose(probs.sum(-1), torch.ones(5, 6))
    assert not torch.allclose(probs[0], probs[1])  # each copy draws its own randomness


# -- ensemble -----------------------------------------------------------------------------------------
def ensemble_tensors(classifier, member: str) -> dict[str, torch.Tensor]:
    return {n.replace(member, "M"): p.detach().clone() for n, p in classifier.named_parameters()
            if f".{member}." in n}


def test_ensemble_members_are_independently_seeded(tiny_bert):
    classifier, method = build(tiny_bert, "ensemble", seed=5)
    assert method.default_samples == 3
    trainable = [n for n, p in classifier.named_parameters() if p.requires_grad]
    lora_classifier, _ = build(tiny_bert, "lora")
    single = sum(1 for p in lora_classifier.parameters() if p.requires_grad)
    assert len(trainable) == 3 * single  # LoRA factors and the classification head, per member
    for k in range(3):
        assert sum(f".member{k}." in n for n in trainable) == single
    members = [ensemble_tensors(classifier, f"member{k}") for k in range(3)]
    for name in members[0]:
        if "lora_B" not in name and not name.endswith("bias"):  # B and biases start at zero
            assert not torch.equal(members[0][name], members[1][name]), name
    # member k is drawn from seed + k: member 1 of seed 5 is member 0 of seed 6
    shifted = ensemble_tensors(build(tiny_bert, "ensemble", seed=6)[0], "member0")
    for name, value in shifted.items():
        assert torch.equal(members[1][name], value), name
    again = ensemble_tensors(build(tiny_bert, "ensemble", seed=5)[0], "member2")
    assert all(torch.equal(again[n], members[2][n]) for n in again)


def test_ensemble_predicts_members_and_trains_each(tiny_bert):
    classifier, method = build(tiny_bert, "ensemble")
    make_lora_visible(classifier)
    batch = batch_of(classifier)
    probs = method.predict(classifier, batch, 3)
    assert probs.shape == (3, 6, 3)
    assert (probs[0] - probs[1]).abs().max() > 1e-4 and (probs[1] - probs[2]).abs().max() > 1e-4
    assert torch.allclose(method.predict(classifier, batch, 0), probs.mean(0, keepdim=True), atol=1e-6)
    # each member alone, through peft's own adapter switch, gives the same probabilities
    stack = classifier.backbone
    for k in range(3):
        stack.peft_model.set_adapter(f"member{k}")
        with torch.no_grad():
            alone = torch.softmax(stack.peft_model(input_ids=batch["input_ids"],
                                                   attention_mask=batch["attention_mask"]).logits, -1)
        assert torch.allclose(alone, probs[k], atol=1e-5)

    classifier.train()
    loss, logs = method.loss(classifier, batch, Progress(0, 10, 60))
    assert loss.item() == pytest.approx(sum(logs[f"nll_{k}"] for k in range(3)), rel=1e-5)
    loss.backward()
    for name, p in classifier.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_ensemble_members_stay_different_after_training(tiny_bert, toy_data, tmp_path):
    out = tmp_path / "ens"
    metrics = runs.run_train(config(tiny_bert, toy_data, "ensemble", steps=6), out, progress_bar=False)
    diag = metrics["diagnostics"]
    assert diag["members"] == 3 and len(diag["member_accuracy"]) == 3 and 0 <= diag["disagreement"] <= 1
    # No one-pass prediction of its own (it would be the same K-average), scored or timed; the report shows none
    # even for runs scored before that was so.
    assert metrics["samples"] == 3 and "fast_path" not in metrics and "predict_seconds_s1" not in metrics
    old = {**metrics, "fast_path": {"accuracy": 0.5, "ece": 0.1, "nll": 1.0, "predict_seconds": 2.0},
           "predict_seconds_s1": 2.0}
    row = report.row(old)
    assert "test_fast_accuracy" not in row and row["fast_predict_seconds"] is None and row["predict_seconds_s1"] is None
    assert row["test_accuracy"] == metrics["accuracy"]
    assert report.row({**old, "method": "mcdropout"})["test_fast_accuracy"] == 0.5  # sampling methods keep theirs
    classifier, method, _ = runs.load_adapter(out)
    from safetensors.torch import load_file

    saved = {k: load_file(out / f"member{k}" / "adapter_model.safetensors") for k in range(3)}  # peft's layout
    assert all(saved[k] and all(".lora_" in n or ".classifier." in n for n in saved[k]) for k in range(3))
    members = [ensemble_tensors(classifier, f"member{k}") for k in range(3)]
    assert any(not torch.equal(members[0][n], members[1][n]) for n in members[0] if "lora_B" in n)
    probs = method.predict(classifier, classifier.encode(load_task(toy_data).test, list(range(8))), 3)
    assert probs.shape == (3, 8, 3) and (probs[0] - probs[2]).abs().max() > 1e-5
    # The diagnostics take the members' probabilities of the scored pass instead of running every member again.
    from bara.methods.base import Method

    split, rows = load_task(toy_data).test, []
    classifier.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    cfg = config(tiny_bert, toy_data, "ensemble")
    reused = runs.score(classifier, method, split, cfg, None, progress_bar=False)
    rows_reused, rows[:] = sum(rows), []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(method), "recording", Method.recording)
        own = runs.score(classifier, method, split, cfg, None, progress_bar=False)
    assert sum(rows) - rows_reused == len(split.labels)  # one pass of the members over the split fewer
    assert reused["diagnostics"] == own["diagnostics"] and reused["nll"] == own["nll"]
    assert method._recorded == []  # consumed: a later diagnostics call predicts its own


# -- temperature scaling ------------------------------------------------------------------------------
def test_fit_temperature_recovers_a_known_temperature():
    torch.manual_seed(0)
    logits = 2 * torch.randn(4000, 5)
    labels = torch.distributions.Categorical(logits=logits).sample()
    t, before, after = fit_temperature(3 * logits, labels)  # over-confident by a factor 3
    assert t == pytest.approx(3.0, rel=0.1)
    assert after < before
    assert after == pytest.approx(F.cross_entropy(3 * logits / t, labels).item(), rel=1e-6)
    t, before, after = fit_temperature(logits / 2, labels)  # under-confident
    assert t == pytest.approx(0.5, rel=0.1) and after < before


def test_temperature_is_fitted_saved_and_not_trained(tiny_bert, toy_data, tmp_path):
    classifier, method = build(tiny_bert, "temperature")
    optimised = {id(p) for group in method.param_groups(classifier, 1e-3, 0.0) for p in group["params"]}
    assert id(classifier.temperature_scaling.temperature) not in optimised
    assert "temperature_scaling.temperature" in method.adapter_state(classifier)

    out = tmp_path / "ts"
    metrics = runs.run_train(config(tiny_bert, toy_data, "temperature", steps=10), out, progress_bar=False)
    diag = metrics["diagnostics"]
    assert diag["temperature"] > 0 and diag["temperature"] != 1.0
    assert diag["validation_nll_scaled"] <= diag["validation_nll_unscaled"]
    assert diag["n_validation"] == 15

    classifier, loaded, _ = runs.load_adapter(out)
    assert classifier.temperature_scaling.temperature.item() == pytest.approx(diag["temperature"])
    assert runs.run_eval(out, progress_bar=False)["diagnostics"]["temperature"] == pytest.approx(diag["temperature"])
    # predict = softmax(logits / T); the validation NLL it reports is the fitted one
    task = load_task(toy_data)
    validation = classifier.encode(task.validation, list(range(len(task.validation))))
    with torch.no_grad():
        logits = classifier(validation["input_ids"], validation["attention_mask"])
    probs = loaded.predict(classifier, validation, 0)[0]
    assert torch.allclose(probs, torch.softmax(logits / diag["temperature"], -1), atol=1e-6)
    nll = F.nll_loss(probs.log(), validation["labels"]).item()
    assert nll == pytest.approx(diag["validation_nll_scaled"], abs=1e-4)
    assert nll <= F.cross_entropy(logits, validation["labels"]).item() + 1e-6


# -- AdaLoRA ------------------------------------------------------------------------------------------
def test_adalora_allocates_ranks(tiny_bert, toy_data, tmp_path, monkeypatch):
    from peft.tuners.adalora.model import AdaLoraModel

    steps = []
    real = AdaLoraModel.update_and_allocate

    def counted(self, global_step):
        steps.append(global_step)
        return real(self, global_step)

    monkeypatch.setattr(AdaLoraModel, "update_and_allocate", counted)
    out = tmp_path / "ada"
    metrics = runs.run_train(config(tiny_bert, toy_data, "adalora", steps=12, **FAST["adalora"]), out,
                             progress_bar=False)
    assert steps == list(range(1, 13))  # once per optimiser step
    diag = metrics["diagnostics"]
    layers = 2 * 2  # query and value in 2 layers
    assert len(diag["ranks"]) == layers and diag["budget_init"] == 6 * layers
    assert diag["total_rank"] == diag["budget_target"] == 2 * layers < 6 * layers
    assert all(0 <= r <= 6 for r in diag["ranks"].values())

    classifier, method, _ = runs.load_adapter(out)
    assert method.diagnostics(classifier, []) == diag  # the pattern travels in the saved singular values
    assert method.peft_config.rank_pattern is not None
    for name, kept in method.rank_pattern().items():
        values = dict(classifier.backbone.base_model.model.named_parameters())[name]
        assert torch.equal((values.detach() != 0).flatten(), kept)


def test_adalora_loss_adds_the_orthogonality_regulariser(tiny_bert):
    classifier, method = build(tiny_bert, "adalora", orth_reg_weight=0.5)
    make_lora_visible(classifier)
    batch = batch_of(classifier)
    classifier.eval()  # no dropout, so peft's own loss is comparable
    loss, logs = method.loss(classifier, batch, Progress(0, 100, 60))
    assert logs["orth"] > 0
    assert loss.item() == pytest.approx(logs["nll"] + 0.5 * logs["orth"], rel=1e-5)
    # peft adds the same regulariser only in AdaLoraModel.forward and only to a loss computed from labels;
    # the PeftModel around it (no task type) calls the base model directly and never adds it
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
    assert classifier.backbone(**inputs).loss.item() == pytest.approx(logs["nll"], rel=1e-5)
    assert loss.item() == pytest.approx(classifier.backbone.base_model(**inputs).loss.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for n, p in classifier.named_parameters() if "lora_A" in n)


def test_adalora_schedule_follows_the_trainer(tiny_bert):
    classifier, method = build(tiny_bert, "adalora")  # tinit 0.1, tfinal 0.4 of the steps
    method.set_schedule(200)
    config = method.peft_config
    assert (config.total_step, config.tinit, config.tfinal) == (200, 20, 80)
    assert method.tuner.rankallocator.peft_config is config  # the allocator reads the same schedule
    with pytest.raises(BaraError, match="no pruning phase"):
        build(tiny_bert, "adalora", tinit=5, tfinal=5)[1].set_schedule(8)
    with pytest.raises(BaraError, match="target_r"):
        get_method("adalora", {"r": 4, "target_r": 8})


def trained_whole_and_resumed(cfg, tmp_path, monkeypatch) -> tuple[dict, dict]:
    """The metrics of ``cfg`` trained in one go, and trained again but stopped right after its first checkpoint,
    then resumed."""
    from bara import checkpoint

    full = runs.run_train(cfg, tmp_path / "full", progress_bar=False)
    real_save = checkpoint.save

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        runs.run_train(cfg, tmp_path / "cut", progress_bar=False)
    monkeypatch.setattr(checkpoint, "save", real_save)
    return full, runs.run_train(cfg, tmp_path / "cut", resume=True, progress_bar=False)


def test_adalora_resume_in_the_final_phase_is_exact(tiny_bert, toy_data, tmp_path, monkeypatch):
    """The rank pattern survives a checkpoint in the saved singular values, so peft keeps masking with it."""
    cfg = config(tiny_bert, toy_data, "adalora", steps=12, r=6, target_r=2, tinit=2, tfinal=4, delta_t=1)
    cfg.train.checkpoint_every = 10  # after the final allocation at step 8
    full, resumed = trained_whole_and_resumed(cfg, tmp_path, monkeypatch)
    assert resumed["diagnostics"] == full["diagnostics"]
    for key in ("accuracy", "ece", "nll", "brier"):
        assert resumed[key] == pytest.approx(full[key], abs=1e-6), key


# -- MonteCLoRA ---------------------------------------------------------------------------------------
def test_monteclora_is_peft_s_variant_and_samples_only_at_test_time(tiny_bert):
    from peft.tuners.lora.monteclora import MontecloraSampler

    classifier, method = build(tiny_bert, "monteclora", sample_scaler=0.05)
    samplers = [m for m in classifier.modules() if isinstance(m, MontecloraSampler)]
    assert len(samplers) == 4 and all(s.num_samples == 8 and s.sample_scaler == 0.05 for s in samplers)
    make_lora_visible(classifier)
    batch = batch_of(classifier)
    torch.manual_seed(0)
    probs = method.predict(classifier, batch, 4)
    assert probs.shape == (4, 6, 3) and torch.allclose(probs.sum(-1), torch.ones(4, 6), atol=1e-5)
    assert (probs[0] - probs[1]).abs().max() > 1e-4  # each pass draws its own perturbation of A
    torch.manual_seed(0)
    assert torch.equal(method.predict(classifier, batch, 4), probs)  # from the global generator: seeded
    one = method.predict(classifier, batch, 0)
    assert torch.equal(one, method.predict(classifier, batch, 0))  # samples = 0: plain LoRA, deterministic
    assert not any(m.training for m in classifier.modules())
    with torch.no_grad():
        for sampler in samplers:
            sampler.std_prior.fill_(-30.0)  # a collapsed posterior: the samples are the mean
    torch.manual_seed(1)
    collapsed = method.predict(classifier, batch, 3)
    assert torch.allclose(collapsed, one.expand_as(collapsed), atol=1e-4)


def test_monteclora_loss_adds_peft_s_variational_term(tiny_bert):
    classifier, method = build(tiny_bert, "monteclora", kl_loss_weight=0.5)
    make_lora_visible(classifier)
    batch = batch_of(classifier)
    classifier.train()
    torch.manual_seed(0)
    loss, logs = method.loss(classifier, batch, Progress(0, 10, 60))
    assert logs["variational"] > 0
    assert loss.item() == pytest.approx(logs["nll"] + logs["variational"], rel=1e-6)
    # the same value from peft's own aggregate, after the pass that set the samplers' state
    assert logs["variational"] == pytest.approx(classifier.backbone.base_model._get_monteclora_loss().item())
    loss.backward()
    for name, p in classifier.named_parameters():
        if "std_prior" in name or "expert_weights_prior" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    with pytest.raises(BaraError, match="dirichlet_prior"):
        get_method("monteclora", {"dirichlet_prior": 0.0})


def test_monteclora_resume_is_exact(tiny_bert, toy_data, tmp_path, monkeypatch):
    """Each pass draws its noise from the generator the checkpoint restores, so a resumed run trains as one."""
    cfg = config(tiny_bert, toy_data, "monteclora", steps=6, sample_scaler=0.05)
    cfg.train.checkpoint_every = 3
    full, resumed = trained_whole_and_resumed(cfg, tmp_path, monkeypatch)
    for key in ("accuracy", "ece", "nll", "brier"):
        assert resumed[key] == pytest.approx(full[key], abs=1e-6), key


# -- TFB ----------------------------------------------------------------------------------------------
def test_largest_within_finds_the_edge_of_the_accepted_interval():
    from bara.methods.tfb import largest_within

    tried = []

    def accepted(sigma):
        tried.append(sigma)
        return sigma <= 0.037

    best = largest_within(accepted, 1e-5, 10.0, 12)
    assert len(tried) == 13 and tried[0] == 10.0
    assert best <= 0.037 and best > 0.037 / (1e6 ** (1 / 2 ** 12)) ** 2  # within two final bracket widths
    assert largest_within(lambda s: True, 1e-5, 10.0, 12) == 10.0
    assert largest_within(lambda s: False, 1e-5, 10.0, 12) == 0.0


def test_tfb_noise_is_isotropic_in_the_column_space_of_b(tiny_bert):
    """One layer's sampled output minus its mean is σ s U z with z ~ N(0, ‖x‖² I): it lies in B's column space,
    and its covariance over draws is σ² s² ‖x‖² U Uᵀ."""
    from bara.methods.tfb import LowRankNoise, lora_layers

    classifier, _ = build(tiny_bert, "tfb")
    layer = next(iter(lora_layers(classifier).values()))
    b = layer.lora_B["default"].weight
    with torch.no_grad():
        b.copy_(torch.randn(b.shape[0], 2) @ torch.randn(2, b.shape[1]))  # rank 2 of r = 8
    x = torch.randn(1, 1, layer.in_features)
    with torch.no_grad():
        mean = layer(x)
        torch.manual_seed(0)
        with LowRankNoise(classifier, sigma=0.3):
            draws = (layer(x.expand(4000, 1, -1)) - mean).reshape(4000, -1)
    basis = torch.linalg.svd(b.detach())[0][:, :2]
    assert torch.allclose(draws - draws @ basis @ basis.T, torch.zeros_like(draws), atol=1e-4)  # in span(U)
    scale = 0.3 * layer.scaling["default"] * x.norm()
    empirical = torch.einsum("ni,nj->ij", draws @ basis, draws @ basis) / 4000
    assert torch.allclose(empirical / scale ** 2, torch.eye(2), atol=0.08)
    with torch.no_grad():
        assert torch.equal(layer(x), mean)  # the hooks are gone after the block


def test_tfb_search_respects_the_tolerance(tiny_bert, toy_data, tmp_path):
    out = tmp_path / "tfb"
    metrics = runs.run_train(config(tiny_bert, toy_data, "tfb", steps=10, search_steps=6, tolerance=1e-3), out,
                             progress_bar=False)
    diag = metrics["diagnostics"]
    assert diag["sigma_searched"] and diag["n_anchor"] == 15 and len(diag["search_curve"]) == 1 + 1 + 6
    base, sigma = diag["validation_metric_lora"], diag["sigma"]
    assert 0 < sigma < 10
    curve = dict(map(tuple, diag["search_curve"]))
    assert diag["validation_metric_tfb"] == curve[sigma] <= base * 1.001  # the chosen σ is within the tolerance
    assert all(v > base * 1.001 for s, v in curve.items() if s > sigma)  # every larger σ tried is not
    # samples = 0 is the LoRA adapter; the saved σ reproduces the sampled predictions after reloading
    classifier, method, _ = runs.load_adapter(out)
    assert classifier.tfb.sigma.item() == sigma
    batch = classifier.encode(load_task(toy_data).test, list(range(8)))
    torch.manual_seed(0)
    probs = method.predict(classifier, batch, 5)
    assert probs.shape == (5, 8, 3) and (probs[0] - probs[1]).abs().max() > 1e-4
    with torch.no_grad():
        lora = torch.softmax(classifier(batch["input_ids"], batch["attention_mask"]), -1)
    assert torch.allclose(method.predict(classifier, batch, 0)[0], lora)


def test_tfb_given_sigma_skips_the_search_and_unfitted_sampling_fails(tiny_bert):
    classifier, method = build(tiny_bert, "tfb", sigma=0.2)
    batch = batch_of(classifier)
    with pytest.raises(BaraError, match="not fitted"):
        method.predict(classifier, batch, 3)
    make_lora_visible(classifier)
    method.fit_posthoc(classifier, [], [])
    assert method.diagnostics(classifier, []) == {"sigma": pytest.approx(0.2), "sigma_searched": False}
    assert method.predict(classifier, batch, 3).shape == (3, 6, 3)
    for bad, match in (({"search_metric": "ece"}, "search_metric"), ({"tolerance": -1.0}, "tolerance"),
                       ({"sigma": -0.1}, "sigma")):
        with pytest.raises(BaraError, match=match):
            get_method("tfb", bad)
    with pytest.raises(BaraError, match="validation split"):
        build(tiny_bert, "tfb")[1].fit_posthoc(classifier, [], [])


@pytest.mark.parametrize("method", ["temperature", "laplace"])
def test_post_hoc_methods_refuse_to_predict_before_they_are_fitted(method, tiny_bert):
    classifier, unfitted = build(tiny_bert, method)
    batch = batch_of(classifier)
    with pytest.raises(BaraError, match=f"{method} is not fitted.*fix: call method.fit_posthoc"):
        unfitted.predict(classifier, batch, 0)
    # Validation during training scores the trained model, before the post-hoc step.
    with torch.no_grad():
        trained = torch.softmax(classifier(batch["input_ids"], batch["attention_mask"]).float(), -1)
    assert torch.equal(unfitted.training_predict(classifier, batch)[0], trained)
