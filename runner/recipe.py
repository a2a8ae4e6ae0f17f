"""Staged recipes: evaluate the base model, SFT, then RL, as one resumable, budgeted, logged run.

A recipe whose config has `stages` runs each stage as a job of its own (`python -m runner`
with the recipe's overrides, the command's, the stage's, and `stages=[]`), so every stage has
the whole single-job contract: its own output dir `<output_dir>/<i>-<name>`, checkpoints,
resume and refusal of a changed config, MLflow run, budget meter, signals and export. What
the recipe adds:

- handoff: a stage after one that exported weights starts from them (`model=pretrained
  model.path=<previous>/hf_model`: tokenizer and chat template included, LoRA merged);
- one MLflow parent run (tags `runner.recipe`, `runner.card_metric`, ...) with a child run
  per stage (`runner.stage`, `runner.stage_index`, `runner.stage_kind`, `command`), as
  runner/track/card.py reads them;
- resume: the same command again runs every stage again, and a finished stage ends at once
  by its own record ("already finished"); the parent run is the one in `recipe_state.json`;
- `budget.cap_usd` caps the whole recipe: each stage gets what the earlier ones left;
- `train.max_generated_tokens` given to a recipe is the whole recipe's sampling budget: the
  tokens a generate stage sampled (kept or not) and an RL stage's rollouts count against it,
  and each RL stage gets what the earlier ones left (evaluations count nowhere, as in a
  single job): RFT then RL compared with RL alone at equal generated tokens;
- at the end, `recipe_card.md` and its plot, in the output dir and on the parent run.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Optional

from runner import host
from runner.config import ConfigError
from runner.state_files import read_json, write_json_atomic

log = logging.getLogger("runner")

STATE_FILE = "recipe_state.json"
REMEDY = "restore it, or use another output_dir (the stages' own dirs keep their runs)"
# what a stage of each kind adds to its overrides, so its kind and its job agree
KIND_OVERRIDES = {"eval": ["train.steps=0"], "generate": [], "sft": ["algo=sft"], "rl": []}
DATA_FILE = "data.jsonl"  # what a generate stage writes in its dir, and the next sft stage reads


def _state_shape(data) -> Optional[str]:
    if not isinstance(data, dict) or not isinstance(data.get("parent_run_id"), (str, type(None))):
        return 'expected {"parent_run_id": ..., "stages": {...}}'
    return None


def _config_dir_args(argv: list[str]) -> list[str]:
    """The command's own --config-dir/--config-name (a recipe of yours outside conf/)."""
    out = []
    for i, a in enumerate(argv):
        if a in ("--config-dir", "-cd", "--config-name", "-cn") and i + 1 < len(argv):
            out += [a, argv[i + 1]]
        elif a.startswith(("--config-dir=", "--config-name=")):
            out.append(a)
    return out


def _base_overrides(overrides: list[str], handed_off: bool) -> list[str]:
    """The command's overrides that every stage gets; once a stage has exported weights the
    model comes from them, so the command's model choice goes."""
    drop = ("output_dir=", "stages=", "stage_overrides", "tracking.parent_run_id=", "tracking.tags")
    kept = [o for o in overrides if not o.lstrip("+~").startswith(drop)]
    if handed_off:
        kept = [o for o in kept if not o.lstrip("+~").startswith(("model=", "model."))]
    return kept


def _child(uri: str, stage_dir: Path, generated: bool = False):
    """The stage's MLflow run, by its output dir's record (a generate stage's: by its data's
    provenance); None if it has none."""
    from mlflow.tracking import MlflowClient

    from runner import outdir

    if generated:
        run_id = (_provenance(stage_dir).get("mlflow") or {}).get("run_id")
    else:
        run_id = outdir.read_record(stage_dir).get("run_id") if stage_dir.exists() else None
    if not run_id:
        return None, None
    c = MlflowClient(uri)
    try:
        return c, c.get_run(run_id)
    except Exception:  # the store lost it: the card will miss this stage, the stage's dir has it
        return c, None


def _start_parent(cfg, recipe: str, recipe_dir: Path, uri: str) -> Optional[str]:
    from runner.track.store import Tracker

    t = Tracker(uri, cfg.tracking.experiment)
    t.start(f"recipe {recipe}", {"runner.recipe": recipe, "runner.card_metric": cfg.card.metric,
                                 "runner.card_higher_is_better": str(cfg.card.higher_is_better).lower(),
                                 "runner.machine": host.cpu_description(), "output_dir": str(recipe_dir)})
    t.flush()
    return t.run_id


def _end_parent(uri: str, parent: Optional[str], status: str) -> None:
    if not parent:
        return
    try:
        from runner.track.connect import connect

        connect(uri).set_terminated(parent, status=status)
    except Exception as e:
        log.warning("could not set the recipe's parent run %s to %s (%s)", parent, status, e)


def estimate_recipe(cfg, overrides: list[str], recipe_dir: Path, recipe: str) -> int:
    """budget.estimate_only=true: every stage priced by its own estimate (timed steps on this
    machine, nothing logged or checkpointed, in `<output_dir>/estimate/`), and the total.
    The stages are priced on the command's model: the earlier stages' exports do not exist yet,
    and a stage's weights do not change its cost."""
    total_usd, total_s, rows = 0.0, 0.0, []
    for i, st in enumerate(cfg.stages):
        if st.kind == "generate":  # its cost is its sampling, which only running it measures
            rows.append(f"  {st.name:<16} {st.kind:<8} not priced (run it: demonstrations take seconds)")
            continue
        d = recipe_dir / "estimate" / f"{i}-{st.name}"
        args = [*_config_dir_args(sys.argv[1:]), *_base_overrides(overrides, False), *KIND_OVERRIDES[st.kind],
                *st.overrides, *cfg.stage_overrides.get(st.name, []), "stages=[]", f"output_dir={d}", "budget.estimate_only=true", "budget.cap_usd=null"]
        print(f"recipe {recipe}: pricing stage {i + 1}/{len(cfg.stages)} {st.name} ({st.kind})", file=sys.stderr)
        rc = _run_stage([sys.executable, "-m", "runner", *args])
        if rc != 0:
            return rc
        est = read_json(d / "estimate.json", "run the estimate again", lambda x: None if isinstance(x, dict) else "not an object")
        total_usd, total_s = total_usd + est["usd"], total_s + est["total_s"]
        rows.append(f"  {st.name:<16} {st.kind:<5} {est['total_s'] / 60:7.1f} min  ${est['usd']:.4f}")
    cap = cfg.budget.cap_usd
    fits = "no cap" if cap is None else ("fits" if total_usd <= cap else "does NOT fit") + f" the ${cap:g} cap"
    print("\n".join([f"recipe {recipe} estimate (stages priced on {cfg.model.name}):", *rows,
                      f"  {'total':<22} {total_s / 60:7.1f} min  ${total_usd:.4f} -> {fits}"]))
    return 0


def stage_key(previous: str, args: list[str]) -> str:
    """A stage's identity in a sweep: what it runs with (the same args, the tags and parent
    aside) and the identity of the stage before it, so jobs that differ only in a later
    stage (the RL stage's seed) share every stage before it."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps([previous, args]).encode()).hexdigest()[:12]


@contextlib.contextmanager
def _claimed(stage_dir: Optional[Path]) -> Iterator[None]:
    """Hold a sweep's shared stage while this job runs it: an exclusive lock on a file beside
    the stage's dir, taken before the stage starts (the stage's own lock inside its dir is
    taken only once its process is up, too late for two jobs that reach the stage at the same
    moment: the second would be refused). Another job waits here until the stage is done,
    then runs it again, and it ends at once as finished (or resumes it, if this job died)."""
    if stage_dir is None:
        yield
        return
    import fcntl

    stage_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(stage_dir.parent / f".{stage_dir.name}.claim", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"recipe: stage {stage_dir.name} is being run by another job of this sweep; waiting",
                  file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _note_stage_run(uri: str, parent: Optional[str], stage_runs: list[str]) -> None:
    """The parent's list of its stages' runs: a stage shared in a sweep is another parent's child."""
    import json

    if parent:
        try:
            from runner.track.connect import connect

            connect(uri).set_tag(parent, "runner.stage_runs", json.dumps(stage_runs))
        except Exception as e:
            log.warning("could not tag the recipe's parent run with its stages (%s)", e)


def check_stages(cfg, overrides: list[str]) -> None:
    """Every stage's config composed and validated before the first stage runs: a bad override
    in the last stage is refused now, in one line naming the stage, not after an hour of the
    others. (Files a stage will read, like the previous stage's export, are its own preflight's.)"""
    from hydra import compose

    from runner.config import validate

    for i, st in enumerate(cfg.stages):
        if st.kind == "generate":  # its own keys are runner.generate's, checked when it starts
            continue
        args = [*_base_overrides(overrides, False), *KIND_OVERRIDES[st.kind], *st.overrides,
                *cfg.stage_overrides.get(st.name, []), "stages=[]"]
        try:
            validate(compose(config_name="config", overrides=args))
        except ConfigError as e:
            raise ConfigError(f"stages[{i}] ({st.name}): {e}") from None
        except Exception as e:  # Hydra's own: an override of a key or group that does not exist
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"stages[{i}] ({st.name}): {why}") from None


def run_recipe(cfg, overrides: list[str], recipe_dir: Path, shared_root: Optional[Path] = None) -> int:
    """Run (or resume) the recipe's stages in order; returns the process's exit code.
    `shared_root` (a sweep's `<sweep dir>/stages`): stages live there under their content
    key (`<i>-<name>-<key>`), so the sweep's jobs share the stages they have in common;
    otherwise under the recipe's own dir as `<i>-<name>`, where a changed stage is refused."""
    from runner.track.store import resolve_uri

    check_stages(cfg, overrides)
    recipe_dir.mkdir(parents=True, exist_ok=True)
    uri = resolve_uri(cfg.tracking.uri)
    recipe = next((o.split("=", 1)[1] for o in overrides if o.startswith("recipe=")), "staged")
    if cfg.budget.estimate_only:
        return estimate_recipe(cfg, [o for o in overrides if not o.startswith("budget.estimate_only")],
                               recipe_dir, recipe)
    state_path = recipe_dir / STATE_FILE
    state = read_json(state_path, REMEDY, _state_shape) or {"parent_run_id": None, "stages": {}}
    if state["parent_run_id"] is None:
        state["parent_run_id"] = _start_parent(cfg, recipe, recipe_dir, uri)
        state["tracking_uri"] = uri
        write_json_atomic(state_path, state)
    elif state.get("tracking_uri") not in (None, uri):
        raise ConfigError(f"{state_path}: this recipe logs to {state['tracking_uri']}, this command to {uri}; pass "
                          f"tracking.uri={state['tracking_uri']}, or use another output_dir")
    parent = state["parent_run_id"]
    spent, previous, key, stage_runs, data = 0.0, None, "", [], None
    tokens_left = cfg.train.max_generated_tokens  # the recipe's sampling budget (None: none)
    for i, st in enumerate(cfg.stages):
        args = [*_config_dir_args(sys.argv[1:]), *_base_overrides(overrides, previous is not None),
                *KIND_OVERRIDES[st.kind], *st.overrides, *cfg.stage_overrides.get(st.name, [])]
        if tokens_left is not None and st.kind in ("rl", "generate"):
            if tokens_left <= 0:
                print(f"recipe: the {cfg.train.max_generated_tokens} generated-token budget is spent after {i} "
                      f"stage(s); stage {st.name} not run", file=sys.stderr)
                _write_card(parent, uri, recipe_dir)
                _end_parent(uri, parent, "FINISHED")
                return 0
            if st.kind == "rl":
                args.append(f"train.max_generated_tokens={tokens_left}")
        if previous is not None:
            args += ["model=pretrained", f"model.path={previous}"]
        if st.kind == "sft" and data is not None and not any(a.startswith("sft.data=") for a in args):
            args.append(f"sft.data={data}")  # the file the generate stage before it wrote
        key = stage_key(key, [a for a in args if not a.startswith("budget.")])
        stage_dir = shared_root / f"{i}-{st.name}-{key}" if shared_root else recipe_dir / f"{i}-{st.name}"
        if cfg.budget.cap_usd is not None:
            left = cfg.budget.cap_usd - spent
            if left <= 0:
                print(f"recipe: the ${cfg.budget.cap_usd:g} cap is spent after {i} stage(s) (${spent:.4f}); "
                      f"stage {st.name} not run", file=sys.stderr)
                _write_card(parent, uri, recipe_dir)  # the stages that ran, as a token-budget stop has it
                _end_parent(uri, parent, "FINISHED")
                return 0
            args.append(f"budget.cap_usd={left:.6g}")
        tags = {"runner.stage": st.name, "runner.stage_index": str(i), "runner.stage_kind": st.kind}
        command = f"python -m {'runner.generate' if st.kind == 'generate' else 'runner'} " + " ".join(
            shlex.quote(a) for a in args)
        tags["command"] = command
        module = "runner.generate" if st.kind == "generate" else "runner"
        if st.kind == "generate":
            stage_dir.mkdir(parents=True, exist_ok=True)
            args.append(f"generate.out={stage_dir / DATA_FILE}")
        args += ["stages=[]", f"output_dir={stage_dir}", f"tracking.uri={uri}",
                 f"++tracking.tags={{{', '.join(f'{k}: {_yaml(v)}' for k, v in tags.items())}}}"]
        if parent:
            args.append(f"tracking.parent_run_id={parent}")
        print(f"recipe {recipe}: stage {i + 1}/{len(cfg.stages)} {st.name} ({st.kind}) in {stage_dir}", file=sys.stderr)
        with _claimed(stage_dir if shared_root else None):
            rc = _run_stage([sys.executable, "-m", module, *args])
        state["stages"][st.name] = {"dir": str(stage_dir), "returncode": rc}
        write_json_atomic(state_path, state)
        if rc != 0:
            print(f"recipe {recipe}: stage {st.name} exited {rc}; the same command resumes it (finished stages "
                  f"are not run again)", file=sys.stderr)
            _end_parent(uri, parent, "KILLED" if rc == 130 else "FAILED")
            return rc
        if st.kind == "generate":
            data = stage_dir / DATA_FILE
        client, run = _child(uri, stage_dir, generated=st.kind == "generate")
        if run is not None:
            spent += float(run.data.tags.get("total_usd", 0.0))
            _log_sample_count(client, run, cfg.card.metric)
            stage_runs.append(run.info.run_id)
            _note_stage_run(uri, parent, stage_runs)
        if tokens_left is not None:
            tokens_left -= _stage_tokens(stage_dir, st.kind, run)
        exported = stage_dir / "hf_model"
        previous = exported if exported.is_dir() else previous
    _write_card(parent, uri, recipe_dir)
    _end_parent(uri, parent, "FINISHED")
    return 0


def _provenance(stage_dir: Path) -> dict:
    """A generate stage's record of its data ({} if it has none)."""
    from runner.generate import provenance_path

    found = read_json(provenance_path(stage_dir / DATA_FILE), REMEDY, lambda x: None if isinstance(x, dict) else "not an object")
    return found or {}


def _stage_tokens(stage_dir: Path, kind: str, run) -> int:
    """What a finished stage sampled: a generate stage's count from its data's provenance (kept
    beside the file, whatever the store holds), an RL stage's from its run's last
    tokens/generated_total; other stages sample only to evaluate, which counts nowhere."""
    if kind == "generate":
        prov = _provenance(stage_dir)
        return int(prov.get("generated_tokens", 0))
    if kind == "rl" and run is not None:
        return int(run.data.metrics.get("tokens/generated_total", 0.0))
    return 0


def _run_stage(cmd: list[str]) -> int:
    """The stage's job, with Ctrl-C and SIGTERM left to it: a terminal's Ctrl-C reaches it
    anyway (same process group), a SIGTERM sent to the recipe is passed on; either way the
    stage stops after its step and checkpoints, as a single job does, and the recipe waits."""
    import signal

    proc = subprocess.Popen(cmd)
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_term = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


def _yaml(v: str) -> str:
    """A tag value as a quoted Hydra override string."""
    return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _log_sample_count(client, run, metric: str) -> None:
    """`<metric>_n` for the card, where the stage's evaluation says how many samples it drew."""
    m = run.data.metrics
    if metric in m and f"{metric}_n" not in m:
        n = m.get("eval/samples")
        if n is not None:
            step = max((x.step for x in client.get_metric_history(run.info.run_id, metric)), default=0)
            client.log_metric(run.info.run_id, f"{metric}_n", float(n), step=step)


def _write_card(parent: Optional[str], uri: str, recipe_dir: Path) -> None:
    if not parent:
        print("recipe: no parent run (MLflow unreachable at the start): no card; the stages' runs are complete",
              file=sys.stderr)
        return
    from runner.track import card

    try:
        c = card.from_mlflow(parent, uri)
        md, png = card.write(c, recipe_dir, uri)
        print(f"recipe card: {md}", file=sys.stderr)
    except Exception as e:  # the card is a report: its failure must not undo the stages
        log.warning("recipe card not written (%s); rebuild it with `python -m runner.track.card --parent %s`", e,
                    parent)
