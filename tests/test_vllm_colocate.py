"""rollout=vllm colocated with training, to vLLM 0.32's V1 engine (runner/rollout/vllm.py).

On CPU: the weight-name mapping, the sync schedule, the sleep level, the order of sleep /
wake_up / reload / prefix-cache reset against a recording stand-in for vLLM's `LLM`, the
clear errors, and the rollout's whole generate / update cycle on the tiny model with that
stand-in. On a CUDA machine with the [gpu] extra: the real engine, a weight update and
sleep level 2, checked against the policy's own log-probs."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from envs import Prompt
from runner.config import ConfigError, validate
from runner.rollout import vllm as V
from runner.rollout.hf import render


# -- a stand-in for vLLM's LLM -----------------------------------------------------------------
class FakeLLM:
    """Records the calls colocation makes, in order, with the checks vLLM 0.32 itself makes:
    its executor ignores waking a tag that is not asleep (vllm/v1/executor/abstract.py) and
    pauses scheduling until every tag is awake (vllm/v1/engine/core.py)."""

    def __init__(self, completions=None, rpc_error=None):
        self.calls: list = []
        self.sleeping: set = set()
        self.loaded: list = []  # names of each load
        self.completions = completions or (lambda prompt, n: [[7, 8, 2]] * n)
        self.rpc_error = rpc_error
        self.prompts = None
        self.params = None

    def sleep(self, level=1, mode="abort"):
        assert not self.sleeping, "sleep while asleep"
        self.calls.append(("sleep", level))
        self.sleeping = {"weights", "kv_cache"}

    def wake_up(self, tags=None):
        for t in tags or sorted(self.sleeping):
            assert t in self.sleeping, f"wake_up({t}) of a tag that is awake"
        self.calls.append(("wake_up", tuple(tags or ())))
        self.sleeping -= set(tags or self.sleeping)
        return not self.sleeping

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        assert "weights" not in self.sleeping, "weights loaded into freed memory"
        if self.rpc_error:
            raise self.rpc_error
        assert method == "reload_weights" and kwargs["is_checkpoint_format"] is True
        self.loaded.append([n for n, _ in kwargs["weights_iterator"]])
        self.calls.append(("reload_weights",))
        return [None]

    def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False):
        self.calls.append(("reset_prefix_cache",))
        return True

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True):
        assert not self.sleeping, "generate on a sleeping engine would never be scheduled"
        self.calls.append(("generate",))
        self.prompts, self.params = prompts, sampling_params
        outs = []
        for p in prompts:
            rows = self.completions(p["prompt_token_ids"], sampling_params.n)
            outs.append(SimpleNamespace(outputs=[
                SimpleNamespace(token_ids=r, logprobs=[{t: SimpleNamespace(logprob=-0.5 - i)} for i, t in enumerate(r)])
                for r in rows]))
        return outs


def params(**kw):
    return SimpleNamespace(**kw)


def weights(*names):
    return [(n, torch.zeros(1)) for n in names]


# -- names -------------------------------------------------------------------------------------
def test_wrapper_prefixes_come_off():
    assert V.vllm_name("module.model.embed_tokens.weight") == "model.embed_tokens.weight"  # DeepSpeed / DDP
    assert V.vllm_name("_orig_mod.model.norm.weight") == "model.norm.weight"  # torch.compile
    assert V.vllm_name("module._orig_mod.lm_head.weight") == "lm_head.weight"
    assert V.vllm_name("model.layers.0._orig_mod.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert (V.vllm_name("model.layers.1._checkpoint_wrapped_module.self_attn.q_proj.weight")
            == "model.layers.1.self_attn.q_proj.weight")
    assert V.vllm_name("base_model.model.model.norm.weight") == "model.norm.weight"  # PEFT, no adapter here
    assert V.vllm_name("module.base_model.model.model.norm.weight") == "model.norm.weight"
    assert V.vllm_name("model.layers.0.self_attn.k_proj.bias") == "model.layers.0.self_attn.k_proj.bias"


@pytest.mark.parametrize("name", [
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight",
    "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight",
    "base_model.model.model.embed_tokens.lora_embedding_A.default",
    "base_model.model.lm_head.modules_to_save.default.weight",
])
def test_unmerged_lora_weights_are_refused(name):
    with pytest.raises(ValueError, match="Merge the adapter"):
        V.vllm_name(name)
    with pytest.raises(ValueError, match="PEFT adapter"):
        list(V.weight_items(weights("model.norm.weight", name), tied_embeddings=False))


def test_weight_items_leave_a_tied_head_out_and_detach():
    w = torch.zeros(2, requires_grad=True)
    named = [("module.model.embed_tokens.weight", w), ("model.norm.weight", w), ("lm_head.weight", w)]
    tied = list(V.weight_items(named, tied_embeddings=True))
    assert [n for n, _ in tied] == ["model.embed_tokens.weight", "model.norm.weight"]
    assert not tied[0][1].requires_grad
    assert [n for n, _ in V.weight_items(named, tied_embeddings=False)][-1] == "lm_head.weight"


def test_zero3_partitions_are_not_whole_parameters():
    m = torch.nn.Linear(2, 2)
    assert V.params_whole(m)
    m.weight.ds_id = 0  # how DeepSpeed ZeRO-3 marks a partitioned parameter
    assert not V.params_whole(m)
    empty = torch.nn.Module()
    empty.w = torch.nn.Parameter(torch.empty(0))  # a partition's local tensor outside a gathering block
    assert not V.params_whole(empty)


# -- schedule and sleep level ------------------------------------------------------------------
def test_sync_schedule_counts_optimizer_steps():
    s = V.SyncSchedule(every=3)
    assert [s.due() for _ in range(7)] == [False, False, True, False, False, True, False]
    assert s.synced_at == [3, 6]
    assert all(V.SyncSchedule(1).due() for _ in range(3))
    with pytest.raises(ValueError, match="sync_every"):
        V.SyncSchedule(0)


def test_sleep_level_two_only_where_every_wake_is_refilled_from_the_policy():
    assert V.sleep_level(False, 1, True) == 0
    assert V.sleep_level(True, 1, True) == 2
    assert V.sleep_level(True, 2, True) == 1  # between syncs the engine samples from the weights it keeps
    assert V.sleep_level(True, 1, False) == 1  # ZeRO-3: only the trainer can gather a refill


# -- the sleep / wake / load order ---------------------------------------------------------------
def test_level2_sleep_then_sync_then_generation_in_trls_order():
    e = FakeLLM()
    c = V.Colocation(e, level=2)
    c.sleep()
    c.load(weights("model.norm.weight"))
    assert e.sleeping == {"kv_cache"}  # the KV cache stays freed until the rollouts need it
    c.ready()
    assert e.calls == [("sleep", 2), ("wake_up", ("weights",)), ("reload_weights",),
                       ("wake_up", ("kv_cache",)), ("reset_prefix_cache",)]
    assert c.awake and not e.sleeping and e.loaded == [["model.norm.weight"]]


def test_level2_weights_discarded_by_a_skipped_update_are_reloaded_from_the_policy():
    e = FakeLLM()
    c = V.Colocation(e, level=2)
    c.sleep()  # the update that followed was skipped: no sync
    c.ready(lambda: iter(weights("a", "b")))
    assert e.calls == [("sleep", 2), ("wake_up", ("weights",)), ("reload_weights",),
                       ("wake_up", ("kv_cache",)), ("reset_prefix_cache",)]
    assert e.loaded == [["a", "b"]]


def test_level2_without_a_source_to_refill_from_fails_clearly():
    c = V.Colocation(FakeLLM(), level=2)
    c.sleep()
    with pytest.raises(RuntimeError, match="discarded by sleep level 2"):
        c.ready(None)


def test_level1_keeps_its_weights_between_syncs():
    e = FakeLLM()
    c = V.Colocation(e, level=1)
    c.sleep()
    c.ready(None)  # no sync due: the offloaded weights come back, nothing is loaded
    assert e.calls == [("sleep", 1), ("wake_up", ("weights",)), ("wake_up", ("kv_cache",))]
    c.sleep()
    c.load(weights("x"))
    c.ready(None)
    assert e.calls[3:] == [("sleep", 1), ("wake_up", ("weights",)), ("reload_weights",),
                           ("wake_up", ("kv_cache",)), ("reset_prefix_cache",)]


def test_without_sleep_mode_a_load_still_resets_the_prefix_cache_before_generating():
    e = FakeLLM()
    c = V.Colocation(e, level=0)
    c.sleep()
    c.load(weights("x"))
    c.ready(None)
    c.ready(None)  # nothing changed since: no second reset
    assert e.calls == [("reload_weights",), ("reset_prefix_cache",)]


def test_sleep_acts_on_a_fully_awake_engine_only():
    e = FakeLLM()
    c = V.Colocation(e, level=2)
    c.sleep()
    c.sleep()
    c.load(weights("x"))
    c.sleep()  # weights just loaded, KV cache still freed: nothing more to free
    assert e.calls == [("sleep", 2), ("wake_up", ("weights",)), ("reload_weights",)]


def test_an_engine_that_stays_partly_asleep_fails_clearly():
    e = FakeLLM()
    e.wake_up = lambda tags=None: False
    e.sleep = lambda level=1: None
    c = V.Colocation(e, level=1)
    c.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        c.ready(None)


@pytest.mark.parametrize("err", [NotImplementedError("Method 'reload_weights' is not implemented."),
                                 TypeError("reload_weights() got an unexpected keyword argument")])
def test_a_vllm_without_the_inplace_reload_fails_clearly(err):
    c = V.Colocation(FakeLLM(rpc_error=err), level=0)
    with pytest.raises(RuntimeError, match="reload_weights"):
        c.load(weights("x"))
    assert not c.cache_stale


# -- engine arguments and process ----------------------------------------------------------------
def rollout_cfg(**kw):
    return dataclasses.replace(validate({"model": {"name": "tiny", "source": "tiny"}}).rollout, name="vllm", **kw)


def test_engine_arguments():
    kw = V.engine_kwargs(rollout_cfg(gpu_memory_utilization=0.25), "/w", seed=3)
    assert kw == dict(model="/w", tokenizer="/w", dtype="bfloat16", gpu_memory_utilization=0.25,
                      enable_sleep_mode=True, seed=3, max_model_len=V.MAX_MODEL_LEN, enable_prefix_caching=True,
                      logprobs_mode="raw_logprobs")
    assert V.engine_kwargs(rollout_cfg(sleep=False), "/w", 0, "float32")["enable_sleep_mode"] is False
    assert V.engine_kwargs(rollout_cfg(), "/w", 0, "float32")["dtype"] == "float32"
    assert V.engine_kwargs(rollout_cfg(), "/w", 0, multi_rank=True)["distributed_executor_backend"] == "external_launcher"


def test_the_engine_runs_in_this_process(monkeypatch):
    monkeypatch.setenv(V.MULTIPROCESSING_ENV, "0")
    monkeypatch.delenv(V.MULTIPROCESSING_ENV)  # unset, and unset again after this test
    V.in_process_env()
    import os

    assert os.environ[V.MULTIPROCESSING_ENV] == "0"
    monkeypatch.setenv(V.MULTIPROCESSING_ENV, "1")
    with pytest.raises(ConfigError, match="own process"):
        V.in_process_env()
    with pytest.raises(ConfigError, match="own process"):  # before anything loads, where a GPU and vLLM exist
        V.multiprocess_refused()


def test_rng_is_left_as_it_was():
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    with V.kept_rng():
        torch.manual_seed(0)  # what vLLM's start does to the global generators
        torch.rand(10)
    assert torch.equal(torch.rand(3), want)


def test_sampled_reads_token_ids_and_their_logprobs():
    out = [SimpleNamespace(outputs=[SimpleNamespace(token_ids=(5, 9), logprobs=[
        {3: SimpleNamespace(logprob=-9.0), 5: SimpleNamespace(logprob=-1.0)},  # the sampled token, not the first key
        {9: SimpleNamespace(logprob=-2.0)}]), SimpleNamespace(token_ids=(), logprobs=None)])]
    assert V.sampled(out) == ([[5, 9], []], [[-1.0, -2.0], []])


# -- the rollout's cycle, as the trainer drives it -------------------------------------------------
def prompts():
    return [Prompt((("user", "roll a dice."),), "<answer>"),
            Prompt((("user", "roll a dice, a fair one, please."),), "<answer>")]


def test_generate_update_cycle_with_a_stand_in_engine(tiny):
    model, tok = tiny
    eos = tok.eos_token_id
    e = FakeLLM(completions=lambda p, n: [[11, 12, eos], [13]][: n] + [[14, eos]] * (n - 2))
    r = V.VLLMRollout(rollout_cfg(max_new_tokens=4), "unused", tok, 0, engine=e, sampling_params=params)
    r.on_policy_updated(model.named_parameters(), False, force=True)  # the trainer's first push
    assert r.schedule.updates == 0  # not an optimizer step

    b = r.generate(model, tok, prompts(), 3)
    enc = tok([render(tok, p) for p in prompts()], add_special_tokens=False)
    assert [p["prompt_token_ids"] for p in e.prompts] == enc["input_ids"]  # the batch's own tokens, unpadded
    assert (e.params.n, e.params.logprobs, e.params.max_tokens) == (3, 0, 4)
    assert eos in e.params.stop_token_ids
    assert len(b) == 6 and b.groups.tolist() == [0, 0, 0, 1, 1, 1]
    assert b.completion_mask[:3].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert b.finished[:3] == [True, False, True]  # the short row ends by length, whatever its padding is
    assert b.sampler_logprobs[0].tolist() == [-0.5, -1.5, -2.5]
    assert b.completion_ids[1].tolist() == [13, tok.pad_token_id, tok.pad_token_id]

    r.sleep()  # after collecting: whole parameters and a sync per step, so level 2
    r.on_policy_updated(model.named_parameters(), False)
    r.generate(model, tok, prompts()[:1], 2)
    assert e.calls == [("reload_weights",), ("reset_prefix_cache",), ("generate",),
                       ("sleep", 2), ("wake_up", ("weights",)), ("reload_weights",),
                       ("wake_up", ("kv_cache",)), ("reset_prefix_cache",), ("generate",)]
    names = {n for n, _ in model.named_parameters()}
    assert set(e.loaded[-1]) == names and "lm_head.weight" not in e.loaded[-1]

    r.sleep()  # an update that was skipped: the next rollouts reload from the policy
    r.generate(model, tok, prompts()[:1], 2)
    assert e.calls[-6:] == [("sleep", 2), ("wake_up", ("weights",)), ("reload_weights",),
                            ("wake_up", ("kv_cache",)), ("reset_prefix_cache",), ("generate",)]
    assert len(e.loaded) == 3 and set(e.loaded[-1]) == names


def test_sync_every_two_sleeps_at_level_1_and_pushes_every_other_step(tiny):
    model, tok = tiny
    e = FakeLLM()
    r = V.VLLMRollout(rollout_cfg(sync_every=2), "unused", tok, 0, engine=e, sampling_params=params)
    pushed = []
    for _ in range(4):
        r.generate(model, tok, prompts()[:1], 2)
        r.sleep()
        pushed.append(r.on_policy_updated(model.named_parameters(), True))
    assert pushed == [False, True, False, True]
    assert {c[1] for c in e.calls if c[0] == "sleep"} == {1}
    assert len(e.loaded) == 2


# -- the real engine ---------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_generation_weight_update_and_sleep_level2_on_gpu(tmp_path):
    """vLLM's sampled log-probs equal the policy's own (bf16 tolerance) at start, after a
    weight update through sleep level 2, and after a skipped update refilled from the policy."""
    pytest.importorskip("vllm", reason="needs the [gpu] extra")
    from runner.algo.forward import sequence_logprobs
    from runner.models import load_policy

    cfg = validate({"model": {"name": "tiny", "source": "tiny", "tokenizer_from": "smollm2_135m"}})
    torch.manual_seed(0)
    model, tok = load_policy(cfg.model, "cuda")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    r = V.VLLMRollout(dataclasses.replace(cfg.rollout, name="vllm", max_new_tokens=8, gpu_memory_utilization=0.2),
                      str(tmp_path), tok, seed=0)
    tied = V.ties_embeddings(model)

    def gap(batch):
        model.eval()
        with torch.no_grad():
            own, _ = sequence_logprobs(model, batch)
        m = batch.completion_mask.bool()
        return (own[m] - batch.sampler_logprobs[m]).abs().mean().item()  # vLLM samples in bfloat16

    b0 = r.generate(model, tok, prompts(), 4)
    assert b0.completion_mask.any() and gap(b0) < 0.05

    free = torch.cuda.mem_get_info()[0]
    r.sleep()
    assert r.state.level == 2 and not r.state.awake
    assert torch.cuda.mem_get_info()[0] > free  # vLLM gave its weights and KV cache back

    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # the optimizer step
    assert gap(b0) > 0.2  # the old rollouts are off this policy
    assert r.on_policy_updated(model.named_parameters(), tied)
    b1 = r.generate(model, tok, prompts(), 4)
    assert gap(b1) < 0.05

    r.sleep()  # a skipped update: no push; the discarded weights come back from the policy
    b2 = r.generate(model, tok, prompts(), 4)
    assert gap(b2) < 0.05


def test_vllm_log_probs_are_asked_at_the_loss_temperature():
    """The mismatch metrics and algo.is_cap compare like with like: vLLM reports untempered
    log-probs for loss_temperature 1, tempered ones when the loss follows the sampler, and any
    other loss temperature is refused before anything loads."""
    from types import SimpleNamespace

    from runner.config import ConfigError
    from runner.rollout.vllm import check_logprob_temperature, engine_kwargs

    cfg = SimpleNamespace(gpu_memory_utilization=0.3, sleep=True)
    assert engine_kwargs(cfg, "w", 0)["logprobs_mode"] == "raw_logprobs"
    assert engine_kwargs(cfg, "w", 0, logprob_temperature=1.5)["logprobs_mode"] == "processed_logprobs"
    check_logprob_temperature(1.0, 1.5)
    check_logprob_temperature(1.5, 1.5)
    with pytest.raises(ConfigError, match="algo.loss_temperature=2.0"):
        check_logprob_temperature(2.0, 1.5)
