"""The final export (train.export): plain Hugging Face weights in <output_dir>/hf_model for
trainer=torch, LoRA merged in; train.export=false writes none. Short CLI jobs on the tiny model."""

import torch

from runner import checkpoint as ckpt

from conftest import only_run, run_cli

FAST = ["model=tiny", "train.eval_every=0", "train.eval_samples=4", "train.final_eval_samples=4",
        "train.prompts_per_step=1", "algo.group_size=4", "rollout.max_new_tokens=4", "algo.entropy.coef=0.01"]


def test_torch_trainer_exports_weights_that_load_and_sample(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    r = run_cli([*FAST, "train.steps=2", f"output_dir={out}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run, _ = only_run(tmp_path)
    assert run.data.tags["hf_model"] == str(out / "hf_model")
    exported = AutoModelForCausalLM.from_pretrained(out / "hf_model")
    tok = AutoTokenizer.from_pretrained(out / "hf_model")
    # the same weights as the final checkpoint's
    state = ckpt.read(out / "checkpoints" / "ckpt-00000002.pt")["model"]
    mine = exported.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in state.items() if k in mine)
    enc = tok(["roll a dice."], return_tensors="pt")
    gen = exported.generate(**enc, do_sample=True, max_new_tokens=4, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > enc["input_ids"].shape[1]


def test_export_false_writes_none_and_a_lora_run_from_the_command_line(tmp_path):
    """(The merged LoRA export itself: tests/test_lora.py, in process.)"""
    off = tmp_path / "off"
    r = run_cli([*FAST, "model.lora.r=8", "train.steps=1", "train.export=false", f"output_dir={off}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (off / "hf_model").exists()
    run, _ = only_run(tmp_path)
    assert "hf_model" not in run.data.tags and run.data.params["model.lora.r"] == "8"
    ck = ckpt.read(off / "checkpoints" / "ckpt-00000001.pt")["model"]
    assert ck and all(".lora_" in k for k in ck)  # the adapters alone
