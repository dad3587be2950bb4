"""Speed and memory of blob and bara against LoRA, measured in one process with interleaved repetitions.

    python benchmarks/speed.py                 # MiniLM at 32x64 and SmolLM2 at 8x128
    python benchmarks/speed.py --models minilm --repeats 5
    python benchmarks/speed.py --models minilm --max-rows 256   # S = 10 in passes of at most 256 rows

Prints medians and ratios against LoRA measured in the same run:
  train step (forward + backward + AdamW) of blob and bara / lora         target bara <= 1.15
  memory of a train step (saved activations + adapter states)           target bara <= 1.10
  fast path (one deterministic pass) of bara / lora forward              target <= 1.05
  S = 10 prediction batched vs 10 single passes (and vs one LoRA pass)    target batched <= 10 x one pass
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bara.data import Split  # noqa: E402
from bara.methods import Progress, base  # noqa: E402
from bara.runs import RunConfig, build  # noqa: E402
from bara.trainer import TrainConfig  # noqa: E402

SHAPES = {"minilm": (32, 64), "smollm2": (8, 128)}
METHODS = ("lora", "blob", "bara")


def make_batch(classifier, batch_size: int, length: int) -> dict:
    words = "the quick brown fox jumps over a lazy dog while it rains in the old town".split()
    text = " ".join(words[i % len(words)] for i in range(length * 2))
    split = Split(texts=[text] * batch_size, labels=[i % 3 for i in range(batch_size)])
    return classifier.encode(split, list(range(batch_size)))


def train_step(setup) -> None:
    """One training step (forward + backward + AdamW) of a ``(classifier, method, optimizer, batch)`` setup."""
    classifier, m, optimizer, batch = setup
    classifier.train()
    loss, _ = m.loss(classifier, batch, Progress(50, 100, 1000))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def train_memory_mb(classifier, step_loss) -> float:
    """Memory a train step needs beyond the frozen model, in MiB: the activations autograd saves for the
    backward pass (distinct storages, the model's own weights excluded) plus four copies of the trainable
    parameters (weights, gradients, AdamW's two moments). Counted exactly with saved_tensors_hooks, because
    CPU torch has no allocator statistics (torch.cuda.max_memory_allocated) and RSS peaks follow glibc's
    arenas more than the tensors."""
    params = {p.untyped_storage().data_ptr() for p in classifier.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step_loss()
    trainable = sum(p.numel() * p.element_size() for p in classifier.parameters() if p.requires_grad)
    return (sum(saved.values()) + 4 * trainable) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,smollm2")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--max-rows", type=int, default=None,
                        help="rows per batched Monte-Carlo pass (default: the methods' MAX_ROWS, 1024); smaller "
                             "values split S = 10 into several passes, between batched and looped")
    args = parser.parse_args()
    if args.max_rows:
        base.MAX_ROWS = args.max_rows
    print(f"Monte-Carlo passes of at most {base.MAX_ROWS} rows; torch threads {torch.get_num_threads()}")
    for model in args.models.split(","):
        batch_size, length = SHAPES[model]
        setups = {}
        for method in METHODS:
            config = RunConfig(model=model, method=method, train=TrainConfig(max_length=length))
            classifier, m = build(config, ["A", "B", "C"])
            optimizer = torch.optim.AdamW(m.param_groups(classifier, 1e-4, 0.0))
            batch = make_batch(classifier, batch_size, length)
            setups[method] = (classifier, m, optimizer, batch)

        def predict(method, samples):
            classifier, m, _, batch = setups[method]
            m.predict(classifier, batch, samples)

        def loop10(method):
            for _ in range(10):
                predict(method, 1)

        times: dict[str, list[float]] = {}
        memory = {}
        for method in METHODS:
            classifier, m, _, batch = setups[method]
            classifier.train()
            memory[method] = train_memory_mb(classifier, lambda: m.loss(classifier, batch, Progress(50, 100, 1000)))
        for method in METHODS:  # warm-up
            train_step(setups[method]), predict(method, 0)
        for _ in range(args.repeats):  # interleaved: drifts in machine load hit every method alike
            for method in METHODS:
                times.setdefault(f"train/{method}", []).append(timed(lambda: train_step(setups[method])))
                times.setdefault(f"pass/{method}", []).append(timed(lambda: predict(method, 0)))
            for method in ("blob", "bara"):
                times.setdefault(f"S10/{method}", []).append(timed(lambda: predict(method, 10)))
                times.setdefault(f"loop10/{method}", []).append(timed(lambda: loop10(method)))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\n{model}: batch {batch_size} x {length}, {args.repeats} interleaved repeats, medians")
        for method in METHODS:
            print(f"  train step {method:5s} {med[f'train/{method}']:.3f} s  "
                  f"ratio to lora {med[f'train/{method}'] / med['train/lora']:.2f}"
                  + ("   (target <= 1.15)" if method == "bara" else ""))
        for method in METHODS:
            print(f"  train step memory {method:5s} {memory[method]:.0f} MiB beyond the frozen model  "
                  f"ratio to lora {memory[method] / memory['lora']:.2f}"
                  + ("   (target <= 1.10)" if method == "bara" else ""))
        print(f"  fast path  bara  {med['pass/bara']:.3f} s  ratio to lora forward "
              f"{med['pass/bara'] / med['pass/lora']:.2f}   (target <= 1.05)")
        for method in ("blob", "bara"):
            print(f"  S=10 {method:5s} batched {med[f'S10/{method}']:.3f} s = "
                  f"{med[f'S10/{method}'] / med['pass/lora']:.2f} x one lora pass; 10 single passes "
                  f"{med[f'loop10/{method}']:.3f} s "
                  f"(batched/looped {med[f'S10/{method}'] / med[f'loop10/{method}']:.2f})")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
