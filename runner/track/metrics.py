"""Distribution metrics for answer diversity: what the dice post plots."""

from __future__ import annotations

import math
from collections import Counter
from typing import Mapping, Sequence

from envs.base import INVALID


def mean(xs: Sequence[float]) -> float:
    """The mean, 0 for no values (a metric over an empty set of groups or rollouts)."""
    return sum(xs) / len(xs) if xs else 0.0


def answer_distribution(keys: Sequence[str], answer_space: Sequence[str]) -> dict[str, float]:
    """Fraction per answer in `answer_space`, plus INVALID for everything else."""
    n = max(len(keys), 1)
    counts = Counter(k if k in answer_space else INVALID for k in keys)
    dist = {a: counts.get(a, 0) / n for a in answer_space}
    dist[INVALID] = counts.get(INVALID, 0) / n
    return dist


def entropy(dist: Mapping[str, float]) -> float:
    """Shannon entropy in nats over all buckets, INVALID included."""
    return max(0.0, -sum(p * math.log(p) for p in dist.values() if p > 0))


def tv_to_uniform(dist: Mapping[str, float], valid: Sequence[str]) -> float:
    """Total-variation distance to the uniform distribution over the valid answers."""
    target = {a: 1.0 / len(valid) for a in valid}
    keys = set(dist) | set(target)
    return 0.5 * sum(abs(dist.get(k, 0.0) - target.get(k, 0.0)) for k in keys)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)
    (Chen et al. 2021), the chance that k samples drawn without replacement hold a right one."""
    if k > n:
        raise ValueError(f"pass@k needs k <= n (k={k}, n={n})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def group_mechanics(rewards: Sequence[float], shaped: Sequence[float], unshaped: Sequence[float],
                    keys: Sequence[str], advantage_fn, rel_tol: float = 0.01) -> tuple[int, bool]:
    """For one group: how many distinct rewarded answers it holds, and whether shaping
    changed any of its advantages against no shaping (`unshaped`: the rewards as the
    `none` shaper would pass them on, e.g. with the same overlong penalty).

    Why both: with group-std advantages the divisor is undone by the std in a group that
    holds at most one distinct rewarded answer (every rewarded rollout is divided by the
    same k), so it can only act where a group already holds two or more.
    """
    distinct = len({k for r, k in zip(rewards, keys) if r > 0 and k != INVALID})
    a, b = advantage_fn(list(shaped)), advantage_fn(list(unshaped))
    # relative: the std's small epsilon (ADV_EPS) alone moves them by ~1e-4 of their size
    scale = max([abs(x) for x in a + b] + [1e-12])
    changed = any(abs(x - y) > rel_tol * scale for x, y in zip(a, b))
    return distinct, changed
