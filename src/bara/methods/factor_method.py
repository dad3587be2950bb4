r"""The method of a Gaussian posterior on LoRA's A (:mod:`.factor_posterior`), which BLoB is as it stands and BaRA
builds on: injection of the layers, AdamW's groups, the objective, BLoB's KL step, prediction, the ranks and the
merged model.

Minibatch of M instances, dataset size N, KL warm-up :math:`\beta_t` (0 -> 1 over the first ``kl_warmup`` of
training). AdamW minimises

.. math:: J = \frac1M \sum_n \ell_n + \beta_t\,\frac{[KL_A]_{loss}}{N}, \qquad
          \ell_n = -\log p(y_n \mid x_n, w),\ w \sim q

over mu_A, B and the head; with ``kl_step=sgd`` (the default, as BLoB's code) :math:`KL_A` is left out of J and
:func:`~.factor_posterior.kl_sgd_step` steps it after each AdamW step, with sigma_A's parameter, which AdamW then
never sees; with ``kl_step=ngvi`` that step moves mu_A only and sigma_A is set to VI's fixed point from the NLL's
curvature (:func:`~.factor_posterior.ngvi_sigma_step`). After every step sigma_A is bounded by ``max_sigma`` (0: no
bound). The prediction averages S sampled
passes (flipout's draws), or takes one pass with A = mu_A.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import BaraError
from ..heads import Classifier
from .base import Method, Progress, repeated_passes
from .factor_posterior import (SIGMA_PARAMS, FactorLinear, clamp_sigma, kl_sgd_step, ngvi_sigma_step,
                               sigma_in_adamw)
from .lora import target_modules

# The ranks in a report; on test, their spread and the global gates' rank as well.
RANK_SUMMARY = ("joint_effective_rank", "selection_variability", "hard_rank_std")
# What an ungated layer reports for the global gate it does not have: every factor at E[pi] = 0.5 (so a global
# rank of 0), the values BLoB's runs have always reported (BaRA's pi_init, while BLoB ran as its gate-less layer),
# kept so that its metrics.json and rank plot do not change.
UNGATED_PI = 0.5


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


class FactorPosteriorMethod(Method):
    """LoRA with a Gaussian posterior on A in every target module (:class:`~.factor_posterior.FactorLinear`, or a
    subclass's ``layer_class``), the head trained in full."""

    layer_class: ClassVar[type[FactorLinear]] = FactorLinear
    default_samples = 10
    diverged_fix = ", or --kl-lr, or bound sigma_A with --max-sigma 0.2 (docs/experiments.md section 9)"
    report_columns = (("joint_effective_rank", "s̄"),)
    run_files = ("rank.png",)
    column_legend = ("V: selection variability, rank std: std across instances of the hard effective rank, s̄: joint "
                     "effective rank.")
    # The keys of the diagnostics a report row takes (:meth:`summary`).
    summary_keys: ClassVar[tuple[str, ...]] = RANK_SUMMARY
    # Parameters a subclass puts in AdamW groups of its own (BaRA's gate), by a part of their names.
    separate_params: ClassVar[tuple[str, ...]] = ()

    @property
    def bayes_factors(self) -> bool:
        """Whether A has its Gaussian posterior (else a point estimate: an ablation of BaRA's)."""
        return True

    # -- building -----------------------------------------------------------------------------------
    def wrap(self, classifier: Classifier) -> None:
        targets = target_modules(self.config, classifier)
        if not targets:
            raise BaraError("no default target modules for this architecture; fix: pass --target-modules")
        found = [(n, m) for n, m in classifier.backbone.named_modules() if _matches(n, targets)
                 and isinstance(m, (nn.Linear, Conv1D))]
        if not found:
            raise BaraError(f"no linear layer named {targets} in the model; fix: pass --target-modules")
        self.layers: dict[str, FactorLinear] = {}
        for name, module in found:  # built in the model's order: their initial draws follow it
            parent_name, _, child = name.rpartition(".")
            layer = self.layer_class(module, self.config)
            setattr(classifier.backbone.get_submodule(parent_name), child, layer)
            self.layers[name] = layer
        for head in classifier.head_names:  # the fresh classification head is trained in full
            for p in classifier.backbone.get_submodule(head).parameters():
                p.requires_grad_(True)

    def set_mode(self, mode: str) -> None:
        for layer in self.layers.values():
            layer.mode = mode

    def param_groups(self, classifier, lr, weight_decay):
        """AdamW's groups: factors and head at ``lr``. sigma_A's parameter joins AdamW only with kl_step=loss (or
        ``sigma_optimizer=adamw``): with kl_step=sgd only the SGD step of :meth:`on_step_end` moves it, as in BLoB's
        code (AdamW moves every parameter by about lr a step, whatever its gradient, which drove rho through 0 and
        then the KL's -2/rho term threw sigma_A out)."""
        factors, sigma = [], []
        for name, p in classifier.named_parameters():
            if p.requires_grad and not any(s in name for s in self.separate_params):
                (sigma if any(k in name for k in SIGMA_PARAMS) else factors).append(p)
        return [{"params": factors, "lr": lr, "weight_decay": weight_decay},
                *([{"params": sigma, "lr": lr, "weight_decay": 0.0}] if sigma_in_adamw(self.config) else [])]

    # -- training -----------------------------------------------------------------------------------
    def kl_beta(self, progress: Progress) -> float:
        """beta_t: the KL warm-up, 0 -> 1 over the first ``kl_warmup`` of training."""
        c = self.config
        return min(1.0, progress.fraction / c.kl_warmup) if c.kl_warmup > 0 else 1.0

    def loss(self, model, batch: dict, progress: Progress) -> tuple[torch.Tensor, dict]:
        c = self.config
        self.set_mode("train")
        nll = self.data_term(model, batch)
        beta = self.kl_beta(progress)
        kl_A = sum(l.kl_A() for l in self.layers.values())
        loss = nll + beta * c.kl_scale * (kl_A if c.kl_step == "loss" else 0.0) / progress.num_train
        return loss, {"nll": nll.item(), "kl_global": kl_A.item(), "beta": beta}

    def data_term(self, model, batch: dict) -> torch.Tensor:
        """-log p(y | x, w) for one sample w."""
        return F.cross_entropy(self.forward(model, batch), batch["labels"])

    def on_step_end(self, classifier: Classifier, progress: Progress) -> None:
        """BLoB's SGD KL step (kl_step=sgd; mu_A's part, then sigma_A at VI's fixed point with ngvi), then sigma_A's
        bound."""
        if not self.bayes_factors:
            return
        layers = list(self.layers.values())
        if self.config.kl_step in ("sgd", "ngvi"):
            kl_sgd_step(layers, self.config, progress)
        if self.config.kl_step == "ngvi":
            ngvi_sigma_step(layers, self.config, progress)
        clamp_sigma(layers, self.config)

    # -- prediction ---------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, classifier: Classifier, batch: dict, samples: int) -> torch.Tensor:
        """``samples = 0``: one pass with A = mu_A (and a gated layer's z at its own one-pass value). Otherwise S
        samples, batched: the batch is repeated S times so each copy draws its own A (and gates)."""
        classifier.eval()
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if samples == 0:
            self.set_mode("mean")
            return torch.softmax(classifier(ids, mask).float(), -1)[None]
        self.set_mode("sample")
        probs = repeated_passes(classifier, batch, samples)
        self.set_mode("train")
        return probs

    # -- diagnostics --------------------------------------------------------------------------------
    def diagnostics(self, classifier: Classifier, batches) -> dict:
        """The effective ranks: without a gate every factor is on for every instance (joint rank r)."""
        sizes = [batch["input_ids"].shape[0] for batch in batches]
        return self.rank_summary({name: all_on(sum(sizes), layer.rank) for name, layer in self.layers.items()})

    def gate_summary(self, layer: FactorLinear) -> dict:
        """What the layer's global gate says of its factors: E[pi], how many have E[pi] > 0.5, q(pi)'s std;
        here, without one, :data:`UNGATED_PI`."""
        return {"expected_pi": [UNGATED_PI] * layer.rank, "global_rank": 0, "pi_std": None}

    def rank_summary(self, stats: dict) -> dict:
        """Effective ranks per layer and jointly (docs/ARCHITECTURE.md, diagnostics), and the bound's complexity
        term, from each layer's gate probabilities ``rho`` and gates ``hard`` (``stats[layer]``, ``[N, r]``)."""
        layers = {}
        for name, layer in self.layers.items():
            rho, hard = stats[name]["rho"], stats[name]["hard"]
            expected_rank, hard_rank = rho.sum(1), hard.sum(1)
            layers[name] = {
                "rank": layer.rank, "d_in": layer.in_features, "d_out": layer.out_features, **self.gate_summary(layer),
                "mean_expected_rank": expected_rank.mean().item(), "std_expected_rank": expected_rank.std().item(),
                "mean_hard_rank": hard_rank.mean().item(), "std_hard_rank": hard_rank.std().item(),
                "selection_variability": rho.std(0).mean().item(),
            }
        joint_expected = torch.stack([stats[n]["rho"].sum(1) for n in self.layers]).mean(0)
        joint_hard = torch.stack([stats[n]["hard"].sum(1) for n in self.layers]).mean(0)
        per_layer = layers.values()
        r_max = self.config.r
        return {
            "r_max": r_max,
            "joint_effective_rank": joint_expected.mean().item(),
            "joint_effective_rank_std": joint_expected.std().item(),
            "joint_hard_rank_std": joint_hard.std().item(),
            "per_instance_joint_hard_rank": joint_hard.tolist(),
            "selection_variability": float(np.mean([l["selection_variability"] for l in per_layer])),
            "hard_rank_std": float(np.mean([l["std_hard_rank"] for l in per_layer])),
            "global_rank_mean": float(np.mean([l["global_rank"] for l in per_layer])),
            "complexity": sum(l["mean_expected_rank"] * (l["d_in"] + l["d_out"]) for l in per_layer),
            "complexity_lora": sum(r_max * (l["d_in"] + l["d_out"]) for l in per_layer),
            **self.sigma_summary(),
            "layers": layers,
        }

    @torch.no_grad()
    def sigma_summary(self) -> dict:
        """sigma_A over every entry of every layer (mean, median) and |mu_A|'s mean: how wide the posterior on A is
        beside the mean it is around (docs/experiments.md sections 18 and 26); none for a point estimate."""
        if not self.bayes_factors or not self.layers:
            return {}
        sigma = torch.cat([layer.sigma_A.float().flatten() for layer in self.layers.values()])
        mu = torch.cat([layer.bara_A_mu.float().flatten() for layer in self.layers.values()])
        return {"sigma_A_mean": sigma.mean().item(), "sigma_A_median": sigma.median().item(),
                "mu_A_abs_mean": mu.abs().mean().item()}

    @classmethod
    def summary(cls, diagnostics: dict, validation: bool = False) -> dict:
        """The ranks (and a gate's numbers: :attr:`summary_keys`), on validation too, where choices are made; on
        test also the ranks' spread."""
        keys = cls.summary_keys if validation else cls.summary_keys + ("joint_effective_rank_std", "global_rank_mean")
        return {k: diagnostics[k] for k in keys if k in diagnostics}

    def plots(self, classifier: Classifier, diagnostics: dict, output_dir, caption: str = "") -> list[str]:
        from ..plots import rank_plots

        pi = np.array([l["expected_pi"] + [np.nan] * (diagnostics["r_max"] - len(l["expected_pi"]))
                       for l in diagnostics["layers"].values()])
        names = [n.replace("base_model.model.", "") for n in diagnostics["layers"]]
        title = (f"{caption or self.name}: joint expected rank {diagnostics['joint_effective_rank']:.2f} of "
                 f"{diagnostics['r_max']}")
        if "gate_mi" in diagnostics:
            title += (f", decided {diagnostics['decided_share']:.0%}, MI {diagnostics['gate_mi']:.2f} bits "
                      f"(null {diagnostics['gate_mi_null']:.2f})")
        rank_plots(np.array(diagnostics["per_instance_joint_hard_rank"]), pi, output_dir / "rank.png", title=title,
                   layer_names=names)
        return ["rank.png"]

    # -- adapters -----------------------------------------------------------------------------------
    @torch.no_grad()
    def merged(self, classifier: Classifier) -> nn.Module:
        """W + (alpha/r) B diag(z) mu_A in every adapted layer: the one-pass prediction, z of :meth:`merge_weights`."""
        self.set_mode("mean")
        for name, layer in self.layers.items():
            z = self.merge_weights(layer)
            delta = layer.scaling * layer.bara_B.float() @ (z[:, None] * layer.bara_A_mu.float())  # [out, in]
            weight = layer.base.weight
            weight.add_((delta if isinstance(layer.base, nn.Linear) else delta.t()).to(weight.dtype))
            parent, _, child = name.rpartition(".")
            setattr(classifier.backbone.get_submodule(parent), child, layer.base)
        self.layers = {}
        return classifier.backbone

    def merge_weights(self, layer: FactorLinear) -> torch.Tensor:
        """z ``[r]`` of the merged weight: 1, every factor on (BLoB's mean)."""
        return torch.ones(layer.rank, device=layer.bara_B.device)


def all_on(n: int, rank: int) -> dict[str, torch.Tensor]:
    """The gate statistics of an ungated layer for ``n`` instances: every factor on, surely."""
    ones = torch.ones(n, rank)
    return {"rho": ones, "hard": ones}
