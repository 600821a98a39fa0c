"""pass@k: the probability that at least one of k samples, drawn without replacement from n generated
samples of which c are correct, is correct (Chen et al. 2021, "Evaluating Large Language Models Trained
on Code", the unbiased estimator).

    pass@k = 1 - C(n - c, k) / C(n, k)

The binomial coefficients overflow floats long before n = 200, so the ratio is computed as a product
of k factors, each in [0, 1]:

    C(n - c, k) / C(n, k) = prod_{j=0}^{k-1} (n - c - j) / (n - j)
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples, c of them correct."""
    n, c, k = int(n), int(c), int(k)
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"need n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    wrong = n - c
    if wrong < k:  # every k-subset holds a correct sample
        return 1.0
    j = np.arange(k, dtype=np.float64)
    all_wrong = float(np.prod((wrong - j) / (n - j)))
    return 1.0 - all_wrong


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float:
    """Mean pass@k over problems given as (n, c) pairs."""
    values = [pass_at_k(n, c, k) for n, c in counts]
    if not values:
        raise ValueError("no problems to average over")
    return float(np.mean(values))


def pass_at_ks(counts: Sequence[tuple[int, int]], ks: Iterable[int]) -> dict[str, float]:
    """{"pass@k": mean} for each k that every problem has enough samples for (k <= min n)."""
    if not counts:
        raise ValueError("no problems to average over")
    fewest = min(n for n, _ in counts)
    return {f"pass@{k}": mean_pass_at_k(counts, k) for k in sorted(set(int(k) for k in ks)) if 1 <= k <= fewest}
