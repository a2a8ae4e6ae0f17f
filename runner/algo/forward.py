"""The training forward: completion log-probs and entropies under the current policy.

Paths that must give the same numbers (tests hold them to it):
- full: one forward over prompt + completion for every rollout;
- shared prefix: each distinct prompt is run once, its KV cache is indexed out to the
  rollouts that share it, and only completion tokens are run per rollout. With G=6 and a
  49-token prompt against ~10 completion tokens this removes most of the work. Gradients
  flow through the shared cache (indexing sums them back), so they are the same too;
- model tokens only (multi-turn episodes): the LM head only where the model's own tokens are;
- padding-free (`trainer.padding_free`, on): the shared-prefix forward as one flat stream of
  real tokens, each distinct prompt once and each rollout's completion after it, with an
  attention mask that lets a completion see its own prompt and its own earlier tokens only.
  Every linear layer then runs one matrix product per pass instead of one for the prompts
  and one for the completions (and its weight gradient one product, not two and a sum), no
  position is padding, and the LM head runs only where a real token is predicted. The mask
  is dense (N x N for N tokens), so it is used up to PADDING_FREE_MAX_TOKENS.
"""

from __future__ import annotations

import torch

from runner.algo.loss import token_logprobs
from runner.rollout.hf import RolloutBatch, completion_extents, position_ids

# the padding-free pass's largest flat stream (prompts once + completion tokens): its
# attention is dense over the stream, N^2 where the padded pass does rows x (prompt +
# completion), so past this the padded passes (length buckets) are used instead
PADDING_FREE_MAX_TOKENS = 1024
# ... and where no row shares its prompt (SFT on distinct examples) the stream saves no prompt
# forward, so its dense attention is paid for nothing past this: `python -m runner.bench --sft`
# (8 distinct examples of 128 tokens, a 1016-token stream) ran 1.33x slower than the padded
# shared-prefix passes on 2 cores (AMD EPYC Zen 4), where RL's shared-prompt streams of
# ~200-430 tokens ran 29-35% faster flat
PADDING_FREE_DISTINCT_MAX_TOKENS = 512


def sequence_logprobs(model, batch: RolloutBatch, shared_prefix: bool = False,
                      temperature: float = 1.0, padding_free: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, C] log-probs of the completion tokens and the policy's entropy at each, of the
    policy with its logits divided by `temperature` (algo.loss_temperature). padding_free:
    the shared-prefix forward as one flat stream where the model and the batch allow it
    (`padding_free_tokens`); entries past a row's last real token are then 0."""
    if batch.token_turn is not None:
        return _model_tokens_only(model, batch, temperature)
    if shared_prefix and padding_free and padding_free_tokens(model, batch) is not None:
        return _padding_free(model, batch, temperature)
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
    u_ids, u_attn, inverse = _unique_prompts(batch)
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


def _unique_prompts(batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(distinct prompt ids, their attention masks, each row's prompt index)."""
    P = batch.prompt_len
    uniq, inverse = torch.unique(torch.cat([batch.input_ids[:, :P], batch.attention_mask[:, :P]], 1), dim=0,
                                 return_inverse=True)
    return uniq[:, :P], uniq[:, P:], inverse


def padding_free_supported(model) -> bool:
    """A plain LM head and an attention that takes a custom boolean 4-D mask as it is (SDPA;
    flash-attention kernels take none)."""
    impl = getattr(model.config, "_attn_implementation", None)
    return _head_is_plain(model) and impl == "sdpa" and not getattr(model.config, "sliding_window", None)


def padding_free_tokens(model, batch: RolloutBatch, limit: int | None = None) -> int | None:
    """Length of the batch's flat stream (each distinct prompt's real tokens once, each
    row's completion tokens but its last), or None where the padding-free pass does not
    apply: an unsupported model, a single-turn batch only, or a stream over `limit`."""
    if batch.token_turn is not None or not padding_free_supported(model):
        return None
    _, u_attn, _ = _unique_prompts(batch)
    n = int(u_attn.sum()) + sum(max(e - 1, 0) for e in completion_extents(batch))
    if limit is None:
        limit = PADDING_FREE_MAX_TOKENS if u_attn.shape[0] < len(batch) else PADDING_FREE_DISTINCT_MAX_TOKENS
    return n if n <= limit else None


def _padding_free(model, batch: RolloutBatch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    comp = batch.completion_ids
    B, C = comp.shape
    u_ids, u_attn, inverse = _unique_prompts(batch)
    U, dev = u_ids.shape[0], comp.device
    prompt_len = u_attn.sum(1)
    ext = torch.as_tensor(completion_extents(batch), device=dev)
    seg_len = torch.cat([prompt_len, (ext - 1).clamp(min=0)])  # segments: U prompts, then B completions
    seg = torch.repeat_interleave(torch.arange(U + B, device=dev), seg_len)
    start = seg_len.cumsum(0) - seg_len
    ix = torch.arange(seg.numel(), device=dev) - start[seg]  # a token's index in its segment
    owner = torch.cat([torch.arange(U, device=dev), inverse])[seg]  # the prompt it belongs to
    is_prompt = seg < U
    # left padding is not in the stream; a completion's positions continue its prompt's
    pos = torch.where(is_prompt, ix, prompt_len[owner] + ix)
    cols = torch.arange(C, device=dev)
    inputs = cols[None, :] < (ext - 1).clamp(min=0)[:, None]  # [B, C]: completion tokens fed as inputs
    tokens = torch.cat([u_ids[u_attn.bool()], comp[inputs]])
    # a token sees its own segment up to itself; a completion token also its whole prompt
    mask = (((seg[:, None] == seg[None, :]) & (ix[None, :] <= ix[:, None]))
            | (is_prompt[None, :] & ~is_prompt[:, None] & (owner[:, None] == owner[None, :])))
    embeds = model.get_input_embeddings()(tokens).unsqueeze(0)
    hidden = model.get_decoder()(inputs_embeds=embeds, attention_mask=mask[None, None], position_ids=pos[None],
                                 use_cache=False).last_hidden_state[0]
    # the hidden state that predicts each real completion token: the prompt's last for the
    # first, the row's previous token for the rest
    real = cols[None, :] < ext[:, None]  # [B, C]
    at = torch.where(cols[None, :] == 0, (start[inverse] + prompt_len[inverse] - 1)[:, None],
                     start[U:][:, None] + cols[None, :] - 1)
    logits = model.get_output_embeddings()(hidden[at[real]])
    lp, ent = token_logprobs(logits.unsqueeze(0), comp[real].unsqueeze(0), temperature)
    logp = torch.zeros((B, C), dtype=lp.dtype, device=dev).masked_scatter(real, lp[0])
    entropy = torch.zeros((B, C), dtype=ent.dtype, device=dev).masked_scatter(real, ent[0])
    return logp, entropy
