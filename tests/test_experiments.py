"""benchmarks/experiments/: mc_sources.py's settings sample only what they say they sample; gate_evidence.py holds
exactly one gate; the experiment presets vary what they say they vary."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bara import runs
from bara.methods import base
from bara.methods.bara import BaraConfig, BaraLinear
from bara.runs import RunConfig
from bara.trainer import TrainConfig

EXPERIMENTS = Path(__file__).parents[1] / "benchmarks" / "experiments"


def _script(name: str = "mc_sources"):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _outputs(module: BaraLinear, x: torch.Tensor, mode: str, draws: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(output, gate probabilities rho) of ``draws`` seeded forward passes in ``mode``."""
    module.mode = mode
    outs = []
    for seed in range(draws):
        torch.manual_seed(seed)
        outs.append((module(x), module.last_rho.clone()))
    return outs


def test_sources_settings_sample_only_a_or_only_the_gates():
    script = _script()
    torch.manual_seed(0)
    module = BaraLinear(nn.Linear(6, 5), BaraConfig(r=4, alpha=8.0, pi_init=0.6))
    with torch.no_grad():
        module.bara_B.normal_()
        module.bara_A_log_sigma.fill_(-0.7)  # visible noise on A (sigma 0.5)
    x = torch.randn(3, 4, 6)
    method = SimpleNamespace(config=module.config)
    (_, a_only), (_, gates_only) = script.settings("sources", method)
    try:
        one_pass, one_pass_rho = _outputs(module, x, "mean", 1)[0]
        a_only()
        sampled = _outputs(module, x, "sample")
        assert all(torch.equal(rho, one_pass_rho) for _, rho in sampled)  # the gates of the one-pass prediction
        assert not torch.allclose(sampled[0][0], sampled[1][0])  # ... and A drawn anew each time
        module.config.bayes_factors = False  # nothing left to sample: exactly the one-pass prediction
        assert torch.allclose(_outputs(module, x, "sample", 1)[0][0], one_pass, atol=1e-6)
        gates_only()
        sampled = _outputs(module, x, "sample")
        assert not module.config.bayes_factors
        assert not torch.allclose(sampled[0][0], sampled[1][0])  # the gates (and pi, theta) vary ...
        module.mode = "mean"
        module.config.bayes_factors = True
        assert torch.allclose(module(x), one_pass, atol=1e-6)  # ... and the one-pass path is untouched
    finally:
        BaraLinear.local_weights = script.LOCAL_WEIGHTS
        module.config.bayes_factors = True


def test_relaxed_setting_samples_the_gates_as_in_training():
    script = _script()
    torch.manual_seed(0)
    module = BaraLinear(nn.Linear(6, 5), BaraConfig(r=4, alpha=8.0, pi_init=0.6))
    x = torch.randn(64, 4, 6)
    (_, hard), (_, relaxed) = script.settings("relaxed", SimpleNamespace(config=module.config))
    try:
        relaxed()
        _, rho = _outputs(module, x, "sample", 1)[0]
        g = module.last_g
        assert ((g > 0) & (g < 1)).float().mean() > 0.9  # Concrete draws, strictly inside (0, 1)
        assert abs(g.mean().item() - rho.mean().item()) < 0.1  # ... around the gate probability
        hard()
        _outputs(module, x, "sample", 1)
        assert set(module.last_g.unique().tolist()) <= {0.0, 1.0}  # the default: 0/1 gates
    finally:
        script.layer.torch.bernoulli = script.BERNOULLI


def test_rows_settings_set_the_rows_per_pass():
    script = _script()
    default = base.MAX_ROWS
    try:
        (_, batched), (_, looped) = script.settings("rows", SimpleNamespace(config=None))
        looped()
        assert base.MAX_ROWS == 64
        batched()
        assert base.MAX_ROWS == 1024
    finally:
        base.MAX_ROWS = default


def test_stability_experiment_shares_standard_runs_and_scores_validation_everywhere():
    from bara import bench

    path = Path(__file__).parents[1] / "benchmarks" / "experiments" / "stability.toml"
    plan, standard = bench.plan(str(path)), bench.plan("standard")
    assert plan.validate_all and not standard.validate_all
    grids = {c.hash for e in plan.entries for c, _, _ in plan.candidates(e) if e.variant == "bara"}
    assert grids == {c.hash for e in standard.entries if e.dataset in ("banking77", "clinc150")
                     and e.variant == "bara" for c, _, o in standard.candidates(e) if o.get("prior_sigma") == 0.2}
    # BLoB's grid as standard had it when this ran (2 rates x 2 KL-step rates); standard's BLoB now follows LoRA.
    blob = [(lr, o.get("kl_lr")) for e in plan.entries if e.variant == "blob" and e.dataset == "banking77"
            for _, lr, o in plan.candidates(e)]
    assert sorted(blob) == [(5e-3, 0.002), (5e-3, 0.01), (1e-2, 0.002), (1e-2, 0.01)]
    fixes = {e.variant: (e.lr, e.config.method_options) for e in plan.entries if e.dataset == "banking77"}
    for method in ("bara", "blob"):
        assert fixes[f"{method}-max-sigma"][0] == fixes[f"{method}-flat-kl"][0] == method  # its chosen rate
        assert fixes[f"{method}-max-sigma"][1]["max_sigma"] == 0.2
        assert fixes[f"{method}-flat-kl"][1]["kl_gamma"] == 0.0


def test_gate_experiment_varies_one_default_at_a_time_on_validation():
    from bara import bench

    path = Path(__file__).parents[1] / "benchmarks" / "experiments" / "gate.toml"
    plan = bench.plan(str(path))
    assert plan.validate_all and not any(plan.candidates(e) for e in plan.entries)  # no grid: one rate, no choice
    specs = bench.expand(plan)
    assert len(specs) == 3 * 3 * 3 and {s.config.train.lr for s in specs} == {0.01}
    assert {s.dataset for s in specs} == {"banking77", "clinc150", "hwu64"}
    options = {s.variant: s.config.method_options for s in specs if s.dataset == "hwu64" and s.seed == 0}
    base = options.pop("bara")
    changed = {v: {k: o[k] for k in o if base.get(k) != o[k]} for v, o in options.items()}
    assert changed == {"bara-k1": {"train_samples": 1}, "bara-orth2": {"orth_reg": 2.0}}


def test_a_factor_that_does_nothing_carries_no_evidence_and_the_others_some(tiny_bert, toy_data, tmp_path):
    out = tmp_path / "bara"
    config = RunConfig(model=tiny_bert, data=toy_data, method="bara", method_options={"r": 4},
                       train=TrainConfig(steps=6, batch_size=8, max_length=16, lr=5e-2))
    runs.run_train(config, out, progress_bar=False, validation=False)
    weights = out / "adapter_model.safetensors"
    tensors = load_file(weights)
    first = sorted(k for k in tensors if k.endswith("bara_B"))[0]
    tensors[first][:, 2] = 0.0  # the first layer's third factor no longer reaches the output
    save_file(tensors, weights)
    result = _script("gate_evidence").gate_evidence(str(out), n=12)
    dl = result["dl"]
    layers = sum(k.endswith("bara_B") for k in tensors)
    assert dl.shape == (12, 4 * layers) and result["gates"] == 4 * layers
    assert torch.all(dl[:, 2] == 0)  # exactly the gate held: the others of that layer still move the likelihood
    assert dl[:, [0, 1, 3]].abs().max() > 0 and dl.abs().max() > 0
    for key in ("decided_trained_gate", "decided_given_label_elbo", "decided_given_label_tempered"):
        assert 0.0 <= result[key] <= 1.0
    assert result["abs_dl_max"] == dl.abs().max().item()


def test_before_after_table_puts_two_reports_side_by_side(tmp_path):
    spec = importlib.util.spec_from_file_location("before_after", EXPERIMENTS.parent / "before_after.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    row = {"dataset": "banking77", "variant": "bara"}
    before = [{**row, "seed": 0, "val_nll": 0.56, "test_nll": 0.64, "test_accuracy": 0.84},
              {**row, "seed": 1, "test_nll": 0.66, "test_accuracy": 0.82}]
    after = [{**row, "seed": 0, "val_nll": 0.45, "test_nll": 0.50, "decided_share": 0.3, "decided_share_null": 0.0}]
    for name, rows in (("before", before), ("after", after)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = module.table(module.read(tmp_path / "before.jsonl"), module.read(tmp_path / "after.jsonl"), None)
    assert text.startswith("### banking77\n")

    def cells(table: str) -> dict:
        lines = table.strip().splitlines()
        header = [c.strip() for c in lines[0].split("|")[1:-1]]
        return {l.split("|")[2].strip(): dict(zip(header, (c.strip() for c in l.split("|")[1:-1]))) for l in lines[2:]}

    numbers, gate = (cells(t) for t in text.split("\n\n")[1:3])
    assert numbers["before"]["n"] == "2" and numbers["before"]["test NLL"] == "0.650 ± 0.014"
    assert numbers["before"]["val NLL"] == "0.560" and numbers["before"]["test acc %"] == "83.0 ± 1.4"
    assert numbers["after"]["test acc %"] == "—" and numbers["after"]["test NLL"] == "0.500"
    assert gate["before"]["test decided"] == "—" and gate["after"]["test decided"] == "0.300"
    assert gate["after"]["test decided null"] == "0.000" and gate["after"]["val decided"] == "—"


def test_sigma_seed1_experiment_is_standards_seed1_bara_and_the_ngvi_prior_beside_it():
    """docs/experiments.md section 27 reads its default runs as standard's own seed-1 BaRA runs (clinc150's retrained
    to the same folder): the same hashes, and the variant differs by its two options only."""
    from bara import bench

    plan, standard = bench.plan(str(EXPERIMENTS / "sigma-seed1.toml")), bench.plan("standard")
    for dataset in ("banking77", "hwu64", "clinc150"):
        mine = {e.variant: e for e in plan.entries if e.dataset == dataset}
        theirs = next(e for e in standard.entries if e.dataset == dataset and e.variant == "bara")
        chosen = mine["bara"].lr
        assert chosen in theirs.lr  # the rate standard chose is one of its grid's
        # σ_p 0.2 (the default then), pinned: standard's seed-1 run at that candidate of its prior grid
        assert mine["bara"].spec(chosen, 1).hash == theirs.spec(chosen, 1, {"prior_sigma": 0.2}).hash
        ngvi = mine["bara-ngvi-p005"].spec(chosen, 1)
        assert ngvi.hash not in {theirs.spec(chosen, 1, {"prior_sigma": p}).hash for p in (0.2, 0.05)}
        assert ngvi.config.method_options == {**theirs.config.method_options, "kl_step": "ngvi", "prior_sigma": 0.05}
    assert plan.validate_all and set(plan.preset.values["seeds"]) == {1}


def test_rank_experiment_is_standards_runs_and_double_rank_beside_them():
    """docs/experiments.md section 28 reads its default runs as standard's own BaRA and AdaLoRA runs (banking77's
    BaRA runs as the ablations'): the same hashes, at standard's chosen rate, and each double-rank variant differs
    by its rank options only."""
    from bara import bench

    plan, standard = bench.plan(str(EXPERIMENTS / "rank.toml")), bench.plan("standard")
    ablations = {e.spec(1e-2, seed).hash for e in bench.plan("ablations").entries for seed in (0, 1)
                 if e.dataset == "banking77" and e.variant in ("bara", "bara-r32")}  # at BaRA's chosen 1e-2
    assert {e.dataset for e in plan.entries} == {"hwu64", "clinc150", "banking77"}
    for dataset in ("hwu64", "clinc150", "banking77"):
        mine = {e.variant: e for e in plan.entries if e.dataset == dataset}
        assert set(mine) == {"bara", "bara-r32", "adalora", "adalora-r24"}
        for method, double, options in (("bara", "bara-r32", {"r": 32}),
                                        ("adalora", "adalora-r24", {"r": 24, "target_r": 16})):
            theirs = next(e for e in standard.entries if e.dataset == dataset and e.variant == method)
            chosen = mine[method].lr
            assert chosen in theirs.lr and mine[double].lr == chosen
            pinned = {"prior_sigma": 0.2} if method == "bara" else {}  # BaRA's prior then: standard's σ_p 0.2 runs
            for seed in (0, 1):
                assert mine[method].spec(chosen, seed).hash == theirs.spec(chosen, seed, pinned).hash
                wider = mine[double].spec(chosen, seed)
                assert wider.config.method_options == {**theirs.config.method_options, **pinned, **options}
                if dataset == "banking77" and method == "bara":
                    assert {wider.hash, mine[method].spec(chosen, seed).hash} <= ablations
    assert plan.validate_all and set(plan.preset.values["seeds"]) == {0, 1}


def test_sigma_grid_reads_standards_candidates_and_the_sigma_experiments_runs():
    """docs/experiments.md section 29: the grid's default candidates are standard's BaRA candidates, and its
    non-default ones at BaRA's chosen rate are sigma.toml's variants (the same runs: nothing trained twice)."""
    from bara import bench

    plan, standard, sigma = (bench.plan(p) for p in (str(EXPERIMENTS / "sigma-grid.toml"), "standard",
                                                      str(EXPERIMENTS / "sigma.toml")))
    assert {e.variant for e in plan.entries} == {"bara"}
    for dataset in ("banking77", "hwu64", "clinc150"):
        mine = next(e for e in plan.entries if e.dataset == dataset)
        theirs = next(e for e in standard.entries if e.dataset == dataset and e.variant == "bara")
        candidates = plan.candidates(mine)
        assert len(candidates) == 2 * 2 * len(theirs.lr) == 8
        by_options = {(c.config.train.lr, c.config.method_options.get("kl_step", "sgd"),
                       c.config.method_options.get("prior_sigma", 0.05)): c.hash for c, _, _ in candidates}
        assert len(set(by_options.values())) == 8
        for lr in theirs.lr:  # the default KL step's candidates: standard's runs
            for prior in (0.2, 0.05):
                assert by_options[lr, "sgd", prior] == theirs.spec(lr, 0, {"prior_sigma": prior}).hash
        variants = {e.variant: e for e in sigma.entries if e.dataset == dataset}
        chosen = variants["bara"].lr
        assert by_options[chosen, "ngvi", 0.2] == variants["bara-ngvi"].spec(chosen, 0).hash
        for variant, kl_step in (("bara-ngvi-p005", "ngvi"), ("bara-sgd-p005", "sgd")):
            # σ_p 0.05 is the default since: the grid leaves it out, the variant writes it out (the same run; the
            # hashes were equal when both ran)
            mine_ = variants[variant].spec(chosen, 0).config
            grid = next(c for c, lr, o in candidates if lr == chosen and (o["kl_step"], o["prior_sigma"]) == (kl_step, 0.05))
            assert mine_.method_options == {**grid.config.method_options, "prior_sigma": 0.05}
            assert dataclasses.replace(mine_, method_options={}) == dataclasses.replace(grid.config, method_options={})


def test_adalora_grid_is_as_large_as_baras_and_reads_standards_candidates():
    """docs/experiments.md section 30, the null of section 29: AdaLoRA's grid has as many candidates a set as BaRA's
    in sigma-grid.toml, at the same rates, its default's candidates are standard's AdaLoRA runs, and its options
    leave the rank budget alone."""
    from bara import bench

    plan, standard, bara = (bench.plan(p) for p in (str(EXPERIMENTS / "adalora-grid.toml"), "standard",
                                                     str(EXPERIMENTS / "sigma-grid.toml")))
    assert {e.variant for e in plan.entries} == {"adalora"}
    for dataset in ("banking77", "hwu64", "clinc150", "stackoverflow", "20ng"):
        mine = next(e for e in plan.entries if e.dataset == dataset)
        theirs = next(e for e in standard.entries if e.dataset == dataset and e.variant == "adalora")
        rival = next(e for e in bara.entries if e.dataset == dataset)
        candidates = plan.candidates(mine)
        assert len(candidates) == len(plan.candidates(rival)) == 8 and mine.lr == rival.lr == theirs.lr
        by_options = {(c.config.train.lr, c.config.method_options.get("orth_reg_weight", 0.5),
                       c.config.method_options.get("tfinal", 0.4)): c for c, _, _ in candidates}
        assert len({c.hash for c in by_options.values()}) == 8
        for (lr, orth, tfinal), spec in by_options.items():
            assert (spec.config.method_options.get("r", 12), spec.config.method_options.get("target_r", 8)) == (12, 8)
            if (orth, tfinal) == (0.5, 0.4):
                assert spec.hash == theirs.spec(lr, 0).hash


def test_pace_experiment_reads_the_llm_tracks_bara_candidate_and_varies_one_option_each():
    """docs/experiments.md section 36: at LoRA's chosen rate, pace.toml's bara is multiple-choice's own seed-0 BaRA
    candidate (the same hash: not trained twice), and each other variant differs from it by the one option it names."""
    from bara import bench

    plan, mc = bench.plan(str(EXPERIMENTS / "pace.toml")), bench.plan("multiple-choice")
    varied = {"bara-a32": {"alpha": 32.0}, "bara-gate-none": {"gate": "none"}, "bara-pi09": {"pi_init": 0.9},
              "bara-orth0": {"orth_reg": 0.0}, "bara-k1": {"train_samples": 1}, "bara-r8": {"r": 8}}
    for dataset in ("logical_fallacy_detection", "navigate-turns"):
        mine = {e.variant: e for e in plan.entries if e.dataset == dataset}
        assert set(mine) == {"bara", *varied}
        lora = next(e for e in mc.entries if e.dataset == dataset and e.variant == "lora")
        theirs = next(e for e in mc.entries if e.dataset == dataset and e.variant == "bara")
        assert {e.lr for e in mine.values()} == {3e-3} and 3e-3 in lora.lr and theirs.lr == 3e-3
        base_ = mine["bara"].spec(3e-3, 0)
        # multiple-choice's BaRA grid has dropped the penalty (orth_reg 0, chosen on validation, §36); pace.toml
        # drops the grids, so its base is the candidate with the penalty, a run of the full grid
        assert base_.hash == theirs.spec(3e-3, 0, {"prior_sigma": 0.05, "orth_reg": 0.5}).hash
        for variant, options in varied.items():
            spec = mine[variant].spec(3e-3, 0)
            assert spec.config.method_options == {**base_.config.method_options, **options}
            assert dataclasses.replace(spec.config, method_options={}) == \
                dataclasses.replace(base_.config, method_options={})
    assert plan.validate_all and set(plan.preset.values["seeds"]) == {0}


def test_update_norm_reads_the_scaled_update_of_bara_and_peft_adapters(tmp_path):
    """benchmarks/experiments/update_norm.py (docs/experiments.md §36): ||(alpha / r) B A||_F per matrix, averaged,
    from a bara adapter's mu_A and B and from peft's lora_A / lora_B, with alpha / r from bara's config of the run
    (adapter_config.json, or bara_config.json beside a peft adapter, as bara writes them)."""
    script = _script("update_norm")
    a, b = torch.randn(4, 6), torch.randn(5, 4)
    expected = (2.0 * b @ a).norm().item()
    bara = tmp_path / "bara"
    bara.mkdir()
    (bara / "adapter_config.json").write_text(json.dumps({"method": "bara", "method_config": {"r": 4, "alpha": 8.0}}))
    save_file({"m.q.bara_A_mu": a, "m.q.bara_B": b, "m.q.bara_A_log_sigma": torch.zeros(4, 6),
               "m.v.bara_A_mu": a.clone(), "m.v.bara_B": 2 * b}, str(bara / "adapter_model.safetensors"))
    row = script.update_norms(bara)
    assert row["matrices"] == 2
    assert abs(row["update"] - 1.5 * expected) < 1e-4  # (1 + 2) / 2 times one matrix's norm
    assert abs(row["B"] - 1.5 * b.abs().mean().item()) < 1e-6
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 99, "lora_alpha": 1.0}))
    (peft / "bara_config.json").write_text(json.dumps({"method": "lora", "method_config": {"r": 4, "alpha": 8.0}}))
    save_file({"x.lora_A.weight": a, "x.lora_B.weight": b}, str(peft / "adapter_model.safetensors"))
    assert abs(script.update_norms(peft)["update"] - expected) < 1e-4
