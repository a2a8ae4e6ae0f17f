"""One short tiny-model run per preset and per exploration control, in-process, read back
from a real MLflow SQLite store."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from conftest import CONF
from envs import Prompt
from runner.config import validate
from runner.rollout.hf import HFRollout, concat, select, span_token_mask
from runner.train import run

FAST = ["model=tiny", "train.steps=2", "train.eval_every=0", "train.eval_samples=4", "train.prompts_per_step=2",
        "rollout.max_new_tokens=6", "algo.group_size=3"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("algo_runs")
    return d, f"sqlite:///{d / 'mlruns.db'}"


def train(store, name, *overrides):
    d, uri = store
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = validate(compose("config", overrides=[*FAST, f"tracking.uri={uri}", *overrides]))
    out = d / name
    trainer = run(cfg, out, "{}", None)
    c = MlflowClient(uri)
    run_ = c.get_run(trainer.tracker.run_id)
    assert run_.info.status == "FINISHED"
    return c, run_


def last(c, run_, key):
    return c.get_metric_history(run_.info.run_id, key)[-1].value


@pytest.mark.parametrize("algo", ["grpo", "dr_grpo", "dapo", "cispo", "gspo", "rloo"])
def test_each_preset_runs_and_logs_its_metrics(store, algo):
    # The random tiny model never answers, so every group has zero reward variance and
    # DAPO's dynamic sampling would (rightly) drop them all: that path has its own test.
    extra = ["algo.dynamic_sampling.enabled=false"] if algo == "dapo" else []
    c, r = train(store, algo, f"algo={algo}", *extra)
    assert r.data.tags["algo"] == algo and r.data.params["algo.name"] == algo
    keys = set(r.data.metrics)
    assert {"train/loss", "train/clip_frac/low", "train/clip_frac/high", "train/ratio/mean", "train/ratio/min",
            "train/ratio/max", "groups/zero_variance_frac", "groups/dropped", "train/entropy_coef"} <= keys


def test_dynamic_sampling_drops_groups_without_signal(store):
    # the tiny model never answers, so every group's rewards are all 0: all dropped each round
    c, r = train(store, "dapo_drop", "algo=dapo", "algo.dynamic_sampling.max_rounds=2")
    assert last(c, r, "groups/dropped") == 4.0  # 2 groups x 2 rounds
    assert last(c, r, "groups/sampling_rounds") == 2.0
    assert last(c, r, "train/skipped") == 1.0


def test_kl_control_loads_a_reference_and_logs_kl(store):
    # rewards carry no signal on the tiny model; the entropy bonus is what moves the policy
    c, r = train(store, "kl", "algo.kl.coef=0.1", "algo.kl.estimator=k3", "algo.lr=1e-2", "algo.entropy.coef=0.5")
    kl = [m.value for m in c.get_metric_history(r.info.run_id, "train/kl")]
    assert kl[0] == pytest.approx(0.0, abs=1e-6)  # identical to the reference before any update
    assert kl[1] > 0  # and apart from it after one


def test_adaptive_entropy_logs_its_coefficient(store):
    c, r = train(store, "adaptive", "algo.entropy.adaptive=true", "algo.entropy.coef=0.01",
                 "algo.entropy.target=100", "algo.entropy.delta=0.005", "algo.entropy.coef_max=1")
    coefs = [m.value for m in sorted(c.get_metric_history(r.info.run_id, "train/entropy_coef"), key=lambda m: m.step)]
    assert coefs == pytest.approx([0.01, 0.015])  # entropy below the (huge) target: raised each step


def test_answer_scope_and_top_entropy_run(store):
    c, r = train(store, "scope", "algo.entropy.coef=0.01", "algo.entropy.scope=answer",
                 "algo.top_entropy_quantile=0.2")
    assert 0 < last(c, r, "train/pg_token_frac") <= 0.5


def test_span_token_mask_marks_the_answer_tokens(tiny):
    _, tok = tiny
    ids = tok("4</answer> padding", add_special_tokens=False, return_tensors="pt")["input_ids"]
    m = span_token_mask(tok, ids, [(0, 1)])
    assert m[0, 0] and m.sum() == 1
    assert span_token_mask(tok, ids, [None]).sum() == 0


def test_concat_and_select_keep_groups_and_alignment(tiny):
    model, tok = tiny
    torch.manual_seed(0)
    eng = HFRollout(max_new_tokens=4)
    a = eng.generate(model, tok, [Prompt((("user", "hi"),), "<answer>")], 2)
    b = eng.generate(model, tok, [Prompt((("user", "a much longer prompt than that"),), "<answer>")], 3)
    both = concat([a, select(b, [0, 2])], tok.pad_token_id)
    assert both.groups.tolist() == [0, 0, 1, 1]
    assert both.input_ids.shape[1] == both.prompt_len + both.completion_mask.shape[1]
    # the short prompt's rows got extra left padding; its completion tokens are unchanged
    n = a.completion_mask[0].sum()
    assert both.completion_ids[0, :n].tolist() == a.completion_ids[0, :n].tolist()
    assert both.completions[2] == b.completions[0] and both.completions[3] == b.completions[2]
