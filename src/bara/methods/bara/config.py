"""Every BaRA hyper-parameter, including the ablation switches (docs/ARCHITECTURE.md), round-tripped through
``adapter_config.json``."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import BaraError
from ..base import Choices, option
from ..factor_posterior import FactorPosteriorConfig


class Gate(Choices):
    """``gate``: which gates multiply the rank-1 factors."""

    BOTH = "both"
    """Global-local: a per-layer gate with an IBP prior times a per-instance one (BaRA)."""
    GLOBAL = "global"
    """The per-layer gate only."""
    LOCAL = "local"
    """The per-instance gate only."""
    DETERMINISTIC = "deterministic"
    """A per-instance gate without a KL, with an L1 penalty on z (SoRA-like)."""
    NONE = "none"
    """z = 1: every factor always on, exactly BLoB."""


class Slab(Choices):
    """``slab``: the local weight z = g * theta."""

    BOTH = "both"
    """A binary gate g times a magnitude theta."""
    BINARY = "binary"
    """theta = 1: the gate alone."""
    MAGNITUDE = "magnitude"
    """g = 1: the magnitude alone."""


class Context(Choices):
    """``context``: what a local gate is computed from."""

    INSTANCE = "instance"
    """The masked mean over the instance's tokens: one gate per instance."""
    TOKEN = "token"
    """Each token: a gate per token."""
    CAUSAL = "causal"
    """The mean over the tokens up to each token: no look-ahead."""


class ContextSource(Choices):
    """``context_source``: what the gate reads."""

    HIDDEN = "hidden"
    """A learned projection of the layer's input."""
    ADAPTER = "adapter"
    """mu_A x, free."""


class Estimator(Choices):
    """``estimator``: the gradient estimator of the local gate."""

    CONCRETE = "concrete"
    """The binary Concrete relaxation."""
    HARD_CONCRETE = "hard_concrete"
    """The stretched and clipped (hard) Concrete."""
    STRAIGHT_THROUGH = "straight_through"
    """A hard sample forward, the relaxed gradient backward."""


class Allocation(Choices):
    """``allocation``: how the factors' local gates relate."""

    INDEPENDENT = "independent"
    """Each factor gated on its own."""
    STICK = "stick"
    """Instance-specific stick-breaking: factor k is on only if the instance keeps all factors before it."""


class ContextNorm(Choices):
    """``context_norm``: the normalisation of the context before the gate network."""

    LAYER = "layer"
    """LayerNorm."""
    BATCH = "batch"
    """Centred and scaled across instances with running statistics: how an instance differs from the others."""


class FastGate(Choices):
    """``fast_gate``: the local gate of the one-pass prediction."""

    HARD = "hard"
    """g = 1[rho > 0.5]; pruning then keeps predictions exactly."""
    EXPECTED = "expected"
    """g = rho, the mean gate."""


class PiUpdate(Choices):
    """``pi_update``: how q(pi) is inferred."""

    SVI = "svi"
    """q(pi) = Beta, moved after every step towards its conjugate optimum by a natural-gradient step."""
    GRADIENT = "gradient"
    """q(pi) = Kumaraswamy(a, b) with free a, b under Adam at gate_lr."""


class PiCounts(Choices):
    """``pi_counts``: with ``pi_update=svi``, how the conjugate target counts each instance's usage."""

    FULL = "full"
    """Once: N u."""
    TEMPERED = "tempered"
    """At the local KL's weight: omega N u, the optimum of the tempered objective itself."""


@dataclass
class BaraConfig(FactorPosteriorConfig):
    # Adapters saved before these options existed: the hard one-pass gate, BLoB's rho, q(pi) trained by gradients, no
    # disentanglement penalty, one training sample.
    legacy = {**FactorPosteriorConfig.legacy, "fast_gate": "hard", "pi_update": "gradient", "orth_reg": 0.0,
              "train_samples": 1}

    r: int = option(16, "maximum rank r: the number of rank-1 factors each instance chooses from")
    # 0.05, not BLoB's 0.2: chosen with the rate on validation on 4 of standard's 5 sets (docs/experiments.md §29-§33).
    prior_sigma: float = option(0.05, "prior std of A: N(0, prior_sigma^2) (BLoB's default is 0.2)")
    gate: str = option("both", "gate: both (global-local, BaRA), global (per-layer only), local (per-instance "
                               "only), deterministic (no KL, L1 penalty: SoRA-like), none (z = 1: exactly BLoB)", Gate)
    slab: str = option("both", "local weight z = g*theta: both, binary (theta = 1) or magnitude (g = 1)", Slab)
    context: str = option("instance", "gate context: instance (masked mean over tokens), token (a gate per "
                                      "token), causal (prefix mean, no look-ahead)", Context)
    context_source: str = option("hidden", "what the gate reads: hidden (a learned projection of the layer "
                                           "input) or adapter (mu_A x, free)", ContextSource)
    # Default "batch": measured in docs/experiments.md, section 3.
    context_norm: str = option("batch", "normalisation of the context before the gate network: batch (centred "
                                        "and scaled across instances with running statistics, so the gate sees "
                                        "how an instance differs from the others) or layer (LayerNorm)", ContextNorm)
    context_dim: int = option(32, "size of the learned context projection (context_source=hidden)")
    gate_hidden: int = option(32, "hidden width of the gate network")
    gate_init: float = option(0.1, "std of the gate network's initial weights (0 = zero-initialised last layer)")
    gate_lr: float = option(1e-3, "learning rate of the gate network (and of q(pi) with pi_update=gradient; no "
                                  "weight decay)")
    pi_update: str = option("svi", "how q(pi) is inferred: svi (q(pi) = Beta, moved after every step towards its "
                                   "conjugate optimum Beta(alpha0/r + N * usage, 1 + N * (1 - usage)) by a "
                                   "natural-gradient step of size (pi_step_delay + t)^-pi_step_power, the way "
                                   "topic models update global Beta/Dirichlet parameters) or gradient (q(pi) = "
                                   "Kumaraswamy(a, b) with free a, b under Adam at gate_lr, the reparameterised "
                                   "form; what gate=global always uses: without a local gate no usage reaches q(pi))",
                            PiUpdate)
    pi_counts: str = option("full", "pi_update=svi: the conjugate target counts each instance's usage once (full: "
                                    "N u) or at the local KL's weight (tempered: omega N u, the optimum of the "
                                    "tempered objective J itself)", PiCounts)
    pi_step_power: float = option(0.7, "pi_update=svi: the step at step t is (delay + t)^-power (Robbins-Monro: "
                                       "0.5 < power <= 1)")
    pi_step_delay: float = option(1.0, "pi_update=svi: tau_0 of the step (delay + t)^-power (Hoffman et al.'s "
                                       "online LDA uses 1024): larger values move q(pi) less in the first steps, "
                                       "while B is still near zero and the gates' usage says little")
    bayes_factors: bool = option(True, "Gaussian posterior on A with flipout (as BLoB); false = point estimate")
    ibp_alpha: float = option(2.0, "IBP concentration alpha0: prior pi_k ~ Beta(alpha0 / r, 1)")
    # Default 0.5 (undecided gates learn an input-dependent allocation): measured in docs/experiments.md, section 5.
    pi_init: float = option(0.5, "initial E[pi] of the global gates (0.5: undecided; gates are never all off at "
                                 "the start, and the KL is warmed up)")
    # Default Gamma(50, 50) (mean 1, std 0.14), not SPEC's Gamma(1, 1): under Gamma(1, 1) every active factor pays
    # 1.7 nats for its magnitude and the gates collapse to one factor a layer; docs/experiments.md, section 11.
    theta_shape: float = option(50.0, "Gamma prior shape of the local magnitude theta (with theta_rate: mean "
                                      "shape / rate; 50 / 50: theta modulates a factor around 1, its scale is in B)")
    theta_rate: float = option(50.0, "Gamma prior rate of the local magnitude theta")
    allocation: str = option("independent", "independent (each factor gated on its own) or stick (instance-"
                                            "specific stick-breaking: factor k is on only if the instance keeps "
                                            "all factors before it, so the gate chooses a rank)", Allocation)
    temperature: float = option(2.0 / 3.0, "temperature of the relaxed local gate")
    estimator: str = option("concrete", "gradient estimator of the local gate: concrete, hard_concrete, "
                                        "straight_through", Estimator)
    # Default "expected" (the mean of every variable in the one-pass prediction): docs/experiments.md, section 5.
    fast_gate: str = option("expected", "local gate of the one-pass prediction: expected (g = rho, the mean gate) "
                                        "or hard (g = 1[rho > 0.5], the design's fast path; pruning then keeps "
                                        "predictions exactly)", FastGate)
    omega_loc: float = option(0.0, "weight of the local KL, summed over an instance's gates (every token's, with a "
                                   "token or causal context); 0 = 1/G_n, G_n = the number of those gates: a "
                                   "tempered ELBO (1 = the exact ELBO)")
    l1_weight: float = option(1e-3, "L1 weight on z for gate=deterministic")
    # Default 2 (the averaged predictive that is scored, trained directly): 0.02 nats lower validation NLL on hwu64 and
    # clinc150, level on banking77, at 1.5-1.9x the training time; docs/experiments.md, section 12.
    train_samples: int = option(2, "K: the data term is -log (1/K) sum_k p(y | x, w_k) over K samples drawn in one "
                                   "batched pass (K = 1: one sample): training the averaged predictive that is "
                                   "scored; costs K times the forward and backward pass")
    # Default 0.5 (peft's AdaLoRA weight): most of AdaLoRA's lead was its orthogonality;
    # docs/experiments.md, section 11.
    orth_reg: float = option(0.5, "weight of the disentanglement penalty: the Frobenius norm of the off-diagonal "
                                  "cosine similarities between A's rows and between B's columns (AdaLoRA's "
                                  "orthogonality of P and Q, without fixing their scale), mean over layers")
    prune_threshold: float = option(0.01, "factors with E[pi] below this are pruned by 'prune'")

    def validate(self) -> None:
        super().validate()
        if not 0 < self.pi_init < 1:
            raise BaraError(f"pi_init must be in (0, 1), got {self.pi_init}")
        for name in ("ibp_alpha", "theta_shape", "theta_rate", "temperature", "gate_lr"):
            if getattr(self, name) <= 0:
                raise BaraError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.train_samples < 1:
            raise BaraError(f"train_samples must be >= 1, got {self.train_samples}; fix: pass --train-samples 1")
        if self.orth_reg < 0:
            raise BaraError(f"orth_reg must be >= 0, got {self.orth_reg}; fix: pass --orth-reg 0")
        if self.pi_step_delay < 1:
            raise BaraError(f"pi_step_delay must be >= 1, got {self.pi_step_delay}; fix: pass --pi-step-delay 1")
        if not 0.5 < self.pi_step_power <= 1:
            raise BaraError(f"pi_step_power must be in (0.5, 1], got {self.pi_step_power}; fix: pass --pi-step-power "
                            "0.7")
        if self.omega_loc < 0:
            raise BaraError(f"omega_loc must be >= 0 (0 = 1/G), got {self.omega_loc}")
