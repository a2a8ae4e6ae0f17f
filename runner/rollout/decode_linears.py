"""Faster linear layers while decoding on CPU, for one rollout: the same products, computed
in the layout this machine's kernels are fastest at.

Why: a decode step multiplies a handful of rows (G completions) by every weight matrix, and
the library call behind `F.linear` is far from its best at that shape:

- bfloat16 weights (AMX CPUs): `F.linear` re-lays each weight out for oneDNN on every call.
  Packed once per rollout (~75 ms for the default model's 135M weights), the same products
  are bit-identical and ~30% faster (this project's 2-core Sapphire Rapids-class VMs: 20.5
  -> 14.8 ms for one decode step's linears).
- float32 weights: `x @ W.T` with few rows and a wide W (the vocabulary head, 49152 x 576)
  ran at 9-35 GFLOP/s on this project's 2-core AMD EPYC VMs, where `(W @ x.T).T` (the weight
  as the left operand, the result copied back to row-major) ran at 29-57: 37 -> 12 ms for
  6 rows, 81 -> 53 ms for 48; a whole decode forward 206 -> 179 ms at 12 rows, 363 -> 330
  at 48 (`python -m runner.bench --sides ours_plain_linears,ours`). Which layout wins
  depends on the BLAS and the CPU, so it is measured on the machine itself (a few
  decode-sized products, ~0.5 s for the default model at 48 rows) and a weight switches
  only where the other layout is clearly faster. The sums run in another order: the logits
  agree with `F.linear`'s to float32 rounding, not bitwise, so the choice is measured once
  per machine and kept (`linear_layouts.json` in the runner's cache dir, first measurement
  wins under a file lock): a timing that came out the other way in a later process would
  otherwise change the rounding, and a resumed run would no longer be bit-identical to
  an uninterrupted one.

Both live only while sampling (the weights change after every update), so they add
nothing to the training step's peak memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# a weight changes layout only when the other is at least this much faster (timing noise)
MARGIN = 0.9
LAYOUT_FILE = "linear_layouts.json"
# above this many rows F.linear is kept unmeasured: the layouts differ by ~10% there either
# way (at 960 rows the weight-major copy made the head 10% slower), and measuring a large
# evaluation batch (960 rows) would cost seconds
MAX_MEASURED_ROWS = 256
# this process's copy of the machine's choices: key -> whether the weight-major product is faster
_CHOICE: dict[str, bool] = {}


def supported(model) -> bool:
    """bf16 packing: bfloat16 weights on a CPU whose oneDNN has bf16 kernels."""
    p = next(model.parameters())
    ops = torch.ops.mkldnn
    return (p.device.type == "cpu" and p.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")
            and bool(ops._is_mkldnn_bf16_supported()))


def _packed(packed: torch.Tensor, bias: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def weight_major(weight: torch.Tensor, bias: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight, bias)` computed as (W @ x.T).T, returned row-major."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.mm(weight, rows.t()).t().contiguous()
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], weight.shape[0])


def _best_time(fn: Callable[[], torch.Tensor], repeats: int = 3) -> float:
    fn()  # warm-up: first-call allocations and kernel selection
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def layout_key(weight: torch.Tensor, rows: int) -> str:
    """What the choice depends on: the CPU, torch (its BLAS), threads, the shape, the rows."""
    from runner.host import cpu_description

    return (f"{cpu_description()} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
            f"{str(weight.dtype).removeprefix('torch.')} {weight.shape[0]}x{weight.shape[1]} | {rows} rows")


def _measure(weight: torch.Tensor, rows: int) -> bool:
    # a generator of its own: measuring must not move the sampler's random stream
    x = torch.randn(rows, weight.shape[1], dtype=weight.dtype, generator=torch.Generator().manual_seed(0))
    plain = _best_time(lambda: F.linear(x, weight))
    swapped = _best_time(lambda: weight_major(weight, None, x))
    return swapped < MARGIN * plain


def layout_path() -> Path:
    from runner.models import cache_dir

    return cache_dir() / LAYOUT_FILE


def weight_major_faster(weight: torch.Tensor, rows: int) -> bool:
    """This machine's choice for this weight shape at `rows` rows: read from the cache
    dir, or measured now and written there for every later process. Where the cache dir
    cannot be written, measured once per process (and said so)."""
    if rows > MAX_MEASURED_ROWS:
        return False
    key = layout_key(weight, rows)
    if key in _CHOICE:
        return _CHOICE[key]
    path = layout_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f".{path.name}.lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process measuring the same key waits for its answer
            try:
                known = json.loads(path.read_text()) if path.exists() else {}
            except ValueError:  # a damaged file: measured again
                known = {}
            if not isinstance(known.get(key), bool):
                known[key] = _measure(weight, rows)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
                os.replace(tmp, path)
            _CHOICE[key] = known[key]
    except OSError as e:
        log.warning("linear layouts not kept in %s (%s): measured for this process only", path, e)
        _CHOICE[key] = _measure(weight, rows)
    return _CHOICE[key]


def _plain_linears(model, dtype: torch.dtype) -> Iterator[torch.nn.Linear]:
    for m in model.modules():
        # a module whose forward is already replaced (hooks, adapters) is left alone
        if type(m) is torch.nn.Linear and "forward" not in m.__dict__ and m.weight.dtype == dtype:
            yield m


@contextlib.contextmanager
def decode_linears(model, rows_hint: int, mode: str = "auto") -> Iterator[int]:
    """Inside the block (no gradients), the model's `nn.Linear`s run the faster way for
    `rows_hint` rows; yields how many were changed (0: nothing changes). mode "auto": bf16
    packing where supported, else float32 weights measured; "weight_major": every float32
    CPU linear (tests); "plain": none (rollout.linears=plain)."""
    patched = []
    p = next(model.parameters())
    if mode != "plain" and supported(model):
        for m in _plain_linears(model, torch.bfloat16):
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), rows_hint)
            except RuntimeError:
                continue
            bias = None if m.bias is None else m.bias.detach()
            m.forward = lambda x, _p=packed, _b=bias: _packed(_p, _b, x)
            patched.append(m)
    elif mode != "plain" and p.device.type == "cpu" and p.dtype == torch.float32:
        for m in _plain_linears(model, torch.float32):
            w = m.weight.detach()
            if mode == "weight_major" or weight_major_faster(w, rows_hint):
                bias = None if m.bias is None else m.bias.detach()
                m.forward = lambda x, _w=w, _b=bias: weight_major(_w, _b, x)
                patched.append(m)
    try:
        yield len(patched)
    finally:
        for m in patched:
            del m.forward
