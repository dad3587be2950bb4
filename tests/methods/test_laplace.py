"""Laplace-LoRA: the K-FAC and diagonal curvature against the GGN computed by brute force, the evidence and its
maximiser, the linearised predictive against a dense covariance, and train/save/load on the tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import functional_call, jacrev

from bara import runs
from bara.data import Split, load_task
from bara.errors import BaraError
from bara.methods import get_method
from bara.methods.laplace import (LaplacePosterior, adapted_layers, fit_posterior, glm_logit_draws, glm_logits,
                                  layer_params, predictive_probs, sampled_predictive_probs, spread_batches,
                                  validation_prior_precision)
from bara.runs import RunConfig
from bara.trainer import TrainConfig


class TinyAdapted(nn.Module):
    """A LoRA-like parameter set in float64: h_t = W0 x_t + B A x_t (W0 frozen) for each token, a mean over the
    real tokens, tanh, and a trained head with bias. ``token_tanh`` adds a nonlinearity before the mean."""

    def __init__(self, d=5, r=3, h=4, classes=3, token_tanh=False):
        super().__init__()
        torch.manual_seed(0)
        self.base = nn.Linear(d, h).double().requires_grad_(False)
        self.lora_A = nn.Linear(d, r, bias=False).double()
        self.lora_B = nn.Linear(r, h, bias=False).double()
        self.head = nn.Linear(h, classes).double()
        nn.init.normal_(self.lora_B.weight)
        self.token_tanh = token_tanh

    def forward(self, batch: dict) -> torch.Tensor:
        x, mask = batch["x"], batch["attention_mask"].double()
        h = self.base(x) + self.lora_B(self.lora_A(x))
        if self.token_tanh:
            h = torch.tanh(h)
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.head(torch.tanh(pooled))


def data(n=4, t=3, d=5, classes=3, seed=1, pad=True) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, t, dtype=torch.long)
    if pad and t > 1:
        mask[::2, -1] = 0
    x = torch.randn(n, t, d, generator=g, dtype=torch.float64)
    x[mask == 0] = 50.0  # junk at the padding: must not reach the curvature
    return {"x": x, "attention_mask": mask, "labels": torch.arange(n) % classes}


def exact_jacobians(model: TinyAdapted, batch: dict) -> dict[str, torch.Tensor]:
    """Per layer, J [N, C, d_out * d_in'] of the logits with respect to [W | b] flattened row-major."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    jac = jacrev(lambda p: functional_call(model, p, (batch,)))(params)
    out = {}
    for name, layer in adapted_layers(model).items():
        w = jac[f"{name}.weight"]
        blocks = [w, jac[f"{name}.bias"][..., None]] if f"{name}.bias" in jac else [w]
        out[name] = torch.cat(blocks, -1).flatten(2)
    return out


def exact_ggn(model: TinyAdapted, batch: dict) -> torch.Tensor:
    """Σ_n J_nᵀ (diag p_n − p_n p_nᵀ) J_n over all layers, by brute force."""
    J = torch.cat(list(exact_jacobians(model, batch).values()), -1)
    with torch.no_grad():
        p = torch.softmax(model(batch), -1)
    hess = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("nca,ncd,ndb->ab", J, hess, J)


def blocks(model: TinyAdapted) -> list[slice]:
    sizes = [layer_params(layer).numel() for layer in adapted_layers(model).values()]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [slice(s, s + n) for s, n in zip(starts, sizes)]


def dense_precision(posterior: LaplacePosterior) -> torch.Tensor:
    """Block-diagonal GGN approximation of the posterior, dense (K-FAC: G ⊗ A for [W | b] row-major)."""
    parts = []
    for f in posterior.layers.values():
        parts.append(torch.kron(f.G, f.A) if f.structure == "kron" else torch.diag(f.H.flatten()))
    return torch.block_diag(*parts).double()


def fit(model, batch, **options) -> LaplacePosterior:
    return fit_posterior(model, adapted_layers(model), [batch], **options)


# -- curvature -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kfac_equals_the_exact_ggn_for_one_instance_of_one_token(approx):
    """For one data point with one token, each layer's GGN block is exactly G ⊗ A (float64, rtol 1e-10)."""
    model = TinyAdapted()
    batch = data(n=1, t=1, pad=False)
    posterior = fit(model, batch, kfac_approx=approx)
    ggn = exact_ggn(model, batch)
    for f, block in zip(posterior.layers.values(), blocks(model)):
        assert torch.allclose(torch.kron(f.G, f.A), ggn[block, block], rtol=1e-10, atol=1e-12)
    assert posterior.n_data == posterior.n_fit == 1


def test_reduce_kfac_is_exact_for_one_padded_sequence_and_expand_is_not():
    """A mean over tokens right after the adapter makes the per-token output gradients equal, so K-FAC-reduce is
    exact for one sequence (padding and the junk in it ignored); K-FAC-expand is not (it drops the
    cross-token terms)."""
    model = TinyAdapted()
    batch = data(n=1, t=4)
    batch["attention_mask"][0, -1] = 0
    ggn = exact_ggn(model, batch)
    reduce, expand = fit(model, batch, kfac_approx="reduce"), fit(model, batch, kfac_approx="expand")
    for name, block in zip(reduce.layers, blocks(model)):
        exact = ggn[block, block]
        assert torch.allclose(torch.kron(reduce.layers[name].G, reduce.layers[name].A), exact, rtol=1e-10,
                              atol=1e-12)
        if name != "head":  # the head sees one pooled vector: both agree there
            assert not torch.allclose(torch.kron(expand.layers[name].G, expand.layers[name].A), exact, rtol=1e-3)


def test_diag_is_the_exact_ggn_diagonal_for_many_sequences():
    model = TinyAdapted(token_tanh=True)
    batch = data(n=6, t=3)
    posterior = fit(model, batch, structure="diag")
    diagonal = exact_ggn(model, batch).diagonal()
    for f, block in zip(posterior.layers.values(), blocks(model)):
        assert torch.allclose(f.H.flatten(), diagonal[block], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("structure,approx", [("kron", "expand"), ("kron", "reduce"), ("diag", "expand")])
def test_padding_is_invisible_to_the_curvature(structure, approx):
    """A padded batch gives the same factors (1e-10) as its instances fed unpadded, one batch each."""
    model = TinyAdapted(token_tanh=True)
    padded = data(n=2, t=4, pad=False)
    padded["attention_mask"][0, 2:] = 0
    padded["x"][0, 2:] = 50.0
    one = {"x": padded["x"][:1, :2], "attention_mask": padded["attention_mask"][:1, :2], "labels": padded["labels"][:1]}
    two = {k: v[1:] for k, v in padded.items()}
    together = fit(model, padded, structure=structure, kfac_approx=approx)
    apart = fit_posterior(model, adapted_layers(model), [one, two], structure=structure, kfac_approx=approx)
    assert together.log_likelihood == pytest.approx(apart.log_likelihood, abs=1e-12)
    for name, f in together.layers.items():
        for key, value in f.state(name).items():
            assert torch.allclose(value, apart.layers[name].state(name)[key], rtol=1e-10, atol=1e-12), key


def test_sampled_labels_give_the_exact_ggn_on_average():
    """One label drawn per instance: over 40,000 copies of one instance, G is within 3% (Frobenius) of the exact
    per-class expansion; A does not depend on the labels."""
    model = TinyAdapted()
    one = data(n=1, t=1, pad=False)
    many = {k: v.expand(40_000, *v.shape[1:]) for k, v in one.items()}
    torch.manual_seed(0)
    sampled, exact = fit(model, many, exact=False), fit(model, many, exact=True)
    for name in exact.layers:
        s, e = sampled.layers[name], exact.layers[name]
        assert torch.allclose(s.A, e.A)
        assert (s.G - e.G).norm() / e.G.norm() < 0.03  # seed 0 gives 1.5%, shrinking as 1/sqrt(copies)


def test_fitting_on_part_of_the_data_rescales_to_all_of_it():
    model = TinyAdapted()
    batch = data(n=4)
    full = fit(model, batch)
    half = fit_posterior(model, adapted_layers(model), [batch], n_data=8)
    assert half.n_data == 8 and half.n_fit == 4
    assert half.log_likelihood == pytest.approx(2 * full.log_likelihood)
    assert torch.allclose(half.layers["head"].G, 2 * full.layers["head"].G)
    assert torch.allclose(half.layers["head"].A, full.layers["head"].A)


def test_spread_batches_takes_n_fit_instances_from_evenly_spread_batches():
    loader = torch.utils.data.DataLoader(list(range(100)), batch_size=10,
                                         collate_fn=lambda i: {"labels": torch.tensor(i)})
    seen = torch.cat([b["labels"] for b in spread_batches(loader, 25)])
    assert seen.tolist() == list(range(0, 10)) + list(range(30, 40)) + list(range(70, 75))
    assert len(torch.cat([b["labels"] for b in spread_batches(loader, 0)])) == 100


# -- evidence --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_log_marginal_likelihood_matches_the_dense_formula(structure):
    """log p(D|θ*) − δ/2 ‖θ*‖² + P/2 log δ − 1/2 log det(GGN + δ I), the log det by dense slogdet
    (1e-8)."""
    model = TinyAdapted()
    batch = data(n=5)
    posterior = fit(model, batch, structure=structure)
    theta = torch.cat([layer_params(m).flatten() for m in adapted_layers(model).values()])
    with torch.no_grad():
        loglik = -torch.nn.functional.cross_entropy(model(batch), batch["labels"], reduction="sum").item()
    precision = dense_precision(posterior)
    for delta in (0.01, 0.3, 7.0):
        dense = (loglik - delta / 2 * theta.pow(2).sum().item() + len(theta) / 2 * math.log(delta)
                 - 0.5 * torch.linalg.slogdet(precision + delta * torch.eye(len(theta), dtype=torch.float64))[1].item())
        assert posterior.log_marginal_likelihood(delta) == pytest.approx(dense, abs=1e-8)


def test_fitted_prior_precision_maximises_the_marginal_likelihood_on_a_grid():
    model = TinyAdapted()
    posterior = fit(model, data(n=8))
    best = posterior.optimize_prior_precision()
    assert posterior.prior_precision == best and 1e-4 < best < 1e6
    top = posterior.log_marginal_likelihood(best)
    grid = torch.logspace(-4, 6, 2001, dtype=torch.float64).tolist()
    values = [posterior.log_marginal_likelihood(d) for d in grid]
    assert top >= max(values) - 1e-9
    assert top > posterior.log_marginal_likelihood(best * 2) and top > posterior.log_marginal_likelihood(best / 2)


# -- predictive ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_glm_covariance_equals_dense_j_sigma_jt(structure):
    """J (GGN + δ I)⁻¹ Jᵀ with the dense block-diagonal precision and brute-force Jacobians (1e-10), also when
    the instances go one chunk at a time."""
    model = TinyAdapted(token_tanh=True)
    train, test = data(n=6, seed=1), data(n=3, seed=2)
    posterior = fit(model, train, structure=structure)
    posterior.prior_precision = 0.7
    J = torch.cat(list(exact_jacobians(model, test).values()), -1)
    sigma = torch.linalg.inv(dense_precision(posterior) + 0.7 * torch.eye(J.shape[-1], dtype=torch.float64))
    dense = J @ sigma @ J.transpose(1, 2)
    modules = adapted_layers(model)
    mean, cov = glm_logits(model, modules, posterior, test, num_classes=3)
    assert torch.allclose(cov, dense, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        assert torch.allclose(mean, model(test))
    _, chunked = glm_logits(model, modules, posterior, test, num_classes=3, budget=1)
    assert torch.allclose(chunked, cov, rtol=1e-12, atol=1e-14)


def test_probit_and_monte_carlo_probabilities():
    torch.manual_seed(0)
    mean = torch.randn(4, 3, dtype=torch.float64)
    root = torch.randn(4, 3, 3, dtype=torch.float64)
    cov = root @ root.transpose(1, 2)
    probit = predictive_probs(mean, cov, 0)
    kappa = 1 / torch.sqrt(1 + math.pi / 8 * cov.diagonal(dim1=1, dim2=2))
    assert probit.shape == (1, 4, 3) and torch.allclose(probit[0].double(), torch.softmax(mean * kappa, -1), atol=1e-6)
    mc = predictive_probs(mean, cov, 20000)
    assert mc.shape == (20000, 4, 3) and torch.allclose(mc.sum(-1), torch.ones(20000, 4), atol=1e-5)
    draws = torch.distributions.MultivariateNormal(mean, cov + 1e-9 * torch.eye(3)).sample((20000,))
    assert torch.allclose(mc.mean(0).double(), torch.softmax(draws, -1).mean(0), atol=0.01)
    assert torch.allclose(predictive_probs(mean, 0 * cov, 0)[0].double(), torch.softmax(mean, -1), atol=1e-6)


def tiny_classifier(tiny_bert, **options):
    options = {"prior_fit": "marglik", **options}  # Laplace-LoRA's evidence fit: these tests fit without validation
    classifier, method = runs.build(RunConfig(model=tiny_bert, method="laplace", method_options=options,
                                              train=TrainConfig(max_length=16)), ["red", "green", "blue"])
    with torch.no_grad():
        for name, p in classifier.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # B starts at zero; make the adapter matter
    split = Split(texts=[f"the {w} car number {i}" for i, w in zip(range(9), ["red", "green", "blue"] * 3)],
                  labels=[i % 3 for i in range(9)])
    return classifier, method, classifier.encode(split, list(range(9)))


def test_predictive_variance_shrinks_as_the_prior_precision_grows(tiny_bert):
    classifier, method, batch = tiny_classifier(tiny_bert, prior_precision=1.0)
    method.fit_posthoc(classifier, [batch], [])
    modules, forward = adapted_layers(classifier), method._forward(classifier)
    traces = []
    for delta in (1e-2, 1e-1, 1.0, 10.0, 100.0):
        method.posterior.prior_precision = delta
        _, cov = glm_logits(forward, modules, method.posterior, batch, num_classes=3)
        traces.append(cov.diagonal(dim1=1, dim2=2).sum(-1))
    traces = torch.stack(traces)  # [delta, instance]
    assert (traces[1:] < traces[:-1]).all() and (traces > 0).all()
    method.posterior.prior_precision = 1e9  # a point mass: the probit predictive is the MAP softmax
    with torch.no_grad():
        map_probs = torch.softmax(classifier(batch["input_ids"], batch["attention_mask"]), -1)
    assert torch.allclose(method.predict(classifier, batch, 0)[0], map_probs, atol=1e-5)


def test_curvature_on_the_encoder_covers_lora_and_head(tiny_bert):
    classifier, method, batch = tiny_classifier(tiny_bert)
    modules = adapted_layers(classifier)
    assert sum("lora_A" in n for n in modules) == 4 and sum("lora_B" in n for n in modules) == 4
    assert sum(layer_params(m).numel() for m in modules.values()) == sum(
        p.numel() for p in classifier.parameters() if p.requires_grad)
    method.fit_posthoc(classifier, [batch], [])
    diag = method.diagnostics(classifier, [])
    assert diag["prior_precision_fitted"] and math.isfinite(diag["log_marginal_likelihood"])
    assert diag["n_fit"] == 9 and diag["posterior_params"] == sum(
        p.numel() for p in classifier.parameters() if p.requires_grad)
    probs = method.predict(classifier, batch, 5)
    assert probs.shape == (5, 9, 3) and torch.allclose(probs.sum(-1), torch.ones(5, 9), atol=1e-5)


# -- runs ------------------------------------------------------------------------------------------------------
def config(model, data_, steps=6, **options) -> RunConfig:
    return RunConfig(model=model, data=data_, method="laplace", method_options=options,
                     train=TrainConfig(steps=steps, batch_size=8, lr=5e-3, max_length=16, eval_batch_size=16))


@pytest.mark.parametrize("options,samples", [({}, 0), ({"hessian_structure": "diag", "link_approx": "mc"}, 10)])
def test_train_fit_save_load_reproduces_the_metrics(tiny_bert, toy_data, tmp_path, options, samples):
    out = tmp_path / "laplace"
    metrics = runs.run_train(config(tiny_bert, toy_data, **options), out, progress_bar=False)
    assert metrics["samples"] == samples and ("fast_path" in metrics) == (samples > 0)
    diag = metrics["diagnostics"]
    assert diag["n_data"] == diag["n_fit"] == 60 and 1e-4 <= diag["prior_precision"] <= 1e6
    saved = load_file(out / runs.BARA_STATE)  # beside the LoRA, which is a peft adapter
    kind = "H" if options else "A"
    assert any(k.startswith(f"laplace_{kind}.") for k in saved) and saved["laplace_prior_precision"].item() == \
        pytest.approx(diag["prior_precision"])
    again = runs.run_eval(out, progress_bar=False)
    for key in ("accuracy", "nll", "ece", "brier"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-9)
    assert again["diagnostics"]["log_marginal_likelihood"] == pytest.approx(diag["log_marginal_likelihood"], rel=1e-12)

    classifier, method, _ = runs.load_adapter(out)
    batch = classifier.encode(load_task(toy_data).test, list(range(8)))
    probs = method.predict(classifier, batch, 0)
    assert probs.shape == (1, 8, 3) and torch.allclose(probs.sum(-1), torch.ones(1, 8), atol=1e-5)

    del saved["laplace_prior_precision"]  # an adapter without its posterior is refused, loudly
    save_file(saved, out / runs.BARA_STATE)
    with pytest.raises(BaraError, match="laplace_prior_precision"):
        runs.load_adapter(out)


def test_causal_lm_multiple_choice_with_part_of_the_data(tiny_llama, toy_choices, tmp_path):
    out = tmp_path / "llama"
    metrics = runs.run_train(config(tiny_llama, toy_choices, steps=4, n_fit=10, ggn="sampled"), out,
                             progress_bar=False)
    diag = metrics["diagnostics"]
    assert metrics["num_labels"] == 3 and diag["n_fit"] == 10 and diag["n_data"] == metrics["n_train"] > 10
    assert math.isfinite(metrics["nll"]) and math.isfinite(diag["log_marginal_likelihood"])
    assert runs.run_eval(out, progress_bar=False)["nll"] == pytest.approx(metrics["nll"], abs=1e-6)


def test_untrained_lora_parameters_only_and_bad_options_fail_loudly():
    with pytest.raises(BaraError, match="hessian_structure"):
        get_method("laplace", {"hessian_structure": "full"})
    with pytest.raises(BaraError, match="prior_precision"):
        get_method("laplace", {"prior_precision": -1.0})
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    with pytest.raises(BaraError, match="trainable outside"):
        adapted_layers(model)


@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_jvp_draws_have_the_glm_mean_and_covariance(structure):
    """The forward-mode draws J(θ − θ*) have mean 0 and covariance J Σ Jᵀ (as glm_logits computes it exactly),
    within Monte-Carlo error over 4,000 draws; their logits are the model's."""
    model = TinyAdapted(token_tanh=True)
    posterior = fit(model, data(n=6, seed=1), structure=structure)
    posterior.prior_precision = 0.7
    test = data(n=3, seed=2)
    modules = adapted_layers(model)
    _, cov = glm_logits(model, modules, posterior, test, num_classes=3)
    torch.manual_seed(0)
    mean, draws = glm_logit_draws(model, (test,), modules, posterior, 4000)
    with torch.no_grad():
        assert torch.allclose(mean, model(test))
    assert draws.shape == (4000, 3, 3)
    scale = cov.diagonal(dim1=1, dim2=2).sqrt()  # per instance and class
    assert (draws.mean(0).abs() < 0.1 * scale).all()
    empirical = torch.einsum("sbc,sbd->bcd", draws, draws) / 4000
    assert torch.allclose(empirical, cov, atol=0.1 * cov.diagonal(dim1=1, dim2=2).max().item())
    probit = sampled_predictive_probs(mean, draws, 0)
    assert torch.allclose(probit, predictive_probs(mean, cov, 0), atol=0.01)
    assert sampled_predictive_probs(mean, draws[:5], 5).shape == (5, 3, 3)


def test_draws_predictive_on_the_encoder_matches_the_per_class_one(tiny_bert):
    classifier, method, batch = tiny_classifier(tiny_bert, prior_precision=3.0)
    method.fit_posthoc(classifier, [batch], [])
    exact = method.predict(classifier, batch, 0)
    method.config.jacobians = "draws"
    torch.manual_seed(0)
    drawn = method.predict(classifier, batch, 0)
    torch.manual_seed(0)
    assert torch.equal(method.predict(classifier, batch, 0), drawn)  # seeded: reproducible
    assert drawn.shape == exact.shape == (1, 9, 3) and torch.allclose(drawn.sum(-1), torch.ones(1, 9), atol=1e-5)
    assert (drawn - exact).abs().max() < 0.05 and not torch.equal(drawn, exact)
    sampled = method.predict(classifier, batch, 4)
    assert sampled.shape == (4, 9, 3) and not torch.allclose(sampled[0], sampled[1])


def test_validation_prior_precision_minimises_the_probit_nll_over_the_grid():
    """Every grid point's NLL equals the probit predictive's NLL at that δ, and the chosen δ has the lowest;
    instances beyond the limit are not read."""
    model = TinyAdapted(token_tanh=True)
    posterior = fit(model, data(n=6, seed=1), structure="kron")
    val = data(n=5, seed=3)
    modules = adapted_layers(model)
    grid = (1e-3, 1e3, 7)
    delta, curve = validation_prior_precision(model, modules, posterior, [val], num_classes=3, limit=4, grid=grid,
                                              budget=1)
    assert len(curve) == 7 and delta == min(curve, key=lambda point: point[1])[0]
    first4 = {k: v[:4] for k, v in val.items()}
    for d, nll in curve:
        posterior.prior_precision = d
        mean, cov = glm_logits(model, modules, posterior, first4, num_classes=3)
        probs = predictive_probs(mean, cov, 0)[0].double()
        expected = -probs.log().gather(1, first4["labels"][:, None]).mean().item()
        assert nll == pytest.approx(expected, rel=1e-5)
    assert len({round(nll, 9) for _, nll in curve}) > 1
    with pytest.raises(BaraError, match="validation"):
        validation_prior_precision(model, modules, posterior, [], num_classes=3, limit=4)


def test_prior_fit_val_on_the_encoder(tiny_bert):
    classifier, method, batch = tiny_classifier(tiny_bert, prior_fit="val", prior_fit_max=6)
    method.fit_posthoc(classifier, [batch], [batch])
    diag = method.diagnostics(classifier, [])
    assert diag["prior_fit"] == "val" and 1e-4 <= diag["prior_precision"] <= 1e6
    with pytest.raises(BaraError, match="prior_fit"):
        get_method("laplace", {"prior_fit": "evidence"})
