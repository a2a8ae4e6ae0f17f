"""Group-aware reward shapers (the dice post's "diversity bonus" and "cluster divisor").

They run on whole groups, after scoring: a rollout's shaped reward depends on how many
rollouts in its group gave the same answer (k), which no per-sample reward can know.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

SHAPERS = ("none", "bonus", "divisor")


def cluster_sizes(keys: Sequence[str], groups: Sequence[int]) -> list[int]:
    """k for each rollout: rollouts in the same group with the same answer key."""
    counts = Counter(zip(groups, keys))
    return [counts[(g, k)] for g, k in zip(groups, keys)]


def group_sizes(groups: Sequence[int]) -> list[int]:
    counts = Counter(groups)
    return [counts[g] for g in groups]


def shape(
    name: str, rewards: Sequence[float], keys: Sequence[str], groups: Sequence[int]
) -> list[float]:
    """Shaped rewards.

    - none: unchanged.
    - bonus: r + N / ((N - 1) k). Additive, so a rare *wrong* answer still gains.
    - divisor: r / k. A wrong answer (r = 0) gains nothing from being rare.
    """
    if not (len(rewards) == len(keys) == len(groups)):
        raise ValueError("rewards, keys and groups must have the same length")
    if name == "none":
        return [float(r) for r in rewards]
    ks = cluster_sizes(keys, groups)
    if name == "divisor":
        return [r / k for r, k in zip(rewards, ks)]
    if name == "bonus":
        ns = group_sizes(groups)
        return [r + n / ((n - 1) * k) if n > 1 else float(r) for r, k, n in zip(rewards, ks, ns)]
    raise ValueError(f"shaper.name={name!r}: must be one of {', '.join(SHAPERS)}")
