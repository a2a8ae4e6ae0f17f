"""Faster linear layers while decoding on CPU, for one rollout: the same products, computed
in the layout this machine's kernels are fastest at.

Why: a decode step multiplies a handful of rows (G completions) by every weight matrix, and
the library call behind `F.linear` (MKL's sgemm) is far from its best at that shape. Three
layouts compute the same product:

- plain: `F.linear`, `x @ W.T`;
- weight_major: `(W @ x.T).T` copied back to row-major: the weight as the left operand.
  MKL runs "few rows times the 49152 x 576 vocabulary head" 1.3-3x faster this way on this
  project's AMD EPYC VMs;
- packed: the weight re-laid out once per rollout for oneDNN's matmul
  (`torch.ops.mkldnn._reorder_linear_weight`, the kernels Inductor uses for frozen CPU
  models). On the 2-core AMD EPYC (Zen 3) VMs a whole decode forward of the default model
  ran 25-27% faster than with plain linears (12 rows 166 -> 122 ms, 48 rows 322 -> 242 ms),
  the head at 12 rows 2.4x. For bfloat16 weights (AMX CPUs) it is always used: `F.linear`
  re-lays each bf16 weight out for oneDNN on every call, so packing once gives the
  bit-identical product ~30% faster.

Which fp32 layout wins depends on the BLAS, the CPU, the shape and the rows, so it is
measured on the machine itself (a few decode-sized products per weight shape, ~1 s for the
default model) and a weight leaves `F.linear` only where another layout is clearly faster;
a packed weight is rebuilt for every rollout (the weights change after each update), so
its re-layout counts against it, spread over DECODE_CALLS decode steps. The layouts sum in
different orders: the logits agree with `F.linear`'s to float32 rounding, not bitwise. So
the choice is measured once per machine and kept (`decode_linear_layouts.json` in the
runner's cache dir, first measurement wins under a file lock): a timing that came out the
other way in a later process would otherwise change the rounding, and a resumed run would
no longer be bit-identical to an uninterrupted one.

All of it lives only while sampling, so it adds nothing to the training step's peak memory.
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

# a weight changes layout only when another is at least this much faster (timing noise)
MARGIN = 0.9
LAYOUT_FILE = "decode_linear_layouts.json"
LAYOUTS = ("plain", "weight_major", "packed")
# decode steps a packed weight serves before it is rebuilt (the main job's max_new_tokens):
# its re-layout counts as 1/DECODE_CALLS of a call in the measurement
DECODE_CALLS = 8
# above this many rows F.linear is kept unmeasured: the layouts differ by ~10% there either
# way (at 960 rows the weight-major copy made the head 10% slower), and measuring a large
# evaluation batch (960 rows) would cost seconds
MAX_MEASURED_ROWS = 256
# this process's copy of the machine's choices: key -> layout
_CHOICE: dict[str, str] = {}


def onednn_available() -> bool:
    """torch's oneDNN matmul with weight packing (CPU builds with mkldnn)."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


def supported(model) -> bool:
    """bf16 packing: bfloat16 weights on a CPU whose oneDNN has bf16 kernels."""
    p = next(model.parameters())
    return (p.device.type == "cpu" and p.dtype == torch.bfloat16 and onednn_available()
            and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def pack(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """The weight re-laid out for oneDNN's matmul at about `rows` rows (any row count works)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def packed_linear(packed: torch.Tensor, bias: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def weight_major(weight: torch.Tensor, bias: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight, bias)` computed as (W @ x.T).T, returned row-major."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.mm(weight, rows.t()).t().contiguous()
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], weight.shape[0])


def _best_time(fn: Callable[[], object], repeats: int = 3) -> float:
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


def choose(per_call: dict[str, float], repack: Optional[float] = None) -> str:
    """The rule: the layout with the least cost per decode call (a packed weight's re-layout
    spread over DECODE_CALLS calls), `plain` unless that is below MARGIN x plain's."""
    cost = dict(per_call)
    if "packed" in cost:
        cost["packed"] += (repack or 0.0) / DECODE_CALLS
    best = min(cost, key=cost.__getitem__)
    return best if cost[best] < MARGIN * cost["plain"] else "plain"


def _measure(weight: torch.Tensor, rows: int) -> str:
    # a generator of its own: measuring must not move the sampler's random stream
    x = torch.randn(rows, weight.shape[1], dtype=weight.dtype, generator=torch.Generator().manual_seed(0))
    per_call = {"plain": _best_time(lambda: F.linear(x, weight)),
                "weight_major": _best_time(lambda: weight_major(weight, None, x))}
    repack = None
    if onednn_available():
        try:
            packed = pack(weight, rows)
            per_call["packed"] = _best_time(lambda: packed_linear(packed, None, x))
            repack = _best_time(lambda: pack(weight, rows), repeats=1)
        except RuntimeError:  # no oneDNN kernel for this dtype or shape
            per_call.pop("packed", None)
    return choose(per_call, repack)


def layout_path() -> Path:
    from runner.models import cache_dir

    return cache_dir() / LAYOUT_FILE


def layout_for(weight: torch.Tensor, rows: int) -> str:
    """This machine's layout for this weight shape at `rows` rows: read from the cache dir,
    or measured now and written there for every later process. Where the cache dir cannot
    be written, measured once per process (and said so)."""
    if rows > MAX_MEASURED_ROWS:
        return "plain"
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
            if known.get(key) not in LAYOUTS:
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


def _forward(layout: str, weight: torch.Tensor, bias: Optional[torch.Tensor],
             rows: int) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    if layout == "weight_major":
        return lambda x: weight_major(weight, bias, x)
    if layout == "packed" and onednn_available():
        try:
            packed = pack(weight, rows)
        except RuntimeError:
            return None
        return lambda x: packed_linear(packed, bias, x)
    return None


@contextlib.contextmanager
def decode_linears(model, rows_hint: int, mode: str = "auto") -> Iterator[int]:
    """Inside the block (no gradients), the model's `nn.Linear`s run the faster way for
    `rows_hint` rows; yields how many were changed (0: nothing changes). mode "auto": bf16
    weights packed where oneDNN has bf16 kernels, float32 weights in the layout measured
    fastest here; "weight_major" / "packed": every float32 CPU linear in that layout
    (tests, benchmarks); "plain": none (rollout.linears=plain)."""
    patched = []
    p = next(model.parameters())
    if mode == "plain" or p.device.type != "cpu":
        dtype = None
    elif supported(model):
        dtype = torch.bfloat16  # always packed: bit-identical to F.linear's bf16 product
    else:
        dtype = torch.float32
    for m in (_plain_linears(model, dtype) if dtype is not None else ()):
        w = m.weight.detach()
        if dtype == torch.bfloat16:
            layout = "packed"
        else:
            layout = mode if mode in LAYOUTS else layout_for(w, rows_hint)
        forward = _forward(layout, w, None if m.bias is None else m.bias.detach(), rows_hint)
        if forward is not None:
            m.forward = forward
            patched.append(m)
    try:
        yield len(patched)
    finally:
        for m in patched:
            del m.forward
