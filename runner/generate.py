"""`python -m runner.generate [overrides] generate.source=demonstrations|rejection generate.out=FILE`:
data generation as a stage. It writes a dataset file that a later SFT stage trains on with
`sft.data=FILE`, and says where the file came from.

    python -m runner.generate env=wordle generate.source=demonstrations generate.n=512 generate.out=wordle.jsonl
    python -m runner.generate env=math model=qwen2_5_0_5b_instruct rollout.max_new_tokens=256 \\
        generate.source=rejection generate.prompts=256 generate.k=8 generate.min_reward=1 generate.out=star.jsonl
    python -m runner env=wordle algo=sft sft.data=wordle.jsonl

The overrides are the main job's (`python -m runner`): the same conf/, composed and validated
the same way (`--config-dir DIR` adds a config dir of yours). The keys of this stage are
`generate.*` (also accepted as `+generate.*`), taken out before composing:

    source        demonstrations: the environment's expert, env.demonstrations(n, seed)
                  rejection: K samples per prompt from the run's model (`model=`, `model.path=`),
                  scored by the environment's own score (a game played turn by turn), the best
                  kept: STaR / RFT / expert iteration
    out           the JSONL file to write; its directory must exist
    n             demonstrations: how many (1024)
    prompts       rejection: how many prompts, env.prompts(0, prompts) (64)
    k             rejection: samples per prompt (8)
    min_reward    keep rows scoring >= this (both sources)
    top_fraction  rejection: keep the best ceil(top_fraction * k) distinct rows of each prompt
    dedup         one row per distinct prompt + text (default: true for rejection; false for
                  demonstrations, whose repeats are the distribution they teach)
    batch_prompts rejection: prompts per sampling call (8)
    overwrite     replace an existing file made by another request (false)

Rejection needs one of min_reward and top_fraction. The rows are what runner/loop/sft_step.py
`from_rows` reads back as the same examples: single-turn `{"prompt": [{role, content}...],
"completion": TEXT, "reward": R}`, TEXT what the model writes after the environment's
assistant prefix; a game `{"messages": [prompt messages..., assistant turn, user reply, ...,
assistant turn], "reward": R}`, the replies the environment's. Beside the file,
`FILE.provenance.json` records the request (source, env and its config, model, rollout,
seed, the generate keys), the counts (rows, sampled, dropped by reward and as duplicates, the tokens sampled),
the mean reward of the kept rows, the command, time, runner commit and the file's SHA-256;
the stage is an MLflow run of its own (tag runner.stage_kind=generate) with the file as its
dataset input and both files as artifacts.

Bad input (an unknown generate key, k < 1, min_reward with top_fraction, a directory that
does not exist, an existing file without overwrite) is one line and exit 2, before any model
loads. The same command again, where the file and its provenance are those of the same
request, says "already generated" and exits 0: a resumed recipe skips the stage.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from runner.config import ConfigError
from runner.generate_rows import NothingKept, Outcome, make_rows  # noqa: F401  (NothingKept: raised through generate())

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
FORMAT = "runner.generate/1"
PROVENANCE = ".provenance.json"
SOURCES = ("demonstrations", "rejection")
# what each source defaults the keys it reads to; a key only one source reads is refused with the other
DEFAULTS = {"demonstrations": {"n": 1024, "dedup": False},
            "rejection": {"prompts": 64, "k": 8, "batch_prompts": 8, "dedup": True}}
ONLY = {"n": "demonstrations", "prompts": "rejection", "k": "rejection", "top_fraction": "rejection",
        "batch_prompts": "rejection"}
# the parts of a provenance that say what was asked for: equal ones make the same file
REQUEST_KEYS = ("format", "source", "env", "model", "rollout", "seed", "generate")


@dataclass
class GenerateConfig:
    """The `generate.*` keys (None: the source's default, see DEFAULTS)."""

    source: Optional[str] = None
    out: Optional[str] = None
    n: Optional[int] = None
    prompts: Optional[int] = None
    k: Optional[int] = None
    min_reward: Optional[float] = None
    top_fraction: Optional[float] = None
    dedup: Optional[bool] = None
    batch_prompts: Optional[int] = None
    overwrite: bool = False

    def get(self, key: str) -> Any:
        """A key's value, the source's default where it was not given."""
        value = getattr(self, key)
        return DEFAULTS.get(self.source or "", {}).get(key) if value is None else value

    def settings(self) -> dict[str, Any]:
        """The keys this source reads, defaults filled in: what the provenance records and a
        re-run compares (out and overwrite say where and whether, not what)."""
        keys = ["n"] if self.source == "demonstrations" else ["prompts", "k", "batch_prompts", "top_fraction"]
        return {k: self.get(k) for k in [*keys, "min_reward", "dedup"]}


# -- the request: parsed and checked before anything loads ----------------------------------

def split_args(argv: Sequence[str]) -> tuple[list[str], dict[str, Any], Optional[str], str]:
    """(the main job's overrides, the generate keys as {key: value}, --config-dir,
    --config-name: a recipe's stage gets the command's own, e.g. a sweep file's). Values are
    read with Hydra's own override grammar, so `generate.k=4` is 4 and `=null` None."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    overrides: list[str] = []
    node: dict[str, Any] = {}
    config_dir, config_name = None, "config"
    args = list(argv)
    parser = None
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--config-dir":
            if i + 1 >= len(args):
                raise ConfigError("--config-dir: give a directory")
            config_dir, i = args[i + 1], i + 2
            continue
        if a.startswith("--config-dir="):
            config_dir, i = a.split("=", 1)[1], i + 1
            continue
        if a in ("--config-name", "-cn"):
            if i + 1 >= len(args):
                raise ConfigError(f"{a}: give a config name")
            config_name, i = args[i + 1], i + 2
            continue
        if a.startswith("--config-name="):
            config_name, i = a.split("=", 1)[1], i + 1
            continue
        i += 1
        if not a.lstrip("+").startswith("generate.") and a.lstrip("+").split("=", 1)[0] != "generate":
            overrides.append(a)
            continue
        parser = parser or OverridesParser.create()
        try:
            o = parser.parse_override(a.lstrip("+"))
        except HydraException as e:
            raise ConfigError(f"{a}: not an override of the form generate.key=value "
                              f"({str(e).strip().splitlines()[0]})") from None
        key = o.key_or_group.removeprefix("generate.")
        if o.key_or_group == "generate" or o.is_delete() or not o.value_type:
            raise ConfigError(f"{a}: give one key at a time, generate.key=value")
        node[key] = o.value()
    return overrides, node, config_dir, config_name


def parse_generate(node: dict[str, Any]) -> GenerateConfig:
    """The generate keys as a GenerateConfig; an unknown key or a mistyped value is one line
    naming it, as the main job's keys are (runner.config)."""
    from runner.config import _build

    return _build(GenerateConfig, node, "generate")


def check_generate(gen: GenerateConfig) -> None:
    """The request on its own: refused in one line (a ConfigError, exit 2) before any model loads."""
    if gen.source not in SOURCES:
        raise ConfigError(f"generate.source={gen.source!r}: must be one of {', '.join(SOURCES)}")
    if not gen.out:
        raise ConfigError("generate.out: missing; give the JSONL file to write, e.g. generate.out=data.jsonl")
    for key, source in ONLY.items():
        if getattr(gen, key) is not None and gen.source != source:
            raise ConfigError(f"generate.{key}={getattr(gen, key)!r}: only with generate.source={source}")
    for key in ("n", "prompts", "k", "batch_prompts"):
        value = getattr(gen, key)
        if value is not None and value < 1:
            raise ConfigError(f"generate.{key}={value!r}: must be an integer >= 1")
    if gen.min_reward is not None and gen.top_fraction is not None:
        raise ConfigError(f"generate.min_reward={gen.min_reward!r} and generate.top_fraction={gen.top_fraction!r}: "
                          f"give one of them, not both")
    if gen.min_reward is not None and not math.isfinite(gen.min_reward):
        raise ConfigError(f"generate.min_reward={gen.min_reward!r}: must be a finite number")
    if gen.top_fraction is not None and not 0 < gen.top_fraction <= 1:
        raise ConfigError(f"generate.top_fraction={gen.top_fraction!r}: must be in (0, 1]")
    if gen.source == "rejection" and gen.min_reward is None and gen.top_fraction is None:
        raise ConfigError("generate.source=rejection: give generate.min_reward=R (keep rows scoring >= R) or "
                          "generate.top_fraction=F (the best F of each prompt's k samples)")
    out = out_path(gen)
    if not out.parent.is_dir():
        raise ConfigError(f"generate.out={gen.out}: directory {out.parent} does not exist")
    if out.is_dir():
        raise ConfigError(f"generate.out={gen.out}: is a directory; give a file name")


def check_run(cfg, env, gen: GenerateConfig) -> None:
    """The request against the run's config and environment."""
    if gen.source == "demonstrations" and not callable(getattr(env, "demonstrations", None)):
        raise ConfigError(f"generate.source=demonstrations: env {cfg.env.name!r} has no demonstrations(n, seed); "
                          f"use generate.source=rejection")
    if gen.source == "rejection":
        if cfg.rollout.name != "hf":
            raise ConfigError(f"rollout.name={cfg.rollout.name!r}: generate samples with rollout=hf")
        if cfg.rollout.strategy != "independent":
            raise ConfigError(f"rollout.strategy={cfg.rollout.strategy!r}: generate samples k independent "
                              f"completions per prompt; use rollout.strategy=independent")


def out_path(gen: GenerateConfig) -> Path:
    return Path(gen.out).expanduser().absolute()


def provenance_path(out: Path) -> Path:
    return out.with_name(out.name + PROVENANCE)


def _plain(value: Any) -> Any:
    """JSON's view of a value (tuples as lists, keys as strings): how a provenance reads back."""
    return json.loads(json.dumps(value, default=str))


def request(cfg, gen: GenerateConfig) -> dict[str, Any]:
    """What was asked for: equal requests make the same file (the run is seeded)."""
    sampling = gen.source == "rejection"
    model = {"name": cfg.model.name, "path": cfg.model.path, "config": dataclasses.asdict(cfg.model)}
    return _plain({
        "format": FORMAT, "source": gen.source,
        "env": {"name": cfg.env.name, "config": dataclasses.asdict(cfg.env)},
        "model": model if sampling else None,
        "rollout": dataclasses.asdict(cfg.rollout) if sampling else None,
        "seed": cfg.seed, "generate": gen.settings(),
    })


def already_generated(out: Path, wanted: dict[str, Any]) -> Optional[dict]:
    """The provenance beside `out` where it records this same request and `out` is still the
    file it describes (same SHA-256); None otherwise (no file, another request, an edit)."""
    from runner.digests import file_sha256

    prov = provenance_path(out)
    if not out.is_file() or not prov.is_file():
        return None
    try:
        prior = json.loads(prov.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(prior, dict) or any(prior.get(k) != wanted[k] for k in REQUEST_KEYS):
        return None
    return prior if prior.get("sha256") == file_sha256(out) else None


def refuse_existing(out: Path, wanted: dict[str, Any], gen: GenerateConfig) -> None:
    """An existing file made by another request (or of unknown origin) is kept unless overwrite."""
    if not out.exists() or gen.overwrite:
        return
    prov = provenance_path(out)
    why = "has no provenance"
    try:
        prior = json.loads(prov.read_text()) if prov.is_file() else None
    except (OSError, ValueError):
        prior, why = None, "has a damaged provenance"
    if isinstance(prior, dict):
        diff = [k for k in REQUEST_KEYS if prior.get(k) != wanted[k]]
        why = f"was made by another request ({', '.join(diff)} differ)" if diff else "was changed since it was made"
    raise ConfigError(f"generate.out={out}: exists and {why}; pass generate.overwrite=true to replace it, "
                      f"or choose another file")


# -- writing -----------------------------------------------------------------------------

def git_commit() -> Optional[str]:
    """The runner checkout's commit (None outside a git checkout)."""
    try:
        r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    return r.stdout.strip() or None


def provenance(wanted: dict, out: Path, outcome: Outcome, sha256: str, command: str, tracker) -> dict[str, Any]:
    sel, sampled = outcome.selection, outcome.sampled
    return {
        **wanted,
        "data_file": str(out), "rows": len(outcome.rows), "sampled": sampled,
        "dropped": {"reward": sel.dropped_reward, "duplicate": sel.dropped_duplicate},
        "kept_frac": len(outcome.rows) / sampled if sampled else 0.0,
        "mean_reward": outcome.mean_reward, "reward_errors": outcome.reward_errors,
        "generated_tokens": outcome.generated_tokens,
        "sha256": sha256, "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runner_commit": git_commit(),
        "mlflow": {"uri": tracker.uri, "experiment": tracker.experiment, "run_id": tracker.run_id},
    }


# -- MLflow ------------------------------------------------------------------------------

def open_tracker(cfg, gen: GenerateConfig, wanted: dict):
    """This stage's own MLflow run (a recipe's child where tracking.parent_run_id is set)."""
    from runner.config import flatten
    from runner.track.store import Tracker

    t = cfg.tracking
    tracker = Tracker(t.uri, t.experiment)
    tags = {**(getattr(t, "tags", None) or {}), "runner.stage_kind": "generate", "env": cfg.env.name,
            "generate.source": gen.source, "model": cfg.model.name if gen.source == "rejection" else "none"}
    tracker.start(t.run_name or f"generate-{cfg.env.name}-{gen.source}-s{cfg.seed}", tags,
                  parent_run_id=getattr(t, "parent_run_id", None))
    tracker.log_params(flatten({k: v for k, v in wanted.items() if v is not None}))
    return tracker


def log_outcome(tracker, out: Path, prov_path: Path, prov: dict, rows: list[dict]) -> Optional[str]:
    """Metrics, the file as the run's dataset input, both files as artifacts; returns why
    MLflow did not get them (None: it did)."""
    from runner.track.inputs import rows_schema

    tracker.log_metrics({"generate/rows": prov["rows"], "generate/kept_frac": prov["kept_frac"],
                         "generate/mean_reward": prov["mean_reward"], "generate/sampled": prov["sampled"],
                         "generate/dropped_reward": prov["dropped"]["reward"],
                         "generate/dropped_duplicate": prov["dropped"]["duplicate"],
                         "generate/reward_errors": prov["reward_errors"],
                         "tokens/generated_total": prov["generated_tokens"]}, step=0)
    tracker.set_tags({"generate.sha256": prov["sha256"], "generate.out": str(out)})
    tracker.log_artifact(out)
    tracker.log_artifact(prov_path)
    tracker.log_input(out, prov["sha256"], prov["rows"], "generated", rows_schema(rows))
    tracker.flush()
    return "MLflow is unreachable" if tracker.run_id is None else None


# -- the stage -----------------------------------------------------------------------------

def summary(prov: dict, prov_path: Path) -> str:
    return (f"generated {prov['rows']} rows ({prov['kept_frac']:.1%} of {prov['sampled']} kept; dropped "
            f"{prov['dropped']['reward']} by reward, {prov['dropped']['duplicate']} as duplicates; mean reward "
            f"{prov['mean_reward']:.3f}) -> {prov['data_file']} (provenance {prov_path}; MLflow run "
            f"{prov['mlflow']['run_id']})")


def default_command() -> str:
    return shlex.join([Path(sys.executable).name, "-m", "runner.generate", *sys.argv[1:]])


def generate(cfg, gen: GenerateConfig, command: Optional[str] = None) -> dict[str, Any]:
    """Run the stage for a validated RunConfig `cfg`: the provenance written, plus `status`
    ("generated" or "already generated") and `summary` (the line the CLI prints). Refusals
    raise ConfigError before any model loads; NothingKept where every row was dropped."""
    from runner.digests import file_sha256
    from runner.plugins import build_env
    from runner.state_files import write_json_atomic, write_text_durable

    check_generate(gen)
    out = out_path(gen)
    env = build_env(cfg.env, cfg.seed)
    check_run(cfg, env, gen)
    wanted = request(cfg, gen)
    prior = already_generated(out, wanted)
    if prior is not None:
        return {**prior, "status": "already generated",
                "summary": f"already generated: {out} ({prior['rows']} rows, sha256 {prior['sha256'][:12]}) is this "
                           f"request's; nothing to do"}
    refuse_existing(out, wanted, gen)
    tracker = open_tracker(cfg, gen, wanted)
    prov_path = provenance_path(out)
    try:
        outcome = make_rows(cfg, env, gen, out.parent)
        if not outcome.rows:
            raise NothingKept(f"generate: no row kept (of {outcome.sampled}: {outcome.selection.dropped_reward} "
                              f"dropped by reward, {outcome.selection.dropped_duplicate} as duplicates); lower "
                              f"generate.min_reward or sample more (generate.prompts, generate.k)")
        write_text_durable(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in outcome.rows))
        prov = provenance(wanted, out, outcome, file_sha256(out), command or default_command(), tracker)
        write_json_atomic(prov_path, prov)
        problem = log_outcome(tracker, out, prov_path, prov, outcome.rows)
    except BaseException as e:
        tracker.set_tags({"stop_reason": type(e).__name__})
        tracker.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    if not tracker.end("FINISHED") or problem:
        print(f"warning: MLflow at {tracker.uri} did not get all of this run ({problem or 'unreachable'}); the "
              f"data file and its provenance are complete", file=sys.stderr)
    return {**prov, "status": "generated", "summary": summary(prov, prov_path)}


def compose(overrides: list[str], config_dir: Optional[str] = None, config_name: str = "config"):
    """The validated RunConfig these overrides give `python -m runner` (runner.show_config's
    route); a Hydra composition error is one line."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from runner.config import validate
    from runner.plugins import register_entry_points

    register_entry_points()
    primary, extra = CONF, [f"hydra.searchpath=[file://{Path(config_dir).resolve()}]"] if config_dir else []
    if config_name != "config" and config_dir:  # the command's own primary config (a sweep file, say),
        # with conf/ searched for the rest, as `python -m runner --config-dir D --config-name N` has it
        primary, extra = Path(config_dir).resolve(), [f"hydra.searchpath=[file://{CONF}]"]
    try:
        with initialize_config_dir(config_dir=str(primary), version_base="1.3"):
            cfg = hydra_compose(config_name, overrides=[*overrides, *extra])
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(str(e).strip().splitlines()[0]) from None
    return validate(cfg)


def main(argv: Optional[list[str]] = None) -> int:
    from runner import host

    host.configure()  # before torch loads, as `python -m runner` does
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        overrides, node, config_dir, config_name = split_args(args)
        gen = parse_generate(node)
        check_generate(gen)  # before composing: the cheapest refusals first
        result = generate(compose(overrides, config_dir, config_name), gen,
                          command=shlex.join([Path(sys.executable).name, "-m", "runner.generate", *args]))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NothingKept as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(result["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
