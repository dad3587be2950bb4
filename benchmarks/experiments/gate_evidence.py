"""How much does one instance's label say about one of BaRA's gates? (docs/experiments.md, section 12)

For a finished BaRA run and N examples of a split, at the one-pass prediction (A = mu_A, theta at its mean, every
gate at its expected value rho_bar), for every gate k of every adapted layer:

    dl_nk = log p(y_n | x_n, g_k = 1) - log p(y_n | x_n, g_k = 0)      (the other gates left at rho_bar)

Given the label, the gate's conditional posterior is sigma(logit E[pi_k] + dl_nk) under the ELBO and
sigma(logit E[pi_k] + G dl_nk) under the tempered objective BaRA optimises (its local KL weighted 1/G, G the gates of
an instance). The script prints the share of decided gates (outside (0.1, 0.9)) of both beside the trained gate's own
(which does not see the label), and how large dl is. Costs 2 G one-pass forward passes over the N examples.

  python benchmarks/experiments/gate_evidence.py runs/exp/hwu64-bara --n 128
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from bara import runs
from bara.trainer import batches, on_device


def decided(p: torch.Tensor) -> float:
    return ((p <= 0.1) | (p >= 0.9)).float().mean().item()


@torch.no_grad()
def gate_evidence(folder: str, n: int = 128, split: str = "validation") -> dict:
    classifier, method, config = runs.load_adapter(folder)
    data = getattr(runs.task_of(config), split)
    order = list(range(min(n, len(data))))
    batch = on_device(next(iter(batches(classifier, data, len(order), order=order))), classifier)
    forced = {}  # the one gate held at 0 or 1: {"layer", "k", "value"}

    def hold(layer, weights):
        def factor_weights(x, ax_mean):
            z = weights(x, ax_mean)
            if forced.get("layer") is layer:  # z = rho_bar * m in the one-pass prediction: m times the held value
                k = forced["k"]
                z = z.clone()
                z[:, k] = z[:, k] / layer.last_rho[:, k].clamp(min=1e-6) * forced["value"]
            return z
        return factor_weights

    for layer in method.layers.values():
        layer.factor_weights = hold(layer, layer.factor_weights)

    def loglik() -> torch.Tensor:
        method.set_mode("mean")
        logits = classifier(batch["input_ids"], batch["attention_mask"]).float()
        return -F.cross_entropy(logits, batch["labels"], reduction="none")

    loglik()
    rho_bar = {name: layer.last_rho.clone() for name, layer in method.layers.items()}
    dl, rho, prior = [], [], []
    for name, layer in method.layers.items():
        pi = layer.expected_pi().detach().float()
        for k in range(layer.rank):
            forced.update(layer=layer, k=k, value=1.0)
            on = loglik()
            forced.update(value=0.0)
            dl.append(on - loglik())
            rho.append(rho_bar[name][:, k])
            prior.append(pi[k].expand_as(on))
        forced.clear()
    dl, rho, prior = torch.stack(dl, 1), torch.stack(rho, 1), torch.stack(prior, 1)  # [N, G]
    gates = dl.shape[1]
    logit_prior = torch.logit(prior.clamp(1e-6, 1 - 1e-6))
    return {
        "run": str(folder), "split": split, "n": len(order), "gates": gates,
        "decided_trained_gate": decided(rho),
        "decided_given_label_elbo": decided(torch.sigmoid(logit_prior + dl)),
        "decided_given_label_tempered": decided(torch.sigmoid(logit_prior + gates * dl)),
        "abs_dl_median": dl.abs().median().item(), "abs_dl_q90": dl.abs().quantile(0.9).item(),
        "abs_dl_max": dl.abs().max().item(), "share_abs_dl_over_2.2": (dl.abs() > 2.2).float().mean().item(),
        "sign_agrees_with_factor_mean": ((dl > 0) == (dl.mean(0, keepdim=True) > 0)).float().mean().item(),
        "dl": dl,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished BaRA run folder (bara train --output)")
    parser.add_argument("--n", type=int, default=128, help="examples of the split (default 128)")
    parser.add_argument("--split", default="validation", choices=("validation", "test"))
    args = parser.parse_args()
    result = gate_evidence(args.run, args.n, args.split)
    del result["dl"]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
