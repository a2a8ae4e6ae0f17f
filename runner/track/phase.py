"""The divisor's phase diagram: how often a policy ends spread over the valid answers, per
group size x shaper, from a sweep's finished runs (sweeps/phase_diagram.yaml).

    python -m runner.track.phase --parent RUN_ID [--uri URI] [--out DIR]
    python -m runner.track.phase --experiment NAME [--uri URI]

A run is judged on its final evaluation (samples at temperature 1), by the rules stated in
report.py before any number was seen: *spread* (each valid answer >= 0.20, at most 0.10 unrewarded)
and *collapsed* (the top answer >= 0.80). Rates are over seeds; a cell shows "k/n".
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SHAPER_ORDER = ("none", "bonus", "divisor")


@dataclass
class Outcome:
    group_size: int
    prompts: int
    shaper: str
    seed: str
    final: dict[str, float]  # answer -> fraction of the final evaluation's samples
    valid: list[str]

    @property
    def spread(self) -> bool:
        rewarded = sum(self.final.get(a, 0.0) for a in self.valid)
        return all(self.final.get(a, 0.0) >= 0.2 for a in self.valid) and 1.0 - rewarded <= 0.1 + 1e-9

    @property
    def collapsed(self) -> bool:
        return max((v for k, v in self.final.items() if k != "invalid"), default=0.0) >= 0.8


def outcome_of(run) -> Optional[Outcome]:
    """An Outcome from a finished MLflow run with a final evaluation of finite answers."""
    m, p = run.data.metrics, run.data.params
    fracs = {k[len("eval/answers/frac/"):]: v for k, v in m.items() if k.startswith("eval/answers/frac/")}
    if run.info.status != "FINISHED" or not fracs:
        return None
    env = p.get("env.name", "even_dice")
    faces = int(p.get("env.faces", 6))
    valid = [str(i) for i in range(1, faces + 1) if env != "even_dice" or i % 2 == 0]
    return Outcome(int(p.get("algo.group_size", 0)), int(p.get("train.prompts_per_step", 0)),
                   run.data.tags.get("shaper", p.get("shaper.name", "?")), p.get("seed", "?"), fracs, valid)


def table(outcomes: list[Outcome]) -> tuple[str, dict[tuple[int, str], tuple[int, int, int]]]:
    """Markdown table and {(G, shaper): (spread, collapsed, seeds)}."""
    cells: dict[tuple[int, str], list[Outcome]] = {}
    for o in outcomes:
        cells.setdefault((o.group_size, o.shaper), []).append(o)
    sizes = sorted({g for g, _ in cells})
    shapers = [s for s in SHAPER_ORDER if any(k[1] == s for k in cells)] + sorted(
        {s for _, s in cells} - set(SHAPER_ORDER))
    stats = {k: (sum(o.spread for o in v), sum(o.collapsed for o in v), len(v)) for k, v in cells.items()}
    prompts = {g: sorted({o.prompts for (gg, _), v in cells.items() if gg == g for o in v}) for g in sizes}
    head = "| G x groups | " + " | ".join(f"{s}: spread / collapsed" for s in shapers) + " |\n"
    head += "|---|" + "---|" * len(shapers) + "\n"
    rows = []
    for g in sizes:
        row = [f"{g} x {'/'.join(map(str, prompts[g]))}"]
        for s in shapers:
            sp, co, n = stats.get((g, s), (0, 0, 0))
            row.append(f"{sp}/{n} / {co}/{n}" if n else "-")
        rows.append("| " + " | ".join(row) + " |\n")
    return head + "".join(rows), stats


def heatmap(stats: dict[tuple[int, str], tuple[int, int, int]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({g for g, _ in stats})
    shapers = [s for s in SHAPER_ORDER if any(k[1] == s for k in stats)] + sorted(
        {s for _, s in stats} - set(SHAPER_ORDER))
    fig, axes = plt.subplots(1, 2, figsize=(9, 0.6 * len(sizes) + 2), squeeze=False)
    for ax, (title, idx) in zip(axes[0], (("spread rate (each valid >= 0.2, unrewarded <= 0.1)", 0),
                                         ("collapse rate (top answer >= 0.8)", 1))):
        grid = [[stats[(g, s)][idx] / stats[(g, s)][2] if (g, s) in stats else float("nan") for s in shapers]
                for g in sizes]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i, g in enumerate(sizes):
            for j, s in enumerate(shapers):
                if (g, s) in stats:
                    v, n = stats[(g, s)][idx], stats[(g, s)][2]
                    ax.text(j, i, f"{v}/{n}", ha="center", va="center", color="w" if v / n < 0.6 else "k")
        ax.set_xticks(range(len(shapers)), shapers)
        ax.set_yticks(range(len(sizes)), [f"G={g}" for g in sizes])
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def phase(uri: str, parent_run_id: Optional[str] = None, experiment: Optional[str] = None,
          out: Path = Path("phase")) -> tuple[str, dict]:
    from mlflow.tracking import MlflowClient

    from runner.track.report import publish, study_runs

    client = MlflowClient(uri)
    exp_id, runs = study_runs(client, parent_run_id, experiment)
    outcomes = [o for o in (outcome_of(r) for r in runs) if o is not None]
    text, stats = table(outcomes)
    text = ("# Phase diagram: spread / collapsed seeds per group size x shaper\n\n"
            "Final evaluation (samples at T=1). spread: each valid answer >= 0.20 and at most 0.10 unrewarded; "
            "collapsed: the top answer >= 0.80.\n\n" + text)
    publish(client, uri, exp_id, parent_run_id, out, "phase.md", text,
            lambda o: [heatmap(stats, o / "phase_heatmap.png")] if stats else [])
    return text, stats


def main(argv=None) -> int:
    from runner.track.report import study_cli

    return study_cli(argv, "python -m runner.track.phase", __doc__, "phase", phase)


if __name__ == "__main__":
    sys.exit(main())
