"""The supervised step kind (algo=sft, runner/loop/sft_step.py) on the tiny model: what carries
loss, that the loss is the examples' negative log-likelihood, that training lowers held-out
loss and exports weights that reload to the same logits, that a resume trains on the same
examples, and the refusals before any weights load."""

import json
import random
from pathlib import Path

import pytest
import torch

from conftest import only_run, run_cli
from envs.base import Prompt
from runner import checkpoint as ckpt
from runner.loop import sft_step

DICE = "roll a dice. output the roll in <answer></answer> tags."
FAST = ["model=tiny", "algo=sft", "train.eval_samples=8", "train.final_eval_samples=8", "sft.batch_size=8",
        "sft.eval_size=8", "tracking.system_metrics=false", "algo.lr=1e-3", "algo.warmup_steps=0"]


@pytest.fixture(scope="module")
def tok():
    from runner.config import validate
    from runner.models import load_tokenizer

    return load_tokenizer(validate({"model": {"name": "tiny", "source": "tiny", "tokenizer_from": "smollm2_135m"}}).model)


def dice_file(path: Path, n: int = 64, seed: int = 0) -> Path:
    r = random.Random(seed)
    path.write_text("".join(json.dumps({"prompt": DICE, "completion": f"{r.choice('2446')}</answer>"}) + "\n"
                            for _ in range(n)))
    return path


class _Rows(list):
    """A list of dict rows with the column_names a datasets.Dataset has."""

    @property
    def column_names(self):
        return list(self[0])


def test_prompt_and_environment_tokens_carry_no_loss(tok):
    rows = _Rows([{"messages": [{"role": "user", "content": "guess"}, {"role": "assistant", "content": "<guess>crane</guess>"},
                                {"role": "user", "content": "C=gray R=green"}, {"role": "assistant", "content": "<guess>brine</guess>"}]}])
    (ex,) = sft_step.from_rows(rows, "", None, "mem")
    assert ex.turns == ("<guess>crane</guess>", "<guess>brine</guess>") and ex.replies == ("C=gray R=green",)
    enc, cut = sft_step.encode(tok, ex, 512, False, "mem")
    assert not cut
    trained = [t for t, m in zip(enc.comp, enc.train) if m]
    env = [t for t, m in zip(enc.comp, enc.train) if not m]
    eos = tok.eos_token_id
    assert tok.decode(trained) == f"<guess>crane</guess>{tok.eos_token}<guess>brine</guess>{tok.eos_token}"
    assert "C=gray R=green" in tok.decode(env) and "crane" not in tok.decode(env)
    assert trained.count(eos) == 2 and "guess" in tok.decode(enc.prompt_ids) and "crane" not in tok.decode(enc.prompt_ids)
    assert [t for t, m in zip(enc.turn_of, enc.train) if not m] == [-1] * len(env)  # the env's tokens: turn -1
    # the single-turn form: the environment's prefix is the prompt's, taken off the completion
    (one,) = sft_step.from_rows(_Rows([{"prompt": DICE, "completion": "<answer>4</answer>"}]), "<answer>", None, "mem")
    assert one.prompt.assistant_prefix == "<answer>" and one.turns == ("4</answer>",)


def test_the_loss_is_the_examples_negative_log_likelihood(tiny, tok):
    from runner.algo.forward import sequence_logprobs
    from runner.algo.loss import BatchNorm, LossConfig, policy_loss
    from runner.rollout.multiturn import assemble

    model, _ = tiny
    exs = [sft_step.Example(Prompt((("user", DICE),), "<answer>"), (c,)) for c in ("4</answer>", "12</answer> ok")]
    encs = [sft_step.encode(tok, e, 64, False, "mem")[0] for e in exs]
    batch = assemble(tok, [e.prompt for e in exs], [0, 0], [e.prompt_ids for e in encs], [e.comp for e in encs],
                     [e.train for e in encs], None, "cpu", finished=[True, True])
    logp, ent = sequence_logprobs(model, batch, shared_prefix=True)
    mask = batch.completion_mask
    loss, _ = policy_loss(logp, logp.detach(), torch.ones(2), mask, ent, LossConfig(clip_mode="nll", loss_agg="token-mean"),
                          BatchNorm(tokens=float(mask.sum()), seqs=2.0, max_len=8.0))
    with torch.no_grad():  # the same from one plain forward and cross-entropy
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        P = batch.prompt_len
        targets = batch.input_ids[:, P:]
        nll = torch.nn.functional.cross_entropy(logits[:, P - 1:-1].transpose(1, 2), targets, reduction="none")
    assert torch.allclose(loss, (nll * mask).sum() / mask.sum(), atol=1e-4)


def test_sft_lowers_heldout_loss_and_exports_weights_that_reload(tmp_path):
    from transformers import AutoModelForCausalLM

    from runner.config import validate
    from runner.models import build_tiny, load_tokenizer

    data = dice_file(tmp_path / "d.jsonl")
    out = tmp_path / "out"
    r = run_cli([*FAST, f"sft.data={data}", "train.steps=12", "train.eval_every=3", f"output_dir={out}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run, metrics = only_run(tmp_path)
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    held = [m.value for m in sorted(c.get_metric_history(run.info.run_id, "eval/sft_loss"), key=lambda m: m.step)]
    assert len(held) == 4 and held[-1] < held[0] - 0.5, held
    assert run.data.tags["sft.examples"] == "64" and len(run.data.tags["sft.data_sha256"]) == 64
    # the file it trained on, as the run's dataset input (matched to a generate run by its SHA-256)
    (inp,) = c.get_run(run.info.run_id).inputs.dataset_inputs
    from runner.digests import file_sha256

    assert inp.dataset.digest == file_sha256(data)[:32] and json.loads(inp.dataset.profile)["num_rows"] == 64
    assert inp.dataset.source == json.dumps({"uri": data.resolve().as_uri()}) and inp.tags[0].value == "training"
    assert metrics["sft/epoch"] == pytest.approx(12 * 8 / 56)
    cfg = validate({"model": {"name": "tiny", "source": "tiny", "tokenizer_from": "smollm2_135m"}}).model
    tok = load_tokenizer(cfg)
    mine = build_tiny(cfg, tok)
    mine.load_state_dict(ckpt.read(out / "checkpoints" / "ckpt-00000012.pt")["model"])
    exported = AutoModelForCausalLM.from_pretrained(out / "hf_model")
    ids = tok("roll a dice", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(mine(ids).logits, exported(ids).logits, atol=1e-5)


def test_a_resumed_sft_run_trains_on_the_same_examples(tmp_path):
    data = dice_file(tmp_path / "d.jsonl", n=40)
    args = [*FAST, f"sft.data={data}", "train.eval_every=0", "train.checkpoint_every=3",
            "algo.lr_schedule=constant"]  # a decaying lr would follow train.steps
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    assert run_cli([*args, "train.steps=6", f"output_dir={a / 'out'}"], cwd=a).returncode == 0
    assert run_cli([*args, "train.steps=3", f"output_dir={b / 'out'}"], cwd=b).returncode == 0
    r = run_cli([*args, "train.steps=6", f"output_dir={b / 'out'}"], cwd=b)  # raises the steps: resumes at 3
    assert r.returncode == 0, r.stderr[-2000:]
    run, _ = only_run(b)
    assert len(run.inputs.dataset_inputs) == 1  # the resume names the same file once
    wa = ckpt.read(a / "out" / "checkpoints" / "ckpt-00000006.pt")["model"]
    wb = ckpt.read(b / "out" / "checkpoints" / "ckpt-00000006.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_batches_cycle_through_epochs_in_a_seeded_order():
    from types import SimpleNamespace as NS

    data = sft_step.SFTData.__new__(sft_step.SFTData)
    data.cfg = NS(seed=3, sft=NS(batch_size=4))
    data.train = list(range(10))
    first = [i for s in range(1, 4) for i in data.rows_for(s)][:10]  # epoch 0: every example once
    assert sorted(first) == list(range(10))
    assert data.rows_for(2) == data.rows_for(2) and data.rows_for(4) != data.rows_for(1)


def _refused(r, *words):
    assert r.returncode == 2, r.stderr[-2000:]
    first = r.stderr.strip().splitlines()[0]
    assert "Traceback" not in r.stderr and all(w in first for w in words), first


def test_bad_sft_input_is_refused_before_the_weights_load(tmp_path):
    no_col = tmp_path / "nocol.jsonl"
    no_col.write_text(json.dumps({"question": DICE, "answer": "4"}) + "\n")
    _refused(run_cli([*FAST, f"sft.data={no_col}", f"output_dir={tmp_path / 'o1'}"], cwd=tmp_path),
             "sft.data", "prompt and completion")
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text(json.dumps({"prompt": DICE, "completion": "4</answer>"}) + "\n{oops\n")
    _refused(run_cli([*FAST, f"sft.data={bad_line}", f"output_dir={tmp_path / 'o2'}"], cwd=tmp_path),
             "sft.data", "line 2", "not valid JSON")
    long = dice_file(tmp_path / "long.jsonl", n=20)
    _refused(run_cli([*FAST, f"sft.data={long}", "sft.max_length=2", f"output_dir={tmp_path / 'o3'}"], cwd=tmp_path),
             "sft.max_length=2", "sft.truncation=truncate")
    r = run_cli([*FAST, f"sft.data={long}", "sft.max_length=2", "sft.truncation=truncate", "train.steps=1",
                 "train.eval_every=0", f"output_dir={tmp_path / 'o4'}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    run, metrics = only_run(tmp_path)
    assert run.data.tags["sft.truncated"] == "20" and metrics["sft/truncated_total"] == 20
    _refused(run_cli([*FAST, "env=dataset", "env.path=examples/arithmetic/problems.jsonl",
                      "env.reward_funcs=[examples.arithmetic.rewards.correct]", f"output_dir={tmp_path / 'o5'}"],
                     cwd=Path(__file__).resolve().parent.parent), "no demonstrations", "sft.data")
    _refused(run_cli([*FAST, "algo.clip_mode=ppo", f"sft.data={long}", f"output_dir={tmp_path / 'o6'}"], cwd=tmp_path),
             "algo.clip_mode", "nll")
    assert not (tmp_path / "o1" / "checkpoints").exists() and not (tmp_path / "o3" / "checkpoints").exists()


@pytest.mark.parametrize("env", [["env=even_dice", "env.demo_weights={4: 0.5, 2: 0.25, 6: 0.25}"],
                                 # a 6-turn game with its replies runs past the default 512 tokens
                                 ["env=wordle", "env.eval_size=8", "rollout.max_new_tokens=8", "sft.max_length=1024"]])
def test_sft_on_the_environments_own_demonstrations(tmp_path, env):
    """No data file: the environment's demonstrations (a Wordle game's replies replayed, masked)."""
    r = run_cli([*FAST, *env, "sft.demonstrations=48", "train.steps=2", "train.eval_every=0", "sft.batch_size=4",
                 f"output_dir={tmp_path / 'out'}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run, metrics = only_run(tmp_path)
    assert run.data.tags["sft.data"].startswith("48 demonstrations of env") and run.data.tags["sft.examples"] == "48"
    assert metrics["sft/tokens"] > 0 and "eval/sft_loss" in metrics


@pytest.mark.parametrize("trainer", [["model.lora.r=4", "model.lora.target_modules=[q_proj,v_proj]"],
                                     ["trainer=deepspeed", "trainer.num_procs=2", "trainer.zero_stage=2",
                                      "train.prompts_per_step=2"]])
def test_sft_runs_on_lora_and_deepspeed_and_resumes(tmp_path, trainer):
    """The supervised step on the RL job's other paths: LoRA adapters (exported merged) and two
    DeepSpeed ranks (each its share of the examples), checkpointed and resumed."""
    data = dice_file(tmp_path / "d.jsonl", n=40)
    out = tmp_path / "out"
    args = [*FAST, *trainer, f"sft.data={data}", "train.eval_every=0", "train.checkpoint_every=2", f"output_dir={out}"]
    r = run_cli([*args, "train.steps=2"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli([*args, "train.steps=4"], cwd=tmp_path)  # resumes at 2
    assert r.returncode == 0, r.stderr[-3000:]
    run, metrics = only_run(tmp_path)
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    assert sorted(m.step for m in c.get_metric_history(run.info.run_id, "sft/loss")) == [1, 2, 3, 4]
    assert run.info.status == "FINISHED" and (out / "hf_model" / "config.json").exists()
