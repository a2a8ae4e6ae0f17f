"""LoRA adapters (model.lora, peft) on the tiny model: what trains, what the sampler runs,
the shared-prefix forward, checkpoints and the merged export."""

import pytest
import torch

from envs import Prompt
from runner import checkpoint as ckpt
from runner import lora
from runner.algo.forward import sequence_logprobs
from runner.algo.loss import BatchNorm, LossConfig, advantages, policy_loss
from runner.config import ConfigError, validate
from runner.rollout.hf import HFRollout

TINY = {"name": "tiny", "source": "tiny", "tokenizer_from": "smollm2_135m"}
PROMPTS = [Prompt((("user", "roll a dice."),), "<answer>"),
           Prompt((("user", "roll a dice, a fair one, please. output it in tags."),), "<answer>")]


def config(r=8, **over):
    # an entropy bonus: a gradient every step, even when every reward of the random model is 0;
    # float32 rollouts unless a test says otherwise: `auto` is bf16 on CPUs with avx512_bf16 or
    # AMX, and the merged copy's logits are compared with the adapted model's to float32 rounding
    raw = {"model": {**TINY, "lora": {"r": r}}, "algo": {"group_size": 4, "lr": 1e-2, "entropy": {"coef": 0.01}},
           "rollout": {"max_new_tokens": 6, "dtype": "float32"}, "train": {"prompts_per_step": 2, "eval_samples": 8, "steps": 3}}
    for k, v in over.items():
        raw.setdefault(k, {}).update(v)
    return validate(raw)


def trainer(cfg, out, steps=0):
    from runner.train import Trainer

    t = Trainer(cfg, out)
    t.setup()
    metrics = []
    for _ in range(steps):
        t.step += 1
        metrics.append(t.train_step())
    return t, metrics


def adapters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An in-process LoRA trainer after 2 steps, and the weights it started from."""
    out = tmp_path_factory.mktemp("lora") / "out"
    t, _ = trainer(config(), out)
    start = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    m = []
    for _ in range(2):
        t.step += 1
        m.append(t.train_step())
    return t, start, m


def test_config_lora_block():
    assert validate({}).model.lora.r == 0 and not lora.enabled(validate({}).model)
    assert validate({"model": {"lora": None}}).model.lora is None
    on = validate({"model": {"lora": {"r": 16, "target_modules": ["q_proj", "v_proj"]}}}).model
    assert lora.enabled(on) and on.lora.target_modules == ["q_proj", "v_proj"] and on.lora.alpha == 32
    for bad, first in [({"r": -1}, "model.lora.r=-1: must be an integer >= 0"),
                       ({"r": 2.5}, "model.lora.r=2.5: expected an integer"),
                       ({"alpha": 0}, "model.lora.alpha=0.0: must be > 0"),
                       ({"dropout": 1}, "model.lora.dropout=1.0: must be in [0, 1)"),
                       ({"target_modules": []}, "model.lora.target_modules=[]: must be [all-linear] or"),
                       ({"target_modules": ["all-linear", "q_proj"]}, "model.lora.target_modules=['all-linear', "),
                       ({"target_modules": "q_proj"}, "model.lora.target_modules='q_proj': expected a list"),
                       ({"rank": 4}, "model.lora.rank: unknown key; allowed keys in model.lora: r, alpha")]:
        with pytest.raises(ConfigError) as e:
            validate({"model": {"lora": bad}})
        assert str(e.value).startswith(first), str(e.value)
    with pytest.raises(ConfigError, match=r"^model.lora.r=4: LoRA needs rollout=hf"):
        validate({"model": {"lora": {"r": 4}}, "rollout": {"name": "vllm"}})


def test_one_export_switch_for_both_trainers():
    assert validate({}).train.export is True
    assert validate({"train": {"export": False}}).train.export is False
    assert not hasattr(validate({}).trainer, "export_hf")
    # a run's config.yaml written before the rename still loads (resume, runner.reevaluate)
    assert validate({"trainer": {"name": "deepspeed", "export_hf": False}}).train.export is False
    assert validate({"trainer": {"export_hf": False}, "train": {"export": True}}).train.export is True


def test_unknown_target_modules_name_the_model_layers():
    from runner.models import load_policy

    with pytest.raises(ValueError, match=r"model.lora.target_modules=\['attn_qkv'\]: .*q_proj"):
        load_policy(validate({"model": {**TINY, "lora": {"r": 4, "target_modules": ["attn_qkv"]}}}).model)


def test_only_the_adapters_train(trained):
    t, start, m = trained
    assert lora.is_lora(t.model)
    trainable = {n for n, p in t.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # 2 layers x 7 linears (all-linear), an A and a B each
    assert len(trainable) == 28
    in_opt = {id(p) for g in t.opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in t.model.parameters() if p.requires_grad}
    assert all(abs(x["train/grad_norm"]) > 0 for x in m)
    for n, p in t.model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, start[n]), n  # B starts at 0, A gets gradients once B moved
        else:
            assert torch.equal(p, start[n]), n  # the base weights never move


def test_rollout_copy_samples_the_adapted_policy(trained):
    t, _, m = trained
    assert not lora.is_lora(t.rollout_model) and t.rollout_model is not t.model
    ids = torch.randint(0, 1000, (3, 10))
    torch.testing.assert_close(logits(t.rollout_model, ids), logits(t.model, ids), atol=1e-5, rtol=1e-5)
    # the sampler's own log-probs against the training forward's, every step (float32 copy here)
    assert all(x["rollout/logp_abs_diff"] < 1e-5 for x in m), [x["rollout/logp_abs_diff"] for x in m]
    # and the adapters matter: the merged copy is not the base model
    with t.model.disable_adapter():
        base = logits(t.model, ids)
    assert (base - logits(t.rollout_model, ids)).abs().max() > 1e-3


def test_bf16_rollout_and_bf16_training_with_lora(tmp_path):
    t, m = trainer(config(rollout={"dtype": "bfloat16"}, trainer={"precision": "bf16"}), tmp_path / "o", steps=2)
    assert t.rollout_model.dtype == torch.bfloat16 and not lora.is_lora(t.rollout_model)
    assert lora.is_lora(t.backend.compute_model) and t.backend.compute_model is not t.model
    # the bf16 training copy's adapters follow the fp32 master ones
    c = dict(t.backend.compute_model.named_parameters())
    for n, p in t.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(c[n], p.detach().to(torch.bfloat16)), n
    ids = torch.randint(0, 1000, (3, 10))
    torch.testing.assert_close(logits(t.rollout_model, ids), logits(t.model, ids), atol=0.1, rtol=0.05)
    assert all(x["rollout/logp_abs_diff"] < 0.05 for x in m)


def test_shared_prefix_forward_equals_plain_forward_through_peft(tiny):
    import copy

    model = lora.apply(copy.deepcopy(tiny[0]), validate({"model": {**TINY, "lora": {"r": 4}}}).model.lora)
    torch.manual_seed(0)
    with torch.no_grad():  # adapters that change the outputs (B starts at 0)
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1)
    b = HFRollout(max_new_tokens=8).generate(model, tiny[1], PROMPTS, 3)
    adv = advantages(torch.randn(len(b)), b.groups)
    norm = BatchNorm(float(b.completion_mask.sum()), float(len(b)), 8.0)

    def run(shared, padding_free=False):
        model.zero_grad()
        logp, ent = sequence_logprobs(model, b, shared_prefix=shared, padding_free=padding_free)
        loss, _ = policy_loss(logp, logp.detach() - 0.05, adv, b.completion_mask, ent, LossConfig(entropy_coef=0.01),
                              norm)
        loss.backward()
        return logp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    from runner.algo.forward import padding_free_tokens

    assert padding_free_tokens(model, b) is not None  # the flat stream applies through peft too
    lp_full, ent_full, g_full = run(False)
    mask = b.completion_mask.bool()
    for padding_free in (False, True):
        lp_shared, ent_shared, g_shared = run(True, padding_free)
        torch.testing.assert_close(lp_shared[mask], lp_full[mask], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent_shared[mask], ent_full[mask], atol=1e-4, rtol=1e-4)
        assert g_full and set(g_full) == set(g_shared)
        for n in g_full:
            torch.testing.assert_close(g_shared[n], g_full[n], atol=1e-5, rtol=1e-4)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_checkpoint_holds_the_adapters_and_a_resume_restores_them(trained):
    t, _, _ = trained
    path = t.save_checkpoint()
    saved = ckpt.read(path)
    assert set(saved["model"]) == {n for n, p in t.model.named_parameters() if p.requires_grad}
    assert len(saved["optimizer"]["state"]) == len(saved["model"])  # Adam's moments of the adapters alone
    t2, _ = trainer(t.cfg, t.output_dir)
    assert t2.step == t.step == 2
    a, b = adapters(t.model), adapters(t2.model)
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    # the base weights are the preset's again (the tiny model is seeded), so the whole policy is the same
    for (n, p), (n2, p2) in zip(t.model.named_parameters(), t2.model.named_parameters()):
        assert n == n2 and torch.equal(p, p2), n
    s1, s2 = t.opt.state_dict(), t2.opt.state_dict()
    assert s1["state"].keys() == s2["state"].keys()
    for k in s1["state"]:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1["state"][k][key], s2["state"][k][key])
    ids = torch.randint(0, 1000, (2, 8))
    assert torch.equal(logits(t2.rollout_model, ids), logits(t.rollout_model, ids))


def test_a_checkpoint_of_other_weights_is_refused_with_its_reason(trained):
    t, _, _ = trained
    with pytest.raises(RuntimeError, match="holds full model weights .a run without LoRA."):
        lora.load_trainable(t.model, t.rollout_model.state_dict(), "ckpt-x")
    from runner.backend import TorchBackend

    bk = TorchBackend(config(r=0))
    bk.wrap(t.rollout_model, torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]))
    import runner.checkpoint as ckpt

    d = t.output_dir / "checkpoints"
    if ckpt.load_latest(d) is None:
        t.save_checkpoint()
    with pytest.raises(RuntimeError, match="holds LoRA adapters, not full weights"):
        bk.load(d)


def test_export_merges_on_a_copy_and_loads_with_from_pretrained(trained, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t, _, _ = trained
    before = adapters(t.model)
    out = t.backend.export_hf(t.model, t.tok, tmp_path / "hf_model")
    assert out == tmp_path / "hf_model" and not (tmp_path / ".hf_model.tmp").exists()
    assert not any(".lora_" in k or "base_layer" in k for k in load_file(out / "model.safetensors"))
    exported = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 1000, (3, 10))
    torch.testing.assert_close(logits(exported, ids), logits(t.model, ids), atol=1e-5, rtol=1e-5)
    # the policy keeps its adapters (a resume goes on training them)
    assert lora.is_lora(t.model) and all(torch.equal(p, before[n]) for n, p in adapters(t.model).items())
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok(["roll a dice."], return_tensors="pt")
    gen = exported.generate(**enc, do_sample=True, max_new_tokens=4, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > enc["input_ids"].shape[1]


def test_lora_leaves_the_sampling_stream_alone(tmp_path):
    """Same seed, same first rollouts with or without LoRA (B starts at 0: the same policy)."""
    full, _ = trainer(config(r=0), tmp_path / "full")
    after_setup = torch.get_rng_state()
    adapted, _ = trainer(config(), tmp_path / "lora")
    assert torch.equal(torch.get_rng_state(), after_setup)
    a = adapted.collector.collect(adapted.rollout, adapted.rollout_model, adapted.tok, 1)
    torch.set_rng_state(after_setup)
    b = full.collector.collect(full.rollout, full.rollout_model, full.tok, 1)
    assert torch.equal(a.batch.input_ids, b.batch.input_ids)


def test_deepspeed_zero3_trains_the_adapters_and_exports_them_merged(tmp_path):
    """Two processes, ZeRO-3: the adapters are gathered for the merge (rollout copy, export)."""
    from safetensors.torch import load_file

    from conftest import run_cli
    from runner.models import load_policy

    out = tmp_path / "z3"
    r = run_cli(["model=tiny", "model.lora.r=8", "algo.lr=1e-2", "algo.entropy.coef=0.01", "train.eval_every=0",
                 "train.eval_samples=4", "train.final_eval_samples=4", "train.prompts_per_step=2", "algo.group_size=4",
                 "rollout.max_new_tokens=4", "trainer=deepspeed", "trainer.num_procs=2", "trainer.zero_stage=3",
                 "train.steps=1", f"output_dir={out}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    exported = load_file(out / "hf_model" / "model.safetensors")
    torch.manual_seed(0)  # the run's seed: the tiny preset's base weights again
    base = load_policy(validate({"model": TINY}).model)[0].state_dict()
    assert set(exported) <= set(base)
    assert torch.equal(exported["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # frozen, whole
    assert not torch.equal(exported["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])


def test_an_adapter_on_the_tied_embedding_is_refused():
    from runner.models import load_policy

    with pytest.raises(ValueError, match=r"lm_head shares its weight with the tied embedding"):
        load_policy(validate({"model": {**TINY, "lora": {"r": 4, "target_modules": ["q_proj", "lm_head"]}}}).model)
