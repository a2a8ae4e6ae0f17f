"""Every fast path against its straightforward reference on the tiny model."""

import json

import pytest
import torch

from envs import Prompt
from runner.algo.loss import BatchNorm, LossConfig, advantages, policy_loss
from runner.algo.forward import sequence_logprobs
from runner.rollout import decode_linears as dl
from runner.rollout.decode_linears import decode_linears
from runner.rollout.decode_linears import supported as packed_supported
from runner.rollout.hf import HFRollout, concat, sample_next, select

PROMPTS = [Prompt((("user", "roll a dice."),), "<answer>"),
           Prompt((("user", "roll a dice, a fair one, please. output it in tags."),), "<answer>")]


def batch(tiny, engine="loop", seed=0, n=8, group=3):
    model, tok = tiny
    torch.manual_seed(seed)
    return HFRollout(max_new_tokens=n, engine=engine).generate(model, tok, PROMPTS, group)


@pytest.fixture(params=["one_head", "two_calls", "padding_free"])
def shared_path(request, monkeypatch):
    """The shared-prefix forward's three forms: one embedding lookup and one LM-head product
    (plain heads), two whole-model calls (heads whose logits the model post-processes), or
    one flat stream of real tokens with a block attention mask (trainer.padding_free)."""
    import runner.algo.forward as forward

    if request.param == "two_calls":
        monkeypatch.setattr(forward, "_head_is_plain", lambda model: False)
    return request.param


def shared(model, b, path, **kw):
    """The shared-prefix forward by `path`, checking the padding-free one is really taken."""
    from runner.algo.forward import padding_free_tokens

    pf = path == "padding_free"
    assert (padding_free_tokens(model, b) is not None) == (path != "two_calls")
    return sequence_logprobs(model, b, shared_prefix=True, padding_free=pf, **kw)


def ragged(tiny, seed=0, lengths=(8, 1, 3, 5, 8, 2)):
    """Two prompts of different lengths (left padding), completions cut to `lengths`: a
    one-token completion, full-length ones and padding in between."""
    return cut_lengths(batch(tiny, seed=seed), lengths, tiny[1].pad_token_id)


def test_shared_prefix_forward_equals_full_forward(tiny, shared_path):
    model, _ = tiny
    b = ragged(tiny)
    model.eval()
    with torch.no_grad():
        full = sequence_logprobs(model, b, shared_prefix=False)
        shared_ = shared(model, b, shared_path)
    model.train()
    m = b.completion_mask.bool()
    torch.testing.assert_close(shared_[0][m], full[0][m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared_[1][m], full[1][m], atol=1e-4, rtol=1e-4)
    assert torch.isfinite(shared_[0]).all() and torch.isfinite(shared_[1]).all()


def test_every_forward_path_applies_the_loss_temperature(tiny, shared_path):
    from runner.algo.loss import token_logprobs
    from runner.rollout.hf import position_ids

    model, _ = tiny
    b = ragged(tiny)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                    position_ids=position_ids(b.attention_mask), use_cache=False)
        C = b.completion_ids.shape[1]
        ref = token_logprobs(out.logits[:, -C - 1:-1] / 1.5, b.completion_ids)
        full = sequence_logprobs(model, b, shared_prefix=False, temperature=1.5)
        shared_ = shared(model, b, shared_path, temperature=1.5)
    model.train()
    m = b.completion_mask.bool()
    for got in (full, shared_):
        torch.testing.assert_close(got[0][m], ref[0][m], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1][m], ref[1][m], atol=1e-4, rtol=1e-4)


def test_shared_prefix_gradients_equal_full_ones(tiny, shared_path):
    model, _ = tiny
    # rows from two rounds with different padding, as dynamic sampling builds them
    b = concat([ragged(tiny, seed=1), select(batch(tiny, seed=2), [3, 4, 5])], 0)
    adv = advantages(torch.randn(len(b)), b.groups)
    norm = BatchNorm(float(b.completion_mask.sum()), float(len(b)), 8.0)

    def grads(use_shared):
        model.zero_grad()
        logp, ent = (shared(model, b, shared_path) if use_shared else sequence_logprobs(model, b, shared_prefix=False))
        loss, _ = policy_loss(logp, logp.detach() - 0.05, adv, b.completion_mask, ent,
                              LossConfig(entropy_coef=0.01), norm)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    l_full, g_full = grads(False)
    l_shared, g_shared = grads(True)
    model.zero_grad()
    assert l_shared == pytest.approx(l_full, rel=1e-5, abs=1e-6)
    for a, b_ in zip(g_shared, g_full):
        torch.testing.assert_close(a, b_, atol=1e-5, rtol=1e-4)


def test_logit_postprocessing_models_keep_their_own_forward(tiny, monkeypatch):
    from runner.algo.forward import _head_is_plain

    model, _ = tiny
    assert _head_is_plain(model)
    monkeypatch.setattr(model.config, "final_logit_softcapping", 30.0, raising=False)
    assert not _head_is_plain(model)


def test_sampling_loop_equals_generate_when_greedy(tiny):
    model, tok = tiny
    outs = []
    for engine in ("loop", "generate"):
        torch.manual_seed(0)
        outs.append(HFRollout(temperature=1e-5, max_new_tokens=7, engine=engine).generate(model, tok, PROMPTS, 2))
    loop, gen = outs
    assert loop.completions == gen.completions
    assert torch.equal(loop.completion_mask, gen.completion_mask)
    n = min(loop.input_ids.shape[1], gen.input_ids.shape[1])
    assert torch.equal(loop.input_ids[:, :n], gen.input_ids[:, :n])


def assert_sampler_logprobs_match_training(model, b):
    """The sampling loop's log-probs of its tokens equal the training forward's."""
    model.eval()
    with torch.no_grad():
        logp, _ = sequence_logprobs(model, b)
    model.train()
    m = b.completion_mask.bool()
    torch.testing.assert_close(b.sampler_logprobs[m], logp[m], atol=1e-4, rtol=1e-4)


def stop_rows_early(monkeypatch, model, tok) -> None:
    """The sampler of runner.rollout.hf, made to write EOS for rows 0 and 3 at step 2 and
    for row 4 at step 4 (the third of the 4 rows still decoding then)."""
    import runner.rollout.hf as rollout

    eos = rollout.eos_token_ids(model, tok)[0]
    real = rollout.sample_next
    calls = {"n": 0}

    def stop_some(logits, temperature, top_p):
        out = real(logits, temperature, top_p)
        calls["n"] += 1
        if calls["n"] == 2:
            out[[0, 3]] = eos
        if calls["n"] == 4:
            out[2] = eos
        return out

    monkeypatch.setattr(rollout, "sample_next", stop_some)


def test_finished_rows_leave_the_decode_batch_without_changing_the_others(tiny, monkeypatch):
    """Rows that stop early are dropped from the KV cache; the rows still decoding must keep
    exactly the probabilities the policy gives their tokens (a wrong cache row would not)."""
    model, tok = tiny
    stop_rows_early(monkeypatch, model, tok)
    torch.manual_seed(5)
    b = HFRollout(max_new_tokens=8).generate(model, tok, PROMPTS, 3)
    lengths = b.completion_lengths.tolist()
    assert lengths[0] == lengths[3] == 2 and lengths[4] == 4 and max(lengths) == 8
    assert_sampler_logprobs_match_training(model, b)
    assert (b.input_ids[0, b.prompt_len + 2:] == tok.pad_token_id).all()


def test_sampling_loop_is_consistent_with_teacher_forcing(tiny):
    """Sampled tokens must have the probabilities the policy gives them in training."""
    model, _ = tiny
    b = batch(tiny, seed=3)
    assert_sampler_logprobs_match_training(model, b)
    assert b.completion_mask[:, 0].all() and len(b) == 6


def test_top_p_keeps_the_nucleus():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = torch.stack([sample_next(logits, 1.0, 0.7) for _ in range(300)])
    assert set(draws.flatten().tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7; 2 and 3 never drawn


def test_sampler_draws_from_the_tempered_distribution():
    """The inverse-CDF sampler against the probabilities it was given: 20000 draws per
    row, frequencies within 4 standard errors, zero-probability tokens never drawn."""
    torch.manual_seed(0)
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0], [0.0, 0.0, 0.1, 0.0, 0.9]])
    logits = torch.log(probs)
    for temperature in (1.0, 2.0):
        want = torch.softmax(logits / temperature, -1)
        draws = torch.stack([sample_next(logits.repeat(100, 1), temperature, 1.0) for _ in range(100)])
        draws = draws.view(-1, 2)  # [10000 draws, row]: the repeated rows alternate
        for row in range(2):
            freq = torch.bincount(draws[:, row], minlength=5).double() / draws.shape[0]
            se = (want[row] * (1 - want[row]) / draws.shape[0]).sqrt().double()
            assert ((freq - want[row].double()).abs() <= 4 * se + 1e-12).all(), (temperature, row, freq, want[row])
            assert (freq[want[row] == 0] == 0).all()


def test_bf16_autocast_logprobs_close_to_fp32(tiny):
    model, _ = tiny
    b = batch(tiny, seed=4)
    m = b.completion_mask.bool()
    with torch.no_grad():
        ref, _ = sequence_logprobs(model, b, shared_prefix=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, _ = sequence_logprobs(model, b, shared_prefix=True)
    assert low.dtype == torch.float32  # log-softmax is done in fp32 whatever the autocast
    assert (low[m] - ref[m]).abs().max() < 0.1


def test_bf16_rollout_copy_stays_in_sync_with_the_policy(tiny):
    from runner.train import rollout_copy, sync_rollout_weights

    model, _ = tiny
    state = {k: v.clone() for k, v in model.state_dict().items()}
    copy_ = rollout_copy(model, "bfloat16", "cpu")
    assert copy_ is not model and next(copy_.parameters()).dtype == torch.bfloat16
    assert rollout_copy(model, "float32", "cpu") is model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    sync_rollout_weights(copy_, model)
    for r, p in zip(copy_.parameters(), model.parameters()):
        assert torch.equal(r, p.to(torch.bfloat16))
    model.load_state_dict(state)


def test_fused_adamw_matches_the_reference_update():
    from runner.train import make_adamw

    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(50, 7)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    fused = make_adamw(a, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01)
    ref = torch.optim.AdamW(b, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01, foreach=False)
    assert fused.defaults.get("fused") is True
    for _ in range(5):
        g = [torch.randn_like(p) for p in a]
        for p, q, gg in zip(a, b, g):
            p.grad, q.grad = gg.clone(), gg.clone()
        fused.step()
        ref.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("scale", [0.01, 10.0])  # under and over the clipping limit
def test_step_clips_like_clip_grad_norm(scale):
    """The backend skips the rescale under the limit; the update must be clip_grad_norm_'s."""
    from omegaconf import OmegaConf

    from runner.backend import TorchBackend
    from runner.config import validate

    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Linear(30, 5))
    b = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Linear(30, 5))
    b.load_state_dict(a.state_dict())
    bk = TorchBackend(validate(OmegaConf.create({})))
    bk.wrap(a, torch.optim.SGD(a.parameters(), lr=1e-1))  # SGD: the weights show the clipped gradient
    ref = torch.optim.SGD(b.parameters(), lr=1e-1)
    for p, q in zip(a.parameters(), b.parameters()):
        p.grad = torch.randn_like(p) * scale
        q.grad = p.grad.clone()
    norm, stepped = bk.step(1.0)
    want = torch.nn.utils.clip_grad_norm_(b.parameters(), 1.0)
    ref.step()
    assert stepped and float(norm) == pytest.approx(float(want), rel=1e-6)
    assert (float(norm) > 1.0) == (scale > 1)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
        torch.testing.assert_close(p, q, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("algo", ["grpo", "dapo", "dr_grpo"])  # seq-mean, token-mean, constant-norm aggregation
def test_micro_batches_give_the_full_batch_update(tmp_path, algo):
    """trainer.grad_accum_steps cuts the batch for memory; the update must not change:
    gradients summed over micro-batches, each normalised by whole-batch counts."""
    from hydra import compose, initialize_config_dir

    from conftest import CONF
    from runner.config import validate
    from runner.train import Trainer

    def trainer(k):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = validate(compose("config", overrides=[
                "model=tiny", f"algo={algo}", "rollout.max_new_tokens=6", "algo.group_size=3", "algo.entropy.coef=0.01",
                "algo.num_iterations=2", f"trainer.grad_accum_steps={k}", "env=dice",
                f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}"]))
        t = Trainer(cfg, tmp_path / f"out-{k}")
        t.setup()
        return t

    ref = trainer(1)
    torch.manual_seed(0)
    batch = ref.rollout.generate(ref.rollout_model, ref.tok, ref.env.prompts(0, 3), 3)
    adv = torch.randn(len(batch))
    m1 = ref.update(batch, adv, [None] * len(batch))
    full = {n: p.detach().clone() for n, p in ref.model.named_parameters()}
    for k in (2, 4):
        t = trainer(k)
        assert len(t.backend.micro_batches(len(batch))) == k
        mk = t.update(batch, adv, [None] * len(batch))
        assert mk["train/loss"] == pytest.approx(m1["train/loss"], rel=1e-5, abs=1e-7)
        assert mk["train/grad_norm"] == pytest.approx(m1["train/grad_norm"], rel=1e-4)
        for n, p in t.model.named_parameters():
            torch.testing.assert_close(p.detach(), full[n], rtol=1e-5, atol=1e-6, msg=n)
    assert m1["train/grad_norm"] > 0


def test_bf16_precision_steps_fp32_master_weights(tmp_path):
    """trainer.precision=bf16: forward/backward on one bfloat16 copy (also the rollout
    copy), gradients added into the fp32 master weights AdamW steps, copy refreshed after
    the step and after a resume; the update agrees with the fp32 one up to bf16 rounding,
    also when the batch is cut into micro-batches (accumulated in fp32)."""
    from hydra import compose, initialize_config_dir

    from conftest import CONF
    from runner.config import validate
    from runner.train import Trainer

    def trainer(name, precision, gas=1):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = validate(compose("config", overrides=[
                "model=tiny", "rollout.max_new_tokens=6", "algo.group_size=3", "algo.entropy.coef=0.01",
                "rollout.dtype=bfloat16", f"trainer.precision={precision}", f"trainer.grad_accum_steps={gas}",
                "algo.lr=1e-3", "env=dice", f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}"]))
        t = Trainer(cfg, tmp_path / name)
        t.setup()
        return t

    ref = trainer("fp32", "fp32")
    assert ref.backend.compute_model is ref.model
    torch.manual_seed(0)
    batch = ref.rollout.generate(ref.rollout_model, ref.tok, ref.env.prompts(0, 3), 3)
    adv = torch.randn(len(batch))
    start = {n: p.detach().clone() for n, p in ref.model.named_parameters()}
    m_ref = ref.update(batch, adv, [None] * len(batch))
    d_ref = torch.cat([(p.detach() - start[n]).flatten() for n, p in ref.model.named_parameters()])

    for gas in (1, 2):
        t = trainer(f"bf16-{gas}", "bf16", gas)
        comp = t.backend.compute_model
        assert comp is not t.model and t.rollout_model is comp  # one low-precision copy
        assert next(t.model.parameters()).dtype == torch.float32 and next(comp.parameters()).dtype == torch.bfloat16
        m = t.update(batch, adv, [None] * len(batch))
        d = torch.cat([(p.detach() - start[n]).flatten() for n, p in t.model.named_parameters()])
        cos = torch.nn.functional.cosine_similarity(d, d_ref, dim=0)
        assert cos > 0.98, cos
        assert m["train/grad_norm"] == pytest.approx(m_ref["train/grad_norm"], rel=0.05)
        for (n, p), c in zip(t.model.named_parameters(), comp.parameters()):
            assert torch.equal(c.detach(), p.detach().to(torch.bfloat16)), n  # refreshed after the step
            assert c.grad is None  # moved into the fp32 master, not kept twice

    t.save_checkpoint()
    again = trainer("bf16-2", "bf16", 2)
    assert again.step == t.step
    for p, c in zip(again.model.parameters(), again.backend.compute_model.parameters()):
        assert torch.equal(c.detach(), p.detach().to(torch.bfloat16))
    for p, q in zip(again.model.parameters(), t.model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.skipif(not packed_supported(torch.nn.Linear(2, 2).to(torch.bfloat16)),
                    reason="this CPU/torch build has no oneDNN bf16 kernels")
def test_packed_linears_sample_exactly_what_plain_ones_do(tiny, monkeypatch):
    """bf16 CPU decoding with oneDNN-packed weights: same tokens, same log-probs, same
    seed; the modules are plain again afterwards (the next update changes the weights)."""
    import contextlib

    import runner.rollout.hf as rollout_mod
    from runner.backend import low_precision_copy

    model, tok = tiny
    low = low_precision_copy(model, torch.bfloat16).eval()
    with decode_linears(low, 6) as n:
        assert n == sum(type(m) is torch.nn.Linear for m in low.modules()) > 0
    assert not any("forward" in m.__dict__ for m in low.modules())
    prompts = PROMPTS  # two lengths: left padding too
    torch.manual_seed(5)
    packed = HFRollout(max_new_tokens=8, kernel="eager").generate(low, tok, prompts, 3)
    monkeypatch.setattr(rollout_mod, "decode_linears", lambda model, rows_hint, mode: contextlib.nullcontext(0))
    torch.manual_seed(5)
    plain = HFRollout(max_new_tokens=8, kernel="eager").generate(low, tok, prompts, 3)
    assert torch.equal(packed.input_ids, plain.input_ids)
    torch.testing.assert_close(packed.sampler_logprobs, plain.sampler_logprobs, rtol=0, atol=0)



@pytest.mark.parametrize("layout", ["weight_major", "packed"])
def test_other_layouts_compute_the_linear_layer(layout):
    """(W @ x.T).T row-major again, and oneDNN's product with the re-laid-out weight:
    F.linear's values (to float32 rounding), shape and layout, with and without a bias, for
    one row, a batch of rows and a 3-d input."""
    if layout == "packed" and not dl.onednn_available():
        pytest.skip("this torch build has no oneDNN")
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 32, generator=g), torch.randn(96, generator=g)
    packed = dl.pack(w, 6) if layout == "packed" else None
    for shape in ((1, 32), (6, 32), (4, 1, 32), (3, 5, 32)):
        x = torch.randn(*shape, generator=g)
        for bias in (None, b):
            out = dl.weight_major(w, bias, x) if layout == "weight_major" else dl.packed_linear(packed, bias, x)
            assert out.shape == shape[:-1] + (96,) and out.is_contiguous()
            torch.testing.assert_close(out, torch.nn.functional.linear(x, w, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["weight_major", "packed"])
def test_other_layouts_sample_what_plain_linears_do(tiny, monkeypatch, layout):
    """float32 CPU decoding with every linear in another layout: the sampler's log-probs of
    its tokens are the plain training forward's; the modules are plain again afterwards.
    Weight-major products are exact at the tiny model's sizes, so the same seed samples the
    same tokens; oneDNN's differ in the last bit, and on a near-uniform random model that
    can move an inverse-CDF draw over a token boundary, so there the tokens are not compared."""
    import runner.rollout.hf as rollout_mod

    if layout == "packed" and not dl.onednn_available():
        pytest.skip("this torch build has no oneDNN")
    model, tok = tiny
    model.eval()
    with decode_linears(model, 6, mode=layout) as n:
        assert n == sum(type(m) is torch.nn.Linear for m in model.modules()) > 0
        assert all("forward" in m.__dict__ for m in model.modules() if type(m) is torch.nn.Linear)
    assert not any("forward" in m.__dict__ for m in model.modules())
    runs, asked = {}, []
    for mode in (layout, "plain"):
        # the plain side goes through the config's switch (rollout.linears=plain) as given
        monkeypatch.setattr(rollout_mod, "decode_linears", lambda model, rows_hint, given, _m=mode: asked.append(given)
                            or decode_linears(model, rows_hint, _m if given == "auto" else given))
        torch.manual_seed(5)
        runs[mode] = HFRollout(max_new_tokens=8, linears="auto" if mode == layout else mode).generate(
            model, tok, PROMPTS, 3)
    assert asked == ["auto", "plain"]
    assert_sampler_logprobs_match_training(model, runs[layout])
    if layout == "weight_major":
        assert torch.equal(runs[layout].input_ids, runs["plain"].input_ids)
        torch.testing.assert_close(runs[layout].sampler_logprobs, runs["plain"].sampler_logprobs,
                                   rtol=1e-5, atol=1e-5)


def test_a_layout_must_be_clearly_faster_and_pay_for_its_packing():
    """The rule on hand-made timings: within the margin F.linear stays; a packed weight's
    re-layout is paid once per rollout, spread over DECODE_CALLS calls."""
    assert dl.choose({"plain": 1.0, "weight_major": 0.95, "packed": 0.95}, repack=0.0) == "plain"
    assert dl.choose({"plain": 1.0, "weight_major": 0.8}) == "weight_major"
    calls = dl.DECODE_CALLS
    assert dl.choose({"plain": 1.0, "weight_major": 0.8, "packed": 0.5}, repack=0.1 * calls) == "packed"
    assert dl.choose({"plain": 1.0, "weight_major": 0.8, "packed": 0.5}, repack=0.4 * calls) == "weight_major"
    assert dl.choose({"plain": 1.0, "weight_major": 1.2, "packed": 0.5}, repack=0.45 * calls) == "plain"


def test_auto_layout_follows_the_measurement_and_leaves_the_random_stream(tiny, monkeypatch, tmp_path):
    """mode auto switches exactly the weight shapes this machine measured faster in the
    other layout, measures each shape once per machine (the cache dir's file, read by every
    later process: a resumed run rounds as the first one did), and never draws from torch's
    global generator (the sampler's)."""
    model, _ = tiny
    monkeypatch.setenv("RUNNER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(dl, "_CHOICE", {})
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    head = model.get_output_embeddings().weight
    # this machine's file says: only the vocabulary head is faster, weight-major
    dl.layout_path().write_text(json.dumps({dl.layout_key(m.weight, 7): "weight_major" if m.weight.shape == head.shape
                                            else "plain" for m in linears}))
    measured = []
    real = dl._measure
    monkeypatch.setattr(dl, "_measure", lambda w, rows: measured.append(tuple(w.shape)) or real(w, rows))
    with decode_linears(model, 7) as n:
        switched = [m for m in linears if "forward" in m.__dict__]
        assert n == len(switched) > 0 and all(m.weight.shape == head.shape for m in switched)
    assert measured == []

    torch.manual_seed(3)
    before = torch.get_rng_state()
    for _ in range(2):
        with decode_linears(model, 5):
            pass
    assert torch.equal(torch.get_rng_state(), before)
    shapes = {tuple(m.weight.shape) for m in linears}
    assert sorted(measured) == sorted(shapes)  # each shape once, in this process
    kept = json.loads(dl.layout_path().read_text())
    assert {k for k in kept if k.endswith("| 5 rows")} == {dl.layout_key(m.weight, 5) for m in linears}

    monkeypatch.setattr(dl, "_CHOICE", {})  # a later process: reads, measures nothing
    with decode_linears(model, 5):
        pass
    assert sorted(measured) == sorted(shapes)

    dl.layout_path().write_text("{not json")  # a damaged file: measured again, rewritten
    monkeypatch.setattr(dl, "_CHOICE", {})
    with decode_linears(model, 5):
        pass
    assert len(measured) == 2 * len(shapes) and len(json.loads(dl.layout_path().read_text())) == len(shapes)

    key = dl.layout_key(head, 5)  # a value that names no layout (an older file's): measured again
    dl.layout_path().write_text(json.dumps({key: True}))
    monkeypatch.setattr(dl, "_CHOICE", {})
    with decode_linears(model, 5):
        pass
    assert json.loads(dl.layout_path().read_text())[key] in dl.LAYOUTS


def test_large_batches_keep_plain_linears_unmeasured(tiny, monkeypatch, tmp_path):
    """A 960-row evaluation batch keeps F.linear and measures nothing; at the limit it measures."""
    model, _ = tiny
    monkeypatch.setenv("RUNNER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(dl, "_CHOICE", {})
    sizes = []
    real = dl._measure
    monkeypatch.setattr(dl, "_measure", lambda w, rows: sizes.append(rows) or real(w, rows))
    with decode_linears(model, 960) as n:
        assert n == 0
    assert sizes == []
    with decode_linears(model, dl.MAX_MEASURED_ROWS):
        pass
    assert set(sizes) == {dl.MAX_MEASURED_ROWS}


def test_layout_choice_without_a_writable_cache_dir(tiny, monkeypatch, tmp_path):
    """A cache dir that cannot be created: the choice is measured for this process and the
    rollout samples as usual."""
    model, _ = tiny
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("RUNNER_CACHE_DIR", str(blocker / "cache"))  # under a regular file
    monkeypatch.setattr(dl, "_CHOICE", {})
    with decode_linears(model, 3) as n:
        assert n >= 0
    assert len(dl._CHOICE) == len({tuple(m.weight.shape) for m in model.modules() if type(m) is torch.nn.Linear})


def cut_lengths(batch, lengths, pad_id):
    """Rows shortened to the given completion lengths (as if they had stopped earlier)."""
    P = batch.prompt_len
    for i, n in enumerate(lengths):
        batch.completion_mask[i, n:] = False
        batch.attention_mask[i, P + n:] = 0
        batch.input_ids[i, P + n:] = pad_id
    return batch


@pytest.mark.parametrize("algo,k", [("grpo", 1), ("dapo", 2), ("dr_grpo", 1)])
def test_skipping_zero_advantages_and_length_buckets_give_the_same_update(tmp_path, algo, k):
    """trainer.skip_zero_advantage leaves rows with advantage exactly 0 out of the training
    passes, trainer.length_buckets cuts the passes by completion length: the weights after
    two updates (the second with every advantage 0, where only Adam's momentum moves them)
    must equal those of one pass over every row."""
    from hydra import compose, initialize_config_dir

    from conftest import CONF
    from runner.config import validate
    from runner.train import Trainer

    def trainer(skip, buckets, padding_free=False):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = validate(compose("config", overrides=[
                "model=tiny", f"algo={algo}", "rollout.max_new_tokens=8", "algo.group_size=3", "algo.num_iterations=2",
                f"trainer.grad_accum_steps={k}", f"trainer.skip_zero_advantage={skip}",
                f"trainer.length_buckets={buckets}", f"trainer.padding_free={padding_free}", "env=dice",
                f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}"]))
        t = Trainer(cfg, tmp_path / f"out-{skip}-{buckets}-{padding_free}")
        t.setup()
        return t

    ref = trainer(False, False)
    others = [trainer(True, False), trainer(False, True), trainer(True, True),
              trainer(False, False, True), trainer(True, True, True)]
    torch.manual_seed(0)
    batch = ref.rollout.generate(ref.rollout_model, ref.tok, ref.env.prompts(0, 3), 3)
    batch = cut_lengths(batch, [8, 2, 3, 8, 1, 2, 2, 7, 2], ref.tok.pad_token_id)
    adv = torch.tensor([0.0, 1.2, -1.2, 0.0, 0.0, 0.0, 0.5, 0.0, -0.5])  # group 2 has no signal
    for a in (adv, torch.zeros_like(adv)):
        m_ref = ref.update(batch, a, [None] * len(batch))
        for t in others:
            m = t.update(batch, a, [None] * len(batch))
            assert m["train/loss"] == pytest.approx(m_ref["train/loss"], rel=1e-5, abs=1e-7)
            assert m["train/grad_norm"] == pytest.approx(m_ref["train/grad_norm"], rel=1e-4, abs=1e-7)
            for (n, p), q in zip(t.model.named_parameters(), ref.model.parameters()):
                # every other path sums in another order (skipped rows, buckets, the flat
                # stream); Adam divides by sqrt(v), so where a gradient is ~0 that rounding can
                # move a weight by a few 1e-6 (seen for buckets after the sampler changed the
                # batch); a wrong update differs by ~lr = 5e-5 a step
                torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-5, msg=n)
    assert m_ref["train/skipped_seq_frac"] == 0.0
    assert others[0].update(batch, adv, [None] * 9)["train/skipped_seq_frac"] == pytest.approx(5 / 9)  # four rows carry signal
    assert others[0].learner.skips_zero_advantage() and others[1].learner.buckets_by_length(batch)
    # padding-free passes are not cut by length (they pad nothing): one pass per micro-batch
    micro = others[4].learner.micro_batches(batch, adv)[0]
    assert len(micro) == k and all(others[4].learner.padding_free(mb) for _, mb in micro)


def test_padding_free_passes_give_way_to_length_buckets_over_the_token_limit(tiny, monkeypatch):
    """The flat stream's attention is dense (N x N): a pass over PADDING_FREE_MAX_TOKENS
    runs padded, cut by length as before."""
    import runner.algo.forward as forward

    model, _ = tiny
    b = ragged(tiny)
    # 2 prompts' real tokens once + each completion's tokens but its last
    prompts = int(torch.unique(b.attention_mask[:, :b.prompt_len], dim=0).sum())
    n = forward.padding_free_tokens(model, b)
    assert n == prompts + sum(x - 1 for x in (8, 1, 3, 5, 8, 2))
    assert forward.padding_free_tokens(model, b, limit=n) == n and forward.padding_free_tokens(model, b, limit=n - 1) is None
    monkeypatch.setattr(forward, "PADDING_FREE_MAX_TOKENS", n - 1)
    assert forward.padding_free_tokens(model, b) is None
    # rows that share no prompt (SFT examples) have a lower limit: the stream saves no prompt forward
    from runner.rollout.hf import select

    monkeypatch.setattr(forward, "PADDING_FREE_MAX_TOKENS", 10 ** 6)
    inverse = forward._unique_prompts(b)[2].tolist()
    distinct = select(b, [inverse.index(0), inverse.index(1)])
    d = forward.padding_free_tokens(model, distinct)
    assert d is not None and forward.padding_free_tokens(model, b) is not None
    monkeypatch.setattr(forward, "PADDING_FREE_DISTINCT_MAX_TOKENS", d - 1)
    assert forward.padding_free_tokens(model, distinct) is None and forward.padding_free_tokens(model, b) == n
    monkeypatch.setattr(model.config, "_attn_implementation", "eager")
    assert not forward.padding_free_supported(model)


def test_length_buckets_cut_where_padding_costs_most():
    from runner.algo.forward import length_buckets

    ext = [5] * 47 + [16]
    assert sorted(map(len, length_buckets(list(range(48)), ext, overhead=54))) == [1, 47]
    assert length_buckets(list(range(6)), [5] * 6, overhead=54) == [list(range(6))]  # nothing to gain
    cut = length_buckets([0, 1, 2, 3], [3, 3, 3, 4], overhead=54)  # not worth a second pass
    assert cut == [[0, 1, 2, 3]]
    assert sorted(i for b in length_buckets(list(range(10)), [1, 9, 2, 8, 3, 7, 4, 6, 5, 16], 0.0) for i in b) == list(range(10))


class _GQA(torch.nn.Module):
    num_key_value_groups = 2
    is_causal = True


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_over_kv_heads_equals_sdpa(dtype, tol, masked):
    """One query token per row: the packed form is the same attention as transformers' SDPA
    (with no mask, where SDPA takes its slow enable_gqa route, and with a padding mask)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from runner.rollout.decode_attention import decode_sdpa

    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 4, 1, 16, generator=g).to(dtype)
    k, v = (torch.randn(5, 2, 9, 16, generator=g).to(dtype) for _ in range(2))
    mask = None
    if masked:
        mask = torch.ones(5, 1, 1, 9, dtype=torch.bool)
        mask[1, ..., :4] = False  # a left-padded row
    ours, _ = decode_sdpa(_GQA(), q, k, v, mask, scaling=0.25)
    ref, _ = sdpa_attention_forward(_GQA(), q, k, v, mask, scaling=0.25)
    assert ours.shape == ref.shape == (5, 1, 4, 16)
    torch.testing.assert_close(ours.float(), ref.float(), atol=tol, rtol=tol)
    if masked:  # the padded keys are really masked out: changing them changes nothing
        k2 = k.clone()
        k2[1, :, :4] += 100
        torch.testing.assert_close(decode_sdpa(_GQA(), q, k2, v, mask, scaling=0.25)[0], ours, atol=0, rtol=0)


@pytest.mark.parametrize("prompts", ["same_length", "ragged"])
def test_decode_attention_samples_what_sdpa_does(tiny, prompts):
    """The sampling loop with the packed decode attention (rollout.attention=auto) draws the
    same tokens with the same log-probs as with transformers' SDPA, is really used at every
    one-token step, and leaves the model's attention as it was (training runs SDPA)."""
    from runner.rollout.decode_attention import NAME

    model, tok = tiny
    ps = [PROMPTS[0]] * 2 if prompts == "same_length" else PROMPTS
    assert model.config._attn_implementation == "sdpa"
    seen = []
    hook = model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((kwargs["hidden_states"].shape[1], m.config._attn_implementation)),
        with_kwargs=True)
    try:
        out = {}
        for mode in ("auto", "sdpa"):
            seen.clear()
            torch.manual_seed(5)
            out[mode] = HFRollout(max_new_tokens=8, attention=mode).generate(model, tok, ps, 3)
            steps = [impl for length, impl in seen if length == 1]
            assert steps and set(steps) == {NAME if mode == "auto" else "sdpa"}
            assert model.config._attn_implementation == "sdpa"
    finally:
        hook.remove()
    assert torch.equal(out["auto"].input_ids, out["sdpa"].input_ids)
    torch.testing.assert_close(out["auto"].sampler_logprobs, out["sdpa"].sampler_logprobs, atol=1e-5, rtol=1e-5)
    assert_sampler_logprobs_match_training(model, out["auto"])
