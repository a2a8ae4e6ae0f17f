"""The dice-post reproduction report: one row per recipe, verdicts by stated rules, plots.

    python -m runner.report --parent RUN_ID [--uri URI] [--out DIR]
    python -m runner.report --experiment runner [--uri URI]

Reads finished runs tagged with `recipe` (children of a sweep's parent run, or every run
in an experiment), aggregates their final evaluation over seeds (mean and spread), applies
the verdict rule of each recipe's claim, writes `report.md` and plots, and logs them to
the parent run when there is one. `make reproduce` runs the sweep and this at its end.
"""

from __future__ import annotations

import argparse
import math
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
    argmax_switches: int  # how often the most frequent valid answer changed over training


@dataclass
class Claim:
    text: str
    rule: str
    judge: Callable[[list[RunSummary], dict[str, list[RunSummary]]], str]


def _mean(xs):
    return statistics.mean(xs) if xs else math.nan


def _top(r: RunSummary) -> float:
    return max(r.final[a] for a in ANSWERS if a != "invalid")


def _collapsed(runs):
    return _mean([_top(r) for r in runs])


def _verdict(a: bool, b: bool) -> str:
    return "reproduced" if a and b else "partly" if a or b else "not reproduced"


CLAIMS: dict[str, Claim] = {
    "dice_grpo": Claim("collapses onto its favourite answer",
                       "reproduced if the top answer's final share (mean over seeds) >= 0.9; partly if >= 0.6",
                       lambda rs, _: "reproduced" if _collapsed(rs) >= 0.9 else "partly" if _collapsed(rs) >= 0.6
                       else "not reproduced"),
    "dice_grpo_temp15": Claim("the same collapse at temperature 1.5", "same rule as dice_grpo",
                              lambda rs, _: CLAIMS["dice_grpo"].judge(rs, _)),
    "dice_entropy": Claim("less collapse, but completion length grows",
                          "less collapse: top share below dice_grpo's by >= 0.1 (or < 0.6 if that recipe is absent); "
                          "length grows: last/first mean length >= 1.3; reproduced if both, partly if one",
                          lambda rs, by: _verdict(_less_collapse(rs, by), _mean([r.length_last / max(r.length_first, 1e-9) for r in rs]) >= 1.3)),
    "dice_entropy_strict": Claim("diversity without length growth",
                                 "diversity: top share < 0.9 and >= 3 answers with share >= 0.05 (mean); no growth: "
                                 "last/first mean length <= 1.1; reproduced if both, partly if one",
                                 lambda rs, _: _verdict(_diverse(rs), _mean([r.length_last / max(r.length_first, 1e-9) for r in rs]) <= 1.1)),
    "even_dice_entropy": Claim("ping-pongs between answers and never finds one of 2, 4, 6",
                               "ping-pong: the most frequent valid answer changes >= 3 times over training (mean); "
                               "a missing answer: some even answer has final share < 0.02 (mean); reproduced if both, partly if one",
                               lambda rs, _: _verdict(_mean([r.argmax_switches for r in rs]) >= 3,
                                                      min(_mean([r.final[a] for r in rs]) for a in EVEN) < 0.02)),
    "even_dice_bonus": Claim("more diversity, but invalid odd answers leak in",
                             "diversity as in dice_entropy_strict; leak: final share of 1, 3, 5 together >= 0.05 (mean); "
                             "reproduced if both, partly if one",
                             lambda rs, _: _verdict(_diverse(rs), _mean([sum(r.final[a] for a in "135") for r in rs]) >= 0.05)),
    "even_dice_divisor": Claim("near-uniform over 2, 4, 6 with few invalid answers",
                               "near-uniform: TV to uniform over {2,4,6} <= 0.15 (mean); few invalid: valid rate >= 0.9; "
                               "reproduced if both; partly if TV <= 0.35 with valid rate >= 0.9",
                               lambda rs, _: "reproduced" if _mean([r.tv for r in rs]) <= 0.15 and _mean([r.valid_rate for r in rs]) >= 0.9
                               else "partly" if _mean([r.tv for r in rs]) <= 0.35 and _mean([r.valid_rate for r in rs]) >= 0.9
                               else "not reproduced"),
    "even_dice_entropy_answer_scope": Claim("(our proposal, no claim in the post) entropy on the answer span only",
                                            "n/a: compare its row with even_dice_entropy and dice_entropy_strict",
                                            lambda rs, _: "n/a"),
}


def _less_collapse(rs, by):
    base = by.get("dice_grpo")
    return _collapsed(rs) <= _collapsed(base) - 0.1 if base else _collapsed(rs) < 0.6


def _diverse(rs):
    return _collapsed(rs) < 0.9 and _mean([sum(r.final[a] >= 0.05 for a in ANSWERS if a != "invalid") for r in rs]) >= 3


def _history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def summarise_run(client, run) -> RunSummary:
    rid, m = run.info.run_id, run.data.metrics
    final = {a: m.get(f"eval/answers/frac/{a}", 0.0) for a in ANSWERS}
    lengths = _history(client, rid, "completion/mean_length")
    curves = {a: dict(_history(client, rid, f"answers/frac/{a}")) for a in ANSWERS}
    steps = sorted(set().union(*[c.keys() for c in curves.values()]))
    dist_curve = [(s, {a: curves[a].get(s, 0.0) for a in ANSWERS}) for s in steps]
    tops = [max(EVEN, key=lambda a: d[a]) for _, d in dist_curve if sum(d[a] for a in EVEN) > 0]
    switches = sum(1 for x, y in zip(tops, tops[1:]) if x != y)
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


def build(runs: list[RunSummary]) -> tuple[str, dict[str, str]]:
    """Markdown report and {recipe: verdict}."""
    by: dict[str, list[RunSummary]] = {}
    for r in runs:
        by.setdefault(r.recipe, []).append(r)
    order = [k for k in CLAIMS if k in by] + sorted(k for k in by if k not in CLAIMS)
    head = ("| recipe | seeds | " + " | ".join(f"p({a})" for a in ANSWERS)
            + " | valid rate | answer entropy | TV to uniform-valid | length first→last | post's claim | verdict |\n")
    head += "|" + "---|" * (len(ANSWERS) + 8) + "\n"
    rows, verdicts = [], {}
    for k in order:
        rs = by[k]
        claim = CLAIMS.get(k)
        verdict = claim.judge(rs, by) if claim else "n/a"
        verdicts[k] = verdict
        rows.append(
            f"| {k} | {len(rs)} | " + " | ".join(_fmt([r.final[a] for r in rs]) for a in ANSWERS)
            + f" | {_fmt([r.valid_rate for r in rs])} | {_fmt([r.entropy for r in rs])} | {_fmt([r.tv for r in rs])}"
            + f" | {_fmt([r.length_first for r in rs])}→{_fmt([r.length_last for r in rs])}"
            + f" | {claim.text if claim else ''} | **{verdict}** |\n")
    rules = "\n".join(f"- `{k}`: {CLAIMS[k].rule}" for k in order if k in CLAIMS)
    text = ("# Dice post reproduction\n\nFinal evaluation (sampled at temperature 1) per recipe, mean±spread "
            "(population std) over seeds; `invalid` is anything without exactly one numeric answer tag.\n\n"
            + head + "".join(rows) + "\n## Verdict rules\n\n" + rules + "\n")
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


def report(uri: str, parent_run_id: Optional[str] = None, experiment: Optional[str] = None,
           out: Path = Path(".")) -> tuple[str, dict[str, str]]:
    from mlflow.tracking import MlflowClient

    from runner.tracking import Tracker

    client = MlflowClient(uri)
    if parent_run_id:
        exp_id = client.get_run(parent_run_id).info.experiment_id
        flt = f"tags.mlflow.parentRunId = '{parent_run_id}'"
    else:
        exp_id = client.get_experiment_by_name(experiment or "runner").experiment_id
        flt = ""
    found = [r for r in client.search_runs([exp_id], filter_string=flt, max_results=5000)
             if r.data.tags.get("recipe") and r.info.status == "FINISHED" and "eval/answers/valid_rate" in r.data.metrics]
    runs = [summarise_run(client, r) for r in found]
    text, verdicts = build(runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    paths = plots(runs, out) if runs else []
    if parent_run_id:
        t = Tracker(uri, client.get_experiment(exp_id).name)
        t.run_id = parent_run_id
        t.log_text(text, "report.md")
        for p in paths:
            t.log_artifact(p)
        t.flush()
    return text, verdicts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m runner.report", description=__doc__.splitlines()[0])
    p.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns.db)")
    p.add_argument("--parent", default=None, help="a sweep's parent run id")
    p.add_argument("--experiment", default="runner")
    p.add_argument("--out", type=Path, default=Path("report"))
    a = p.parse_args(argv)
    from runner.tracking import resolve_uri

    text, _ = report(resolve_uri(a.uri), a.parent, a.experiment, a.out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
