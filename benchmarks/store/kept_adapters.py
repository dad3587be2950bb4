"""The adapter files benchmarks/store keeps in git, one path a line: the exception benchmarks/store/.gitignore
names, force-added by commit.sh (which untracks any other). Machines do not outlive a session, so an adapter that a
later session needs is committed:

- a grid candidate's whose test split waits for the choice (``test_deferred`` in its metrics.json) while its grid
  is open or once it is chosen: the chosen one is scored on test from its adapter, perhaps on another machine;
- standard's chosen banking77 runs, which issue 19's corruption curves (`bara corrupt --bench
  benchmarks/store/standard --data banking77`) score after the machine that trained them is gone.

    .venv/bin/python benchmarks/store/kept_adapters.py
"""

from pathlib import Path

from bara import bench, runs

STORE = Path(__file__).resolve().parent
CORRUPTED = {("standard", "banking77")}

for output in sorted(p.parent for p in STORE.glob("*/runs")):
    plan_ = bench.plan(output.name)  # the folder is named after its preset (stream.sh)
    specs = bench.expand(plan_, output)
    final = {s.folder for s in specs if not s.pending}
    open_grids = {(s.dataset, s.variant) for s in specs if s.pending}
    for spec in plan_.all_runs(specs, output=output):
        folder = output / spec.folder
        if not (folder / runs.METRICS).exists():
            continue
        waits = runs.test_deferred(folder) and (spec.folder in final or (spec.dataset, spec.variant) in open_grids)
        if waits or ((output.name, spec.dataset) in CORRUPTED and spec.folder in final):
            for tensors in sorted(runs.adapter_files(folder)):  # not a checkpoint's, nor a .retrain.partial's
                print(tensors.relative_to(Path.cwd()))
