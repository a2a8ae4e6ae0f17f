"""What a finished run leaves for people: the answer-distribution plot, a table of the last
evaluation's samples, and the summary printed at the end."""

from __future__ import annotations

from io import StringIO
from pathlib import Path
from typing import Any, Optional

from envs import INVALID


def _cell(x: Any) -> str:
    """Text as one markdown table cell."""
    return str(x).replace("|", "\\|").replace("\n", "\\n")


def log_artifacts(tracker, output_dir: Path, cfg, env, history, last_eval: Optional[dict[str, Any]]) -> None:
    from runner.track.plots import distribution_over_steps

    art = output_dir / "artifacts"
    art.mkdir(parents=True, exist_ok=True)
    if history.train:
        keys = list(history.train[-1][1].keys())
        plot = distribution_over_steps(history.train, history.eval, keys, env.valid_answers or keys,
                                       art / "answer_distribution.png", f"{cfg.env.name} / {cfg.shaper.name}")
        tracker.log_artifact(plot)
    if (output_dir / "reward_errors.jsonl").exists():
        tracker.log_artifact(output_dir / "reward_errors.jsonl")
    if last_eval:
        from runner.track.completions import prompt_text

        reference = getattr(env, "reference", None)  # optional: the right answer, where the env knows one
        prompts = last_eval.get("prompts") or [last_eval["prompt"]] * len(last_eval["completions"])
        rows = ["| # | prompt | completion | answer | reference | reward |", "|---|---|---|---|---|---|"]
        for i, (p, c, s) in enumerate(zip(prompts, last_eval["completions"], last_eval["scores"])):
            if i >= cfg.train.sample_table_rows:
                break
            ref = reference(p) if reference else None
            rows.append(f"| {i} | {_cell(prompt_text(p))} | `{_cell(p.assistant_prefix + c)}` | {s.answer_key} | "
                        f"{'' if ref is None else _cell(ref)} | {s.reward:g} |")
        (art / "samples.md").write_text("\n".join(rows) + "\n")
        tracker.log_artifact(art / "samples.md")


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def disk_note(output_dir: Path, keep_final_checkpoint: bool) -> str:
    """What the run leaves on disk: a default-model checkpoint (optimizer state included) is
    ~1.6 GB, which surprises a user of five-step runs."""
    total, ckpt = _size(output_dir), _size(output_dir / "checkpoints")
    note = f"on disk: {total / 1e9:.2f} GB"
    if keep_final_checkpoint and ckpt:
        note += (f", {ckpt / 1e9:.2f} GB of it checkpoints (train.keep_final_checkpoint=false deletes them "
                 f"when a run completes; the exported hf_model stays)")
    return note


def summary(trainer) -> str:
    """The final policy: answer fractions and exact first-token probabilities where answers
    are finite, else the held-out evaluation's metrics; then where the run is logged."""
    from rich.table import Table

    cfg, env = trainer.cfg, trainer.env
    ev = trainer.evaluator.last or {"dist": {}, "probs": {}}
    valid = env.valid_answers or []
    t = Table(title=f"final policy after {trainer.step} steps: {cfg.env.name}, shaper={cfg.shaper.name}")
    if not env.answer_space:  # held-out evaluation (math, Wordle, datasets): its metrics
        t.add_column("held-out evaluation")
        t.add_column("value", justify="right")
        for k, v in sorted(trainer.final_metrics.items()):
            if k.startswith("eval/") and k != "eval/reward_errors":
                t.add_row(k[5:], f"{v:.3f}")
    else:
        exact = bool(ev["probs"])
        t.add_column("answer")
        t.add_column(f"sampled (n={ev.get('samples', cfg.train.eval_samples)}, T=1)", justify="right")
        if exact:
            t.add_column("P(first token)", justify="right")
        t.add_column("ideal", justify="right")
        for k, v in ev["dist"].items():
            ideal = 1 / len(valid) if k in valid else 0.0
            p = ev["probs"].get(k)
            probs = [("" if p is None else f"{p:.3f}")] if exact else []
            t.add_row(k, f"{v:.3f}", *probs, f"{ideal:.3f}")
            if k == INVALID and ev.get("other"):
                t.add_row("  of it: answers outside the space", f"{ev['other']:.3f}", *([""] if exact else []), "")
        t.caption = (f"{INVALID}: no answer of env.answer_space ({', '.join(env.answer_space)}) read "
                     "(no answer at all, or one outside the space; answers/other_rate is the latter)" + ("" if exact else "; exact P(first token) needs every "
                                                          "answer to be one token, and some of these are not"))
    from rich.console import Console

    buf = StringIO()
    console = Console(file=buf, width=100)
    console.print(t)
    console.print(f"MLflow: {trainer.tracker.run_url()}  (`make ui` to browse)")
    m = trainer.meter
    console.print(f"output: {trainer.output_dir}   wall {m.wall_seconds:.0f} s, "
                  f"{m.device_hours:.4f} device-h, ${m.usd:.4f}")
    console.print(disk_note(trainer.output_dir, trainer.cfg.train.keep_final_checkpoint), soft_wrap=True)
    return buf.getvalue()
