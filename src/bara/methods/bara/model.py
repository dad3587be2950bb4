r"""BaRA as a method: injection into a model, the objective, Monte-Carlo prediction, diagnostics, pruning.

What is optimised (docs/experiments.md section 10 says why each weight is what it is). Minibatch of M instances,
dataset size N, step t, KL warm-up :math:`\beta_t` (0 -> 1 over the first ``kl_warmup`` of training):

1. AdamW minimises

   .. math:: J = \frac1M \sum_n \big[\ell_n + \beta_t\,w_n\,KL_{loc,n}\big]
             + \beta_t \frac{[KL_\pi]_{gradient} + [KL_A]_{loss}}{N} + \lambda_{orth}\,E

   over mu_A, B, the head and the gate network (and a Kumaraswamy q(pi) with ``pi_update=gradient``), where
   :math:`\ell_n = -\log p(y_n \mid x_n, w)` for one sample w (or :math:`-\log \frac1K\sum_k p(y_n \mid x_n, w_k)`,
   ``train_samples`` = K); :math:`KL_{loc,n} = \sum_{\ell,k(,t)} [P(\text{reach}_k)\,KL(\mathrm{Bern}(\rho)
   \,\|\,\mathrm{Bern}(\hat\pi)) + \rho\,KL(\mathrm{Weibull}\,\|\,\mathrm{Gamma})]`, summed over every
   gate of the instance (every token's, with a token context); :math:`w_n = \omega_{loc}`, or :math:`1/G_n` with
   :math:`G_n` the instance's number of gates (the default: a tempered ELBO, the local KL per gate); E is the
   disentanglement penalty (``orth_reg``).
2. ``kl_step=sgd`` (default, as BLoB's code): then one plain-SGD step, lr ``kl_lr`` with warm-up and linear decay,
   on :math:`w_t\,KL_A` for mu_A and on :math:`\partial\ell/\partial s + w_t\,\partial KL_A/\partial s` for
   sigma_A's parameter s (log sigma, or BLoB's rho), which AdamW never sees. :math:`w_t = 2^i/(2^{M+1} - 1)`,
   :math:`i = t \bmod M`, :math:`M = 100 N^{\pi/\gamma}/b` (BLoB's KL reweighting: on average 1/M per step, about
   21 times the ELBO's 1/N at N = 1,000; ``kl_gamma = 0``: :math:`1/M` with M batches per epoch).
3. ``pi_update=svi`` (default): then q(pi_k) = Beta(alpha_k, beta_k) takes a stochastic natural-gradient step
   towards its conjugate optimum given the step's usage :math:`u_k` (batch mean of rho): :math:`(\alpha, \beta)
   \leftarrow (1 - \eta_t)(\alpha, \beta) + \eta_t(\alpha_0/r + N' u_k,\ 1 + N'(1 - u_k))`, N' = N
   (``pi_counts=full``) or :math:`\bar w N` (``tempered``: the optimum of J itself, whose local KL is tempered),
   :math:`\eta_t = (\tau_0 + t)^{-0.7}` (``pi_step_delay`` = τ0, 1 by default): KL_pi at the ELBO's own weight,
   reached in closed form instead of by Adam steps of about gate_lr (which moved q(pi) by ~0.3 in 640 steps).
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...errors import BaraError
from ...heads import Classifier
from ..base import Method, Progress, repeated_passes
from ..factor_posterior import SIGMA_PARAMS, clamp_sigma, kl_sgd_step, sigma_in_adamw
from ..factor_posterior import blob_kl_weight, linear_schedule  # noqa: F401 (importable here, as before)
from ..lora import target_modules
from .config import BaraConfig
from .layer import BaraLinear

GATE_PARAMS = ("bara_gate", "bara_context", "bara_pi_")
# The gate in a report, each beside its null (the gate network as initialised) or as the shuffle test's change in NLL.
GATE_SUMMARY = ("decided_share", "decided_share_null", "gate_mi", "gate_mi_null", "shuffle_nll_one_pass",
                "shuffle_nll_sampled", "rank_std_between_inputs", "rank_std_between_samples", "joint_effective_rank",
                "selection_variability", "hard_rank_std")


def bernoulli_entropy_bits(p: torch.Tensor) -> torch.Tensor:
    """H(p) = -p log2 p - (1 - p) log2(1 - p), 0 at p = 0 and 1."""
    return -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p)) / math.log(2)


def gate_information(stats: dict, layers) -> dict[str, float]:
    r"""Is the gate decided, and does it depend on the input? From the one-pass gate probabilities
    :math:`\bar\rho_{nk}` of every layer:

    - ``gate_entropy``: mean over layers, factors and instances of :math:`H(\bar\rho_{nk})` (bits);
    - ``decided_share``: share of :math:`\bar\rho_{nk}` outside (0.1, 0.9);
    - ``gate_mi``: the mutual information between input and gate, :math:`\sum_k [H(\mathrm{mean}_n \bar\rho_{nk})
      - \mathrm{mean}_n H(\bar\rho_{nk})]` (bits), mean over layers.
    """
    rho = [stats[n]["rho"].clamp(0, 1) for n in layers]
    return {
        "gate_entropy": float(np.mean([bernoulli_entropy_bits(r).mean().item() for r in rho])),
        "decided_share": float(np.mean([((r <= 0.1) | (r >= 0.9)).float().mean().item() for r in rho])),
        "gate_mi": float(np.mean([(bernoulli_entropy_bits(r.mean(0)) - bernoulli_entropy_bits(r).mean(0)).sum().item()
                                  for r in rho])),
    }


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


class Bara(Method):
    """BaRA: Bayesian Adaptive Rank Allocation (global-local gated Bayesian LoRA)."""

    name = "bara"
    # Chosen on validation for MiniLM at 1,000 examples, on banking77, clinc150 and hwu64 alike:
    # benchmarks/results/standard/results.md, each intent set's "Learning rates ... chosen on the validation split".
    default_lr = {"encoder": 1e-2}
    config_class = BaraConfig
    default_samples = 10
    diverged_fix = ", or --kl-lr, or bound sigma_A with --max-sigma 0.2 (docs/experiments.md section 9)"
    report_columns = (("decided_share", "decided"), ("gate_mi", "MI bits"), ("gate_mi_null", "MI null"),
                      ("shuffle_nll_one_pass", "shuffle ΔNLL"), ("joint_effective_rank", "s̄"))
    run_files = ("rank.png",)
    column_legend = ("V: selection variability, rank std: std across instances of the hard effective rank, s̄: joint "
                     "effective rank.")

    def wrap(self, classifier: Classifier) -> None:
        targets = target_modules(self.config, classifier)
        if not targets:
            raise BaraError("no default target modules for this architecture; fix: pass --target-modules")
        found = [(n, m) for n, m in classifier.backbone.named_modules() if _matches(n, targets)
                 and isinstance(m, (nn.Linear, Conv1D))]
        if not found:
            raise BaraError(f"no linear layer named {targets} in the model; fix: pass --target-modules")
        self.layers: dict[str, BaraLinear] = {}
        for name, module in found:
            parent_name, _, child = name.rpartition(".")
            layer = BaraLinear(module, self.config)
            setattr(classifier.backbone.get_submodule(parent_name), child, layer)
            self.layers[name] = layer
        for head in classifier.head_names:  # the fresh classification head is trained in full
            for p in classifier.backbone.get_submodule(head).parameters():
                p.requires_grad_(True)

        def share_mask(module, args, kwargs):  # the padding mask reaches every adapted layer
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            for layer in self.layers.values():
                layer.mask = mask

        classifier.register_forward_pre_hook(share_mask, with_kwargs=True)

    def set_mode(self, mode: str) -> None:
        for layer in self.layers.values():
            layer.mode = mode

    @property
    def gates_per_instance(self) -> int:
        return sum(layer.rank for layer in self.layers.values())

    def param_groups(self, classifier, lr, weight_decay):
        """AdamW's groups: factors and head at ``lr``; the gate network (and a Kumaraswamy q(pi)) at gate_lr, no
        weight decay. sigma_A's parameter joins AdamW only with kl_step=loss: with kl_step=sgd only the SGD step of
        :meth:`on_step_end` moves it, as in BLoB's code (AdamW moves every parameter by about lr a step, whatever
        its gradient, which drove rho through 0 and then the KL's -2/rho term threw sigma_A out)."""
        groups = {"gate": [], "sigma": [], "factors": []}
        for name, p in classifier.named_parameters():
            if p.requires_grad:
                key = "gate" if any(g in name for g in GATE_PARAMS) else \
                    "sigma" if any(k in name for k in SIGMA_PARAMS) else "factors"
                groups[key].append(p)
        sigma = [{"params": groups["sigma"], "lr": lr, "weight_decay": 0.0}] if sigma_in_adamw(self.config) else []
        return [{"params": groups["factors"], "lr": lr, "weight_decay": weight_decay}, *sigma,
                {"params": groups["gate"], "lr": self.config.gate_lr, "weight_decay": 0.0}]

    def loss(self, model, batch: dict, progress: Progress) -> tuple[torch.Tensor, dict]:
        c = self.config
        self.set_mode("train")
        nll = self.data_term(model, batch)
        beta = min(1.0, progress.fraction / c.kl_warmup) if c.kl_warmup > 0 else 1.0
        layers = list(self.layers.values())
        if c.gate in ("none", "deterministic"):
            kl_local = weighted_local = torch.zeros((), device=nll.device)
        else:
            per_instance = sum(l.kl_local for l in layers)  # [N]: summed over each instance's gates
            weight = c.omega_loc or 1.0 / sum(l.gates for l in layers)  # 1/G_n, the instance's own gate count
            kl_local, weighted_local = per_instance.mean(), (weight * per_instance).mean()
        kl_pi, kl_A = sum(l.kl_pi() for l in layers), sum(l.kl_A() for l in layers)
        kl_in_loss = (kl_pi if not c.svi else 0.0) + (kl_A if c.kl_step == "loss" else 0.0)
        loss = nll + beta * weighted_local + beta * c.kl_scale * kl_in_loss / progress.num_train
        logs = {"nll": nll.item(), "kl_local": kl_local.item(), "kl_global": (kl_pi + kl_A).item(), "beta": beta}
        if c.gate == "deterministic":
            penalty = sum(l.penalty.mean() for l in layers)
            loss = loss + c.l1_weight * penalty
            logs["l1"] = penalty.item()
        if c.orth_reg > 0:
            orth = sum(l.entanglement() for l in layers) / len(layers)
            loss = loss + c.orth_reg * orth
            logs["orth"] = orth.item()
        return loss, logs

    def data_term(self, model, batch: dict) -> torch.Tensor:
        """-log p(y | x, w) for one sample, or -log (1/K) sum_k p(y | x, w_k) for K = train_samples samples drawn
        as K copies of the batch in one pass (each copy draws its own A, pi, gates and magnitudes)."""
        k = self.config.train_samples
        if k == 1:
            return F.cross_entropy(self.forward(model, batch), batch["labels"])
        repeated = {**batch, "input_ids": batch["input_ids"].repeat(k, 1),
                    "attention_mask": batch["attention_mask"].repeat(k, 1)}
        log_probs = F.log_softmax(self.forward(model, repeated).float(), -1).view(k, len(batch["labels"]), -1)
        mixture = torch.logsumexp(log_probs, 0) - math.log(k)
        return F.nll_loss(mixture, batch["labels"])

    def on_step_end(self, classifier: Classifier, progress: Progress) -> None:
        c = self.config
        if c.kl_step == "sgd" and c.bayes_factors:
            kl_sgd_step(list(self.layers.values()), c, progress)
        if c.svi:  # q(pi)'s natural-gradient step, from the usage of the step's training pass
            rate = (c.pi_step_delay + progress.step) ** -c.pi_step_power
            layers = list(self.layers.values())
            weight = 1.0
            if c.pi_counts == "tempered" and layers[0].gates is not None:
                weight = c.omega_loc or (1.0 / sum(l.gates for l in layers)).mean().item()
            for layer in layers:
                layer.svi_step(progress.num_train * weight, rate)
        if c.bayes_factors:
            clamp_sigma(list(self.layers.values()), c)

    @torch.no_grad()
    def predict(self, classifier: Classifier, batch: dict, samples: int) -> torch.Tensor:
        """``samples = 0``: one pass with A = mu_A, theta = m and the gate at the sampler's own mean
        E_q(pi)[sigma(logit pi + Delta)] (``fast_gate=hard``: its 0/1 threshold). Otherwise S samples, batched:
        the batch is repeated S times so each copy draws its own A, pi, gates and magnitudes."""
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
    @torch.no_grad()
    def gate_statistics(self, classifier: Classifier, batches) -> dict[str, dict[str, torch.Tensor]]:
        """Per layer: expected gate probabilities rho_bar [N, r] and hard gates [N, r] of the one-pass prediction;
        also the labels and the one-pass probabilities ``probs`` [1, N, C]."""
        rho = {n: [] for n in self.layers}
        hard = {n: [] for n in self.layers}
        labels, probs = [], []
        for batch in batches:
            probs.append(self.predict(classifier, batch, 0).cpu())
            labels.append(batch["labels"].cpu())
            for name, layer in self.layers.items():
                if layer.last_rho is None or self.config.gate == "none":
                    ones = torch.ones(batch["input_ids"].shape[0], layer.rank)
                    rho[name].append(ones), hard[name].append(ones)
                else:
                    rho[name].append(layer.last_rho.float().cpu()), hard[name].append(layer.last_g.float().cpu())
        stats = {n: {"rho": torch.cat(rho[n]), "hard": torch.cat(hard[n])} for n in self.layers}
        stats["labels"], stats["probs"] = torch.cat(labels), torch.cat(probs, dim=1)
        return stats

    @contextmanager
    def initial_gates(self):
        """Every layer's gate network and q(pi) as initialised (the null of the gate diagnostics)."""
        with ExitStack() as stack:
            for i, layer in enumerate(self.layers.values()):
                if self.config.gate != "none":
                    stack.enter_context(layer.initial_gate(seed=i))
            yield

    @contextmanager
    def shuffled_gates(self, block: int):
        """Each instance's local gate (the gate network's output) replaced by another's in its batch of ``block``."""
        for layer in self.layers.values():
            layer.shuffle_block = block
        try:
            yield
        finally:
            for layer in self.layers.values():
                layer.shuffle_block = 0

    def sampled_ranks(self, classifier: Classifier, batches, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``samples`` Monte-Carlo passes: probabilities [S, N, C] and the joint hard rank of every sample [S, N]."""
        probs, ranks = [], []
        for batch in batches:
            p, r = [], []
            for _ in range(samples):
                p.append(self.predict(classifier, batch, 1)[0].cpu())
                r.append(torch.stack([l.last_g.float().sum(-1).cpu() for l in self.layers.values()]).mean(0)
                         if self.config.gate != "none" else torch.full((len(p[-1]),), float(self.config.r)))
            probs.append(torch.stack(p)), ranks.append(torch.stack(r))
        return torch.cat(probs, 1), torch.cat(ranks, 1)

    def diagnostics(self, classifier: Classifier, batches) -> dict:
        """Effective ranks (the bound's complexity term) and whether the gate is decided and input-dependent,
        each beside its null (docs/experiments.md section 10): the gate network as initialised on the same inputs,
        and a shuffle test (each instance gets another instance's local gate)."""
        from ...metrics import evaluate

        batches = list(batches)
        stats = self.gate_statistics(classifier, batches)
        result = self._rank_summary(stats)
        if self.config.gate == "none":  # BLoB: no gate to be decided or input-dependent
            return result
        with self.initial_gates():
            null = self.gate_statistics(classifier, batches)
        result.update(gate_information(stats, self.layers), **{f"{k}_null": v for k, v in
                                                               gate_information(null, self.layers).items()})
        if self.config.gate == "global":  # nothing depends on the input: nothing to shuffle
            return result
        labels, block = stats["labels"], len(batches[0]["labels"])
        with self.shuffled_gates(block):
            shuffled = self.gate_statistics(classifier, batches)["probs"]
        samples = self.default_samples
        torch.manual_seed(0)
        sampled, ranks = self.sampled_ranks(classifier, batches, samples)
        torch.manual_seed(0)
        with self.shuffled_gates(block):
            sampled_shuffled, _ = self.sampled_ranks(classifier, batches, samples)
        predictions = {"one_pass": stats["probs"], "one_pass_shuffled": shuffled, "sampled": sampled,
                       "sampled_shuffled": sampled_shuffled}
        scores = {name: evaluate(p, labels) for name, p in predictions.items()}
        for kind in ("one_pass", "sampled"):
            result[f"shuffle_nll_{kind}"] = scores[f"{kind}_shuffled"]["nll"] - scores[kind]["nll"]
            result[f"shuffle_accuracy_{kind}"] = scores[f"{kind}_shuffled"]["accuracy"] - scores[kind]["accuracy"]
        result["rank_std_between_inputs"] = ranks.mean(0).std().item()
        result["rank_std_between_samples"] = ranks.std(0).mean().item()
        return result

    @torch.no_grad()
    def _pi_moved(self, layer: BaraLinear) -> dict:
        """How far q(pi) moved from its initial value: mean over factors of |E[pi] - E_0[pi]| and of the std
        now beside the initial std (a q(pi) that stays where it started was not inferred)."""
        if not self.config.uses_pi:
            return {}
        now = layer.q_pi()
        with layer.initial_gate():
            start = layer.q_pi()
            start_mean, start_std = start.mean.clone(), start.variance.sqrt().clone()
        return {"pi_mean_moved": (now.mean - start_mean).abs().mean().item(),
                "pi_std_mean": now.variance.sqrt().mean().item(), "pi_std_initial": start_std.mean().item()}

    def _rank_summary(self, stats: dict) -> dict:
        """Effective ranks per layer and jointly (docs/ARCHITECTURE.md, diagnostics), and the bound's complexity term."""
        layers = {}
        for name, layer in self.layers.items():
            rho, hard = stats[name]["rho"], stats[name]["hard"]
            expected_rank, hard_rank = rho.sum(1), hard.sum(1)
            q = layer.q_pi() if self.config.uses_pi else None
            pi = layer.expected_pi().detach().float().cpu()
            layers[name] = {
                "rank": layer.rank, "d_in": layer.in_features, "d_out": layer.out_features,
                "expected_pi": pi.tolist(), "global_rank": int((pi > 0.5).sum()),
                "pi_std": q.variance.sqrt().detach().float().cpu().tolist() if q is not None else None,
                **self._pi_moved(layer),
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
            "layers": layers,
        }

    @classmethod
    def summary(cls, diagnostics: dict, validation: bool = False) -> dict:
        """The gate's numbers (on validation too, where choices are made) and, on test, the ranks' spread."""
        keys = GATE_SUMMARY if validation else GATE_SUMMARY + ("joint_effective_rank_std", "global_rank_mean")
        return {k: diagnostics[k] for k in keys if k in diagnostics}

    def plots(self, classifier: Classifier, diagnostics: dict, output_dir, caption: str = "") -> list[str]:
        from ...plots import rank_plots

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
        """W + (alpha/r) B diag(z) mu_A in every adapted layer, z the one-pass local weight: 1 without a gate (BLoB's
        mean), the same for every input with gate=global. The one-pass prediction of any other gate depends on the
        input, so no single weight matrix holds it."""
        if self.config.gate not in ("none", "global"):
            raise BaraError(f"BaRA's gate (gate={self.config.gate}) switches factors per input, so the update is not "
                            "one weight matrix; fix: use the adapter (bara eval, bara.from_pretrained), or train with "
                            "--gate global (or --method blob) for a mergeable model")
        self.set_mode("mean")
        for name, layer in self.layers.items():
            z = torch.ones(layer.rank, device=layer.bara_B.device)
            if self.config.gate == "global":  # run the gate on any input: it ignores the input
                x = torch.zeros(1, 1, layer.in_features, device=z.device)
                z = layer.local_weights(x, torch.zeros(1, 1, layer.rank, device=z.device),
                                        torch.ones(1, 1, device=z.device)).reshape(-1)
            delta = layer.scaling * layer.bara_B.float() @ (z[:, None] * layer.bara_A_mu.float())  # [out, in]
            weight = layer.base.weight
            weight.add_((delta if isinstance(layer.base, nn.Linear) else delta.t()).to(weight.dtype))
            parent, _, child = name.rpartition(".")
            setattr(classifier.backbone.get_submodule(parent), child, layer.base)
        self.layers = {}
        return classifier.backbone

    def adapter_state(self, classifier: Classifier) -> dict[str, torch.Tensor]:
        state = super().adapter_state(classifier)  # plus the gate's running statistics (context_norm=batch)
        state.update({n: b.detach().clone() for n, b in classifier.named_buffers()
                      if (".bara_gate." in n and "running" in n) or ".bara_pi_" in n})  # q(pi) under svi
        return state

    def load_adapter_state(self, classifier: Classifier, state: dict[str, torch.Tensor]) -> None:
        for name, layer in self.layers.items():  # a pruned adapter has fewer factors in some layers
            key = next((k for k in state if k.endswith(f"{name}.bara_A_mu")), None)
            if key is not None and state[key].shape[0] != layer.rank:
                layer.keep_factors(torch.arange(state[key].shape[0]))
        super().load_adapter_state(classifier, state)

    @torch.no_grad()
    def prune(self, threshold: float | None = None) -> dict[str, int]:
        """Remove factors with E[pi] < threshold for good; returns the rank kept per layer.
        Needs a context that does not depend on the factors (context_source=hidden)."""
        threshold = self.config.prune_threshold if threshold is None else threshold
        if self.config.context_source != "hidden" and self.config.gate != "none":
            raise BaraError("pruning changes mu_A x, the gate's context with context_source=adapter; fix: train "
                            "with --context-source hidden")
        kept = {}
        for name, layer in self.layers.items():
            index = torch.nonzero(layer.expected_pi() >= threshold).flatten()
            if len(index) < layer.rank:
                layer.keep_factors(index)
            kept[name] = layer.rank
        return kept
