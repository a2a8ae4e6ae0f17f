"""DeepSpeed on CPU (gloo): config mapping, launch, group gather, world-size invariance of
the update, checkpoint resume and Hugging Face export, on the tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_cli
from runner.backend import ds_config
from runner.config import ConfigError, validate
from runner.launch import command, free_port

TINY = ["model=tiny", "train.eval_samples=8", "rollout.max_new_tokens=6", "algo.group_size=6",
        "train.prompts_per_step=2"]


def cfg_of(prompts=4, **trainer):
    return validate({"model": {"name": "tiny", "source": "tiny", "tokenizer_from": "smollm2_135m"},
                     "trainer": {"name": "deepspeed", **trainer}, "train": {"prompts_per_step": prompts}})


def test_deepspeed_json_follows_the_config():
    c = ds_config(cfg_of(zero_stage=3, grad_accum_steps=2, offload_optimizer=True, offload_params=True), world=2)
    assert c["zero_optimization"]["stage"] == 3
    assert c["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert c["zero_optimization"]["offload_param"]["device"] == "cpu"
    # 4 groups x 6 over 2 ranks = 12 rollouts a rank, 2 micro-batches of 6
    assert (c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"], c["train_batch_size"]) == (6, 2, 24)
    assert c["gradient_clipping"] == 1.0 and c["bf16"]["enabled"] is False  # fp32 on CPU under precision=auto
    c = ds_config(cfg_of(zero_stage=1, group_placement="gather"), world=2)
    assert "offload_optimizer" not in c["zero_optimization"] and c["train_micro_batch_size_per_gpu"] == 12


def test_launch_commands(tmp_path):
    torchrun = command(cfg_of(num_procs=4), tmp_path / "job.json", 29500)
    assert torchrun[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert torchrun[torchrun.index("--nproc_per_node") + 1] == "4" and torchrun[-3:] == ["-m", "runner.launch", str(tmp_path / "job.json")]
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1 slots=8\nnode2 slots=8\n")
    ds = command(cfg_of(16, num_procs=8, launcher="deepspeed", hostfile=str(hostfile), device="cuda"),
                 tmp_path / "job.json", 29500)
    assert ds[0] == "deepspeed" and ds[ds.index("--hostfile") + 1] == str(hostfile)
    assert ds[ds.index("--num_gpus") + 1] == "8" and ds[-3:] == ["--module", "runner.launch", str(tmp_path / "job.json")]


@pytest.mark.parametrize("trainer,bad_key", [
    ({"zero_stage": 4}, "trainer.zero_stage"),
    ({"num_procs": 3}, "train.prompts_per_step"),  # 4 groups do not split over 3 ranks
    ({"offload_params": True, "zero_stage": 2}, "trainer.offload_params"),
    ({"group_placement": "gather", "num_procs": 4}, "algo.group_size"),  # 6 rollouts over 4 ranks
    ({"hostfile": "/no/such/hostfile", "launcher": "deepspeed"}, "trainer.hostfile"),
    ({"num_procs": 2, "hostfile": str(ROOT / "tests" / "helpers" / "hosts_3x2"), "launcher": "deepspeed"},
     "train.prompts_per_step"),  # 3 hosts x 2 = 6 ranks: 4 groups do not split
    ({"precision": "fp8"}, "trainer.precision"),
])
def test_bad_deepspeed_settings_name_the_key(trainer, bad_key):
    with pytest.raises(ConfigError) as e:
        cfg_of(**trainer)
    assert str(e.value).startswith(bad_key)


def test_gather_placement_refuses_dynamic_sampling():
    with pytest.raises(ConfigError, match="^algo.dynamic_sampling.enabled"):
        validate({"trainer": {"name": "deepspeed", "group_placement": "gather"},
                  "algo": {"dynamic_sampling": {"enabled": True}}})


def torchrun(nprocs: int, out: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nprocs), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(ROOT / "tests" / "helpers" / "ds_update.py"), str(out),
           *args]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "world1.pt"
    torchrun(1, out, "2", "local")
    return torch.load(out)


@pytest.mark.parametrize("stage,placement,gas", [(2, "local", 1), (3, "local", 1), (2, "gather", 1), (2, "local", 2)])
def test_two_processes_match_one_on_the_same_global_batch(one_process, tmp_path, stage, placement, gas):
    """Same global batch, split over 2 ranks (whole groups, or half of every group gathered
    for shaping and advantages): same loss, same gradient norm, same updated weights up to
    float reordering (Adam's first step is +-lr per weight: lr=1e-2 here)."""
    out = tmp_path / "world2.pt"
    torchrun(2, out, str(stage), placement, str(gas))
    two = torch.load(out)
    assert abs(two["loss"] - one_process["loss"]) < 1e-6 and abs(one_process["loss"]) > 1e-3, (two["loss"],
                                                                                            one_process["loss"])
    assert two["grad_norm"] == pytest.approx(one_process["grad_norm"], rel=1e-5)
    diff = (two["params"] - one_process["params"]).abs()
    # Adam's first step is lr * g / (|g| + eps): a weight whose true gradient is ~0 gets
    # +-lr from the sign of its float-reordering noise, so a handful of the ~3M weights
    # may differ by up to 2 lr (seen once in ~20 runs); a wrong reduction moves most of them
    far = int((diff >= 2e-3).sum())
    assert far <= 32 and diff.mean() < 1e-6, (diff.max().item(), diff.mean().item(), far)
    assert two["shaped"] == one_process["shaped"]


def _client(tmp_path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")


def test_two_process_run_checkpoints_resumes_and_exports(tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "trainer=deepspeed", "trainer.num_procs=2", "train.eval_every=2", "train.checkpoint_every=2",
            f"output_dir={out}"]
    p = run_cli([*args, "train.steps=2"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    tags = sorted(x.name for x in (out / "checkpoints" / "deepspeed").iterdir() if x.is_dir())
    assert tags == ["step-00000002"]
    assert sorted(f.name for f in (out / "checkpoints" / "deepspeed" / tags[0]).glob("rank*.pt")) == ["rank0.pt", "rank1.pt"]
    p = run_cli([*args, "train.steps=3"], tmp_path)  # the same output dir: resume at step 2
    assert p.returncode == 0, p.stderr[-3000:]
    c = _client(tmp_path)
    runs = c.search_runs([c.get_experiment_by_name("runner").experiment_id])
    assert len(runs) == 1  # one MLflow run across both attempts, logged by rank 0 only
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["stop_reason"] == "completed"
    steps = [m.step for m in c.get_metric_history(run.info.run_id, "reward/raw_mean")]
    assert sorted(steps) == [1, 2, 3]
    arts = [a.path for a in c.list_artifacts(run.info.run_id, "config")]
    assert "config/deepspeed_config.json" in arts
    ds_json = json.loads((out / "deepspeed_config.json").read_text())
    assert ds_json["zero_optimization"]["stage"] == 2 and ds_json["train_batch_size"] == 12
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(out / "hf_model")
    assert sum(p.numel() for p in exported.parameters()) > 0


def test_zero3_two_processes_export_gathered_weights(tmp_path):
    out = tmp_path / "z3"
    p = run_cli([*TINY, "trainer=deepspeed", "trainer.num_procs=2", "trainer.zero_stage=3", "trainer.group_placement=gather",
                 "algo.entropy.coef=0.01", "train.steps=2", "train.eval_every=0", f"output_dir={out}"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    from safetensors.torch import load_file

    weights = load_file(out / "hf_model" / "model.safetensors")
    # whole tensors, not this rank's ZeRO-3 slice
    assert weights["model.embed_tokens.weight"].shape[0] > 1000 and weights["model.layers.0.mlp.up_proj.weight"].dim() == 2
    c = _client(tmp_path)
    run = c.search_runs([c.get_experiment_by_name("runner").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.metrics["train/grad_norm"] > 0


def test_vllm_without_a_gpu_fails_first_and_clearly(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the CPU error path does not apply")
    p = run_cli(["model=tiny", "rollout=vllm", f"output_dir={tmp_path / 'v'}"], tmp_path)
    assert p.returncode == 2
    first = p.stderr.strip().splitlines()[0]
    assert first.startswith("error: rollout=vllm: vLLM needs a CUDA GPU") and "rollout=hf" in first
    assert not (tmp_path / "mlruns.db").exists()
    assert not (tmp_path / "v").exists() or not any((tmp_path / "v").iterdir())  # Hydra's empty run dir at most


def test_vllm_weight_names_and_sync_schedule():
    from runner.rollout.vllm import SyncSchedule, weight_items

    w = torch.zeros(2)
    named = [("module.model.embed_tokens.weight", w), ("model.norm.weight", w), ("lm_head.weight", w)]
    assert [n for n, _ in weight_items(named, tied_embeddings=True)] == ["model.embed_tokens.weight", "model.norm.weight"]
    assert [n for n, _ in weight_items(named, tied_embeddings=False)][-1] == "lm_head.weight"
    s = SyncSchedule(every=3)
    assert [s.due() for _ in range(7)] == [False, False, True, False, False, True, False]
    assert s.synced_at == [3, 6]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_vllm_rollouts_on_gpu(tmp_path):
    pytest.importorskip("vllm", reason="needs the [gpu] extra")
    p = run_cli([*TINY, "rollout=vllm", "train.steps=2", "train.eval_every=0", f"output_dir={tmp_path / 'v'}"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
