"""The recipe card: what a multi-stage recipe ("generate data -> SFT -> RL") achieved, in
one page and one figure, built at the recipe's end and rebuildable from MLflow alone.

    python -m runner.track.card --parent RUN_ID [--uri URI] [--out DIR] [--machine TEXT]

writes `recipe_card.md` and `recipe_card.png` to --out (default: the current directory),
logs both as artifacts of the parent run (best effort: a store that cannot take them gets a
warning, not a failure), and prints the card. Exit 2, with one line, when the parent run does
not exist, names no card metric, or has no stage children.

Success is the RL Diary's ("$100 agents"): "the % improvement demonstrated by the RL-tuned
model on the end-task in comparison to the base or SFT model", 10% = success.

The MLflow contract (what the recipe runner writes; this module only reads it)
-----------------------------------------------------------------------------
Parent run (one per recipe):
  tag `runner.recipe`                 the recipe's name
  tag `runner.card_metric`            the end-task metric, e.g. `eval/accuracy`,
                                      `eval/game/solve_rate`, `eval/prob/tv_uniform_valid`
  tag `runner.card_higher_is_better`  "true" / "false" (missing: "true")
  tag `runner.machine`                optional: where the stages ran (else --machine, else
                                      runner.host.cpu_description() of the machine building the card)
Child runs (one per stage), found by `tags.mlflow.parentRunId = '<parent id>'`; children
without `runner.stage` are not stages and are ignored:
  tag `runner.stage`        stage name: `eval_base`, `generate`, `sft`, `rl`, ...
  tag `runner.stage_index`  "0", "1", ...: the order the stages ran in
  tag `runner.stage_kind`   one of eval, generate, sft, rl
  tag `total_usd`, tag `total_wall_s`  floats as strings (missing: shown as "-", not summed)
  tag `command`             the exact command line of the stage
  param `seed`
  metric `<card metric>`         at the stage's last step (MLflow's latest value is read)
  metric `<card metric>_n`       the number of samples it was computed on
  metric `<card metric>_stderr`  its standard error, if the stage knows it; otherwise the
                                 card uses the binomial sqrt(p(1-p)/n) when the value lies in
                                 [0, 1] and n is known, and marks it "binomial" (for a
                                 noise-free quantity such as an exact probability this is an
                                 upper bound, not its error); else it shows no error
  run status: FINISHED, KILLED, FAILED or RUNNING.

Which scores are compared
-------------------------
- RL: the last stage (by index) of kind `rl`.
- SFT: the last stage of kind `sft`.
- base: the last stage of kind `eval` that ran before any sft/rl stage (an eval stage after
  training evaluates a trained model, not the base), i.e. the base model's evaluation.
The last stage of a kind is taken even if it did not finish: a failed RL retry must not be
hidden behind an earlier stage's score.

The rule (stated before any number is seen)
-------------------------------------------
improvement(new, ref) = (new - ref) / |ref| when higher is better and (ref - new) / |ref| when
lower is better, so a positive improvement is always "better"; for a lower-is-better metric
RL must reach <= 0.9 x the reference (for a positive reference) to count as +10%.
- success: RL improves by >= 10% over the base OR over the SFT model (the seed's "base or
  SFT": an SFT stage that made the model worse is an easier bar, and the card shows both
  numbers so a reader sees it). The boundary counts: exactly +10% is a success, compared with
  a 1e-9 tolerance (0.27 vs 0.30, lower is better, is 0.0999999999999999 in floats: +10%).
- Only comparisons between FINISHED stages that both logged the metric may decide it; a
  reference stage that did not finish is shown, marked "not counted".
- A reference that scores 0 leaves the relative improvement undefined: that comparison is
  printed as "undefined (the base scores 0): +X absolute" (X = RL - reference, in the
  metric's units) and does not count; the verdict is taken on the other reference if it is
  defined, else it is "not judgeable".
- No SFT stage: judged against the base only (and vice versa). No RL stage, or an RL stage
  that is not FINISHED or logged no metric: "no verdict" (its improvement is still shown).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

THRESHOLD = 0.10  # the seed's "10% = success"
TOLERANCE = 1e-9  # float noise at the boundary: 0.05 / 0.5 is 0.1000000000000001 or 0.0999999999999999
CARD_MD, CARD_PNG = "recipe_card.md", "recipe_card.png"


class CardError(ValueError):
    """The store does not hold a card's inputs (no parent, no metric, no stages)."""


@dataclass(frozen=True)
class StageResult:
    name: str
    kind: str  # eval, generate, sft or rl
    metric: Optional[float]  # the card metric at the stage's last step; None if not logged
    n: Optional[int] = None  # samples the metric was computed on
    stderr: Optional[float] = None  # as logged by the stage
    usd: Optional[float] = None
    wall_s: Optional[float] = None
    command: str = ""
    seed: str = ""
    status: str = "FINISHED"
    index: int = 0
    run_id: str = ""

    def error(self) -> tuple[Optional[float], str]:
        """(standard error, where it came from: "logged", "binomial" or "")."""
        if self.stderr is not None:
            return self.stderr, "logged"
        if self.metric is not None and self.n and 0.0 <= self.metric <= 1.0:
            return math.sqrt(self.metric * (1.0 - self.metric) / self.n), "binomial"
        return None, ""

    @property
    def scored(self) -> bool:
        """Whether this stage's score may decide a verdict."""
        return self.status == "FINISHED" and self.metric is not None


@dataclass(frozen=True)
class Card:
    recipe: str
    metric_name: str
    higher_is_better: bool
    stages: list[StageResult]
    machine: str = ""
    parent_run_id: str = ""


@dataclass(frozen=True)
class Comparison:
    """RL against one reference ("base" or "SFT")."""
    ref: str
    rl: StageResult
    other: StageResult
    relative: Optional[float]  # None: the reference scores 0
    absolute: float  # rl - reference, in the metric's units

    @property
    def counts(self) -> bool:
        return self.relative is not None and self.rl.scored and self.other.scored

    @property
    def passes(self) -> bool:
        return self.counts and self.relative >= THRESHOLD - TOLERANCE


@dataclass(frozen=True)
class Verdict:
    outcome: str  # "success", "failure", "not judgeable" or "no verdict"
    reason: str  # one line, e.g. "success: RL +14.3% over SFT >= 10%"
    comparisons: list[Comparison] = field(default_factory=list)


def improvement(new: float, old: float, higher_is_better: bool = True) -> Optional[float]:
    """Relative improvement of `new` over `old`, positive when better in the metric's own
    direction; None when `old` is 0 (relative change from nothing has no value)."""
    if old == 0:
        return None
    return (new - old) / abs(old) if higher_is_better else (old - new) / abs(old)


def last_of(stages: list[StageResult], kind: str, before: Optional[int] = None) -> Optional[StageResult]:
    found = [s for s in stages if s.kind == kind and (before is None or s.index < before)]
    return max(found, key=lambda s: s.index) if found else None


def references(stages: list[StageResult]) -> tuple[Optional[StageResult], Optional[StageResult], Optional[StageResult]]:
    """(base, SFT, RL) stages per the module docstring."""
    trained = [s.index for s in stages if s.kind in ("sft", "rl")]
    return (last_of(stages, "eval", min(trained) if trained else None), last_of(stages, "sft"), last_of(stages, "rl"))


def compare(rl: StageResult, other: Optional[StageResult], ref: str, higher_is_better: bool) -> Optional[Comparison]:
    if other is None or rl.metric is None or other.metric is None:
        return None
    return Comparison(ref, rl, other, improvement(rl.metric, other.metric, higher_is_better), rl.metric - other.metric)


def pct(x: float) -> str:
    return f"{x * 100:+.1f}%"


def describe(c: Comparison) -> str:
    """"+14.3% over SFT", or the undefined case's wording."""
    if c.relative is None:
        what = "the base scores" if c.ref == "base" else "the SFT model scores"
        return f"undefined ({what} 0): {c.absolute:+.4g} absolute"
    return f"{pct(c.relative)} over {c.ref}"


def verdict(base: Optional[StageResult], sft: Optional[StageResult], rl: Optional[StageResult],
            higher_is_better: bool = True) -> Verdict:
    """Apply the rule of the module docstring; the reason says which comparison decided."""
    if rl is None:
        return Verdict("no verdict", "no verdict: the recipe has no RL stage")
    comps = [c for c in (compare(rl, base, "base", higher_is_better), compare(rl, sft, "SFT", higher_is_better)) if c]
    if rl.metric is None:
        return Verdict("no verdict", f"no verdict: the RL stage `{rl.name}` logged no score", comps)
    if rl.status != "FINISHED":
        return Verdict("no verdict", f"no verdict: the RL stage `{rl.name}` is {rl.status}", comps)
    scored = [c for c in comps if c.other.scored]
    if not scored:
        return Verdict("not judgeable", "not judgeable: no finished base or SFT score to compare with", comps)
    passing = [c for c in scored if c.passes]
    if passing:
        return Verdict("success", "success: RL " + " and ".join(describe(c) for c in passing)
                       + f" >= {THRESHOLD:.0%}", comps)
    counting = [c for c in scored if c.counts]
    if not counting:
        return Verdict("not judgeable", "not judgeable: RL " + "; ".join(describe(c) for c in scored), comps)
    undefined = [c for c in scored if not c.counts]
    return Verdict("failure", "failure: RL " + ", ".join(describe(c) for c in counting)
                   + f"{', each' if len(counting) > 1 else ''} < {THRESHOLD:.0%}"
                   + "".join(f"; {describe(c)}" for c in undefined), comps)


def card_verdict(card: Card) -> Verdict:
    base, sft, rl = references(card.stages)
    return verdict(base, sft, rl, card.higher_is_better)


# -- the page -------------------------------------------------------------------------

def fmt_wall(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(math.floor(s + 0.5), 60)  # half up: 7242.5 s is 2h 00m 43s
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {sec:02d}s" if h else f"{m}m {sec:02d}s"


def fmt_usd(x: Optional[float]) -> str:
    return "-" if x is None else f"${x:.4f}"


def fmt_score(s: StageResult) -> str:
    """"0.55 ± 0.0497 (n=100, binomial)"."""
    if s.metric is None:
        return "-"
    se, source = s.error()
    text = f"{s.metric:.4g}" + (f" ± {se:.3g}" if se is not None else "")
    notes = [f"n={s.n}"] if s.n else []
    if source == "binomial":
        notes.append("binomial")
    return text + (f" ({', '.join(notes)})" if notes else "")


def totals(stages: list[StageResult]) -> tuple[float, float, int, int]:
    """(dollars, wall seconds, stages without a cost, stages without a wall time)."""
    usd = sum(s.usd for s in stages if s.usd is not None)
    wall = sum(s.wall_s for s in stages if s.wall_s is not None)
    return usd, wall, sum(s.usd is None for s in stages), sum(s.wall_s is None for s in stages)


def rule_text(card: Card) -> str:
    direction = "higher" if card.higher_is_better else "lower"
    sign = "(new - ref) / |ref|" if card.higher_is_better else "(ref - new) / |ref|"
    return (f"success iff the RL stage improves `{card.metric_name}` ({direction} is better) by >= "
            f"{THRESHOLD:.0%} over the base model OR over the SFT model, improvement = {sign}, "
            f"boundary included; only FINISHED stages count; a reference scoring 0 gives no relative "
            f"improvement and the other reference decides (none left: not judgeable); no finished RL "
            f"stage: no verdict.")


def not_counted(c: Comparison) -> str:
    """Why a shown comparison cannot decide the verdict ("" when it can)."""
    late = [s for s in (c.rl, c.other) if s.status != "FINISHED"]
    return "".join(f"; not counted: `{s.name}` is {s.status}" for s in late)


def render(card: Card) -> str:
    """recipe_card.md."""
    ordered = sorted(card.stages, key=lambda s: s.index)
    v = card_verdict(card)
    usd, wall, no_usd, no_wall = totals(ordered)
    lines = [f"# Recipe card: {card.recipe}", "",
             f"End-task metric: `{card.metric_name}` ({'higher' if card.higher_is_better else 'lower'} is better).", "",
             "| # | stage | kind | status | " + card.metric_name + " ± stderr (n) | cost | wall time | seed |",
             "|---|---|---|---|---|---|---|---|"]
    for s in ordered:
        lines.append(f"| {s.index} | {s.name} | {s.kind} | {s.status} | {fmt_score(s)} | {fmt_usd(s.usd)} "
                     f"| {fmt_wall(s.wall_s)} | {s.seed or '-'} |")
    lines += ["", "## Improvement of RL", ""]
    lines += [f"- RL (`{c.rl.name}`) vs {c.ref} (`{c.other.name}`): {describe(c)}"
              f" ({c.rl.metric:.4g} vs {c.other.metric:.4g})" + not_counted(c) for c in v.comparisons] \
        or ["- nothing to compare"]
    lines += ["", "## Verdict", "", f"Rule (RL Diary, \"$100 agents\"): {rule_text(card)}", "",
              f"**{v.reason}**", "", "## Totals", "",
              f"- cost: {fmt_usd(usd)} over {len(ordered)} stages"
              + (f" ({no_usd} without a cost)" if no_usd else ""),
              f"- wall time: {fmt_wall(wall)} ({wall:.1f} s, stages summed)"
              + (f" ({no_wall} without a wall time)" if no_wall else ""),
              f"- machine: {card.machine or 'unknown'}"]
    if card.parent_run_id:
        lines.append(f"- MLflow parent run: `{card.parent_run_id}`")
    if any(s.error()[1] == "binomial" for s in ordered):
        lines.append("- binomial: stderr not logged by the stage, computed as sqrt(p(1-p)/n)")
    lines += ["", "## Commands and seeds", ""]
    for s in ordered:
        lines += [f"{s.index}. `{s.name}` (seed {s.seed or '-'}):", "", "   ```", f"   {s.command or '(not recorded)'}",
                  "   ```", ""]
    return "\n".join(lines)


def plot(card: Card, path: Path) -> Path:
    """The metric per stage with error bars, the 10% targets over base and SFT, and the
    cost per stage below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = sorted(card.stages, key=lambda s: s.index)
    xs = list(range(len(ordered)))
    colors = {"eval": "C0", "generate": "C7", "sft": "C1", "rl": "C2"}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(5.0, 1.3 * len(ordered) + 2), 6), sharex=True,
                                      gridspec_kw={"height_ratios": [2, 1]})
    for x, s in zip(xs, ordered):
        if s.metric is None:
            continue
        se = s.error()[0]
        top.errorbar([x], [s.metric], yerr=[se] if se is not None else None, fmt="o" if s.status == "FINISHED" else "x",
                     color=colors.get(s.kind, "k"), capsize=5, markersize=8)
        top.annotate(f"{s.metric:.3g}" + ("" if s.status == "FINISHED" else f" ({s.status})"), (x, s.metric),
                     textcoords="offset points", xytext=(8, 0), fontsize=8, va="center")
    base, sft, _ = references(ordered)
    factor = 1 + THRESHOLD if card.higher_is_better else 1 - THRESHOLD
    for ref, label, style in ((base, "base", ":"), (sft, "SFT", "--")):
        if ref is not None and ref.metric:
            top.axhline(ref.metric + (factor - 1) * abs(ref.metric), ls=style, color="grey", lw=1,
                        label=f"{label} {'+' if card.higher_is_better else '-'}{THRESHOLD:.0%}: success line")
    if top.get_legend_handles_labels()[0]:
        top.legend(fontsize=8)
    top.set_ylabel(card.metric_name)
    top.set_title(f"{card.recipe}: {card_verdict(card).reason}", fontsize=9)
    costs = [s.usd or 0.0 for s in ordered]
    bottom.bar(xs, costs, color=[colors.get(s.kind, "k") for s in ordered])
    for x, s in zip(xs, ordered):
        bottom.annotate(f"{fmt_usd(s.usd)}\n{fmt_wall(s.wall_s)}", (x, s.usd or 0.0), textcoords="offset points",
                        xytext=(0, 2), ha="center", va="bottom", fontsize=7)
    bottom.set_ylabel("cost (USD)")
    bottom.set_ylim(0, max(costs + [1e-6]) * 1.5)
    bottom.set_xticks(xs, [f"{s.name}\n({s.kind})" for s in ordered])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# -- from MLflow ------------------------------------------------------------------------

def _float(x) -> Optional[float]:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def stage_of(run, metric_name: str) -> StageResult:
    """One stage child run, read per the contract."""
    t, m = run.data.tags, run.data.metrics
    n = _float(m.get(f"{metric_name}_n"))
    index = _float(t.get("runner.stage_index"))
    return StageResult(
        name=t["runner.stage"], kind=t.get("runner.stage_kind", "?"), metric=_float(m.get(metric_name)),
        n=int(n) if n is not None else None, stderr=_float(m.get(f"{metric_name}_stderr")),
        usd=_float(t.get("total_usd")), wall_s=_float(t.get("total_wall_s")), command=t.get("command", ""),
        seed=run.data.params.get("seed", ""), status=run.info.status,
        index=int(index) if index is not None else 10 ** 6, run_id=run.info.run_id)


def _shared_stages(client, tags: dict, seen: set[str]) -> list:
    """Stages a recipe in a sweep reused from another job of the sweep (runner/recipe.py): they
    are another parent's children, named in this parent's `runner.stage_runs` tag (a JSON list
    of run ids)."""
    import json

    try:
        ids = json.loads(tags.get("runner.stage_runs", "[]"))
    except ValueError:
        return []
    out = []
    for run_id in ids if isinstance(ids, list) else []:
        if run_id not in seen:
            try:
                out.append(client.get_run(run_id))
            except Exception:  # a run deleted since: the card shows the stages it can read
                continue
    return out


def from_mlflow(parent_run_id: str, uri: str, machine: Optional[str] = None) -> Card:
    """The card of a recipe's parent run; CardError when the store does not hold one."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    try:
        parent = client.get_run(parent_run_id)
    except MlflowException as e:
        raise CardError(f"no parent run {parent_run_id} in {uri}") from e
    tags = parent.data.tags
    metric_name = tags.get("runner.card_metric")
    if not metric_name:
        raise CardError(f"parent run {parent_run_id} has no runner.card_metric tag")
    children = client.search_runs([parent.info.experiment_id], max_results=5000,
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    children += _shared_stages(client, tags, {r.info.run_id for r in children})
    stages = sorted((stage_of(r, metric_name) for r in children if r.data.tags.get("runner.stage")),
                    key=lambda s: (s.index, s.name))
    if not stages:
        raise CardError(f"parent run {parent_run_id} has no stage children (runner.stage tags)")
    if machine is None:
        machine = tags.get("runner.machine")
    if machine is None:
        from runner.host import cpu_description

        machine = f"{cpu_description()} (where the card was built; the parent has no runner.machine tag)"
    return Card(recipe=tags.get("runner.recipe", "?"), metric_name=metric_name,
                higher_is_better=tags.get("runner.card_higher_is_better", "true").strip().lower() != "false",
                stages=stages, machine=machine, parent_run_id=parent_run_id)


def write(card: Card, out: Path, uri: Optional[str] = None) -> tuple[Path, Path]:
    """recipe_card.md and .png in `out`, logged to the parent run when there is one (best effort)."""
    out.mkdir(parents=True, exist_ok=True)
    md = out / CARD_MD
    md.write_text(render(card))
    png = plot(card, out / CARD_PNG)
    if card.parent_run_id and uri:
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(uri)
            for p in (md, png):
                client.log_artifact(card.parent_run_id, str(p))
        except Exception as e:  # the card on disk is the result; the store is a copy
            print(f"warning: could not log the recipe card to run {card.parent_run_id}: {e}", file=sys.stderr)
    return md, png


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m runner.track.card", description=__doc__.splitlines()[0])
    p.add_argument("--parent", required=True, help="the recipe's parent run id")
    p.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns.db)")
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--machine", default=None, help="where the stages ran (default: the parent's runner.machine tag)")
    a = p.parse_args(argv)
    from runner.track.store import resolve_uri

    uri = resolve_uri(a.uri)
    try:
        card = from_mlflow(a.parent, uri, a.machine)
    except CardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write(card, a.out, uri)
    print(render(card))
    return 0


if __name__ == "__main__":
    sys.exit(main())
