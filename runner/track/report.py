"""The dice-post reproduction report: one row per recipe, verdicts by stated rules, plots.

    python -m runner.track.report --parent RUN_ID [--uri URI] [--out DIR]
    python -m runner.track.report --experiment runner [--uri URI]

Reads finished runs tagged with `recipe` (children of a sweep's parent run, or every run
in an experiment), aggregates their final evaluation over seeds (mean and spread), applies
the verdict rule of each recipe's claim, writes `report.md` and plots, and logs them to
the parent run when there is one. `make reproduce` runs the sweep and this at its end.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

ANSWERS = ["1", "2", "3", "4", "5", "6", "invalid"]
EVEN = ["2", "4", "6"]


@dataclass
class RunSummary:
    recipe: str
    seed: str
    final: dict[str, float]  # final evaluation's answer fractions, ANSWERS order
    valid_rate: float
    entropy: float
    tv: float
    length_first: float  # mean completion length, first 3 training steps
    length_last: float  # and last 3
    length_curve: list[tuple[int, float]]
    dist_curve: list[tuple[int, dict[str, float]]]
    argmax_switches: int  # leader changes of the even answers, smoothed (leader_switches)


def _mean(xs):
    return statistics.mean(xs) if xs else math.nan


# A seed's verdict on one sub-claim: True, False, or None where the rule cannot judge it
# (e.g. "no length growth" on a run that is mostly invalid): None never counts as a pass.
Judge = Callable[[RunSummary], Optional[bool]]
MIN_VALID = 0.5  # below this valid rate a run says nothing about diversity, length or missing answers
PASS_SHARE = 0.8  # "reproduced": the claim holds in at least this share of seeds (3/3, 4/5)


@dataclass
class Claim:
    text: str
    rule: str  # stated before looking at the numbers; judged per seed
    parts: dict[str, Judge]  # every part must hold for a seed to pass


def _valid_answers(r: RunSummary) -> list[str]:
    return EVEN if r.recipe.startswith("even") else [a for a in ANSWERS if a != "invalid"]


def _top(r: RunSummary) -> float:
    """The most frequent answer's share of all final samples."""
    return max(r.final[a] for a in ANSWERS if a != "invalid")


def _valid_mass(r: RunSummary) -> float:
    return sum(r.final[a] for a in _valid_answers(r))


def _top_of_valid(r: RunSummary) -> Optional[float]:
    """The top valid answer's share of the valid mass; None when too little is valid to say
    (invalid samples are not diversity)."""
    v = _valid_mass(r)
    return max(r.final[a] for a in _valid_answers(r)) / v if v >= MIN_VALID else None


def _needs_valid(f: Callable[[RunSummary], bool]) -> Judge:
    return lambda r: f(r) if _valid_mass(r) >= MIN_VALID else None


def _collapsed(r: RunSummary, share: float = 0.9) -> Optional[bool]:
    t = _top_of_valid(r)
    return None if t is None else t >= share


def _diverse(r: RunSummary) -> Optional[bool]:
    """Top valid answer under 0.9 of the valid mass and >= 3 answers at >= 0.05 of it."""
    t = _top_of_valid(r)
    if t is None:
        return None
    v = _valid_mass(r)
    return t < 0.9 and sum(r.final[a] / v >= 0.05 for a in _valid_answers(r)) >= 3


def _length_ratio(r: RunSummary) -> float:
    return r.length_last / max(r.length_first, 1e-9)


def _spread(r: RunSummary) -> bool:
    """Each of 2, 4, 6 at >= 0.20 of the final samples, and <= 0.10 without reward (odd or unparsed)."""
    return all(r.final[a] >= 0.2 for a in EVEN) and 1.0 - sum(r.final[a] for a in EVEN) <= 0.1 + 1e-9


def leader_switches(curve: list[tuple[int, dict[str, float]]], answers: list[str], window: int = 5,
                    margin: float = 0.25) -> int:
    """How often the leading answer changes in a smoothed series: a moving average over
    `window` steps, and a new leader only once it leads the old one by `margin` (so ties and
    a dozen samples' noise do not count as ping-pong)."""
    if not curve:
        return 0
    smooth = []
    for i in range(len(curve)):
        chunk = [d for _, d in curve[max(0, i - window + 1):i + 1]]
        smooth.append({a: sum(d.get(a, 0.0) for d in chunk) / len(chunk) for a in answers})
    leader, switches = None, 0
    for d in smooth:
        if sum(d.values()) <= 0:
            continue
        best = max(answers, key=lambda a: d[a])
        if leader is None:
            leader = best
        elif best != leader and d[best] >= d[leader] + margin:
            leader, switches = best, switches + 1
    return switches


COLLAPSE_RULE = "collapse: the top valid answer holds >= 0.9 of the valid final samples, with valid rate >= 0.5"
DIVERSE_RULE = ("diversity: valid rate >= 0.5, top valid answer < 0.9 of the valid samples and >= 3 valid answers "
                "at >= 0.05 of them (invalid samples are not diversity)")
SPREAD_RULE = "spread: each of 2, 4, 6 at >= 0.20 of the final samples, and <= 0.10 of them unrewarded (odd or invalid)"
COLLAPSE_08 = "collapse: the top answer holds >= 0.8 of the final samples"

CLAIMS: dict[str, Claim] = {
    "dice_grpo": Claim("collapses onto its favourite answer", COLLAPSE_RULE, {"collapse": _collapsed}),
    "dice_grpo_temp15": Claim("the same collapse at temperature 1.5", COLLAPSE_RULE, {"collapse": _collapsed}),
    "dice_entropy": Claim("less collapse, but completion length grows",
                          "less collapse: valid rate >= 0.5 and the top valid answer < 0.9 of the valid samples; "
                          "length grows: last/first mean length >= 1.3",
                          {"less collapse": lambda r: None if _collapsed(r) is None else not _collapsed(r),
                           "length grows": lambda r: _length_ratio(r) >= 1.3}),
    "dice_entropy_strict": Claim("diversity without length growth",
                                 DIVERSE_RULE + "; no growth: valid rate >= 0.5 and last/first mean length <= 1.1",
                                 {"diversity": _diverse, "no growth": _needs_valid(lambda r: _length_ratio(r) <= 1.1)}),
    "even_dice_entropy": Claim("ping-pongs between answers and never finds one of 2, 4, 6",
                               "ping-pong: the leading even answer of the training rollouts (5-step moving average, "
                               "a new leader must lead by 0.25) changes >= 2 times; a missing answer: valid rate >= 0.5 "
                               "and some even answer < 0.02 of the final samples",
                               {"ping-pong": lambda r: r.argmax_switches >= 2,
                                "missing answer": _needs_valid(lambda r: min(r.final[a] for a in EVEN) < 0.02)}),
    "even_dice_entropy_high": Claim("a higher entropy coefficient devolves into gibberish",
                                    "gibberish: >= 0.5 of the final samples unparsed (no answer in the tags); judged "
                                    "from a start that answers (the SFT'd start: 0.04 unparsed), where it cannot pass "
                                    "by never having learned the format",
                                    {"gibberish": lambda r: r.final["invalid"] >= 0.5}),
    "even_dice_bonus": Claim("more diversity, but invalid odd answers leak in",
                             DIVERSE_RULE + "; leak: 1, 3, 5 together >= 0.05 of the final samples",
                             {"diversity": _diverse, "leak": lambda r: sum(r.final[a] for a in "135") >= 0.05}),
    "even_dice_grpo": Claim("(the post's baseline on even rolls) collapses onto one even answer", COLLAPSE_08,
                            {"collapse": lambda r: _top(r) >= 0.8}),
    "even_dice_divisor": Claim("near-uniform over 2, 4, 6 with few invalid answers", SPREAD_RULE,
                               {"spread": _spread}),
}


def judge(claim: Claim, runs: list[RunSummary]) -> tuple[str, dict[str, int], int]:
    """(verdict, passes per part, seeds passing every part). reproduced: >= 80% of seeds pass
    every part; partly: at least one seed does, or one part alone holds in >= 80% of seeds."""
    per_part = {name: sum(f(r) is True for r in runs) for name, f in claim.parts.items()}
    both = sum(all(f(r) is True for f in claim.parts.values()) for r in runs)
    n = len(runs)
    need = math.ceil(PASS_SHARE * n)
    if n and both >= need:
        verdict = "reproduced"
    elif both or any(c >= need for c in per_part.values()):
        verdict = "partly"
    else:
        verdict = "not reproduced"
    return verdict, per_part, both


def _claim_for(recipe: str) -> Optional[Claim]:
    """A recipe's claim; the post's recipes at another group size (`_g48`) carry the same one."""
    if recipe in CLAIMS:
        return CLAIMS[recipe]
    m = re.fullmatch(r"(.+)_g\d+", recipe)
    return CLAIMS.get(m.group(1)) if m else None


def _history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def summarise_run(client, run) -> RunSummary:
    rid, m = run.info.run_id, run.data.metrics
    final = {a: m.get(f"eval/answers/frac/{a}", 0.0) for a in ANSWERS}
    lengths = _history(client, rid, "completion/mean_length")
    curves = {a: dict(_history(client, rid, f"answers/frac/{a}")) for a in ANSWERS}
    steps = sorted(set().union(*[c.keys() for c in curves.values()]))
    dist_curve = [(s, {a: curves[a].get(s, 0.0) for a in ANSWERS}) for s in steps]
    switches = leader_switches(dist_curve, EVEN)
    return RunSummary(
        recipe=run.data.tags["recipe"], seed=run.data.params.get("seed", "?"), final=final,
        valid_rate=m.get("eval/answers/valid_rate", math.nan), entropy=m.get("eval/answers/entropy", math.nan),
        tv=m.get("eval/answers/tv_uniform_valid", math.nan),
        length_first=_mean([v for _, v in lengths[:3]]), length_last=_mean([v for _, v in lengths[-3:]]),
        length_curve=lengths, dist_curve=dist_curve, argmax_switches=switches,
    )


def _fmt(xs: list[float]) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.mean(xs):.2f}±{statistics.pstdev(xs):.2f}"


def _mark(v: Optional[bool]) -> str:
    return {True: "yes", False: "no", None: "n/j"}[v]


def build(runs: list[RunSummary]) -> tuple[str, dict[str, str]]:
    """Markdown report and {recipe: verdict}. Verdicts count seeds that pass (a bimodal
    outcome's mean is no run's outcome); the means are shown for reading, not judged."""
    by: dict[str, list[RunSummary]] = {}
    for r in runs:
        by.setdefault(r.recipe, []).append(r)
    order = [k for k in CLAIMS if k in by] + sorted(k for k in by if k not in CLAIMS)
    head = ("| recipe | seeds | " + " | ".join(f"p({a})" for a in ANSWERS)
            + " | valid rate | TV to uniform-valid | length first→last | post's claim | seeds passing (per part) | verdict |\n")
    head += "|" + "---|" * (len(ANSWERS) + 8) + "\n"
    rows, verdicts, detail = [], {}, []
    for k in order:
        rs = sorted(by[k], key=lambda r: str(r.seed))
        claim = _claim_for(k)
        if claim:
            verdict, per_part, both = judge(claim, rs)
            passing = f"{both}/{len(rs)}" + (" (" + ", ".join(f"{p} {c}/{len(rs)}" for p, c in per_part.items()) + ")"
                                              if len(per_part) > 1 else "")
        else:
            verdict, passing = "n/a", "-"
        verdicts[k] = verdict
        rows.append(
            f"| {k} | {len(rs)} | " + " | ".join(_fmt([r.final[a] for r in rs]) for a in ANSWERS)
            + f" | {_fmt([r.valid_rate for r in rs])} | {_fmt([r.tv for r in rs])}"
            + f" | {_fmt([r.length_first for r in rs])}→{_fmt([r.length_last for r in rs])}"
            + f" | {claim.text if claim else ''} | {passing} | **{verdict}** |\n")
        for r in rs:
            parts = "; ".join(f"{p}: {_mark(f(r))}" for p, f in claim.parts.items()) if claim else "-"
            dist = " ".join(f"{a}:{r.final[a]:.2f}" for a in ANSWERS if r.final[a] >= 0.005)
            detail.append(f"| {k} | {r.seed} | {dist} | {r.argmax_switches} | {parts} |\n")
    rules = "\n".join(f"- `{k}`: {_claim_for(k).rule}" for k in order if _claim_for(k))
    text = ("# Dice post reproduction\n\nFinal evaluation (sampled at temperature 1) per recipe, mean±spread "
            "(population std) over seeds; `invalid` is anything without exactly one numeric answer tag. "
            f"Each claim is judged **per seed**; reproduced: it holds in >= {PASS_SHARE:.0%} of seeds, "
            "partly: in at least one seed, or one of its parts alone holds in that share; n/j: the rule cannot judge that seed "
            f"(valid rate < {MIN_VALID}), which never counts as a pass.\n\n"
            + head + "".join(rows) + "\n## Verdict rules\n\n" + rules
            + "\n\n## Per seed\n\n| recipe | seed | final samples | leader switches | parts |\n|---|---|---|---|---|\n"
            + "".join(detail))
    return text, verdicts


def plots(runs: list[RunSummary], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by: dict[str, list[RunSummary]] = {}
    for r in runs:
        by.setdefault(r.recipe, []).append(r)
    names = [k for k in CLAIMS if k in by] + sorted(k for k in by if k not in CLAIMS)
    cols = 2
    rows_n = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(12, 2.8 * rows_n), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, k in zip(axes.flat, names):
        steps = sorted({s for r in by[k] for s, _ in r.dist_curve})
        ys = [[_mean([dict(r.dist_curve).get(s, {}).get(a, 0.0) for r in by[k]]) for s in steps] for a in ANSWERS]
        ax.stackplot(steps, ys, labels=ANSWERS, colors=[cmap(i) for i in range(6)] + ["#bbbbbb"])
        ax.set_title(k, fontsize=9)
        ax.set_ylim(0, 1)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes[0, -1].legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    p1 = out / "answer_distribution_by_recipe.png"
    fig.savefig(p1, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for k in ("dice_entropy", "dice_entropy_strict", "even_dice_entropy_answer_scope"):
        for i, r in enumerate(by.get(k, [])):
            ax.plot(*zip(*r.length_curve), label=k if i == 0 else None,
                    color={"dice_entropy": "C3", "dice_entropy_strict": "C0"}.get(k, "C2"), alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("mean completion length (tokens)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    p2 = out / "completion_length_entropy.png"
    fig.savefig(p2, dpi=100)
    plt.close(fig)
    return [p1, p2]


def study_runs(client, parent_run_id: Optional[str], experiment: Optional[str]) -> tuple[str, list]:
    """(experiment id, runs) of a study: a sweep's children, or every run of an experiment."""
    if parent_run_id:
        exp_id = client.get_run(parent_run_id).info.experiment_id
        flt = f"tags.mlflow.parentRunId = '{parent_run_id}'"
    else:
        exp_id = client.get_experiment_by_name(experiment or "runner").experiment_id
        flt = ""
    return exp_id, client.search_runs([exp_id], filter_string=flt, max_results=5000)


def publish(client, uri: str, exp_id: str, parent_run_id: Optional[str], out: Path, name: str, text: str,
            plot) -> list[Path]:
    """Write `name` and the plots (`plot(out) -> paths`) to `out`, and log them to the parent run."""
    from runner.track.store import Tracker

    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(text)
    paths = plot(out)
    if parent_run_id:
        t = Tracker(uri, client.get_experiment(exp_id).name)
        t.run_id = parent_run_id
        t.log_text(text, name)
        for p in paths:
            t.log_artifact(p)
        t.flush()
    return paths


def report(uri: str, parent_run_id: Optional[str] = None, experiment: Optional[str] = None,
           out: Path = Path(".")) -> tuple[str, dict[str, str]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp_id, found = study_runs(client, parent_run_id, experiment)
    found = [r for r in found
             if r.data.tags.get("recipe") and r.info.status == "FINISHED" and "eval/answers/valid_rate" in r.data.metrics]
    runs = [summarise_run(client, r) for r in found]
    text, verdicts = build(runs)
    publish(client, uri, exp_id, parent_run_id, out, "report.md", text, lambda o: plots(runs, o) if runs else [])
    return text, verdicts


def study_cli(argv, prog: str, doc: str, default_out: str, fn) -> int:
    """The CLI of a study report: `fn(uri, parent, experiment, out) -> (text, ...)`, printed."""
    p = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    p.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns.db)")
    p.add_argument("--parent", default=None, help="a sweep's parent run id")
    p.add_argument("--experiment", default="runner")
    p.add_argument("--out", type=Path, default=Path(default_out))
    a = p.parse_args(argv)
    from runner.track.store import resolve_uri

    text = fn(resolve_uri(a.uri), a.parent, a.experiment, a.out)[0]
    print(text)
    return 0


def main(argv=None) -> int:
    return study_cli(argv, "python -m runner.track.report", __doc__, "report", report)


if __name__ == "__main__":
    sys.exit(main())
