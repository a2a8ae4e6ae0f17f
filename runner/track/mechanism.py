"""Why a shaper acts or starves, run against run: the plot behind README's divisor section.

    python -m runner.track.mechanism --uri sqlite:///mlruns.db --runs NAME_OR_ID[,...] --out mechanism.png

Four panels over training steps, one line per run: the sampling policy's smallest exact
first-token probability among the rewarded answers (`policy/prob/min_rewarded`, with 1/G
marked: below it an answer is rarely in a group, so no shaper can lift it), the fraction of
groups holding two or more rewarded answers (with group-std scaling the divisor changes no
advantage in any other group), distinct rewarded answers per group, and the valid rate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PANELS = (("policy/prob/min_rewarded", "min P(first token) over rewarded answers", True),
          ("groups/multi_rewarded_frac", "groups holding >= 2 rewarded answers (where the divisor can act)", False),
          ("groups/distinct_rewarded_mean", "distinct rewarded answers per group", False),
          ("answers/valid_rate", "valid rate (training rollouts)", False))


def find_run(client, key: str):
    """A run by id, or the newest run with that run name in any experiment."""
    try:
        return client.get_run(key)
    except Exception:
        pass
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, filter_string=f"tags.mlflow.runName = '{key}'", order_by=["start_time DESC"],
                              max_results=1)
    if not runs:
        raise SystemExit(f"error: no run named or with id {key!r} in this store")
    return runs[0]


def plot(uri: str, keys: list[str], out: Path, labels: list[str] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = [find_run(client, k) for k in keys]
    labels = labels or [r.info.run_name for r in runs]
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5))
    for ax, (metric, title, log_y) in zip(axes.flat, PANELS):
        for i, (r, label) in enumerate(zip(runs, labels)):
            h = sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, metric))
            if h:
                ax.plot(*zip(*h), label=label, color=f"C{i}", lw=1.4)
            if log_y:
                g = int(r.data.params.get("algo.group_size", 0) or 0)
                if g:
                    ax.axhline(1 / g, color=f"C{i}", ls=":", lw=1)
        ax.set_title(title + (" (dotted: 1/G)" if log_y else ""), fontsize=9)
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("step")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m runner.track.mechanism", description=__doc__.splitlines()[0])
    p.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns.db)")
    p.add_argument("--runs", required=True, help="comma-separated run ids or run names")
    p.add_argument("--labels", default=None, help="semicolon-separated legend labels, one per run")
    p.add_argument("--out", type=Path, default=Path("mechanism.png"))
    a = p.parse_args(argv)
    from runner.track.store import resolve_uri

    labels = a.labels.split(";") if a.labels else None
    print(plot(resolve_uri(a.uri), a.runs.split(","), a.out, labels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
