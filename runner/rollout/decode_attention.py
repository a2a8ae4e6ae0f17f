"""Attention while decoding on CPU: one query token per row, computed over the key/value
heads instead of over every query head.

Why: in a decode step of a grouped-query model (SmolLM2-135M: 9 query heads sharing 3
key/value heads) transformers' SDPA path takes one of two routes. With a padding mask it
reshapes the single query token to [rows, kv heads, queries per kv head, dim], so SDPA
runs 3 small problems of 3 queries each ("pack_gqa"). Without a mask (every prompt of the
batch the same length, as in the dice environments) it passes `enable_gqa=True` with 9
query heads of one token each, and torch's CPU flash kernel is slow at that shape: at 12
rows and ~40 cached tokens, 830 us a call in bfloat16 against 155 us packed, so 30 layers
spent ~20 ms of a ~77 ms decode step in attention (AMD EPYC Zen 4, 2 threads; 48 rows:
2.7 ms against 0.6 ms a call). The packed form is the same attention, computed by the same
SDPA kernel over the same keys and values; only how the heads are laid out differs.

So while sampling, the model's attention implementation is switched to one registered
here, which takes the packed route for every one-token CPU step (mask or none) and hands
everything else (the prompt's prefill, GPUs, models without grouped heads) to
transformers' own SDPA function unchanged. `rollout.attention=sdpa` leaves transformers'
dispatch alone.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import pack_gqa, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "runner_decode_sdpa"


def decode_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [B, H, 1, D], key/value
    [B, Hkv, T, D] -> ([B, 1, H, D], None)."""
    n_rep = getattr(module, "num_key_value_groups", 1)
    plain = (query.shape[2] != 1 or n_rep <= 1 or query.device.type != "cpu" or dropout
             or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
             or kwargs.get("cache") is not None)
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    batch, heads, _, dim = query.shape
    out = F.scaled_dot_product_attention(pack_gqa(query, n_rep), key, value,
                                         attn_mask=pack_gqa(attention_mask, n_rep), scale=scaling)
    # [B, Hkv, n_rep, D] -> [B, H, 1, D] -> [B, 1, H, D], the layout the caller reshapes
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, decode_sdpa)
AttentionMaskInterface.register(NAME, sdpa_mask)  # the same masks SDPA gets


@contextlib.contextmanager
def decode_attention(model, mode: str = "auto") -> Iterator[bool]:
    """Inside the block, a CPU model that attends with SDPA decodes with `decode_sdpa`;
    yields whether it was switched (mode "sdpa", other implementations or devices: no)."""
    config = model.config
    current = getattr(config, "_attn_implementation", None)
    switch = mode == "auto" and current == "sdpa" and next(model.parameters()).device.type == "cpu"
    if switch:
        config._attn_implementation = NAME
    try:
        yield switch
    finally:
        if switch:
            config._attn_implementation = current
