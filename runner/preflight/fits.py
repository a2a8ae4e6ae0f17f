"""One generation batch against the model's context and this machine's memory."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

from runner.config import ConfigError
from runner.preflight.model_files import tokenizer_dir

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# one generation batch: the model's context and this machine's memory


def model_shape(c: Any, model_dir: Optional[Path], tok_dir: Optional[Path]) -> Optional[dict[str, Any]]:
    """Context and KV-cache shape from config.json (or the tiny preset), without weights."""
    m = c.model
    if m.source == "tiny":
        from runner.models import TINY_CONTEXT

        vocab = _json(tok_dir / "config.json").get("vocab_size") if tok_dir is not None else None
        return {"context": TINY_CONTEXT, "layers": m.num_hidden_layers, "kv_heads": m.num_key_value_heads,
                "head_dim": m.hidden_size // m.num_attention_heads, "vocab": vocab, "where": "model=tiny (runner/models.py)"}
    if model_dir is None:
        return None
    cfg = _json(model_dir / "config.json")
    if "num_hidden_layers" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]
    first = lambda *names: next((cfg[n] for n in names if isinstance(cfg.get(n), int)), None)  # noqa: E731
    heads = first("num_attention_heads", "n_head")
    hidden = first("hidden_size", "n_embd")
    return {"context": first("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"),
            "layers": first("num_hidden_layers", "n_layer"), "kv_heads": first("num_key_value_heads") or heads,
            "head_dim": first("head_dim") or (hidden // heads if hidden and heads else None),
            "vocab": first("vocab_size"), "where": str(model_dir / "config.json")}


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _chat_renderer(d: Path):
    """prompt -> the text the rollout tokenizes (runner.rollout.hf.render), from the chat
    template on disk (jinja, as transformers renders it) without importing transformers
    (seconds). No template: the messages' text alone, fewer tokens than the real prompt."""
    tc = _json(d / "tokenizer_config.json")
    template = tc.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not template and (d / "chat_template.jinja").is_file():
        template = (d / "chat_template.jinja").read_text()

    def plain(p: Any) -> str:
        return "\n".join(text for _, text in p.messages) + p.assistant_prefix

    if not template:
        return plain
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **_: json.dumps(x, indent=indent,
                                                                                        ensure_ascii=ensure_ascii)
    env.globals.update(raise_exception=raise_exception, strftime_now=time.strftime)
    tpl = env.from_string(template)
    specials = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in tc.items() if k.endswith("_token")}

    def render(p: Any) -> str:
        try:
            messages = [{"role": r, "content": text} for r, text in p.messages]
            return tpl.render(messages=messages, add_generation_prompt=True, **specials) + p.assistant_prefix
        except Exception:  # a template that needs more than this: the lower bound
            return plain(p)

    return render


def env_prompts(c: Any) -> tuple[list, Optional[list]]:
    """(the first step's prompts, the held-out ones or None), from the environment built as
    the run will build it; ([], None) where that fails. A ConfigError it raises is this
    command's refusal and goes through: the dataset env reads and checks its whole file here
    (envs/dataset.py load_rows, which the run's own build then finds cached), so a bad file
    is exit 2 before any model loads. Any other error is reported when the run builds it."""
    try:
        from runner.plugins import build_env

        env = build_env(c.env, c.seed)
        prompts = list(env.prompts(0, c.train.prompts_per_step))
        return prompts, (list(env.eval_prompts()) if hasattr(env, "eval_prompts") else None)
    except Exception as e:
        refusal = _config_error(e)
        if refusal is not None:
            raise refusal from None
        return [], None


def _config_error(e: Optional[BaseException]) -> Optional[ConfigError]:
    """The ConfigError behind `e`: Hydra's instantiate wraps what the target raises in an
    InstantiationException (raised from it), which would hide the one-line refusal."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, ConfigError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def prompt_tokens(c: Any, tok_dir: Optional[Path]) -> tuple[int, Optional[int]]:
    """(the longest prompt in tokens among the first step's and the held-out ones, the
    number of held-out prompts or None); (0, None) where it cannot be told cheaply."""
    prompts, heldout = env_prompts(c)
    if not prompts:
        return 0, None
    n_heldout = len(heldout) if heldout is not None else None
    if tok_dir is None:
        return 0, n_heldout
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
        render = _chat_renderer(tok_dir)
        unique = list(dict.fromkeys(prompts + (heldout or [])))[:2000]
        return max(len(tok.encode(render(p), add_special_tokens=False).ids) for p in unique), n_heldout
    except Exception:
        return 0, n_heldout


def available_memory(device: str) -> tuple[int, str]:
    """Bytes a generation batch can use: a GPU's total memory, else the RAM available now."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_properties(0).total_memory, "GPU memory"
    try:
        import psutil

        return int(psutil.virtual_memory().available), "RAM available"
    except ImportError:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "RAM available"
    return sys.maxsize, "RAM"


def rollout_bytes(c: Any, device: str) -> int:
    """Bytes per value of the weights rollouts sample from (runner.backend.rollout_dtype)."""
    name = c.rollout.dtype
    if name != "auto":
        return 2 if name == "bfloat16" else 4
    if device == "cuda":
        return 2
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 4
    return 2 if ("avx512_bf16" in flags or "amx_bf16" in flags) else 4


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def check_fits(c: Any, device: str, model_dir: Optional[Path]) -> None:
    """The prompt plus rollout.max_new_tokens fit the model's context, and one generation
    batch fits in memory: a training step's algo.group_size x train.prompts_per_step rows,
    an evaluation's train.eval_samples (train.final_eval_samples) rows, or a held-out set's
    env.eval_k per prompt, train.eval_rows of them at once. The estimate is a floor (KV cache and the
    sampler's float32 logits; not weights, optimizer or activations), so what it refuses
    cannot run."""
    m = c.model
    tok_dir = tokenizer_dir(m, model_dir)
    prompt, n_heldout = prompt_tokens(c, tok_dir)  # first: it builds the env, whose bad data is refused
    shape = model_shape(c, model_dir, tok_dir)
    if shape is None:
        return
    new = c.rollout.max_new_tokens
    ctx = shape["context"]
    if ctx and prompt + new > ctx:
        raise ConfigError(f"rollout.max_new_tokens={new}: with the prompt ({prompt} tokens) that is {prompt + new} "
                          f"tokens, past the model's context of {ctx} (max_position_embeddings of {shape['where']}); "
                          f"at most {max(ctx - prompt, 0)}")
    if c.rollout.name != "hf" or not (shape["layers"] and shape["kv_heads"] and shape["head_dim"]):
        return  # vLLM pages its KV cache within rollout.gpu_memory_utilization and queues the rest
    tokens = prompt + new
    nbytes = rollout_bytes(c, device)
    kv_row = shape["layers"] * 2 * shape["kv_heads"] * shape["head_dim"] * nbytes * tokens
    logits_row = (shape["vocab"] or 0) * 4 * 2  # the sampler's float32 probabilities and their cumulative sum
    t, env = c.train, c.env
    train_rows = c.algo.group_size * t.prompts_per_step
    if device == "cuda" and c.trainer.name == "deepspeed":
        train_rows = math.ceil(train_rows / c.trainer.num_procs)  # each GPU samples its share
    batches = [("algo.group_size x train.prompts_per_step", f"{c.algo.group_size}x{t.prompts_per_step}", train_rows)]
    if n_heldout is not None:
        k = getattr(env, "eval_k", 1)  # sampled train.eval_rows rollouts (whole prompts) at a time
        rows = k * min(n_heldout, max(1, t.eval_rows // k))
        batches.append(("train.eval_rows", f"{t.eval_rows} (env.eval_k={k} x {n_heldout} held-out prompts)", rows))
    else:
        batches.append(("train.eval_samples", str(t.eval_samples), t.eval_samples))
        if t.final_eval_samples is not None:
            batches.append(("train.final_eval_samples", str(t.final_eval_samples), t.final_eval_samples))
    avail, what = available_memory(device)
    for key, value, rows in batches:
        need = rows * (kv_row + logits_row)
        if need > avail:
            raise ConfigError(
                f"{key}={value}: one generation batch of {rows} rows x {tokens} tokens needs at least {_gib(need)} "
                f"(KV cache {_gib(rows * kv_row)}: {shape['layers']} layers x 2 (K, V) x {shape['kv_heads']} KV heads x "
                f"{shape['head_dim']} dims x {nbytes} bytes per token; sampling logits {_gib(rows * logits_row)}) and "
                f"this machine has {_gib(avail)} of {what}; lower it")


