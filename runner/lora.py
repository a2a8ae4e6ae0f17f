"""LoRA adapters on the policy (model.lora.r > 0), through peft.

The policy becomes a `peft.PeftModel`: the base weights are frozen, only the adapters
train, and the optimizer, gradients and checkpoints hold the adapters alone. Everything
that runs the policy (the training forward, the shared-prefix forward, evaluation's exact
probabilities) runs it through the wrapper, whose LoRA layers sit inside the transformers
modules, so `get_decoder()`, `get_output_embeddings()` and the KV cache behave as before.

Rollouts sample from a plain transformers model holding the merged weights W + (alpha/r) B A
(`merged_copy`), refreshed after each optimizer step by re-merging only the adapted layers
(`sync_merged`): decoding then costs what it costs without LoRA. The export is the same
merged copy, made at the end, so the policy (and a resume from its checkpoint) keeps its adapters.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Iterator

import torch

ADAPTER = "default"  # peft's name for the one adapter


def enabled(model_cfg: Any) -> bool:
    return getattr(model_cfg, "lora", None) is not None and model_cfg.lora.r > 0


def is_lora(model) -> bool:
    """A policy wrapped by peft (what `apply` returns)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def apply(model, lora_cfg: Any):
    """The model with LoRA adapters on `lora_cfg.target_modules`, only those trainable."""
    from peft import LoraConfig, get_peft_model

    targets = list(lora_cfg.target_modules)
    # a tied embedding / LM head weight is one tensor used twice: an adapter on one use would
    # make the merged copy (both uses) differ from the policy (one use)
    out_emb = model.get_output_embeddings()
    tied = out_emb is not None and out_emb.weight is model.get_input_embeddings().weight
    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules="all-linear" if targets == ["all-linear"] else targets,  # peft's shorthand
                        bias="none", task_type="CAUSAL_LM")
    try:
        # the adapters' random init draws from a stream of its own: the run's sampling stream is
        # the one a full fine-tuning run with the same seed has (same first rollouts, A/B-comparable)
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(torch.initial_seed() + 1)
            # peft asks transformers 5 a deprecated question (is_gradient_checkpointing)
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            wrapped = get_peft_model(model, config)
    except ValueError as e:  # no module matched target_modules
        first = (str(e).splitlines() or [type(e).__name__])[0]
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(f"model.lora.target_modules={lora_cfg.target_modules!r}: {first} "
                         f"(this model's linear layers: {', '.join(linears)})") from None
    if tied:
        shared = out_emb.weight
        bad = [n for n, layer in adapted_layers(wrapped) if layer.get_base_layer().weight is shared]
        if bad:
            raise ValueError(f"model.lora.target_modules={lora_cfg.target_modules!r}: {bad[0]} shares its weight with "
                             f"the tied embedding / LM head, which LoRA here does not adapt; leave it out")
    return wrapped


def _plain_name(name: str) -> str:
    """A PeftModel's parameter or module name as the plain model has it."""
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name.replace(".base_layer", "")


def adapted_layers(model) -> Iterator[tuple[str, Any]]:
    """(plain module name, peft LoRA layer) for each layer that carries the adapter."""
    from peft.tuners.lora import LoraLayer

    for name, m in model.named_modules():
        if isinstance(m, LoraLayer) and ADAPTER in m.lora_A:
            yield _plain_name(name), m


def _merged(layer) -> torch.Tensor:
    """W + delta in float32 (whatever the layer's dtype), as peft's own merge computes it."""
    w = layer.get_base_layer().weight
    delta = layer.get_delta_weight(ADAPTER)
    return w.detach().float() + delta.detach().float()


def plain_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every parameter of the plain model, LoRA merged in; a model without
    LoRA gives its own named_parameters. (Under ZeRO-3: call inside the gather.)"""
    if not is_lora(model):
        yield from model.named_parameters()
        return
    layers = dict(adapted_layers(model))
    for name, p in model.named_parameters():
        if ".lora_" in name:
            continue
        plain = _plain_name(name)
        owner, _, leaf = plain.rpartition(".")
        if leaf == "weight" and owner in layers:
            yield plain, _merged(layers[owner]).to(p.dtype)
        else:
            yield plain, p


def _write_merged(dst: torch.Tensor, layer) -> None:
    """dst = W + scaling * B @ A. A plain linear adapter is one fused addmm (no temporary of
    the weight's size when dst is float32: ~8x faster than peft's delta-then-add on the
    default model's 210 adapted layers); anything else goes through peft's own delta."""
    from peft.tuners.lora import Linear

    base = layer.get_base_layer().weight
    if type(layer) is Linear and not layer.fan_in_fan_out and not layer.use_dora.get(ADAPTER, False):
        b, a, s = layer.lora_B[ADAPTER].weight, layer.lora_A[ADAPTER].weight, layer.scaling[ADAPTER]
        if dst.dtype == base.dtype == b.dtype == a.dtype == torch.float32:
            torch.addmm(base, b, a, alpha=s, out=dst)
        else:
            dst.copy_(torch.addmm(base.float(), b.float(), a.float(), alpha=s))
        return
    dst.copy_(_merged(layer).to(dst.dtype))


@torch.no_grad()
def sync_merged(dst, model) -> None:
    """Write the merged weights of `model` (a PeftModel) into `dst` (a plain model of the same
    architecture, any dtype). Only the adapted layers change during training: the rest of
    `dst` was copied once by `merged_copy`."""
    for name, layer in adapted_layers(model):
        _write_merged(dst.get_submodule(name).weight, layer)


@torch.no_grad()
def merged_copy(model, dtype: torch.dtype):
    """A plain transformers model (no peft) with `model`'s adapters merged, weights in `dtype`.
    Made without a full-precision temporary of the whole model; `model` is left unchanged.
    In the policy's own dtype, the frozen weights no adapter touches (embeddings, norms) are
    shared with it, not copied (they never change): 113 MB less on the default model."""
    adapted = {id(layer.get_base_layer().weight) for _, layer in adapted_layers(model)}
    memo: dict[int, Any] = {}
    for p in model.parameters():
        if p.dtype == dtype and not p.requires_grad and id(p) not in adapted:
            memo[id(p)] = p
        else:  # copy=True: never the policy's own storage for a weight the merge writes
            memo[id(p)] = torch.nn.Parameter(p.detach().to(dtype, copy=True), requires_grad=False)
    for b in model.buffers():
        if b.is_floating_point():
            memo[id(b)] = b.to(dtype, copy=True)
    plain = copy.deepcopy(model, memo).unload()  # peft's layers removed, nothing merged yet
    sync_merged(plain, model)
    return plain


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The adapters' tensors (what a LoRA checkpoint holds: the base weights are the
    preset's own, loaded again on resume)."""
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in keep}


def load_trainable(model, state: dict[str, torch.Tensor], where: str) -> None:
    """Put a checkpoint's adapter tensors back; refuse one written without the same adapters."""
    want = {n for n, p in model.named_parameters() if p.requires_grad}
    have = set(state)
    if have != want:
        what = ("full model weights (a run without LoRA)" if not any(".lora_" in k for k in have)
                else f"other adapters ({len(have)} tensors, this model has {len(want)})")
        raise RuntimeError(f"checkpoint {where} holds {what}; it cannot be resumed with model.lora.r>0 "
                           f"as configured: use the run's own model.lora settings or another output_dir")
    model.load_state_dict(state, strict=False)
