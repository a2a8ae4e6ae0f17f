"""Step kinds (runner/loop/step_kind.py): one job lifecycle, the step a kind's own module.
A user's kind is one module named by `algo.kind` and gets the whole job (checkpoints,
MLflow, evaluation, export) as the built-in ones do; a bad name is one line before any
weights load; the supervised kind leaves the rollout copy stale until an evaluation."""

import textwrap

import torch

from conftest import CONF, only_run, run_cli

FAST = ["model=tiny", "env=dice", "train.eval_samples=8", "train.final_eval_samples=8",
        "tracking.system_metrics=false", "rollout.max_new_tokens=6"]

# a third kind in one module: "unlikelihood" steps that push the policy away from an answer
# of its own option (advantage -1 on it), through the same learner and loss as RL and SFT
USER_KIND = '''
import torch

from runner.config import ConfigError
from runner.loop.step_kind import StepKind
from runner.rollout.multiturn import assemble
from runner.rollout.hf import render


class Unlikelihood(StepKind):
    samples_each_step = False

    @classmethod
    def check_config(cls, cfg):
        if cfg.algo.clip_mode != "nll":
            raise ConfigError(f"algo.clip_mode={cfg.algo.clip_mode!r}: the unlikelihood kind needs nll")
        if set(cfg.algo.kind_options or {}) != {"answer"}:
            raise ConfigError(f"algo.kind_options={cfg.algo.kind_options!r}: give {{answer: FACE}}")

    def step(self, t):
        prompt = self.env.prompts(t.step, 1)[0]
        p_ids = t.tok(render(t.tok, prompt), add_special_tokens=False)["input_ids"]
        answer = str(self.cfg.algo.kind_options["answer"])
        comp = t.tok(f"{answer}</answer>", add_special_tokens=False)["input_ids"] + [t.tok.eos_token_id]
        batch = assemble(t.tok, [prompt], [0], [p_ids], [comp], [[1] * len(comp)], None, t.device,
                         finished=[True])
        m = t.update(batch, -torch.ones(1, device=t.device), [])
        return {**m, "unlikely/loss": m["train/loss"]}

    def progress(self, m):
        return {"loss": f"{m['unlikely/loss']:.3f}"}
'''


def test_a_user_step_kind_is_one_module_and_gets_the_whole_job(tmp_path):
    (tmp_path / "my_kinds.py").write_text(textwrap.dedent(USER_KIND))
    env = {"PYTHONPATH": str(tmp_path)}
    args = [*FAST, "algo.kind=my_kinds.Unlikelihood", "algo.lr=1e-3", "train.steps=4", "train.eval_every=2",
            "train.checkpoint_every=2", f"output_dir={tmp_path / 'out'}"]
    # its own rule, before anything loads
    r = run_cli([*args, "algo.clip_mode=nll"], cwd=tmp_path, env=env)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[0].endswith(
        "algo.kind_options=None: give {answer: FACE}"), r.stderr[-2000:]
    args.append("algo.kind_options={answer:1}")
    r = run_cli([*args, "algo.clip_mode=ppo"], cwd=tmp_path, env=env)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[0].endswith(
        "algo.clip_mode='ppo': the unlikelihood kind needs nll"), r.stderr[-2000:]
    assert not (tmp_path / "mlruns.db").exists() and not list(tmp_path.glob("out/*.yaml"))  # no run, no config
    r = run_cli([*args, "algo.clip_mode=nll"], cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    run, metrics = only_run(tmp_path)
    assert run.info.status == "FINISHED" and "unlikely/loss" in metrics and "eval/answers/entropy" in metrics
    assert (tmp_path / "out" / "checkpoints" / "ckpt-00000004.pt").exists()
    assert (tmp_path / "out" / "hf_model" / "config.json").exists()
    # the answer it trained against lost probability
    assert metrics["policy/prob/1"] < 0.75 * only_first_prob(tmp_path, run, "policy/prob/1")


def only_first_prob(tmp_path, run, key):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    return min(c.get_metric_history(run.info.run_id, key), key=lambda m: m.step).value


def test_a_bad_step_kind_is_one_line_naming_the_choices(tmp_path):
    for kind, says in (("rl algo.kind_options={beta:0.1}",
                        "algo.kind_options={'beta': 0.1}: algo.kind='rl' takes no options"),
                       ("dpo", "algo.kind='dpo': must be one of rl, sft, or the import path of a "
                                "runner.loop.step_kind.StepKind subclass"),
                       ("runner.train.Trainer", "algo.kind='runner.train.Trainer': runner.train.Trainer is not a "
                                                "runner.loop.step_kind.StepKind subclass"),
                       ("nowhere.Kind", "algo.kind='nowhere.Kind': cannot be imported")):
        r = run_cli([*FAST, *f"algo.kind={kind}".split(), f"output_dir={tmp_path / 'out'}"], cwd=tmp_path)
        first = r.stderr.strip().splitlines()[0]
        assert r.returncode == 2 and says in first, r.stderr[-2000:]
    assert not (tmp_path / "mlruns.db").exists() and not list(tmp_path.glob("out/*.yaml"))  # no run, no config


def _trainer(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir

    from runner.config import validate
    from runner.train import Trainer

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = validate(compose("config", overrides=[*FAST, "rollout.dtype=bfloat16", "trainer.precision=fp32",
                                                    f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}", *overrides]))
    t = Trainer(cfg, tmp_path / "out")
    t.setup()
    return t


def _copy_matches(t) -> bool:
    return all(torch.equal(r, p.detach().to(r.dtype))
               for r, p in zip(t.rollout_model.parameters(), t.model.parameters()))


def test_the_supervised_kind_refreshes_the_rollout_copy_only_for_an_evaluation(tmp_path):
    t = _trainer(tmp_path, "algo=sft", "algo.lr=1e-2", "sft.batch_size=4", "sft.eval_size=4", "algo.warmup_steps=0")
    assert t.rollout_model is not t.model and _copy_matches(t)
    for _ in range(2):
        t.step += 1
        t.train_step()
    assert t.rollout_stale and not _copy_matches(t)  # no copy after either optimizer step
    m = t.evaluate(8)
    assert not t.rollout_stale and _copy_matches(t) and "eval/sft_loss" in m
    # RL samples every step: the copy follows each update
    rl = _trainer(tmp_path / "rl", "algo=grpo", "algo.group_size=4", "algo.lr=1e-2")
    rl.step += 1
    rl.train_step()
    assert not rl.rollout_stale and _copy_matches(rl)


def test_the_progress_bar_shows_the_environments_success_rate_where_it_has_one():
    from runner.loop.rl_step import RLStep

    dice = {"reward/raw_mean": 0.9, "answers/entropy": 1.2, "answers/valid_rate": 0.95}
    assert RLStep.progress(None, dice) == {"reward": "0.90", "H": "1.20", "valid": "0.95"}
    # env=dataset: "valid" was the share of parsed numbers while the correctness reward stayed 0
    judged = {**dice, "reward/accuracy": 0.0}
    assert RLStep.progress(None, judged) == {"reward": "0.90", "H": "1.20", "acc": "0.00"}
