"""The whole decode step of a Llama-family model in one C call, for bf16 rollouts on CPU.

Why: an eager transformers decode step of the default model is ~700 small torch ops
(30 layers of norms, projections, rotary, attention, residuals), each paying dispatch,
an output allocation and an OpenMP fork/join. At the few rows a rollout decodes that
overhead, not the bytes of the weights, set the step's time: 56 ms a token at 12 rows
against a 7.4 ms bandwidth floor (README, "Speed on AMD EPYC Zen 4"), and the oneDNN
linears ran at 6-14 GB/s. `fused_decode.c` runs the step in one OpenMP region (one fork,
~10 barriers a layer) with weights packed for AVX512-BF16 dot products, 12 rows x 32
outputs a register tile; everything between the products is float32 in the same loop.

What it is not: a second model. The weights are the rollout model's own bf16 parameters,
re-laid out at the start of each rollout (~45 ms for the default model: they change after
every update); the prompts' prefill runs through the same call (all of a prompt's tokens as
rows at their own positions: every key and value is written before any row attends, so each
sees exactly its earlier positions), each distinct prompt once, its cache then copied to the
G slots of its group. It reads the architecture from the model's config and refuses
(`unsupported` says why) anything it does not compute exactly: biases are taken where
present, rope tables come from the model's own rotary module, so rope scaling types whose
tables depend only on the position are covered. Rows are independent and every sum runs in
a fixed order inside one thread, so a step gives the same bits whatever the thread count.

The shared library is compiled once per machine (`cc -O3 -march=native -fopenmp`, ~2 s)
into the runner's cache dir, keyed by the source, the compiler and the CPU; it links the
same OpenMP runtime torch loaded (libgomp.so.1), so the two share one thread pool and wait
policy. The library is checked against its SHA-256 before it is loaded (a truncated
shared object kills the process in the dynamic loader) and rebuilt when damaged.
Numerics: float32 residual stream, norms, rotary, attention and logits; the
linears' inputs and the KV cache in bf16, as in the transformers bf16 model (whose residual
stream and logits are bf16): tested to be at least as close to a float32 forward as the
transformers bf16 step.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import torch

from runner.digests import file_sha256

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_suffix(".c")
MODEL_TYPES = ("llama", "qwen2")  # same block: pre-norm, rotary, GQA attention, SwiGLU MLP
_LIB: dict[str, object] = {}  # march -> the loaded CDLL; "error <march>" -> why it could not be built


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def has_bf16_dot() -> bool:
    """AVX512-BF16 (vdpbf16ps): the products' fast route (AMD Zen 4+, Intel Cooper Lake+)."""
    return "avx512_bf16" in cpu_flags()


def _compiler() -> Optional[str]:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build_key(cc: str) -> str:
    from runner.host import cpu_description

    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    text = SOURCE.read_bytes() + version.encode() + cpu_description().encode() + " ".join(sorted(cpu_flags())).encode()
    return hashlib.sha256(text).hexdigest()[:16]


def library(march: str = "native") -> ctypes.CDLL:
    """The compiled kernel (built on first use, then read from the cache dir). Raises
    RuntimeError with the compiler's message when it cannot be built or loaded. `march`:
    the instruction set it is built for (tests build x86-64-v3 too: the plain-C products)."""
    if march in _LIB:
        return _LIB[march]
    if f"error {march}" in _LIB:
        raise RuntimeError(_LIB[f"error {march}"])
    try:
        _LIB[march] = _load(march)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _LIB[f"error {march}"] = f"the fused decode kernel could not be built: {e}"
        raise RuntimeError(_LIB[f"error {march}"]) from e
    return _LIB[march]


def _compile(cc: str, march: str, path: Path) -> None:
    """Into a temporary name, renamed once whole, its SHA-256 beside it: a crash mid-build
    leaves no half library, and a file damaged later is found before it is loaded (the
    dynamic loader does not check: a truncated library kills the process with SIGBUS)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    cmd = [cc, "-O3", f"-march={march}", "-fopenmp", "-shared", "-fPIC", "-o", str(tmp), str(SOURCE)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip().splitlines()[:3]}")
    digest = path.with_name(path.name + ".sha256")
    tmp_digest = digest.with_name(f".{digest.name}.{os.getpid()}.tmp")
    tmp_digest.write_text(file_sha256(tmp))
    os.replace(tmp, path)
    os.replace(tmp_digest, digest)


def _load(march: str) -> ctypes.CDLL:
    from runner.models import cache_dir

    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH; set CC or install gcc")
    out_dir = cache_dir() / "fused_decode"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"fused_decode-{march}-{_build_key(cc)}.so"
    digest = path.with_name(path.name + ".sha256")
    with open(out_dir / ".build.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process building the same key waits for it
        if path.exists() and not (digest.exists() and digest.read_text().strip() == file_sha256(path)):
            why = "does not match its digest (damaged)" if digest.exists() else "has no digest"
            log.warning("fused decode kernel %s %s: building it again", path, why)
            path.unlink()
        if not path.exists():
            _compile(cc, march, path)
        lib = ctypes.CDLL(str(path))
    lib.fd_pack.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    lib.fd_pack.restype = None
    lib.fd_step.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                            ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    lib.fd_step.restype = None
    lib.fd_linear.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                              ctypes.c_void_p, ctypes.c_int]
    lib.fd_linear.restype = None
    return lib


def pack(weights: list[torch.Tensor], lib: Optional[ctypes.CDLL] = None) -> torch.Tensor:
    """bf16 [N_i, K] weights in the kernel's layout (flat), their rows one after another: one
    product for projections that read the same input (q/k/v, gate/up). The last block's rows
    past the total are never stored (masked), so they need no zeros."""
    lib = lib or library()
    n, k = sum(w.shape[0] for w in weights), weights[0].shape[1]
    out = torch.empty(((n + 15) // 16 * 16) * k, dtype=torch.bfloat16)
    row = 0
    for w in weights:
        w = w.detach().to(torch.bfloat16).contiguous()
        lib.fd_pack(w.data_ptr(), w.shape[0], k, out.data_ptr(), row)
        row += w.shape[0]
    return out


def linear(x: torch.Tensor, packed: torch.Tensor, n_out: int, lib: Optional[ctypes.CDLL] = None) -> torch.Tensor:
    """x [R, K] (bf16) times a packed [n_out, K] weight, transposed: the kernel's product alone."""
    lib = lib or library()
    x = x.to(torch.bfloat16).contiguous()
    y = torch.empty(x.shape[0], n_out)
    lib.fd_linear(x.data_ptr(), x.shape[0], x.shape[1], packed.data_ptr(), n_out, y.data_ptr(),
                  torch.get_num_threads())
    return y


_P = ctypes.c_void_p


class _Model(ctypes.Structure):
    """fused_decode.c's Model, field for field."""

    _fields_ = [(k, ctypes.c_int) for k in ("layers", "hidden", "heads", "kv_heads", "head_dim", "inter", "vocab",
                                             "max_len", "max_rows", "threads")] + [("eps", ctypes.c_float)] + [
        (k, _P) for k in ("embed", "norm", "lm_head", "ln1", "ln2", "wqkv", "wo", "wgu", "wd", "bqkv", "bo", "bgu",
                          "bd", "kc", "vc", "cos", "sin", "start", "h", "y", "x", "scores", "buf")] + [("buf_len", ctypes.c_int)]


def _layers(model):
    inner = getattr(model, "model", None)
    return getattr(inner, "layers", None), inner


def unsupported(model) -> Optional[str]:
    """Why the fused step cannot run this model exactly (None: it can)."""
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.bfloat16:
        return f"needs bfloat16 weights on CPU (the rollout model is {p.dtype} on {p.device.type})"
    cfg = model.config
    if cfg.model_type not in MODEL_TYPES:
        return f"model type {cfg.model_type!r} is not one of {', '.join(MODEL_TYPES)}"
    layers, inner = _layers(model)
    if layers is None or not hasattr(inner, "rotary_emb") or not hasattr(inner, "embed_tokens"):
        return "not a transformers Llama-style module tree (model.model.layers, rotary_emb, embed_tokens)"
    if getattr(cfg, "hidden_act", None) != "silu":
        return f"hidden_act {cfg.hidden_act!r} (only silu)"
    if getattr(cfg, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    if getattr(cfg, "use_sliding_window", False) or getattr(cfg, "layer_types", None) and any(
            t != "full_attention" for t in cfg.layer_types):
        return "sliding-window attention"
    rope = getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type")) in ("dynamic", "longrope"):
        return f"rope scaling {rope.get('rope_type', rope.get('type'))!r} (its table depends on the length)"
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if heads * hd != cfg.hidden_size or hd % 2 or heads % kv:
        return f"attention shape heads={heads} kv_heads={kv} head_dim={hd} hidden={cfg.hidden_size}"
    if cfg.hidden_size % 2 or cfg.intermediate_size % 2:
        return "odd hidden or intermediate size"
    for i, layer in enumerate(layers):
        mods = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
        if any(type(m) is not torch.nn.Linear or "forward" in m.__dict__ for m in mods):
            return f"layer {i} has projections that are not plain nn.Linear (adapters or patched forwards)"
    if type(model.lm_head) is not torch.nn.Linear or model.lm_head.bias is not None:
        return "the LM head is not a plain bias-free nn.Linear"
    return None


def available(model, need_bf16_dot: bool = True) -> Optional[str]:
    """Why the fused step does not run this model here (None: it does). `rollout.kernel=auto`
    also needs avx512_bf16 (elsewhere the plain-C products are no faster than eager);
    `fused` runs wherever it builds."""
    if need_bf16_dot and not has_bf16_dot():
        return "this CPU has no avx512_bf16"
    reason = unsupported(model)
    if reason:
        return reason
    try:
        library()
    except RuntimeError as e:
        return str(e)
    return None


def _ptrs(tensors) -> ctypes.Array:
    return (_P * len(tensors))(*[t.data_ptr() if t is not None else None for t in tensors])


class FusedDecoder:
    """Decode state of one rollout: packed weights, a KV cache of `slots` rows x `max_len`
    positions, scratch for `max_batch` rows a call. `prefill` runs the prompts (each once,
    its cache then copied to its group's slots), `step` one token for the rows still
    decoding; both return float32 logits."""

    def __init__(self, model, slots: int, max_len: int, max_batch: Optional[int] = None,
                 lib: Optional[ctypes.CDLL] = None):
        reason = unsupported(model)
        if reason:
            raise ValueError(f"rollout.kernel=fused: {reason}")
        lib = lib or library()
        cfg = model.config
        layers, inner = _layers(model)
        L, D, I, V = len(layers), cfg.hidden_size, cfg.intermediate_size, model.lm_head.weight.shape[0]
        H, KVH = cfg.num_attention_heads, cfg.num_key_value_heads
        HD = D // H
        max_batch = max(max_batch or slots, slots)
        self.lib, self.slots, self.max_len, self.max_batch = lib, slots, max_len, max_batch
        keep = []  # every tensor whose pointer the C side holds

        def packed(weights: list[torch.Tensor]) -> torch.Tensor:
            keep.append(pack(weights, lib))
            return keep[-1]

        def bias(mods) -> Optional[torch.Tensor]:
            if all(m.bias is None for m in mods):
                return None
            b = torch.cat([m.bias.detach().float() if m.bias is not None else torch.zeros(m.out_features)
                           for m in mods])
            keep.append(b)
            return b

        def f32(t: torch.Tensor) -> torch.Tensor:
            t = t.detach().float().contiguous()
            keep.append(t)
            return t

        wqkv, wo, wgu, wd, bqkv, bo, bgu, bd, ln1, ln2 = ([] for _ in range(10))
        for layer in layers:
            a, mlp = layer.self_attn, layer.mlp
            wqkv.append(packed([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
            bqkv.append(bias([a.q_proj, a.k_proj, a.v_proj]))
            wo.append(packed([a.o_proj.weight]))
            bo.append(bias([a.o_proj]))
            wgu.append(packed([mlp.gate_proj.weight, mlp.up_proj.weight]))
            bgu.append(bias([mlp.gate_proj, mlp.up_proj]))
            wd.append(packed([mlp.down_proj.weight]))
            bd.append(bias([mlp.down_proj]))
            ln1.append(f32(layer.input_layernorm.weight))
            ln2.append(f32(layer.post_attention_layernorm.weight))
        embed = inner.embed_tokens.weight.detach().contiguous()
        lm_head = packed([model.lm_head.weight])
        norm = f32(inner.norm.weight)
        # rotary tables from the model's own module: its scaling type and attention factor included
        x = torch.zeros(1, 1, HD, dtype=torch.float32)
        cos, sin = inner.rotary_emb(x, torch.arange(max_len).unsqueeze(0))
        cos, sin = f32(cos[0]), f32(sin[0])
        self.kc = torch.empty(L, slots, KVH, max_len, HD, dtype=torch.bfloat16)
        self.vc = torch.empty_like(self.kc)
        self.start = torch.zeros(slots, dtype=torch.int32)
        threads = torch.get_num_threads()
        h = torch.empty(max_batch, D)
        y = torch.empty(max_batch, max(D + 2 * KVH * HD, 2 * I))
        xb = torch.empty(max_batch, max(D, I), dtype=torch.bfloat16)
        scores = torch.empty(threads, H // KVH, max_len)
        buf = torch.empty(threads, max(D, I))
        self.logits = torch.empty(slots, V)
        keep += [embed, self.kc, self.vc, self.start, h, y, xb, scores, buf]
        self._arrays = [_ptrs(v) for v in (ln1, ln2, wqkv, wo, wgu, wd, bqkv, bo, bgu, bd)]
        self._keep = keep
        eps = float(getattr(cfg, "rms_norm_eps", 1e-6))
        self._model = _Model(L, D, H, KVH, HD, I, V, max_len, slots, threads, eps,
                             embed.data_ptr(), norm.data_ptr(), lm_head.data_ptr(),
                             *[ctypes.cast(a, _P) for a in self._arrays],
                             self.kc.data_ptr(), self.vc.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                             self.start.data_ptr(), h.data_ptr(), y.data_ptr(), xb.data_ptr(), scores.data_ptr(),
                             buf.data_ptr(), max(D, I))

    def _run(self, tokens: torch.Tensor, slots: torch.Tensor, at: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[0]
        if n > self.max_batch:
            raise ValueError(f"{n} rows in one call, more than the {self.max_batch} this decoder has room for")
        if n and (int(at.max()) >= self.max_len or int(slots.max()) >= self.slots):
            raise ValueError(f"position or slot beyond the cache's {self.slots} slots x {self.max_len} positions")
        tokens, slots = tokens.to(torch.int64).contiguous(), slots.to(torch.int32).contiguous()
        at, out = at.to(torch.int32).contiguous(), out.to(torch.int32).contiguous()
        logits = self.logits[: out.shape[0]]
        self.lib.fd_step(ctypes.byref(self._model), n, tokens.data_ptr(), slots.data_ptr(), at.data_ptr(),
                         out.shape[0], out.data_ptr(), logits.data_ptr())
        return logits

    def prefill(self, prompt_ids: torch.Tensor, prompt_attn: torch.Tensor, group_size: int) -> torch.Tensor:
        """Left-padded prompts [prompts, P] into slots p*G .. p*G+G-1; the logits after each
        prompt's last token, repeated for its G rows [prompts * G, vocab]."""
        n_prompts, P = prompt_ids.shape
        if n_prompts * group_size > self.slots or P >= self.max_len:
            raise ValueError(f"{n_prompts} x {group_size} rows of {P} tokens do not fit {self.slots} x {self.max_len}")
        pad = P - prompt_attn.sum(-1)
        self.start[: n_prompts * group_size].copy_(pad.repeat_interleave(group_size).to(torch.int32))
        real = prompt_attn.bool()  # padding is never attended to, so it is never computed
        first = torch.arange(n_prompts) * group_size
        slots = first[:, None].expand(-1, P)[real]
        at = torch.arange(P)[None, :].expand(n_prompts, -1)[real]
        last = real.sum(-1).cumsum(0) - 1  # each prompt's last token among the rows
        logits = self._run(prompt_ids[real], slots, at, last)
        for p in range(n_prompts):  # the group's other slots: the same prompt cache
            f = int(first[p])
            self.kc[:, f + 1:f + group_size, :, :P] = self.kc[:, f:f + 1, :, :P]
            self.vc[:, f + 1:f + group_size, :, :P] = self.vc[:, f:f + 1, :, :P]
        return logits.repeat_interleave(group_size, dim=0)

    def step(self, tokens: torch.Tensor, slots: torch.Tensor, t: int) -> torch.Tensor:
        """Logits [len(tokens), vocab] (float32, valid until the next call) after each row's
        token at cache position t."""
        n = tokens.shape[0]
        return self._run(tokens, slots, torch.full((n,), t, dtype=torch.int32), torch.arange(n, dtype=torch.int32))
