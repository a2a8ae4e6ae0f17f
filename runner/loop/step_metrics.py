"""What one step's rollouts say, over every rank's rollouts (a group split over ranks is one
group again): rewards, formats, lengths, groups, why the shaper acted, answers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from envs import INVALID
from runner.algo.loss import advantages
from runner.loop.collector import Collected
from runner.track.metrics import group_mechanics, mean


@dataclass
class StepRollouts:
    """The rollouts' metrics, the answer keys (for the history plot) and the tokens
    generated this step by every rank (FR3E base trajectories included)."""

    metrics: dict[str, float]
    keys: list[str]
    generated: int
    completion_tokens: int  # the completions alone (throughput)


def record(c: Collected, rank: int, env=None) -> dict:
    """This rank's share, small enough to gather (the Scores themselves only for an
    environment with metrics of its own)."""
    own = hasattr(env, "metrics")
    return {"scores": [s for _, sc, _ in c.sampled for s in sc] if own else [],
            "rounds": [([s.reward for s in sc], sh, [s.answer_key for s in sc], [s.exact_format for s in sc],
                        b.completion_lengths.float().cpu().tolist(), list(b.finished), b.groups.tolist(), un)
                       for (b, sc, sh), un in zip(c.sampled, c.unshaped)],
            "dropped": c.dropped_groups, "n_rounds": c.rounds, "rank": rank, "clusters": c.clusters,
            "distinct_correct": distinct_correct(c),
            "correct": [bool(s.correct) for _, sc, _ in c.sampled for s in sc if s.correct is not None],
            "episodes": [e for b, _, _ in c.sampled for e in (b.episodes or [])], "fr3e": c.fr3e,
            "components": [s.components for _, sc, _ in c.sampled for s in sc if s.components]}


def step_metrics(recs: list[dict], cfg, env, evaluator, local_groups: bool) -> StepRollouts:
    rows = [row for r in recs for rd in r["rounds"] for row in zip(*rd[:6])]
    raw, shaped_all, keys, exact, lengths, finished = (list(x) for x in zip(*rows))
    groups: dict[tuple, list[tuple]] = {}  # (raw, shaped, unshaped, key) per rollout of each whole group
    for r in recs:
        for i, rd in enumerate(r["rounds"]):
            owner = r["rank"] if local_groups else -1
            for raw_r, sh, key, g, un in zip(rd[0], rd[1], rd[2], rd[6], rd[7]):
                groups.setdefault((owner, i, g), []).append((raw_r, sh, un, key))
    zero_var = sum(max(x[1] for x in v) == min(x[1] for x in v) for v in groups.values()) / max(len(groups), 1)
    # what generation cost this step, every rank and sampling round: the completions, plus
    # FR3E's base trajectories (its branches' shared prefixes are counted there, once)
    generated = sum(lengths) + sum(f.get("fr3e/base_tokens", 0.0) for r in recs for f in r["fr3e"])
    m: dict[str, float] = {
        "reward/raw_mean": sum(raw) / len(raw),
        "reward/shaped_mean": sum(shaped_all) / len(shaped_all),
        "format/exact_rate": sum(exact) / len(exact),
        "completion/mean_length": sum(lengths) / len(lengths),
        # the decode steps a batch took: it decodes until its longest row ends
        "completion/max_length": float(max(lengths)),
        "completion/finished_rate": sum(finished) / len(finished),
        "groups/zero_variance_frac": zero_var,
        "groups/dropped": float(sum(r["dropped"] for r in recs)),
        "groups/sampling_rounds": float(max(r["n_rounds"] for r in recs)),
        "groups/clusters_mean": mean([x for r in recs for x in r["clusters"]]),
        **mechanism_metrics(groups, cfg.algo),
        **{k: mean([f[k] for r in recs for f in r["fr3e"] if k in f])
           for k in sorted({k for r in recs for f in r["fr3e"] for k in f})},
        "tokens/generated": float(generated),
    }
    corrects = [x for r in recs for x in r["distinct_correct"]]
    if corrects:  # environments that judge right and wrong (math, Wordle, datasets)
        m["groups/distinct_correct_mean"] = mean(corrects)
        m["reward/accuracy"] = mean([float(x) for r in recs for x in r["correct"]])
    parts = [p for r in recs for p in r["components"]]
    for k in sorted({k for p in parts for k in p}):  # a summed reward's parts (env=dataset)
        m[f"reward/{k}"] = mean([p[k] for p in parts if k in p])
    episodes = [e for r in recs for e in r["episodes"]]
    if episodes:
        m.update(env.game_metrics(episodes, "game"))
    if hasattr(env, "metrics"):  # an environment's own metrics over the step's Scores
        m.update(env.metrics([s for r in recs for s in r["scores"]], "env"))
    if env.answer_space:  # finite answers: their distribution is the story
        m.update(evaluator.answer_metrics(keys, "answers"))
    else:
        m["answers/distinct_per_step"] = float(len(set(keys) - {INVALID}))
        m["answers/valid_rate"] = sum(k != INVALID for k in keys) / len(keys)
    return StepRollouts(m, keys, int(generated), int(sum(lengths)))


def mechanism_metrics(groups: dict[tuple, list[tuple]], algo) -> dict[str, float]:
    """Why a shaper acts or not: distinct rewarded answers per group, and the fraction of
    groups whose advantages the shaper changed against shaper=none (with group-std
    scaling the divisor changes none in a group holding at most one rewarded answer)."""
    a = algo

    def adv(r: list[float]) -> list[float]:
        return advantages(torch.tensor(r), torch.zeros(len(r), dtype=torch.long), a.scale_rewards, a.adv_clip,
                          a.baseline).tolist()

    mech = [group_mechanics([x[0] for x in v], [x[1] for x in v], [x[2] for x in v], [x[3] for x in v], adv)
            for v in groups.values()]
    if not mech:
        return {}
    return {"groups/distinct_rewarded_mean": mean([float(d) for d, _ in mech]),
            "groups/multi_rewarded_frac": mean([float(d >= 2) for d, _ in mech]),
            "shaper/effective_group_frac": mean([float(ch) for _, ch in mech])}


def distinct_correct(c: Collected) -> list[int]:
    """Per group: how many different correct completions (texts) it holds; empty where the
    environment does not judge correctness. One right answer reached by several paths
    counts several times: the diversity that matters once accuracy is high."""
    out = []
    for b, sc, _ in c.sampled:
        if not sc or sc[0].correct is None:
            continue
        by: dict[int, set] = {}
        for g, s, text in zip(b.groups.tolist(), sc, b.completions):
            by.setdefault(g, set())
            if s.correct:
                by[g].add(" ".join(text.split()))
        out += [len(v) for v in by.values()]
    return out
