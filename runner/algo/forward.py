"""The training forward: completion log-probs and entropies under the current policy.

Paths that must give the same numbers (tests hold them to it):
- full: one forward over prompt + completion for every rollout;
- shared prefix: each distinct prompt is run once, its KV cache is indexed out to the
  rollouts that share it, and only completion tokens are run per rollout. With G=6 and a
  49-token prompt against ~10 completion tokens this removes most of the work. Gradients
  flow through the shared cache (indexing sums them back), so they are the same too;
- model tokens only (multi-turn episodes): the LM head only where the model's own tokens are.
"""

from __future__ import annotations

import torch

from runner.algo.loss import token_logprobs
from runner.rollout.hf import RolloutBatch, position_ids


def sequence_logprobs(model, batch: RolloutBatch, shared_prefix: bool = False,
                      temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, C] log-probs of the completion tokens and the policy's entropy at each, of the
    policy with its logits divided by `temperature` (algo.loss_temperature)."""
    if batch.token_turn is not None:
        return _model_tokens_only(model, batch, temperature)
    if shared_prefix:
        return _shared_prefix(model, batch, temperature)
    c = batch.completion_ids.shape[1]
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=position_ids(batch.attention_mask),
        logits_to_keep=c + 1,
        use_cache=False,
    )
    return token_logprobs(out.logits[:, :-1], batch.completion_ids, temperature)


def length_buckets(rows: list[int], extents: list[int], overhead: float, max_buckets: int = 3) -> list[list[int]]:
    """Rows cut by completion length into at most `max_buckets` training passes, so one
    rollout that ran to the length limit does not pad every short one to it (G=48 rollouts
    of 5 tokens and one of 16: 240 tokens instead of 768). Cost of a pass: its rows times its
    longest completion, plus `overhead` (the prompt forward, per-op costs); the cheapest cut
    wins. Same update: passes are micro-batches normalised by whole-batch counts."""
    order = sorted(rows, key=lambda i: extents[i])
    ext = [extents[i] for i in order]
    n = len(order)
    if n < 2:
        return [order] if order else []
    cuts = [k for k in range(1, n) if ext[k] != ext[k - 1]]  # cut before index k

    def cost(parts: list[tuple[int, int]]) -> float:
        return sum((b - a) * ext[b - 1] + overhead for a, b in parts)

    best = [(0, n)]
    options = [[(0, k), (k, n)] for k in cuts]
    if max_buckets >= 3:
        options += [[(0, i), (i, j), (j, n)] for i in cuts for j in cuts if j > i]
    for parts in options:
        if cost(parts) < cost(best):
            best = parts
    return [order[a:b] for a, b in best]


# config attributes of models whose causal-LM forward changes the head's logits (soft-capping,
# scaling): for these the logits come from the model's own forward, never from the head alone
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _head_is_plain(model) -> bool:
    cfg = model.config
    return (hasattr(model, "get_decoder") and model.get_output_embeddings() is not None
            and not any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in _LOGIT_POSTPROCESSING))


def _shared_prefix(model, batch: RolloutBatch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    P = batch.prompt_len
    comp = batch.completion_ids
    C = comp.shape[1]
    prompt_ids, prompt_attn = batch.input_ids[:, :P], batch.attention_mask[:, :P]
    uniq, inverse = torch.unique(torch.cat([prompt_ids, prompt_attn], 1), dim=0, return_inverse=True)
    u_ids, u_attn = uniq[:, :P], uniq[:, P:]
    if C > 1 and _head_is_plain(model):
        return _shared_prefix_one_head(model, batch, u_ids, u_attn, inverse, temperature)
    pre = model(input_ids=u_ids, attention_mask=u_attn, position_ids=position_ids(u_attn), use_cache=True,
                logits_to_keep=1)
    first = pre.logits[:, -1][inverse].unsqueeze(1)  # predicts each rollout's first token
    if C == 1:
        return token_logprobs(first, comp, temperature)
    cache = pre.past_key_values
    cache.batch_select_indices(inverse)
    attn = batch.attention_mask[:, : P + C - 1]
    rest = model(input_ids=comp[:, :-1], attention_mask=attn, position_ids=position_ids(attn)[:, P:],
                 past_key_values=cache, use_cache=True)
    return token_logprobs(torch.cat([first, rest.logits], dim=1), comp, temperature)


def _model_tokens_only(model, batch: RolloutBatch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-turn episodes are mostly the environment's tokens: run the transformer over the
    whole episode, but the LM head and the (memory-heavy) log-softmax only where the model's
    own tokens are predicted. Values elsewhere are 0 and masked out of every loss term."""
    P, comp = batch.prompt_len, batch.completion_ids
    C = comp.shape[1]
    hidden = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 position_ids=position_ids(batch.attention_mask), use_cache=False).last_hidden_state
    where = batch.completion_mask.bool()
    logits = model.get_output_embeddings()(hidden[:, P - 1:P + C - 1][where])
    lp, ent = token_logprobs(logits.unsqueeze(0), comp[where].unsqueeze(0), temperature)
    logp = torch.zeros(comp.shape, dtype=lp.dtype, device=lp.device).masked_scatter(where, lp[0])
    entropy = torch.zeros(comp.shape, dtype=ent.dtype, device=ent.device).masked_scatter(where, ent[0])
    return logp, entropy


def _shared_prefix_one_head(model, batch: RolloutBatch, u_ids: torch.Tensor, u_attn: torch.Tensor,
                            inverse: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared-prefix forward with one embedding lookup (prompts and completions
    together) and one LM-head product over every predicted position. Same numbers as two
    model calls; where the embedding and the head share one weight (tied, as in the default
    model) its gradient is built from two dense [vocab x hidden] terms instead of four:
    ~9% of a bf16 backward on the default model."""
    P, comp = batch.prompt_len, batch.completion_ids
    B, C = comp.shape
    decoder = model.get_decoder()
    embeds = model.get_input_embeddings()(torch.cat([u_ids.flatten(), comp[:, :-1].flatten()]))
    n = u_ids.numel()
    pre = decoder(inputs_embeds=embeds[:n].view(*u_ids.shape, -1), attention_mask=u_attn,
                  position_ids=position_ids(u_attn), use_cache=True)
    cache = pre.past_key_values
    cache.batch_select_indices(inverse)
    attn = batch.attention_mask[:, : P + C - 1]
    rest = decoder(inputs_embeds=embeds[n:].view(B, C - 1, -1), attention_mask=attn,
                   position_ids=position_ids(attn)[:, P:], past_key_values=cache, use_cache=True)
    hidden = torch.cat([pre.last_hidden_state[:, -1:][inverse], rest.last_hidden_state], dim=1)
    return token_logprobs(model.get_output_embeddings()(hidden), comp, temperature)
