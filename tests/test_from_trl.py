"""`python -m runner.from_trl`: a TRL GRPOConfig's fields as this runner's overrides, which
compose and validate as they are."""

import json
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from runner.config import validate
from runner.from_trl import convert

CONF = Path(__file__).resolve().parent.parent / "conf"

# what GRPOConfig(...).to_dict() gives for the fields a user sets in practice (TRL 1.16 names)
TRL = {"learning_rate": 1e-6, "num_generations": 8, "per_device_train_batch_size": 8,
       "gradient_accumulation_steps": 4, "steps_per_generation": 4, "beta": 0.04, "epsilon": 0.2,
       "epsilon_high": 0.28, "loss_type": "dr_grpo", "scale_rewards": True, "max_completion_length": 64,
       "temperature": 0.9, "top_p": 1.0, "max_steps": -1, "lr_scheduler_type": "cosine", "seed": 42,
       "importance_sampling_level": "sequence", "num_iterations": 2, "top_k": None, "repetition_penalty": 1.0,
       "mask_truncated_completions": False, "delta": None, "output_dir": "trl-out", "report_to": ["mlflow"]}


def test_a_trl_config_becomes_overrides_that_validate():
    overrides, notes = convert(TRL)
    assert notes == []
    want = {"algo.lr=1e-06", "algo.group_size=8", "algo.kl.coef=0.04", "algo.clip_low=0.2", "algo.clip_high=0.28",
            "algo.loss_agg=seq-mean-token-sum-norm", "algo.scale_rewards=group", "rollout.temperature=0.9",
            "algo.lr_schedule=cosine", "algo.ratio_level=sequence", "algo.num_iterations=2",
            "trainer.grad_accum_steps=4", "train.prompts_per_step=4"}  # 8 x 4 completions / 8 a group
    assert want <= set(overrides) and not any(o.startswith("train.steps=") for o in overrides)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = validate(compose("config", overrides=overrides))
    assert cfg.algo.loss_temperature == 0.9  # the loss follows the sampler, as in TRL


def test_what_does_not_carry_over_is_said():
    _, notes = convert({**TRL, "top_k": 50, "steps_per_generation": 8, "loss_type": "sapo",
                        "per_device_train_batch_size": 3})
    text = "\n".join(notes)
    assert "top_k=50: not supported" in text and "steps_per_generation=8: not supported" in text
    assert "loss_type='sapo': no such loss here" in text and "is not a whole number of groups" in text


def test_the_command_line(tmp_path):
    (tmp_path / "trl.json").write_text(json.dumps(TRL))
    r = subprocess.run([sys.executable, "-m", "runner.from_trl", str(tmp_path / "trl.json")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("python -m runner algo=grpo algo.lr=1e-06"), r.stderr
    (tmp_path / "bad.yaml").write_text("- a list\n")
    r = subprocess.run([sys.executable, "-m", "runner.from_trl", str(tmp_path / "bad.yaml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "expected a mapping" in r.stderr
