"""The model's files: a local directory with config, weights and tokenizer, or a hub id already
in the local Hugging Face cache (looked up without the network)."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Optional

from runner.config import ConfigError, _is_hub_id
from runner.preflight.commandline import group_options

CONF = Path(__file__).resolve().parents[2] / "conf"

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# the model's files

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


def hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def hub_snapshot(repo_id: str, cache_dir: Optional[str] = None) -> Optional[Path]:
    """The local snapshot directory of a Hugging Face id, if its config.json is in the cache
    (no network: the cache lookup alone)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    except Exception:  # not a valid repo id
        return None
    return Path(found).parent if isinstance(found, str) else None


def check_model_dir(key: str, value: str, d: Path, need_tokenizer: bool, cached: bool = False) -> None:
    """A directory with what `save_pretrained` writes: config.json, weights, tokenizer."""
    if not d.is_dir():
        raise ConfigError(f"{key}={value!r}: is a file, not a directory; give a model directory (config.json, "
                          f"weights, tokenizer: what save_pretrained writes) or a Hugging Face id in the local cache")
    missing = []
    if not (d / "config.json").is_file():
        missing.append("config.json")
    if not any((d / f).is_file() for f in WEIGHT_FILES) and not any(d.glob("*.safetensors")):
        missing.append("weights (model.safetensors or pytorch_model.bin)")
    if need_tokenizer and not any((d / f).is_file() for f in TOKENIZER_FILES):
        missing.append("a tokenizer (tokenizer.json or tokenizer.model)")
    if missing:
        where = f"its cached snapshot {d}" if cached else "that directory"
        listed = missing[0] if len(missing) == 1 else ", ".join(missing[:-1]) + " and " + missing[-1]
        raise ConfigError(f"{key}={value!r}: {where} lacks {listed}; a model directory holds what "
                          f"save_pretrained writes for a model and its tokenizer")


def _preset(name: str) -> Optional[Any]:
    from omegaconf import OmegaConf

    path = CONF / "model" / f"{name}.yaml"
    return OmegaConf.load(path) if path.is_file() else None


def check_model(m: Any) -> Optional[Path]:
    """The model's files are on this machine. Returns the directory whose config.json
    describes the weights (None: the tiny model, or a GGUF not converted yet or damaged)."""
    if m.tokenizer_from and _preset(m.tokenizer_from) is None:
        raise ConfigError(f"model.tokenizer_from={m.tokenizer_from!r}: no such model preset; allowed: "
                          f"{', '.join(group_options('model'))}")
    if m.source in ("gguf", "tiny") and m.gguf_package:
        d = verified_cache(m.gguf_package, m.gguf_file or "")
        if m.source == "gguf":
            return d  # None: converted (again) when the model loads
    if m.source != "pretrained":
        return None
    path = os.path.expanduser(m.path)
    if os.path.exists(path):
        check_model_dir("model.path", m.path, Path(path), need_tokenizer=not m.tokenizer_from)
        return Path(path)
    snap = hub_snapshot(m.path) if _is_hub_id(m.path) else None
    if snap is None:
        raise ConfigError(
            f"model.path={m.path!r}: not a directory here and not in the local Hugging Face cache ({hub_cache()}); "
            f"models load from local paths and that cache only (no downloads): where there is network run "
            f"`hf download {m.path}` and copy the cache here (or set HF_HUB_CACHE), or give "
            f"model.path=/path/to/a/model/directory")
    check_model_dir("model.path", m.path, snap, need_tokenizer=not m.tokenizer_from, cached=True)
    return snap


def verified_cache(package: str, filename: str) -> Optional[Path]:
    """The converted model directory if it verifies against its digests (runner.models
    cache_problem), so nothing here reads a damaged config or tokenizer; None where it must
    be converted (again) from the GGUF, which the model's loading does; refused in one line
    where there is no GGUF to convert from."""
    from runner.models import cache_problem, prepared_dir

    d = prepared_dir(package, filename)
    problem = cache_problem(d)
    if problem is None:
        return d
    if importlib.util.find_spec(package) is None:
        state = "was not converted yet" if problem == "not converted yet" else f"is damaged ({problem})"
        raise ConfigError(f"model.gguf_package={package!r}: is not installed and its converted model {d} {state}; "
                          f"run `make setup`")
    return None


def tokenizer_dir(m: Any, model_dir: Optional[Path]) -> Optional[Path]:
    """Where runner.models.load_tokenizer will read the tokenizer from, if it is here already."""
    d: Optional[Path] = None
    if m.tokenizer_from:
        node = _preset(m.tokenizer_from)
        if node is not None and node.get("source") == "gguf":
            d = verified_cache(node.gguf_package, node.gguf_file)
        elif node is not None and node.get("path"):
            p = os.path.expanduser(node.path)
            d = Path(p) if os.path.isdir(p) else (hub_snapshot(node.path) if _is_hub_id(node.path) else None)
    elif m.source in ("tiny", "gguf") and m.gguf_package:
        d = verified_cache(m.gguf_package, m.gguf_file or "")
    else:
        d = model_dir
    return d if d is not None and (d / "tokenizer.json").is_file() else None


