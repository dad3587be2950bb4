"""The hand-written Laplace-LoRA (bara.methods.laplace) against laplace-torch, the reference implementation:
``Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")`` over the LoRA factors of
a tiny float64 model (frozen base and head, token inputs, several batches).

They agree to rounding (float64, 1e-12) on the K-FAC curvature (expand and reduce), the log-likelihood, the
Laplace evidence, the evidence-maximising prior precision, and the linearised predictive's logit mean and
covariance; the probit probabilities to float32 rounding (bara returns float32 probabilities). They differ, by
design, where bara knows more than laplace-torch's generic model interface:

- padding: bara drops padded tokens from K-FAC's input factor A (and from its token count); laplace-torch has
  no attention mask and counts every position, so on padded batches the factors differ (tested below);
- a trained bias: bara takes a layer's [W | b] as one matrix, G ⊗ [x; 1][x; 1]ᵀ, keeping the W-b cross terms;
  laplace-torch (curvlinops, ``separate_weight_and_bias``) keeps two blocks, G ⊗ xxᵀ and G, without them. The
  W-W and b-b blocks agree (tested below). LoRA factors have no bias, so Laplace-LoRA's posterior on the adapter
  is the same in both; only the encoder's trained classification head is affected.

laplace-torch and its curvature back ends are installed with --no-deps (their requirements pull torchvision,
which breaks transformers): ``make env`` does it from pyproject.toml's ``reference`` extra.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import laplace  # laplace-torch: `make env` installs it (pyproject.toml's reference extra, with --no-deps)
from bara.methods.laplace import adapted_layers, fit_posterior, glm_logits, predictive_probs


class TinyLora(nn.Module):
    """h_t = W0 x_t + B A x_t per token (W0 frozen), tanh, a masked mean over tokens, tanh, a head (frozen unless
    ``train_head``). Float64, so both implementations agree to rounding."""

    def __init__(self, d=5, r=3, h=4, classes=3, train_head=False):
        super().__init__()
        torch.manual_seed(0)
        self.base = nn.Linear(d, h).double().requires_grad_(False)
        self.lora_A = nn.Linear(d, r, bias=False).double()
        self.lora_B = nn.Linear(r, h, bias=False).double()
        nn.init.normal_(self.lora_B.weight)  # B starts at zero in LoRA; a trained one does not
        self.head = nn.Linear(h, classes).double().requires_grad_(train_head)
        self.mask = None  # [N, T] for a padded data set (laplace-torch passes the inputs alone)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.base(x) + self.lora_B(self.lora_A(x)))
        mask = torch.ones(x.shape[:2], dtype=x.dtype) if self.mask is None else self.mask.to(x.dtype)
        return self.head(torch.tanh((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)))


def data(n=12, t=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, 5, generator=g, dtype=torch.float64), torch.arange(n) % 3


def fit_both(model, x, y, batch_size=4, kfac_approx="expand", mask=None):
    """laplace-torch's KronLaplace and bara's posterior on the same batches."""
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)
    reference = laplace.Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron",
                                asdl_fisher_kwargs={"kfac_approx": kfac_approx})
    reference.fit(loader)
    batches = [{"x": xb, "labels": yb} for xb, yb in loader]
    if mask is not None:
        batches = [{**b, "attention_mask": m} for b, m in zip(batches, mask.split(batch_size))]
    ours = fit_posterior(lambda b: model(b["x"]), adapted_layers(model), batches, "kron", kfac_approx, True, len(y))
    return reference, ours


def dense(posterior) -> torch.Tensor:
    return torch.block_diag(*[torch.kron(f.G, f.A) for f in posterior.layers.values()])


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_kfac_evidence_and_prior_precision_agree(kfac_approx):
    model = TinyLora()
    reference, ours = fit_both(model, *data(), kfac_approx=kfac_approx)
    assert [tuple(p.shape) for p in reference.params] == [(3, 5), (4, 3)]  # lora_A, lora_B: the LoRA factors only
    ggn = reference.H.to_matrix()
    assert ggn.abs().max() > 0.1
    assert torch.allclose(dense(ours), ggn, rtol=1e-12, atol=1e-12)
    assert ours.log_likelihood == pytest.approx(reference.log_likelihood.item(), rel=1e-12)
    for delta in (0.03, 1.0, 30.0):
        reference.prior_precision = delta
        assert ours.log_marginal_likelihood(delta) == pytest.approx(reference.log_marginal_likelihood().item(),
                                                                    rel=1e-12)
    # laplace-torch maximises the evidence by Adam on log δ; bara by a grid and golden-section search
    reference.optimize_prior_precision(method="marglik", n_steps=500)
    assert ours.optimize_prior_precision() == pytest.approx(reference.prior_precision.item(), rel=1e-5)


def test_linearised_predictive_agrees():
    model = TinyLora()
    x, y = data()
    reference, ours = fit_both(model, x, y)
    reference.prior_precision = ours.prior_precision = 0.7
    test_x, _ = data(n=5, seed=2)
    f_mu, f_var = reference._glm_predictive_distribution(test_x)
    mean, covariance = glm_logits(lambda b: model(b["x"]), adapted_layers(model), ours, {"x": test_x}, 3)
    assert covariance.diagonal(dim1=1, dim2=2).min() > 1e-3
    assert torch.allclose(mean, f_mu, rtol=1e-12, atol=1e-12)
    assert torch.allclose(covariance, f_var, rtol=1e-10, atol=1e-12)
    probit = reference(test_x, pred_type="glm", link_approx="probit")
    assert torch.allclose(predictive_probs(mean, covariance, 0)[0].double(), probit, atol=1e-6)  # float32 output


def test_padding_is_where_they_differ():
    """Padded positions hold junk (50.0) that the model's masked mean ignores: bara's curvature does not see it,
    laplace-torch's input factors take it in."""
    model = TinyLora()
    x, y = data()
    mask = torch.ones(12, 3, dtype=torch.long)
    mask[::2, -1] = 0
    x[mask == 0] = 50.0
    model.mask = mask
    reference, ours = fit_both(model, x, y, batch_size=12, mask=mask)  # the model's mask covers the whole set
    clean = x.clone()
    clean[mask == 0] = 0.0  # other junk: bara's curvature is unchanged, laplace-torch's changes
    again = fit_posterior(lambda b: model(b["x"]), adapted_layers(model),
                          [{"x": clean, "labels": y, "attention_mask": mask}], "kron")
    assert torch.allclose(dense(again), dense(ours), rtol=1e-12, atol=1e-12)
    assert reference.H.to_matrix().abs().max() > 100 * dense(ours).abs().max()


def test_a_trained_bias_keeps_its_cross_terms_in_bara_only():
    model = TinyLora(train_head=True)
    reference, ours = fit_both(model, *data())
    ggn = reference.H.to_matrix()
    blocks = [f for f in ours.layers.values()]
    lora = torch.block_diag(*[torch.kron(f.G, f.A) for f in blocks[:2]])
    assert torch.allclose(lora, ggn[:lora.shape[0], :lora.shape[0]], rtol=1e-12, atol=1e-12)
    head = blocks[2]  # [W | b]: G ⊗ A with A over [x; 1], flattened row by row
    classes, width = head.G.shape[0], head.A.shape[0]
    full = torch.kron(head.G, head.A).reshape(classes, width, classes, width)
    weight_block = full[:, :-1, :, :-1].reshape(classes * (width - 1), -1)
    bias_block = full[:, -1, :, -1]
    theirs = ggn[lora.shape[0]:, lora.shape[0]:]  # laplace-torch: W (row-major), then b
    n_weight = classes * (width - 1)
    assert torch.allclose(weight_block, theirs[:n_weight, :n_weight], rtol=1e-12, atol=1e-12)
    assert torch.allclose(bias_block, theirs[n_weight:, n_weight:], rtol=1e-12, atol=1e-12)
    assert theirs[:n_weight, n_weight:].abs().max() == 0  # no W-b cross terms in laplace-torch
    assert full[:, :-1, :, -1].abs().max() > 1e-3  # bara keeps them: G ⊗ mean(x)
