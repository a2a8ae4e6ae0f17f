"""The output directory's contract: one process at a time, and a resume that is the same run
or is refused.

An output dir holds one run: its checkpoints, the resolved config it started with
(config.yaml), and a record (run_state.json) of the MLflow store and run it logs to and how
it last ended. Running a command on an existing dir resumes that run, so everything that
decides the outcome is checked here, before any model loads:

- a second process on the same dir is refused while the first holds its lock (flock: the
  kernel drops it when the holder dies, even by kill -9);
- a run that completed is not run again (exit 0, nothing touched);
- a resolved config that differs from the dir's in anything but the keys in RESUMABLE is
  refused, naming the differences; so is a different store than the one the run logs to
  (a relative default store seen from another working directory follows the record);
- `train.resume=force` resumes anyway (the differences become a tag); `never` moves the
  dir's run aside into previous/<time>/ and starts a new one. A different model is refused
  even with force: its checkpoint cannot be loaded into other weights.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from runner.config import ConfigError

log = logging.getLogger(__name__)

STATE_FILE = "run_state.json"
CONFIG_FILE = "config.yaml"
LOCK_FILE = ".runner.lock"
SPOOL_FILE = "mlflow_spool.jsonl"
JOURNAL_FILE = "mlflow_journal.jsonl"  # every tracking record of the run (runner.track.recovery)
# Keys that may change between a run and its resume: how long to go on, how often to
# evaluate/checkpoint, what may be spent, threads. Nothing that changes what a step computes
# (train.steps does reshape a decaying lr schedule: the change is recorded as a tag).
RESUMABLE = ("train.steps", "train.eval_every", "train.eval_samples", "train.final_eval_samples",
             "train.checkpoint_every", "train.keep_checkpoints", "train.background_commit", "train.sample_table_rows",
             "train.max_generated_tokens", "train.max_nonfinite_steps", "train.resume", "train.export",
             "train.keep_final_checkpoint", "train.reward_timeout_s", "train.stop_grace_s", "budget.",
             "trainer.num_threads", "tracking.flush_every", "tracking.samples_every",
             "tracking.system_metrics", "tracking.system_metrics_interval", "tracking.uri", "tracking.parent_run_id", "tracking.tags.", "output_dir", "objective", "report")


class OutputDirError(ConfigError):
    """A command the output dir's state refuses (exit 2, nothing touched)."""


class AlreadyFinished(Exception):
    """The dir's run completed; the message says where it is (exit 0)."""


# -- one process per output dir ----------------------------------------------------------
_held: dict[Path, Any] = {}


def lock(output_dir: Path) -> None:
    """Hold the dir's lock until `unlock` or the process ends; refuse if another holds it."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_FILE
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise OutputDirError(f"output_dir {output_dir} is in use by {holder}; wait for it to end, stop it, "
                             f"or choose another output_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    f.flush()
    _held[output_dir] = f


def unlock(output_dir: Path) -> None:
    f = _held.pop(output_dir, None)
    if f is not None:
        f.seek(0)
        f.truncate()
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def discard_if_unused(output_dir: Path) -> None:
    """A refused command leaves nothing behind: the dir Hydra made for it goes, with the lock
    and the log this process may have put in it, if nothing else is in it and no process holds
    its lock (a dir with anything else in it is left exactly as it is)."""
    try:
        names = {p.name for p in output_dir.iterdir()}
    except OSError:
        return
    if not names <= {LOCK_FILE, "runner.log"}:
        return
    lock_path = output_dir / LOCK_FILE
    if LOCK_FILE in names:
        with open(lock_path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # another process is starting in it
            for name in names:
                (output_dir / name).unlink(missing_ok=True)
    else:
        (output_dir / "runner.log").unlink(missing_ok=True)
    # and the default `./outputs/` if this dir was all it held; never any other parent (the
    # user's own directories, the working directory itself)
    try:
        output_dir.rmdir()
        if output_dir.parent == Path.cwd() / "outputs":
            output_dir.parent.rmdir()
    except OSError:
        pass


# -- the record ---------------------------------------------------------------------------
# the record's fields and their types: anything else in a field is damage, not data
RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "run_id": (str,), "tracking_uri": (str,), "experiment": (str,), "status": (str,), "stop_reason": (str,),
    "checkpoint_step": (int,), "final_step": (int,), "checkpoints_dropped": (bool,), "tracking_lost": (str,)}


class DamagedRecord(OutputDirError):
    """run_state.json exists but cannot be read as a record (exit 2, nothing touched)."""


def read_record(output_dir: Path) -> dict[str, Any]:
    """The dir's record; {} only when there is none. A damaged one is refused, never taken as
    absent: it names the MLflow run the dir's checkpoints belong to, and without it the same
    command would start a second run (a finished run an empty twin, a killed one split in two)."""
    path = output_dir / STATE_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, not an object")
        for key, types in RECORD_FIELDS.items():
            value = data.get(key)
            if value is not None and (not isinstance(value, types) or (bool in types) != isinstance(value, bool)):
                raise ValueError(f"{key} is {value!r}")
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        why = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise DamagedRecord(
            f"{path} is damaged ({why}); nothing was changed. It records which MLflow run this dir's checkpoints "
            f"belong to: restore it, or pass train.resume=never to keep this run's files in previous/ and start a "
            f"new run here, or use another output_dir") from None
    return data


def update_record(output_dir: Path, **fields: Any) -> None:
    """Merge fields into run_state.json atomically (a full disk leaves the old record)."""
    path = output_dir / STATE_FILE
    data = {**read_record(output_dir), **fields}
    write_text_atomic(path, json.dumps(data, indent=2))


def write_text_atomic(path: Path, text: str) -> Path:
    """Write beside `path` and rename into place: a crash or a full disk leaves the old file
    (and no temporary behind)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    return path


def has_run(output_dir: Path) -> bool:
    """Whether the dir already belongs to a tracked run (a record, or a spooled creation)."""
    return (output_dir / STATE_FILE).exists() or (output_dir / SPOOL_FILE).exists()


def has_checkpoints(output_dir: Path) -> bool:
    """Whether any checkpoint file is there (either trainer's), readable or not."""
    d = output_dir / "checkpoints"
    return d.is_dir() and (any(d.glob("ckpt-*.pt")) or any((d / "deepspeed").glob("*/COMPLETE")))


# -- the decision -------------------------------------------------------------------------
@dataclass
class Resume:
    """What this command does with its output dir."""

    action: str  # "fresh" | "resume"
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # key -> (was, now), resumable or forced
    tracking_uri: Optional[str] = None  # the store the run logs to, when the record decides it
    notes: list[str] = field(default_factory=list)


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _resumable(key: str) -> bool:
    return any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE)


def _show(v: Any) -> str:
    return json.dumps(v) if isinstance(v, str) or v is None else str(v)


def decide(output_dir: Path, config_yaml: str, mode: str, tracking_uri: Optional[str], steps: int) -> Resume:
    """Read the dir and say whether this command starts fresh or resumes; raise
    OutputDirError (refused) or AlreadyFinished. `tracking_uri` is the command's resolved
    store, `None` when the user left it to the default."""
    if not has_run(output_dir) and not (output_dir / "checkpoints").exists():
        return Resume("fresh")
    if mode == "never":
        moved = set_aside(output_dir)
        return Resume("fresh", notes=[f"train.resume=never: the previous run's files are in {moved}"])
    if not has_run(output_dir) and has_checkpoints(output_dir):
        # the record (or the spool with the run's creation) is gone: a resume would log into a new run
        raise OutputDirError(
            f"output_dir {output_dir} holds checkpoints but no {STATE_FILE} (which MLflow run they belong to); "
            f"nothing was changed: restore it, or pass train.resume=never to keep these files in previous/ and "
            f"start a new run here, or use another output_dir")
    record = read_record(output_dir)
    if (record.get("status") == "FINISHED" and record.get("stop_reason") == "completed"
            and int(record.get("final_step", -1)) >= steps):
        raise AlreadyFinished(f"output_dir {output_dir}: this run already finished at step {record['final_step']} "
                              f"(MLflow run {record.get('run_id')} in {record.get('tracking_uri')}); nothing to do. "
                              f"Raise train.steps to train further, or use another output_dir.")
    if record.get("checkpoints_dropped") and mode != "never":
        # its metrics are in MLflow up to its last step: starting over would log them twice
        raise OutputDirError(f"output_dir {output_dir}: this run completed at step {record.get('final_step')} and "
                             f"deleted its checkpoints (train.keep_final_checkpoint=false), so it cannot be "
                             f"continued; nothing was changed. train.resume=never keeps its files in previous/ "
                             f"and starts a new run here, or use another output_dir")
    res = Resume("resume")
    before_path = output_dir / CONFIG_FILE
    if before_path.exists():
        before, now = flatten(_read_config(before_path)), flatten(yaml.safe_load(config_yaml) or {})
        # keys only one side has come from another version of the schema, not from the user
        diff = {k: (before[k], now[k]) for k in sorted(set(before) & set(now)) if before[k] != now[k]}
        model = {k: v for k, v in diff.items() if k.startswith("model.")}
        if model:
            raise OutputDirError(f"output_dir {output_dir} holds a run of another model ({_listing(model)}); its "
                                 f"checkpoint cannot be loaded into these weights: use another output_dir")
        hard = {k: v for k, v in diff.items() if not _resumable(k)}
        if hard and mode != "force":
            raise OutputDirError(f"output_dir {output_dir} holds a run with a different config: {_listing(hard)}. "
                                 f"Use the original command or another output_dir; train.resume=force resumes "
                                 f"with the new values, train.resume=never starts a new run here")
        res.changes = {k: v for k, v in diff.items() if k not in ("tracking.uri", "output_dir")}
    was = record.get("tracking_uri")
    if was:
        if tracking_uri is None:
            res.tracking_uri = was  # the run's own store, wherever this command runs from
        elif tracking_uri != was and mode != "force":
            raise OutputDirError(f"output_dir {output_dir} logs to MLflow at {was}, this command to {tracking_uri}; "
                                 f"pass tracking.uri={was} (or train.resume=force to copy the run into "
                                 f"{tracking_uri} and continue it there)")
        elif tracking_uri != was and not journaled(output_dir):
            raise OutputDirError(f"train.resume=force into {tracking_uri}: output_dir {output_dir} has no tracking "
                                 f"journal ({JOURNAL_FILE}, written since runner's journals) to copy its run in {was} "
                                 f"from, so the new store would hold the later steps only; nothing was changed: pass "
                                 f"tracking.uri={was}, or train.resume=never to start a new run here")
    return res


def journaled(output_dir: Path) -> bool:
    """Whether the dir's tracking journal holds the run's creation (so the run can be copied)."""
    path = output_dir / JOURNAL_FILE
    try:
        with open(path, "rb") as f:
            for line in f:
                try:
                    if json.loads(line).get("op") == "create":
                        return True
                except (ValueError, AttributeError):
                    continue
    except OSError:
        pass
    return False


def _read_config(path: Path) -> dict:
    """The config the dir's run started with: what a resume is compared against, so a damaged
    one is refused (taken as empty, every difference would go unseen)."""
    try:
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"a YAML {type(data).__name__}, not a config")
        return data
    except (OSError, ValueError, yaml.YAMLError) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise OutputDirError(f"{path} is damaged ({why}); nothing was changed. A resume is checked against it: "
                             f"restore it, or pass train.resume=never to keep this run's files in previous/ and start "
                             f"a new run here") from None


def check_loaded(output_dir: Path, state: Optional[dict], problems: list[str], mode: str) -> str:
    """After the checkpoints were read (the part of the decision that needs them): refuse a
    resume that would log steps into the MLflow run twice; return the note for a forced one."""
    written = int(read_record(output_dir).get("checkpoint_step", 0))
    why = "; ".join(problems)
    if state is None and written > 0:
        # starting over would log steps 1..N into the MLflow run a second time
        raise OutputDirError(
            f"output_dir {output_dir}: checkpoints up to step {written} were written, none is readable "
            f"({why or 'none left'}); nothing was changed. train.resume=never keeps these "
            f"files in previous/ and starts a new run here, or use another output_dir")
    if state is None or state["step"] >= written:
        return ""
    # MLflow holds steps up to `written`: going on from an older checkpoint logs some twice
    step = state["step"]
    if mode != "force":
        raise OutputDirError(
            f"output_dir {output_dir}: the newest readable checkpoint is at step {step} ({why}), but MLflow "
            f"holds steps up to {written}: resuming would log steps {step + 1}-{written} twice. "
            f"train.resume=force does that (tagged on the run), train.resume=never starts a new run here; "
            f"nothing was changed")
    return f"fell back from step {written} to {step} ({why}); steps {step + 1}-{written} are logged twice"


def _listing(diff: dict[str, tuple[Any, Any]], most: int = 4) -> str:
    items = [f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in diff.items()]
    more = f" (and {len(items) - most} more)" if len(items) > most else ""
    return ", ".join(items[:most]) + more


OVERRIDES_FILE = "overrides.yaml"


def record_command(output_dir: Path, overrides: list[str], action: str) -> Path:
    """Append this command's overrides to the dir's history of commands (overrides.yaml): what
    started the run and what each resume changed on the command line (Hydra's own
    .hydra/overrides.yaml is off: a refused start would overwrite it)."""
    path = output_dir / OVERRIDES_FILE
    history = _read_history(path)
    history.append({"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "action": action, "overrides": list(overrides)})
    return write_text_atomic(path, yaml.safe_dump(history, sort_keys=False))


def _read_history(path: Path) -> list:
    """The dir's command history. A damaged one (not YAML, not a list of entries) is kept
    beside it as `<name>.damaged-<time>` and a new history starts with a note saying so:
    the history explains a run, it does not decide one, so it costs no refusal, but it is
    never overwritten as if it had been empty."""
    if not path.exists():
        return []
    try:
        history = yaml.safe_load(path.read_text())
        if isinstance(history, list) and all(isinstance(h, dict) for h in history):
            return history
        why = f"a YAML {type(history).__name__}, not a list of commands"
    except (OSError, ValueError, yaml.YAMLError) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0][:120]
    kept = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, kept)
    log.warning("%s was damaged (%s): kept as %s, a new history starts here", path, why, kept.name)
    return [{"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "action": "history damaged", "overrides": [],
             "kept_as": kept.name}]


def set_aside(output_dir: Path) -> Path:
    """Move the dir's run (record, spool, config, checkpoints, artifacts) into previous/<time>/;
    a rename within one filesystem, so nothing is copied or lost."""
    dest = output_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=False)
    for p in list(output_dir.iterdir()):
        if p.name in ("previous", LOCK_FILE, "runner.log"):
            continue
        shutil.move(str(p), str(dest / p.name))
    return dest
