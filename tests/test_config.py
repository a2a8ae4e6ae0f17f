"""Every option of every group composes through real Hydra; bad input fails early and clearly."""

import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import CONF, run_cli
from runner.config import ENV_NAMES, ConfigError, validate

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())
EXAMPLE = CONF.parent / "examples" / "arithmetic"


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def composed(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_validates(group, option, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE.parent.parent))  # import paths resolve from the repo root
    extra = {("model", "pretrained"): ["model.path=/tmp"],
             ("env", "dataset"): [f"env.path={EXAMPLE}/problems.jsonl",
                                  "env.reward_funcs=[examples.arithmetic.rewards.correct]"]}.get((group, option), [])
    cfg = validate(composed([f"{group}={option}", *extra]))
    if group == "hardware":  # a profile written into budget.*
        assert cfg.budget.hardware == option and cfg.budget.usd_per_device_hour > 0
    elif group == "recipe":  # a whole experiment: it sets other groups
        assert cfg.env.name in ENV_NAMES and cfg.train.steps >= 1
    else:
        assert getattr(cfg, group).name == option


def test_defaults_are_the_main_job():
    cfg = validate(composed())
    assert (cfg.env.name, cfg.shaper.name, cfg.algo.name, cfg.model.name) == ("even_dice", "divisor", "grpo_wide", "smollm2_135m")
    # one wide group a step, unscaled advantages, a decaying lr (README: why the divisor failed at G=6)
    assert (cfg.algo.group_size, cfg.train.prompts_per_step) == (48, 1)
    assert (cfg.algo.scale_rewards, cfg.algo.lr_schedule, cfg.algo.lr) == ("none", "linear", 2e-5)
    # the post's recipes keep the post's setting
    post = validate(composed(["recipe=even_dice_divisor"]))
    assert (post.algo.name, post.algo.group_size, post.train.prompts_per_step, post.algo.scale_rewards) == ("grpo", 6, 2, "group")
    assert cfg.env.prompt == "roll a dice. output the roll in <answer></answer> tags."
    assert cfg.env.assistant_prefix == "<answer>"


@pytest.mark.parametrize(
    "overrides,first_line",
    [
        (["train.steps=-1"], "train.steps=-1: must be an integer >= 0"),
        (["train.steps=abc"], "train.steps='abc': expected an integer"),
        (["algo.group_size=1"], "algo.group_size=1: must be an integer >= 2"),
        (["algo.group_size=-3"], "algo.group_size=-3: must be an integer >= 2"),
        (["algo.lr=0"], "algo.lr=0.0: must be > 0"),
        (["algo.lr=-1e-5"], "algo.lr=-1e-05: must be > 0"),
        (["algo.lr=fast"], "algo.lr='fast': expected a number"),
        (["env.strict_format=maybe"], "env.strict_format='maybe': expected true/false"),
        (["algo.loss_agg=mean"], "algo.loss_agg='mean': must be one of token-mean, seq-mean-token-mean, seq-mean-token-sum-norm"),
        (["+train.stepz=3"], "train.stepz: unknown key; allowed keys in train: steps,"),
        (["model.path=/no/such/model"], "model.path='/no/such/model': does not exist"),
        (["algo.clip_low=1.5"], "algo.clip_low=1.5: must be in [0, 1)"),
        (["trainer.precision=fp16"], "trainer.precision='fp16': must be one of auto, fp32, bf16"),
        (["algo.loss_temperature=0"], "algo.loss_temperature=0.0: must be a number in [0.05, 20]"),
        (["report=phases"], "report='phases': must be null, dice_post or phase"),
        (["algo.lr_schedule=step"], "algo.lr_schedule='step': must be one of constant, linear, cosine"),
        (["rollout.attention=eager"], "rollout.attention='eager': must be one of auto, sdpa"),
        (["rollout.kernel=triton"], "rollout.kernel='triton': must be one of auto, fused, eager"),
        (["rollout.kernel=fused", "rollout.dtype=float32"], "rollout.kernel='fused': needs bfloat16 rollout weights"),
    ],
)
def test_bad_values_name_the_key(overrides, first_line):
    with pytest.raises(ConfigError) as e:
        validate(composed(overrides))
    assert str(e.value).startswith(first_line)


def test_bad_input_from_the_cli_fails_fast_and_touches_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    t = time.time()
    r = run_cli(["algo.group_size=1", f"output_dir={out}"], cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.splitlines()[0].startswith("error: algo.group_size=1: must be an integer >= 2")
    assert time.time() - t < 30  # no model was loaded
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not (tmp_path / "mlruns.db").exists()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["env=nope"], "Could not find 'env/nope'"),  # Hydra lists the available options
        (["train.stepz=3"], "Could not override 'train.stepz'"),
    ],
)
def test_hydra_level_errors_name_the_key(tmp_path, args, needle):
    r = run_cli(args, cwd=tmp_path)
    assert r.returncode != 0
    assert needle in r.stderr
    if args == ["env=nope"]:
        assert "dice" in r.stderr and "even_dice" in r.stderr
    assert not (tmp_path / "mlruns.db").exists()


@pytest.mark.parametrize("study", sorted(p.stem for p in (CONF.parent / "sweeps").glob("*.yaml")))
def test_sweep_files_compose(study, tmp_path):
    """Each study loads through the real CLI, sweeps something, and its job config validates."""
    import yaml

    base = ["--config-dir", str(CONF.parent / "sweeps"), "--config-name", study, "model=tiny"]
    r = run_cli([*base, "--cfg", "hydra"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["hydra"]["sweeper"]["params"]
    r = run_cli([*base, "--cfg", "job", "--resolve"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    validate(yaml.safe_load(r.stdout))


def test_a_sweep_objective_the_run_did_not_log_is_named_not_silent(capsys):
    import math

    from runner.__main__ import objective_value

    final = {"eval/accuracy": 0.5, "eval/pass_at_4": 0.7, "eval/game/solve_rate": 0.1, "train/loss": 1.0}
    assert objective_value(final, "eval/accuracy", sweep=True) == 0.5
    assert math.isnan(objective_value(final, "eval/prob/tv_uniform_valid", sweep=True))
    err = capsys.readouterr().err
    assert err.startswith("warning: objective=eval/prob/tv_uniform_valid: this run logged no such metric")
    assert "eval/accuracy, eval/pass_at_4" in err and "solve_rate" not in err
    assert math.isnan(objective_value(final, "nope", sweep=False)) and not capsys.readouterr().err


def test_the_loss_follows_the_sampling_temperature_by_default_and_sft_does_not():
    """TRL's and verl's convention: the loss's log-probs are of the tempered distribution the
    rollouts came from; SFT learns the examples' likelihood under the model itself."""
    from hydra import compose, initialize_config_dir

    from runner.config import validate

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parent.parent / "conf"), version_base="1.3"):
        assert validate(compose("config", overrides=["rollout.temperature=0.7"])).algo.loss_temperature == 0.7
        assert validate(compose("config", overrides=["algo=dapo", "rollout.temperature=1.3"])).algo.loss_temperature == 1.3
        assert validate(compose("config", overrides=["algo=sft", "rollout.temperature=0.7"])).algo.loss_temperature == 1.0
        assert validate(compose("config", overrides=["rollout.temperature=0.7", "algo.loss_temperature=1.0"])
                        ).algo.loss_temperature == 1.0
