r"""BaRA as a method: BLoB's (:mod:`..factor_method`: injection, the KL step, prediction) with the gate's objective,
q(pi)'s SVI step, the gate's diagnostics and pruning. Which of these a run has (the local KL or the L1 penalty,
KL_pi in the loss or q(pi)'s SVI step, gate information and a shuffle test, a merged model) the ``gate`` strategy
of :mod:`.variants` says, chosen once when the method is built.

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
   21 times the ELBO's 1/N at N = 1,000; ``kl_gamma = 0``: :math:`1/M` with M batches per epoch). ``kl_step=ngvi``:
   that step on mu_A only, and sigma_A set to Gaussian VI's fixed point from the NLL's curvature in A
   (:func:`~..factor_posterior.ngvi_sigma_step`).
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

from ...errors import BaraError
from ...heads import Classifier
from ..base import Progress
from ..factor_method import RANK_SUMMARY, FactorPosteriorMethod
from ..factor_posterior import blob_kl_weight, linear_schedule  # noqa: F401 (importable here, as before)
from .config import BaraConfig
from .layer import BaraLinear
from .variants import gating

GATE_PARAMS = ("bara_gate", "bara_context", "bara_pi_")
# The gate in a report, each beside its null (the gate network as initialised) or as the shuffle test's change in NLL.
GATE_SUMMARY = ("decided_share", "decided_share_null", "gate_mi", "gate_mi_null", "shuffle_nll_one_pass",
                "shuffle_nll_sampled", "rank_std_between_inputs", "rank_std_between_samples", *RANK_SUMMARY)


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


class Bara(FactorPosteriorMethod):
    """BaRA: Bayesian Adaptive Rank Allocation (global-local gated Bayesian LoRA)."""

    name = "bara"
    # Chosen on validation for MiniLM at 1,000 examples on banking77 and clinc150 (on hwu64 5e-3, where 1e-2 scores
    # within 0.7 points and 0.013 nats of it on test: benchmarks/results/defaults/) and at 500 on banking77 and hwu64:
    # benchmarks/results/standard/results.md, each intent set's "Learning rates ... chosen on the validation split".
    # On causal LMs (SmolLM2-135M, 400 steps): 3e-3, chosen on validation over 1e-2 on all three BIG-bench sets of
    # multiple-choice (benchmarks/results/multiple-choice/results.md; 1e-3 not tried).
    default_lr = {"encoder": 1e-2, "causal": 3e-3}
    config_class = BaraConfig
    layer_class = BaraLinear
    report_columns = (("decided_share", "decided"), ("gate_mi", "MI bits"), ("gate_mi_null", "MI null"),
                      ("shuffle_nll_one_pass", "shuffle ΔNLL"), *FactorPosteriorMethod.report_columns)
    summary_keys = GATE_SUMMARY
    separate_params = GATE_PARAMS  # AdamW's gate group

    def __init__(self, config: BaraConfig | None = None):
        super().__init__(config)
        self.gating = gating(self.config)  # which gates there are (variants.py): what the loss and diagnostics add
        self._record: dict | None = None  # a scoring's sampled pass, for the diagnostics (:meth:`recording`)

    @property
    def bayes_factors(self) -> bool:
        return self.config.bayes_factors

    def wrap(self, classifier: Classifier) -> None:
        super().wrap(classifier)

        def share_mask(module, args, kwargs):  # the padding mask reaches every adapted layer
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            for layer in self.layers.values():
                layer.mask = mask

        classifier.register_forward_pre_hook(share_mask, with_kwargs=True)

    @property
    def gates_per_instance(self) -> int:
        return sum(layer.rank for layer in self.layers.values())

    def param_groups(self, classifier, lr, weight_decay):
        """The posterior's groups (factors and head at ``lr``, sigma_A's parameter only with kl_step=loss), then the
        gate network (and a Kumaraswamy q(pi)) at gate_lr, without weight decay."""
        gate = [p for name, p in classifier.named_parameters()
                if p.requires_grad and any(g in name for g in GATE_PARAMS)]
        return [*super().param_groups(classifier, lr, weight_decay),
                {"params": gate, "lr": self.config.gate_lr, "weight_decay": 0.0}]

    def loss(self, model, batch: dict, progress: Progress) -> tuple[torch.Tensor, dict]:
        c = self.config
        self.set_mode("train")
        nll = self.data_term(model, batch)
        beta = self.kl_beta(progress)
        layers = list(self.layers.values())
        if self.gating.local_kl:
            per_instance = sum(l.kl_local for l in layers)  # [N]: summed over each instance's gates
            weight = c.omega_loc or 1.0 / sum(l.gates for l in layers)  # 1/G_n, the instance's own gate count
            kl_local, weighted_local = per_instance.mean(), (weight * per_instance).mean()
        else:  # gate=none (z = 1) or deterministic (the L1 penalty below instead)
            kl_local = weighted_local = torch.zeros((), device=nll.device)
        kl_pi, kl_A = sum(l.kl_pi() for l in layers), sum(l.kl_A() for l in layers)
        # KL_pi by gradients here, or reached by q(pi)'s SVI step after the optimiser's (on_step_end)
        kl_in_loss = (kl_pi if not self.gating.pi.svi else 0.0) + (kl_A if c.kl_step == "loss" else 0.0)
        loss = nll + beta * weighted_local + beta * c.kl_scale * kl_in_loss / progress.num_train
        logs = {"nll": nll.item(), "kl_local": kl_local.item(), "kl_global": (kl_pi + kl_A).item(), "beta": beta}
        if self.gating.l1:  # SoRA-like: the L1 penalty on z
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
            return super().data_term(model, batch)
        repeated = {**batch, "input_ids": batch["input_ids"].repeat(k, 1),
                    "attention_mask": batch["attention_mask"].repeat(k, 1)}
        log_probs = F.log_softmax(self.forward(model, repeated).float(), -1).view(k, len(batch["labels"]), -1)
        mixture = torch.logsumexp(log_probs, 0) - math.log(k)
        return F.nll_loss(mixture, batch["labels"])

    def on_step_end(self, classifier: Classifier, progress: Progress) -> None:
        """The posterior's steps (BLoB's SGD KL step, sigma_A's bound), then q(pi)'s natural-gradient step from the
        usage of the step's training pass (independent of each other: q(pi) reads no sigma_A, nor they q(pi))."""
        super().on_step_end(classifier, progress)
        c = self.config
        if self.gating.pi.svi:
            rate = (c.pi_step_delay + progress.step) ** -c.pi_step_power
            layers = list(self.layers.values())
            weight = 1.0
            if c.pi_counts == "tempered" and layers[0].gates is not None:
                weight = c.omega_loc or (1.0 / sum(l.gates for l in layers)).mean().item()
            for layer in layers:
                layer.svi_step(progress.num_train * weight, rate)

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
                if layer.last_rho is None or not self.gating.network:
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
                if self.gating.network:
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

    def joint_ranks(self) -> torch.Tensor:
        """The joint hard rank of every row of the last pass, ``[rows]``: its active gates, mean over layers."""
        return torch.stack([l.last_g.float().sum(-1).cpu() for l in self.layers.values()]).mean(0)

    def sampled_ranks(self, classifier: Classifier, batches, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``samples`` Monte-Carlo passes: probabilities [S, N, C] and the joint hard rank of every sample [S, N]."""
        probs, ranks = [], []
        for batch in batches:
            p, r = [], []
            for _ in range(samples):
                p.append(self.predict(classifier, batch, 1)[0].cpu())
                r.append(self.joint_ranks() if self.gating.network else torch.full((len(p[-1]),), float(self.config.r)))
            probs.append(torch.stack(p)), ranks.append(torch.stack(r))
        return torch.cat(probs, 1), torch.cat(ranks, 1)

    @contextmanager
    def recording(self, seed: int):
        """The sampled predictions inside keep their probabilities and each sample's joint rank: the next
        :meth:`diagnostics` over the same batches takes them as its sampled pass (and draws its shuffled twin from
        ``seed``, the same numbers) instead of sampling S more passes over the split."""
        self._record = {"seed": seed, "probs": [], "ranks": [], "open": True}
        try:
            yield
        finally:
            self._record["open"] = False

    @torch.no_grad()
    def predict(self, classifier: Classifier, batch: dict, samples: int) -> torch.Tensor:
        record = self._record
        if samples == 0 or record is None or not record["open"] or not self.gating.network:
            return super().predict(classifier, batch, samples)
        passes = []  # the stacked copies of the batch go through in as few passes as MAX_ROWS allows
        hook = classifier.register_forward_hook(lambda *_: passes.append(self.joint_ranks()))
        try:
            probs = super().predict(classifier, batch, samples)
        finally:
            hook.remove()
        record["probs"].append(probs.cpu())
        record["ranks"].append(torch.cat(passes).view(samples, -1))  # the copies are sample-major
        return probs

    def recorded(self) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """The recorded sampled pass, if it drew the default samples: probabilities [S, N, C], ranks [S, N] and its
        seed; consumed."""
        record, self._record = self._record, None
        if not record or not record["probs"] or record["probs"][0].shape[0] != self.default_samples:
            return None
        return torch.cat(record["probs"], 1), torch.cat(record["ranks"], 1), record["seed"]

    def diagnostics(self, classifier: Classifier, batches) -> dict:
        """Effective ranks (the bound's complexity term) and whether the gate is decided and input-dependent,
        each beside its null (docs/experiments.md section 10): the gate network as initialised on the same inputs,
        and a shuffle test (each instance gets another instance's local gate)."""
        from ...metrics import evaluate

        batches = list(batches)
        scored = self.recorded()  # the scoring's sampled pass over these batches (runs.score), if any
        stats = self.gate_statistics(classifier, batches)
        result = self.rank_summary(stats)
        if not self.gating.network:  # gate=none, BLoB's posterior: no gate to be decided or input-dependent
            return result
        with self.initial_gates():
            null = self.gate_statistics(classifier, batches)
        result.update(gate_information(stats, self.layers), **{f"{k}_null": v for k, v in
                                                               gate_information(null, self.layers).items()})
        if not self.gating.input_dependent:  # gate=global: nothing depends on the input, nothing to shuffle
            return result
        labels, block = stats["labels"], len(batches[0]["labels"])
        with self.shuffled_gates(block):
            shuffled = self.gate_statistics(classifier, batches)["probs"]
        samples = self.default_samples
        if scored is not None and scored[0].shape[1] == len(labels):  # the shuffled twin draws the same numbers
            sampled, ranks, seed = scored
            torch.manual_seed(seed)
            twin = []
            for batch in batches:
                with self.shuffled_gates(len(batch["labels"])):  # within each stacked copy of the batch
                    twin.append(self.predict(classifier, batch, samples).cpu())
            sampled_shuffled = torch.cat(twin, 1)
        else:
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
        if not self.gating.pi.inferred:
            return {}
        now = layer.q_pi()
        with layer.initial_gate():
            start = layer.q_pi()
            start_mean, start_std = start.mean.clone(), start.variance.sqrt().clone()
        return {"pi_mean_moved": (now.mean - start_mean).abs().mean().item(),
                "pi_std_mean": now.variance.sqrt().mean().item(), "pi_std_initial": start_std.mean().item()}

    def gate_summary(self, layer: BaraLinear) -> dict:
        q = layer.q_pi() if self.gating.pi.inferred else None
        pi = layer.expected_pi().detach().float().cpu()
        return {"expected_pi": pi.tolist(), "global_rank": int((pi > 0.5).sum()),
                "pi_std": q.variance.sqrt().detach().float().cpu().tolist() if q is not None else None,
                **self._pi_moved(layer)}

    # -- adapters -----------------------------------------------------------------------------------
    def merged(self, classifier: Classifier) -> nn.Module:
        """The posterior's merged model, z the one-pass local weight: 1 without a gate (BLoB's mean), the same for
        every input with gate=global. The one-pass prediction of any other gate depends on the input, so no single
        weight matrix holds it."""
        if self.gating.input_dependent:
            raise BaraError(f"BaRA's gate (gate={self.config.gate}) switches factors per input, so the update is not "
                            "one weight matrix; fix: use the adapter (bara eval, bara.from_pretrained), or train with "
                            "--gate global (or --method blob) for a mergeable model")
        return super().merged(classifier)

    def merge_weights(self, layer: BaraLinear) -> torch.Tensor:
        if not self.gating.network:  # gate=none: z = 1
            return super().merge_weights(layer)
        device = layer.bara_B.device  # run the gate on any input: it ignores the input
        return layer.local_weights(torch.zeros(1, 1, layer.in_features, device=device),
                                   torch.zeros(1, 1, layer.rank, device=device),
                                   torch.ones(1, 1, device=device)).reshape(-1)

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
        if self.config.context_source != "hidden" and self.gating.network:
            raise BaraError("pruning changes mu_A x, the gate's context with context_source=adapter; fix: train "
                            "with --context-source hidden")
        keep = {name: torch.nonzero(layer.expected_pi() >= threshold).flatten() for name, layer in self.layers.items()}
        emptied = [name for name, index in keep.items() if len(index) == 0]
        if emptied:  # checked before anything is cut: a layer without factors has no gate to compute
            raise BaraError(f"pruning at E[pi] >= {threshold:g} would remove every factor of {len(emptied)} layer(s) "
                            f"(first: {emptied[0]}); fix: a lower threshold (the default is "
                            f"{self.config.prune_threshold:g}), or leave the model unpruned")
        for name, layer in self.layers.items():
            if len(keep[name]) < layer.rank:
                layer.keep_factors(keep[name])
        return {name: layer.rank for name, layer in self.layers.items()}
