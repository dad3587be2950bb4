"""The adapter files of a preset's chosen finished runs of one dataset in benchmarks/store/PRESET (no losing grid
candidates), one path a line: the exception benchmarks/store/.gitignore names, force-added by commit.sh.

    .venv/bin/python benchmarks/store/chosen_adapters.py standard banking77
"""

import sys
from pathlib import Path

from bara import bench

preset, dataset = sys.argv[1:3]
output = Path(__file__).resolve().parent / preset
for spec in bench.expand(bench.plan(preset), output):
    folder = output / spec.folder
    if not spec.pending and spec.dataset == dataset and (folder / "metrics.json").exists():
        for tensors in sorted(folder.rglob("*.safetensors")):
            print(tensors.relative_to(Path.cwd()))
