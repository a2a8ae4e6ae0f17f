"""Issue 18's fault-injection cases: what a command line can get wrong fails before any model
loads, with exit code 2 and a first stderr line naming the key (and what is allowed), and
touches nothing.

Every refused command runs the real CLI in the directory of an earlier tiny run (built once
for this module) with that run's output_dir: a command that slipped through would resume,
extend or overwrite that run. After each one the whole directory (output dir, mlruns.db,
artifacts, the runner cache with its start-up record) must be byte-identical, which also
means no MLflow run was created.

Time limit: a refused command imports neither transformers nor MLflow (only torch, for
trainer.device=cuda) and takes 1.5-7 s here on 2 cores busy with other jobs; loading even the
tiny model and opening MLflow takes >= 17 s on this machine (the issue's measurements), so
15 s tells "failed in the pre-load checks" from "failed after loading" with a 2x margin.
"""

import hashlib
import importlib.util
import json
import math
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import CONF, run_cli

LIMIT_S = 15
# the earlier run: everything small, so it takes seconds
TINY = ["model=tiny", "train.steps=1", "train.eval_every=0", "train.eval_samples=4", "train.final_eval_samples=4",
        "algo.group_size=2", "train.prompts_per_step=1", "rollout.max_new_tokens=4"]


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root with its content hash (links and folders by kind, not followed)."""
    seen = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(d) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                seen[rel] = "link -> " + os.readlink(p)
            elif p.is_dir():
                seen[rel] = "dir"
            else:
                seen[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return seen


@pytest.fixture(scope="module")
def earlier(tmp_path_factory):
    """A finished tiny run: its output dir, its MLflow store, and a runner cache of its own
    (whose start-up record that run wrote; the converted tokenizer is linked from the real
    cache, so nothing is converted again) and an empty Hugging Face cache."""
    from runner.models import cache_dir

    base = tmp_path_factory.mktemp("bad_input")
    cache = base / "runner_cache"
    cache.mkdir()
    if (cache_dir() / "models").is_dir():
        (cache / "models").symlink_to(cache_dir() / "models")
    (base / "hf_hub").mkdir()
    env = {"RUNNER_CACHE_DIR": str(cache), "HF_HUB_CACHE": str(base / "hf_hub")}
    out = base / "out"
    r = run_cli([*TINY, f"output_dir={out}"], cwd=base, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (base / "mlruns.db").exists() and (out / "checkpoints").exists()
    return SimpleNamespace(base=base, out=out, env=env, cache=cache)


def refused(e, bad, first, out=None, env=None):
    """Run TINY with `bad` overrides (replacing TINY's values of the same keys) on the earlier
    run's dir; assert exit 2, the first stderr line, the time, and that nothing changed."""
    keys = {a.split("=")[0].lstrip("+~") for a in bad if "=" in a}
    flags = [a for a in bad if a.startswith("-")]  # -m: before the overrides
    args = [*flags, *(a for a in TINY if a.split("=")[0] not in keys), *(a for a in bad if a not in flags),
            f"output_dir={out or e.out}"]
    before = snapshot(e.base)
    t = time.monotonic()
    r = run_cli(args, cwd=e.base, env={**e.env, **(env or {})}, timeout=120)
    took = time.monotonic() - t
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    line = r.stderr.splitlines()[0]
    assert line.startswith(f"error: {first}"), line
    assert took < LIMIT_S, f"{took:.1f} s: {line}"
    assert snapshot(e.base) == before
    return line


# -- 12: a config group given several options ----------------------------------------------
@pytest.mark.parametrize("group,given,shown", [("env", "[dice,math]", "[dice, math]"),
                                               ("algo", "[grpo,dapo]", "[grpo, dapo]"),
                                               ("model", "[tiny,smollm2_135m]", "[tiny, smollm2_135m]")])
def test_a_group_takes_one_option(earlier, group, given, shown):
    line = refused(earlier, [f"{group}={given}"], f"{group}: pick one, got {shown}; allowed: ")
    assert all(o in line for o in options(group)), line


def test_a_group_takes_one_option_in_a_multirun_too(earlier):
    # before the sweep callback makes a parent MLflow run or a sweep dir
    refused(earlier, ["-m", "env=[dice,math]"], "env: pick one, got [dice, math]; allowed: ")


# -- 13: CUDA and the seed -----------------------------------------------------------------
def _cuda():
    from runner.preflight import cuda_visible

    return cuda_visible()


@pytest.mark.parametrize("bad", [["trainer.device=cuda"], ["trainer=deepspeed", "trainer.device=cuda"]])
def test_cuda_without_a_gpu(earlier, bad):
    if _cuda():
        pytest.skip("a CUDA GPU is visible here")
    if "trainer=deepspeed" in bad and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (that is refused first)")
    line = refused(earlier, bad, "trainer.device='cuda': ")
    assert "allowed here: auto, cpu" in line


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_seed_range(earlier, seed):
    refused(earlier, [f"seed={seed}"], f"seed={seed}: must be an integer in [0, 4294967295]")


# -- 14: model.path ------------------------------------------------------------------------
def test_model_path_that_is_a_file(earlier, tmp_path):
    f = tmp_path / "hostname"
    f.write_text("box\n")
    line = refused(earlier, [f"model.path={f}"], f"model.path='{f}': is a file, not a directory")
    assert "config.json" in line


def test_model_path_without_model_files(earlier, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = refused(earlier, [f"model.path={empty}"], f"model.path='{empty}': that directory lacks config.json, ")
    assert "weights" in line and "tokenizer" in line
    (empty / "config.json").write_text("{}")
    (empty / "model.safetensors").write_text("")
    refused(earlier, [f"model.path={empty}"], f"model.path='{empty}': that directory lacks a tokenizer")


def test_model_path_hub_id_not_in_the_cache(earlier):
    """No hub retries (55 s before): the cache lookup alone, well inside the time limit."""
    line = refused(earlier, ["model.path=org/x"], "model.path='org/x': not a directory here and not in the local "
                                                  "Hugging Face cache")
    assert "hf download org/x" in line and str(earlier.base / "hf_hub") in line


def test_a_cached_hub_id_is_found_without_network(tmp_path):
    from runner.config import ConfigError
    from runner.preflight import check_model_dir, hub_snapshot

    snap = tmp_path / "models--org--m" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (tmp_path / "models--org--m" / "refs").mkdir()
    (tmp_path / "models--org--m" / "refs" / "main").write_text("abc123")
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (snap / name).write_text("{}")
    assert hub_snapshot("org/m", cache_dir=str(tmp_path)) == snap
    assert hub_snapshot("org/other", cache_dir=str(tmp_path)) is None
    check_model_dir("model.path", "org/m", snap, need_tokenizer=True, cached=True)
    (snap / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=r"^model.path='org/m': its cached snapshot .* lacks a tokenizer"):
        check_model_dir("model.path", "org/m", snap, need_tokenizer=True, cached=True)


# -- 15: tracking.uri ----------------------------------------------------------------------
def test_tracking_uri_scheme(earlier):
    line = refused(earlier, ["tracking.uri=notascheme://x"],
                   "tracking.uri='notascheme://x': MLflow has no tracking store for the scheme 'notascheme'; allowed: ")
    assert "sqlite:///" in line and "http(s)://" in line


def test_tracking_uri_sqlite_needs_its_directory(earlier, tmp_path):
    uri = f"sqlite:///{tmp_path}/no/such/dir/mlruns.db"
    refused(earlier, [f"tracking.uri={uri}"], f"tracking.uri='{uri}': the directory {tmp_path}/no/such/dir does not exist")


def test_tracking_uri_from_the_environment(earlier):
    refused(earlier, [], "MLFLOW_TRACKING_URI='bogus://y': MLflow has no tracking store", env={"MLFLOW_TRACKING_URI": "bogus://y"})


def test_schemes_are_the_installed_mlflows():
    """The scheme list (kept in runner/preflight/: importing MLflow's registry takes seconds)
    is what the installed MLflow registers."""
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    from runner.preflight import tracking_schemes

    assert set(tracking_schemes()) == set(_tracking_store_registry._registry)


# -- 16: output_dir ------------------------------------------------------------------------
def test_output_dir_that_is_a_file(earlier, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    refused(earlier, [], f"output_dir='{f}': is a file, not a directory", out=f)
    assert f.read_text() == "keep me"


def test_output_dir_that_cannot_be_created(earlier, tmp_path):
    """Under a regular file (root ignores permission bits, not this)."""
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    refused(earlier, [], f"output_dir='{f}/run': cannot be created: {f} is a file", out=f / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# -- 17: numbers ---------------------------------------------------------------------------
@pytest.mark.parametrize("bad,first", [
    (["algo.lr=inf"], "algo.lr=inf: must be a finite number"),
    (["algo.lr=nan"], "algo.lr=nan: not a number"),
    (["algo.clip_high=nan"], "algo.clip_high=nan: not a number"),
    (["budget.usd_per_device_hour=inf"], "budget.usd_per_device_hour=inf: must be a finite number"),
    (["rollout.temperature=0.001"], "rollout.temperature=0.001: must be a finite number >= 0.01"),
    (["rollout.temperature=inf"], "rollout.temperature=inf: must be a finite number"),
    # the tiny model's context is 2048 and the dice prompt, chat template included, 48 tokens
    (["rollout.max_new_tokens=2040"], "rollout.max_new_tokens=2040: with the prompt ("),
    (["train.eval_samples=1000000000"], "train.eval_samples=1000000000: one generation batch of 1000000000 rows"),
    (["train.final_eval_samples=1000000000"], "train.final_eval_samples=1000000000: one generation batch of "),
    # a held-out set is sampled train.eval_rows rollouts at a time: whole prompts, at least one
    (["env=wordle", "env.eval_k=100000000", "train.eval_rows=1000000000"],
     "train.eval_rows=1000000000 (env.eval_k=100000000 x 32 held-out prompts): one generation batch of 1000000000 rows"),
    (["env=wordle", "env.eval_k=1000000000"], "train.eval_rows=64 (env.eval_k=1000000000 x 32 held-out prompts): "
     "one generation batch of 1000000000 rows"),
    (["train.eval_rows=0"], "train.eval_rows=0: must be >= 1"),
    (["algo.group_size=100000", "train.prompts_per_step=100000"],
     "algo.group_size x train.prompts_per_step=100000x100000: one generation batch of 10000000000 rows"),
    (["tracking.experiment=''"], "tracking.experiment='': must be a non-empty"),
    (["env.prompt=''"], "env.prompt='': must be a non-empty"),
])
def test_numbers_and_names(earlier, bad, first):
    line = refused(earlier, bad, first)
    if "max_new_tokens" in first:
        assert "context of 2048" in line and "at most" in line
    if "generation batch" in first:
        assert "KV cache" in line and "GiB" in line


@pytest.mark.parametrize("bad,first", [
    # TRL's and verl's names get the key they mean, before Hydra's five-line "Could not override"
    (["algo.beta=0.1"], "algo.beta: not a key of this runner; did you mean algo.kl.coef (TRL: beta)?"),
    (["per_device_train_batch_size=8"], "per_device_train_batch_size: not a key of this runner; did you mean "
                                        "train.prompts_per_step (TRL: per_device_train_batch_size; TRL counts completions"),
    (["+num_generations=8"], "num_generations: not a key of this runner; did you mean algo.group_size (TRL"),
    (["actor_rollout_ref.actor.entropy_coeff=0.01"], "actor_rollout_ref.actor.entropy_coeff: not a key of this runner; "
                                                     "did you mean algo.entropy.coef (verl: entropy_coeff)?"),
    # a value of the wrong type for a key with a fixed set of values lists the set
    (["algo.scale_rewards=true"], "algo.scale_rewards=True: must be one of group, batch, none"),
    (["trainer.precision=16"], "trainer.precision=16: must be one of auto, fp32, bf16"),
])
def test_foreign_names_and_choice_types(earlier, bad, first):
    refused(earlier, bad, first)


def test_users_rights_are_accepted():
    """inf where it means no limit, and a large step count (the budget and Ctrl-C stop it)."""
    from hydra import compose, initialize_config_dir

    from runner.config import validate

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = validate(compose("config", overrides=["model=tiny", "algo.clip_high=inf", "budget.cap_usd=inf",
                                                    "algo.max_grad_norm=inf", "train.steps=1e12"]))
    assert math.isinf(cfg.algo.clip_high) and math.isinf(cfg.budget.cap_usd) and math.isinf(cfg.algo.max_grad_norm)
    assert cfg.train.steps == 10**12 and isinstance(cfg.train.steps, int)


def test_no_upper_clip_gives_a_finite_loss():
    """algo.clip_high=inf: the ratio is clamped to [1 - clip_low, inf); loss and gradient stay finite."""
    import torch

    from runner.algo.loss import BatchNorm, LossConfig, policy_loss
    from runner.budget import CostMeter

    torch.manual_seed(0)
    logp = (torch.randn(4, 6) - 2).requires_grad_()
    old = logp.detach() + 3 * torch.randn(4, 6)  # ratios from e^-9 to e^9
    adv = torch.tensor([1.0, -1.0, 2.0, -0.5])
    mask = torch.ones(4, 6, dtype=torch.bool)
    for mode in ("ppo", "cispo"):
        loss, stats = policy_loss(logp, old, adv, mask, torch.zeros(4, 6), LossConfig(clip_high=math.inf, clip_mode=mode),
                                  BatchNorm(tokens=24.0, seqs=4.0, max_len=6.0))
        (grad,) = torch.autograd.grad(loss, logp)
        assert torch.isfinite(loss) and torch.isfinite(grad).all() and stats["clip_frac/high"] == 0
    assert not CostMeter(1e6).would_exceed(math.inf, extra_seconds=1e9)  # budget.cap_usd=inf: no cap


# -- 18: a cap below the measured start-up -------------------------------------------------
def test_cap_below_the_measured_start_up(earlier):
    """The earlier run measured its start-up into its runner cache; at $3600/device-hour a
    second costs $1, so a cap of half the start-up's seconds cannot be met."""
    record = json.loads((earlier.cache / "startup.json").read_text())
    (key, m), = record.items()
    assert key.startswith("model=tiny trainer=torch device=") and key.endswith(" rollout=hf") and m["min_s"] > 0
    cap = round(m["min_s"] / 2, 4)
    line = refused(earlier, ["budget.usd_per_device_hour=3600", f"budget.cap_usd={cap}"],
                   f"budget.cap_usd={cap:g}: start-up alone costs more: ${m['min_s']:.6g} = {m['min_s']:.1f} s")
    assert "$3600/device-hour" in line and key in line


def test_cap_check_needs_a_measurement(earlier, tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from runner.config import ConfigError, validate
    from runner.preflight import check_startup_budget

    seconds = json.loads((earlier.cache / "startup.json").read_text()).popitem()[1]["min_s"]
    device = json.loads((earlier.cache / "startup.json").read_text()).popitem()[0].split("device=")[1].split()[0]

    def cfg(cap):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return validate(compose("config", overrides=[*TINY, "budget.usd_per_device_hour=3600", f"budget.cap_usd={cap}"]))

    monkeypatch.setenv("RUNNER_CACHE_DIR", str(earlier.cache))
    check_startup_budget(cfg(seconds * 2), device)  # fits
    with pytest.raises(ConfigError, match=r"^budget.cap_usd="):
        check_startup_budget(cfg(seconds / 2), device)
    monkeypatch.setenv("RUNNER_CACHE_DIR", str(tmp_path))  # nothing measured: the in-loop check decides
    check_startup_budget(cfg(seconds / 2), device)
