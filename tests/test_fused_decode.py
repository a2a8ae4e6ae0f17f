"""The fused decode step (rollout.kernel) against the transformers model it replaces.

The fused step keeps the residual stream and logits in float32 where the transformers bf16
model rounds them to bf16, so the two are not bitwise equal; the reference is a float32
forward of the same bf16 weights, and the fused step must be at least as close to it as the
eager bf16 step is. On CPUs without avx512_bf16 the same C source compiles to its plain-C
route, so these tests run everywhere a C compiler does.
"""

import copy

import pytest
import torch

from runner.digests import file_sha256
from runner.backend import low_precision_copy
from runner.rollout import fused_decode
from runner.rollout.hf import HFRollout, position_ids
from tests.test_fast_paths import PROMPTS, assert_sampler_logprobs_match_training, stop_rows_early


def _qwen2_with_biases(vocab: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
                      rope_theta=10000.0, max_position_embeddings=256)
    torch.manual_seed(1)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # biases that matter (q/k/v carry them in Qwen2)
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
    return model


def _float32_of(low):
    ref = copy.deepcopy(low).float()
    for p, q in zip(ref.parameters(), low.parameters()):
        assert torch.equal(p, q.float())
    return ref.eval()


def _step_errors(low, steps: int = 6, rows: int = 5, lib=None):
    """Max |logit - float32 logit| after a ragged prompt's prefill and `steps` - 1 one-token
    steps, for the fused kernel and for the transformers bf16 model; the fp32 logits' scale;
    the fused logits."""
    ref = _float32_of(low)
    g = torch.Generator().manual_seed(0)
    V = low.config.vocab_size
    P = 9
    ids = torch.randint(0, V, (rows, P), generator=g)
    attn = torch.ones_like(ids)
    attn[0, :4] = 0  # left padding of different lengths
    attn[2, :1] = 0
    toks = torch.randint(0, V, (steps, rows), generator=g)
    with torch.inference_mode():
        full = torch.cat([ids, toks.t()], 1)
        fa = torch.cat([attn, torch.ones(rows, steps, dtype=attn.dtype)], 1)
        # the logits after the prompt's last token and after each of the first steps - 1 tokens
        want = ref(input_ids=full, attention_mask=fa, position_ids=position_ids(fa)).logits[:, P - 1:-1].float()
        dec = fused_decode.FusedDecoder(low, rows, P + steps, max_batch=rows * P, lib=lib)
        first = dec.prefill(ids, attn, 1).clone()
        slots = torch.arange(rows, dtype=torch.int32)
        fused = torch.stack([first] + [dec.step(toks[i], slots, P + i).clone() for i in range(steps - 1)], 1)
        pre = low(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn), use_cache=True)
        cache, a, pos, eager = pre.past_key_values, attn, position_ids(attn)[:, -1:] + 1, [pre.logits[:, -1].float()]
        for i in range(steps - 1):
            a = torch.cat([a, a.new_ones((rows, 1))], 1)
            out = low(input_ids=toks[i][:, None], attention_mask=a, position_ids=pos, past_key_values=cache,
                      use_cache=True)
            cache, pos = out.past_key_values, pos + 1
            eager.append(out.logits[:, -1].float())
        eager = torch.stack(eager, 1)
    return (fused - want).abs().max().item(), (eager - want).abs().max().item(), want.abs().max().item(), fused


def test_plain_c_products_compute_what_the_bf16_dot_ones_do(tiny):
    """The source's plain-C route (no avx512_bf16: built for x86-64-v3) against the native
    build: the same step to float32 summation order (on a CPU without avx512_bf16 both
    builds take the plain route; the float32 reference check above holds for each)."""
    low = low_precision_copy(tiny[0], torch.bfloat16).eval()
    plain = _step_errors(low, lib=fused_decode.library("x86-64-v3"))
    native = _step_errors(low)
    assert plain[0] <= native[1] * 1.05 + 1e-6  # as close to float32 as eager bf16
    diff = (plain[3] - native[3]).abs().max().item()
    assert diff < 0.25 * native[1] + 1e-6, (diff, native[1])  # and to each other, well inside bf16 rounding


@pytest.mark.parametrize("arch", ["llama", "qwen2_biases"])
def test_fused_step_is_as_close_to_float32_as_the_eager_bf16_step(tiny, arch):
    model = tiny[0] if arch == "llama" else _qwen2_with_biases(len(tiny[1]))
    low = low_precision_copy(model, torch.bfloat16).eval()
    assert fused_decode.unsupported(low) is None
    fused, eager, scale, _ = _step_errors(low)
    print(f"{arch}: max |logit error| fused {fused:.4g}, eager bf16 {eager:.4g}, logit scale {scale:.3g}")
    assert eager > 0  # the bf16 step really is rounded: the comparison means something
    assert fused <= eager * 1.05 + 1e-6, (fused, eager)
    assert fused < 0.02 * scale, (fused, scale)


def test_fused_sampling_loop_matches_teacher_forcing_as_rows_finish(tiny, monkeypatch):
    """The whole loop with rollout.kernel=fused: rows that stop early leave the batch (their
    cache slots are skipped, not moved); every row's sampled tokens keep the log-probs a
    float32 teacher-forced forward of the same weights gives them (to bf16 rounding), and
    the tokens after a row's EOS are padding."""
    import runner.rollout.hf as rollout

    model, tok = tiny
    low = low_precision_copy(model, torch.bfloat16).eval()
    stop_rows_early(monkeypatch, low, tok)  # rows 0 and 3 stop at step 2, row 4 at step 4
    used = []
    monkeypatch.setattr(rollout._FusedSteps, "__call__", (lambda call: lambda self, t: used.append(len(t)) or
                                                          call(self, t))(rollout._FusedSteps.__call__))
    torch.manual_seed(5)
    b = HFRollout(max_new_tokens=8, kernel="fused").generate(low, tok, PROMPTS, 3)  # two prompt lengths
    lengths = b.completion_lengths.tolist()
    assert lengths[0] == lengths[3] == 2 and lengths[4] == 4 and max(lengths) == 8
    assert used == [6, 4, 4, 3, 3, 3, 3]  # one fused step per token after the first, finished rows gone
    assert (b.input_ids[0, b.prompt_len + 2:] == tok.pad_token_id).all()
    ref = _float32_of(low)
    from runner.algo.forward import sequence_logprobs

    with torch.no_grad():
        logp, _ = sequence_logprobs(ref, b)
    m = b.completion_mask.bool()
    torch.testing.assert_close(b.sampler_logprobs[m], logp[m], atol=3e-2, rtol=0)


def test_auto_kernel_leaves_float32_rollouts_to_the_eager_path(tiny):
    """float32 rollout weights are not the fused step's: auto samples exactly as eager does
    (the float32 tests everywhere else keep their reference path)."""
    model, tok = tiny
    assert "bfloat16" in fused_decode.unsupported(model)
    out = {}
    for kernel in ("auto", "eager"):
        torch.manual_seed(2)
        out[kernel] = HFRollout(max_new_tokens=6, kernel=kernel).generate(model, tok, PROMPTS, 2)
    assert torch.equal(out["auto"].input_ids, out["eager"].input_ids)
    assert torch.equal(out["auto"].sampler_logprobs, out["eager"].sampler_logprobs)
    assert_sampler_logprobs_match_training(model, out["auto"])


def test_fused_kernel_refuses_what_it_does_not_compute(tiny):
    from runner import lora
    from runner.config import validate

    model, tok = tiny
    with pytest.raises(ValueError, match=r"^rollout\.kernel=fused: needs bfloat16 weights"):
        HFRollout(max_new_tokens=4, kernel="fused").generate(model, tok, PROMPTS, 2)
    low = low_precision_copy(model, torch.bfloat16)
    adapted = lora.apply(copy.deepcopy(low), validate({"model": {"name": "tiny", "source": "tiny", "lora": {"r": 4}}})
                         .model.lora)
    assert fused_decode.unsupported(adapted)  # a peft wrapper (the merged rollout copy is plain)
    hooked = copy.deepcopy(low)
    proj = hooked.model.layers[1].mlp.up_proj
    proj.forward = lambda x: torch.nn.functional.linear(x, proj.weight) * 2  # a patched forward
    assert "not plain nn.Linear" in fused_decode.unsupported(hooked)
    odd = copy.deepcopy(low)
    odd.config.hidden_act = "gelu"
    assert "silu" in fused_decode.unsupported(odd)


def test_a_kernel_that_cannot_be_built_falls_back_under_auto(tiny, monkeypatch, tmp_path):
    """A failing compiler (a real one that exits 1) is reported with the command, `auto`
    samples through the eager path, `fused` refuses with the build error."""
    model, tok = tiny
    low = low_precision_copy(model, torch.bfloat16).eval()
    monkeypatch.setattr(fused_decode, "_LIB", {})
    monkeypatch.setenv("RUNNER_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    monkeypatch.setattr(fused_decode, "has_bf16_dot", lambda: True)
    reason = fused_decode.available(low)
    assert reason and "could not be built" in reason and "false" in reason
    torch.manual_seed(0)
    b = HFRollout(max_new_tokens=4, kernel="auto").generate(low, tok, PROMPTS, 2)
    assert len(b) == 4
    with pytest.raises(ValueError, match="rollout.kernel=fused: the fused decode kernel could not be built"):
        HFRollout(max_new_tokens=4, kernel="fused").generate(low, tok, PROMPTS, 2)


def test_library_is_built_once_per_machine_and_reused(monkeypatch, tmp_path):
    monkeypatch.setattr(fused_decode, "_LIB", {})
    monkeypatch.setenv("RUNNER_CACHE_DIR", str(tmp_path))
    fused_decode.library()
    built = list((tmp_path / "fused_decode").glob("*.so"))
    assert (built[0].parent / (built[0].name + ".sha256")).read_text() == file_sha256(built[0])
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    monkeypatch.setattr(fused_decode, "_LIB", {})  # as a new process: read from the cache dir, not rebuilt
    fused_decode.library()
    assert list((tmp_path / "fused_decode").glob("*.so")) == built and built[0].stat().st_mtime_ns == mtime


def test_a_damaged_library_in_the_cache_is_built_again(monkeypatch, tmp_path):
    import subprocess
    import sys

    monkeypatch.setattr(fused_decode, "_LIB", {})
    monkeypatch.setenv("RUNNER_CACHE_DIR", str(tmp_path))
    # built by another process (this one must not have the file mapped while it is cut)
    subprocess.run([sys.executable, "-c", "from runner.rollout import fused_decode as f; f.library('x86-64-v3')"],
                   check=True)
    (so,) = (tmp_path / "fused_decode").glob("*.so")
    so.write_bytes(so.read_bytes()[:1000])  # truncated, as by a full disk or a copy cut short
    monkeypatch.setattr(fused_decode, "_LIB", {})
    lib = fused_decode.library("x86-64-v3")
    w = torch.randn(20, 8).to(torch.bfloat16)
    x = torch.randn(3, 8).to(torch.bfloat16)
    torch.testing.assert_close(fused_decode.linear(x, fused_decode.pack([w], lib), 20, lib),
                               torch.nn.functional.linear(x.float(), w.float()), atol=1e-4, rtol=1e-4)
    assert so.stat().st_size > 1000


@pytest.mark.parametrize("march", ["native", "x86-64-v3"])
@pytest.mark.parametrize("rows,n,k", [(1, 16, 2), (13, 40, 10), (25, 3072 // 64, 64), (12, 200, 576)])
def test_packed_product_is_the_linear_layer(march, rows, n, k):
    """The products alone (fd_pack + the tiles): every row count up to and past a 12-row
    tile, output counts that end in half a tile or mid-block, against F.linear in float64
    on the same bf16 numbers."""
    lib = fused_decode.library(march)
    g = torch.Generator().manual_seed(rows * n)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    got = fused_decode.linear(x, fused_decode.pack([w], lib), n, lib)
    want = torch.nn.functional.linear(x.double(), w.double()).float()
    torch.testing.assert_close(got, want, atol=1e-4 * k ** 0.5, rtol=1e-5)


def test_the_same_bits_whatever_the_thread_count(tiny):
    """Every sum runs in a fixed order inside one thread: a resumed run on another thread
    count samples what the first one would have."""
    low = low_precision_copy(tiny[0], torch.bfloat16).eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, low.config.vocab_size, (2, 7), generator=g)
    attn = torch.ones_like(ids)
    attn[1, :2] = 0
    toks = torch.randint(0, low.config.vocab_size, (6,), generator=g)
    before = torch.get_num_threads()
    out = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            dec = fused_decode.FusedDecoder(low, 6, 12, max_batch=14)
            first = dec.prefill(ids, attn, 3).clone()
            out[threads] = (first, dec.step(toks, torch.arange(6, dtype=torch.int32), 7).clone())
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out[1][0], out[2][0]) and torch.equal(out[1][1], out[2][1])
