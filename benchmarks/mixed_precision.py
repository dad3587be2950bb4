"""--mixed-precision bf16 against float32, measured in one process with interleaved repetitions.

    python benchmarks/mixed_precision.py                       # SmolLM2 at 8x128, lora and bara
    python benchmarks/mixed_precision.py --models minilm,smollm2 --methods lora --repeats 3

Prints, per model and method, the medians of a train step (forward + backward + AdamW) and of an S = 10 prediction
in each precision, their ratio (float32 / bf16: above 1 is a speed-up), and how far bf16's class log-probabilities
are from float32's on the same batch and weights (the largest absolute difference, in nats). bf16 pays off only on a
CPU with bfloat16 matrix units (avx512_bf16, AMX) or a GPU; elsewhere it can be slower.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from speed import SHAPES, make_batch, timed, train_step  # benchmarks/speed.py, beside this file

from bara.runs import RunConfig, build  # noqa: E402
from bara.trainer import TrainConfig  # noqa: E402

PRECISIONS = ("no", "bf16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2")
    parser.add_argument("--methods", default="lora,bara")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}")
    for model in args.models.split(","):
        batch_size, length = SHAPES[model]
        for method in args.methods.split(","):
            setups = {}
            for precision in PRECISIONS:
                config = RunConfig(model=model, method=method, mixed_precision=precision,
                                   train=TrainConfig(max_length=length))
                torch.manual_seed(0)
                classifier, m = build(config, ["A", "B", "C"])
                setups[precision] = (classifier, m, torch.optim.AdamW(m.param_groups(classifier, 1e-4, 0.0)),
                                     make_batch(classifier, batch_size, length))
            # The same weights in both, so the log-probabilities differ by the precision alone.
            setups["bf16"][0].load_state_dict(setups["no"][0].state_dict())
            with torch.no_grad():
                logp = {}
                for precision, (classifier, m, _, batch) in setups.items():
                    classifier.eval()
                    logp[precision] = classifier(batch["input_ids"], batch["attention_mask"]).log_softmax(-1)
            gap = (logp["no"] - logp["bf16"]).abs().max().item()

            def predict(precision):
                classifier, m, _, batch = setups[precision]
                m.predict(classifier, batch, 10)

            times: dict[str, list[float]] = {}
            for precision in PRECISIONS:  # warm-up
                train_step(setups[precision]), predict(precision)
            for _ in range(args.repeats):  # interleaved: drifts in machine load hit both alike
                for precision in PRECISIONS:
                    times.setdefault(f"train/{precision}", []).append(timed(lambda: train_step(setups[precision])))
                    times.setdefault(f"S10/{precision}", []).append(timed(lambda: predict(precision)))
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"\n{model} {method}: batch {batch_size} x {length}, {args.repeats} interleaved repeats, medians")
            for what in ("train", "S10"):
                print(f"  {what:5s} float32 {med[f'{what}/no']:.3f} s  bf16 {med[f'{what}/bf16']:.3f} s  "
                      f"speed-up {med[f'{what}/no'] / med[f'{what}/bf16']:.2f}")
            print(f"  largest |log p(float32) - log p(bf16)| on the batch, same weights: {gap:.4f} nats")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
