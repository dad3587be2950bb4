"""Seeded, stratified choice of examples: subsampling a split and carving a split out of another.

Allocation is proportional with largest-remainder rounding. For ``n`` examples out of ``N`` with class
sizes ``N_c``, class ``c`` has quota ``q_c = n * N_c / N`` and gets ``floor(q_c)``; the examples left over
go one at a time to the classes with the largest remainder ``q_c - count_c``. When ``n`` is at least the
number of classes, every class gets at least one example, taken back from the classes furthest above
their quota. Which examples of a class are taken is a seeded permutation, so the result depends only on
the labels, ``n`` and the seed.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

# Streams of the random generator, so that subsampling train does not reuse the draws of carving.
CARVE_VALIDATION, CARVE_TEST, SUBSAMPLE_TRAIN, SUBSAMPLE_VALIDATION, SUBSAMPLE_TEST = range(5)


def allocate(sizes: Sequence[int], n: int, capacity: Sequence[int] | None = None) -> list[int]:
    """How many of ``n`` examples each class gets: proportional to ``sizes``, at most ``capacity``.

    Ties between equal remainders go to the class listed first, so the counts are deterministic.
    """
    capacity = list(sizes) if capacity is None else [min(c, s) for c, s in zip(capacity, sizes)]
    total = sum(sizes)
    if not 0 <= n <= sum(capacity):
        raise ValueError(f"cannot take {n} examples from classes that can give {sum(capacity)}")
    quotas = [n * s / total for s in sizes] if total else [0.0] * len(sizes)
    counts = [min(int(q), c) for q, c in zip(quotas, capacity)]
    eligible = [k for k, c in enumerate(capacity) if c > 0]
    floor = [0] * len(sizes)
    if n >= len(eligible):
        for k in eligible:
            floor[k] = 1
            counts[k] = max(counts[k], 1)
    while sum(counts) < n:
        k = max((k for k in eligible if counts[k] < capacity[k]), key=lambda k: (quotas[k] - counts[k], -k))
        counts[k] += 1
    while sum(counts) > n:
        k = max((k for k in eligible if counts[k] > floor[k]), key=lambda k: (counts[k] - quotas[k], -k))
        counts[k] -= 1
    return counts


def stratified_sample(labels: Sequence[Hashable], n: int, seed: int, stream: int,
                      keep_per_class: int = 0) -> list[int]:
    """Indices (ascending) of ``n`` examples, stratified by label and drawn with ``(seed, stream)``.

    ``keep_per_class`` examples of every class are never taken (carving leaves each class in train).
    """
    # Any fixed class order will do: it only decides ties and the order of the random draws.
    classes = sorted(set(labels), key=lambda label: (type(label).__name__, str(label)))
    members = {c: [] for c in classes}
    for i, label in enumerate(labels):
        members[label].append(i)
    sizes = [len(members[c]) for c in classes]
    counts = allocate(sizes, n, [max(s - keep_per_class, 0) for s in sizes])
    rng = np.random.default_rng([seed, stream])
    chosen: list[int] = []
    for c, count in zip(classes, counts):
        order = rng.permutation(len(members[c]))
        chosen.extend(members[c][j] for j in order[:count])
    return sorted(chosen)

