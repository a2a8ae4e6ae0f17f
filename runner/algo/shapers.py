"""Group-aware reward shapers (the dice post's "diversity bonus" and "cluster divisor").

They run on whole groups, after scoring: a rollout's shaped reward depends on how many
rollouts in its group gave the same answer (k), which no per-sample reward can know.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence

SHAPERS = ("none", "bonus", "divisor")


def cluster_sizes(keys: Sequence[str], groups: Sequence[int]) -> list[int]:
    """k for each rollout: rollouts in the same group with the same answer key."""
    counts = Counter(zip(groups, keys))
    return [counts[(g, k)] for g, k in zip(groups, keys)]


def group_sizes(groups: Sequence[int]) -> list[int]:
    counts = Counter(groups)
    return [counts[g] for g in groups]


def none(rewards: Sequence[float], keys: Sequence[str], groups: Sequence[int]) -> list[float]:
    """Unchanged."""
    return [float(r) for r in rewards]


def divisor(rewards: Sequence[float], keys: Sequence[str], groups: Sequence[int]) -> list[float]:
    """r / k. A wrong answer (r = 0) gains nothing from being rare."""
    return [r / k for r, k in zip(rewards, cluster_sizes(keys, groups))]


def bonus(rewards: Sequence[float], keys: Sequence[str], groups: Sequence[int]) -> list[float]:
    """r + N / ((N - 1) k). Additive, so a rare *wrong* answer still gains."""
    ks, ns = cluster_sizes(keys, groups), group_sizes(groups)
    return [r + n / ((n - 1) * k) if n > 1 else float(r) for r, k, n in zip(rewards, ks, ns)]


def shape(name: str, rewards: Sequence[float], keys: Sequence[str], groups: Sequence[int],
          target: Optional[str] = None) -> list[float]:
    """Shaped rewards from the shaper `target` (an import path, shaper._target_) or the
    built-in `name`. A user's shaper has the built-ins' signature and returns one float per
    rollout."""
    from runner.plugins import shaper_function

    if not (len(rewards) == len(keys) == len(groups)):
        raise ValueError("rewards, keys and groups must have the same length")
    if target is None and name not in SHAPERS:
        raise ValueError(f"shaper.name={name!r}: must be one of {', '.join(SHAPERS)} (or set shaper._target_)")
    out = [float(v) for v in shaper_function(target, name)(list(rewards), list(keys), list(groups))]
    if len(out) != len(rewards):
        raise ValueError(f"shaper {target or name} returned {len(out)} values for {len(rewards)} rollouts")
    return out
