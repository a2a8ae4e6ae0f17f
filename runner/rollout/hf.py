"""Rollout engine: sample G completions per prompt with transformers `generate`.

The batch it returns carries everything the loss needs (token ids, masks, group ids) so
the trainer never re-tokenises text: re-tokenising a decoded completion can give other
tokens than were sampled, and the log-probs would then be of text the policy never wrote.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from envs.base import Prompt
from runner.rollout import fused_decode
from runner.rollout.decode_attention import decode_attention
from runner.rollout.decode_linears import decode_linears

log = logging.getLogger(__name__)


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor  # [B, P + C]: left-padded prompt, then completion
    attention_mask: torch.Tensor  # [B, P + C]
    completion_mask: torch.Tensor  # [B, C]: sampled tokens up to and including EOS
    prompt_len: int  # P
    groups: torch.Tensor  # [B]: index of the prompt each rollout answers
    prompts: list[Prompt]  # one per rollout
    completions: list[str]  # decoded completion text (special tokens dropped)
    finished: list[bool]  # stopped with EOS rather than by the length limit
    # [B, C] log-probs of the sampled tokens under softmax(logits / algo.loss_temperature) of
    # the weights that sampled them, from the sampling loop itself (None from `generate`): what
    # the training forward is compared with (rollout/mismatch) and corrected by (algo.is_cap)
    sampler_logprobs: Optional[torch.Tensor] = None
    # Multi-turn rollouts (runner/rollout/multiturn.py): the environment's episode state per row, and
    # [B, C] the model turn each completion token belongs to (-1: the environment's tokens).
    episodes: Optional[list] = None
    token_turn: Optional[torch.Tensor] = None

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len :]

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def concat(batches: Sequence[RolloutBatch], pad_id: int) -> RolloutBatch:
    """One batch from several (e.g. rounds of dynamic sampling): prompts re-left-padded,
    completions re-right-padded, group ids renumbered so groups stay distinct."""
    if len(batches) == 1:
        return batches[0]
    P = max(b.prompt_len for b in batches)
    C = max(b.completion_ids.shape[1] for b in batches)
    ids, attn, cmask, groups = [], [], [], []
    offset = 0
    for b in batches:
        lp, rc = P - b.prompt_len, C - b.completion_ids.shape[1]
        n = len(b)
        ids.append(torch.cat([b.input_ids.new_full((n, lp), pad_id), b.input_ids, b.input_ids.new_full((n, rc), pad_id)], 1))
        attn.append(torch.cat([b.attention_mask.new_zeros((n, lp)), b.attention_mask, b.attention_mask.new_zeros((n, rc))], 1))
        cmask.append(torch.cat([b.completion_mask, b.completion_mask.new_zeros((n, rc))], 1))
        _, renum = torch.unique(b.groups, return_inverse=True)
        groups.append(renum + offset)
        offset += int(renum.max()) + 1 if n else 0
    return RolloutBatch(
        input_ids=torch.cat(ids), attention_mask=torch.cat(attn), completion_mask=torch.cat(cmask),
        prompt_len=P, groups=torch.cat(groups), prompts=[p for b in batches for p in b.prompts],
        completions=[c for b in batches for c in b.completions], finished=[f for b in batches for f in b.finished],
        episodes=[e for b in batches for e in b.episodes] if all(b.episodes is not None for b in batches) else None,
        token_turn=torch.cat([torch.cat([b.token_turn, b.token_turn.new_full((len(b), C - b.token_turn.shape[1]), -1)], 1)
                              for b in batches]) if all(b.token_turn is not None for b in batches) else None,
        sampler_logprobs=torch.cat([torch.cat([b.sampler_logprobs, b.sampler_logprobs.new_zeros(
            (len(b), C - b.sampler_logprobs.shape[1]))], 1) for b in batches])
        if all(b.sampler_logprobs is not None for b in batches) else None,
    )


def select(batch: RolloutBatch, rows: Sequence[int]) -> RolloutBatch:
    idx = torch.as_tensor(list(rows), dtype=torch.long, device=batch.input_ids.device)
    return RolloutBatch(
        input_ids=batch.input_ids[idx], attention_mask=batch.attention_mask[idx],
        completion_mask=batch.completion_mask[idx], prompt_len=batch.prompt_len, groups=batch.groups[idx],
        prompts=[batch.prompts[i] for i in rows], completions=[batch.completions[i] for i in rows],
        finished=[batch.finished[i] for i in rows],
        episodes=[batch.episodes[i] for i in rows] if batch.episodes is not None else None,
        token_turn=batch.token_turn[idx] if batch.token_turn is not None else None,
        sampler_logprobs=batch.sampler_logprobs[idx] if batch.sampler_logprobs is not None else None,
    )


def completion_extents(batch: RolloutBatch) -> list[int]:
    """Per row: the completion columns up to its last real token (0 for an empty one)."""
    m = batch.completion_mask.bool()
    cols = torch.arange(1, m.shape[1] + 1, device=m.device)
    return (m * cols).amax(-1).tolist() if m.shape[1] else [0] * len(batch)


def trim_completions(batch: RolloutBatch) -> RolloutBatch:
    """The batch without the completion columns that are padding in every row: a row's
    log-probs do not depend on padding after it, so the training passes can skip it."""
    c = max(completion_extents(batch), default=0)
    if c >= batch.completion_ids.shape[1]:
        return batch
    c = max(c, 1)
    end = batch.prompt_len + c
    return dataclasses.replace(
        batch, input_ids=batch.input_ids[:, :end], attention_mask=batch.attention_mask[:, :end],
        completion_mask=batch.completion_mask[:, :c],
        sampler_logprobs=None if batch.sampler_logprobs is None else batch.sampler_logprobs[:, :c],
        token_turn=None if batch.token_turn is None else batch.token_turn[:, :c])


def span_token_mask(tokenizer, completion_ids: torch.Tensor, spans: Sequence[Optional[tuple[int, int]]]) -> torch.Tensor:
    """[B, C] mask of completion tokens overlapping each row's character span (none if None).

    Offsets come from decoding growing prefixes, the same decoding that made the text the
    span refers to."""
    mask = torch.zeros(completion_ids.shape, dtype=torch.bool)
    for i, span in enumerate(spans):
        if span is None:
            continue
        ids = completion_ids[i].tolist()
        prev = 0
        for t in range(len(ids)):
            end = len(tokenizer.decode(ids[: t + 1], skip_special_tokens=True))
            if end > span[0] and prev < span[1] and end > prev:
                mask[i, t] = True
            if prev >= span[1]:
                break
            prev = end
    return mask.to(completion_ids.device)


def render(tokenizer, prompt: Prompt) -> str:
    """Chat-template text of a prompt, with the assistant prefix already written."""
    messages = [{"role": r, "content": c} for r, c in prompt.messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + prompt.assistant_prefix


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` uses them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_mask(completion_ids: torch.Tensor, eos_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of real completion tokens (through the first EOS) and whether EOS was reached."""
    is_eos = torch.zeros_like(completion_ids, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= completion_ids == e
    finished = is_eos.any(-1)
    eos_seen_before = is_eos.long().cumsum(-1) - is_eos.long()
    mask = eos_seen_before == 0
    return mask, finished


def eos_token_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def sample_next(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row from softmax(logits / T), optionally nucleus-truncated."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    # inverse-CDF draw: one uniform per row. torch.multinomial draws an exponential per
    # vocabulary entry (5 ms a step for 6 x 49152 on 2 cores, ~10% of a decode step).
    cdf = probs.cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    # first index whose cdf exceeds u: never a zero-probability token
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1).squeeze(-1)


class HFRollout:
    """Sampling from a transformers causal LM.

    engine "loop" (default): prefill each distinct prompt once, copy its KV cache to the G
    rollouts of its group, then a lean sampling loop (no logits processors, stops when all
    rows hit EOS). Its one-token steps run either in one C call (kernel "fused",
    runner/rollout/fused_decode.py: bf16 Llama-family models on CPU) or through the
    transformers model (kernel "eager"; on CPU the linears run in the layout this machine is
    fastest at: runner/rollout/decode_linears.py, and the attention over the key/value heads:
    runner/rollout/decode_attention.py); "auto" takes the fused step where the CPU has
    avx512_bf16 and the model is one it computes. engine "generate": `model.generate`, the
    reference path.
    """

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 16,
                 engine: str = "loop", logprob_temperature: float = 1.0, linears: str = "auto",
                 attention: str = "auto", kernel: str = "auto"):
        self.temperature = temperature
        self.kernel = kernel  # rollout.kernel: auto | fused | eager (runner/rollout/fused_decode.py)
        self._auto_said: set[str] = set()
        self.linears = linears  # rollout.linears: auto | plain (runner/rollout/decode_linears.py)
        self.attention = attention  # rollout.attention: auto | sdpa (runner/rollout/decode_attention.py)
        self.top_p = top_p
        self.max_new_tokens = max_new_tokens
        self.engine = engine
        self.logprob_temperature = logprob_temperature

    @torch.no_grad()
    def generate(
        self, model, tokenizer, prompts: Sequence[Prompt], group_size: int, temperature: float | None = None
    ) -> RolloutBatch:
        device = next(model.parameters()).device
        texts = [render(tokenizer, p) for p in prompts]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        eos = eos_token_ids(model, tokenizer)
        temperature = temperature or self.temperature
        was_training = model.training
        model.eval()
        try:
            if self.engine == "generate":
                ids = enc["input_ids"].repeat_interleave(group_size, dim=0)
                attn = enc["attention_mask"].repeat_interleave(group_size, dim=0)
                out = model.generate(
                    input_ids=ids, attention_mask=attn, do_sample=True, temperature=temperature, top_p=self.top_p,
                    top_k=0, max_new_tokens=self.max_new_tokens, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                )
                comp = out[:, ids.shape[1]:]
                sampler_logprobs = None
            else:
                comp, sampler_logprobs = self._sample_loop(model, enc["input_ids"], enc["attention_mask"],
                                                           group_size, eos, tokenizer.pad_token_id, temperature)
        finally:
            model.train(was_training)
        ids = enc["input_ids"].repeat_interleave(group_size, dim=0)
        attn = enc["attention_mask"].repeat_interleave(group_size, dim=0)
        prompt_len = ids.shape[1]
        mask, finished = completion_mask(comp, eos)
        comp = torch.where(mask, comp, torch.full_like(comp, tokenizer.pad_token_id))
        full = torch.cat([ids, comp], dim=1)
        full_attn = torch.cat([attn, mask.to(attn.dtype)], dim=1)
        decoded = tokenizer.batch_decode(comp, skip_special_tokens=True)
        groups = torch.arange(len(prompts), device=device).repeat_interleave(group_size)
        return RolloutBatch(
            input_ids=full,
            attention_mask=full_attn,
            completion_mask=mask,
            prompt_len=prompt_len,
            groups=groups,
            prompts=[p for p in prompts for _ in range(group_size)],
            completions=decoded,
            finished=finished.tolist(),
            sampler_logprobs=sampler_logprobs,
        )

    def fused(self, model) -> bool:
        """Whether this model's decode steps run in the fused kernel (rollout.kernel)."""
        if self.kernel == "eager":
            return False
        if self.kernel == "fused":
            reason = fused_decode.available(model, need_bf16_dot=False)
            if reason:
                raise ValueError(f"rollout.kernel=fused: {reason} (rollout.kernel=auto falls back to eager)")
            return True
        reason = fused_decode.available(model)
        if reason and reason not in self._auto_said:  # said once per reason, not every rollout
            self._auto_said.add(reason)
            log.info("rollout.kernel=auto: eager decode steps (%s)", reason)
        return reason is None

    def _sample_loop(self, model, prompt_ids, prompt_attn, group_size, eos, pad_id,
                     temperature, past: Optional["Prefix"] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`past`: a prefix of every row already prefilled (a multi-turn episode's earlier
        turns, runner/rollout/multiturn.py); prompt_ids are then only the tokens after it,
        and `past` is advanced to hold them (eager steps only: the fused kernel has its own
        cache, so with it `past` must be None)."""
        # inference mode: no autograd bookkeeping on the ~700 small ops of each eager decode
        # step (~2 ms a token on the default model); its outputs are cloned out of it, since
        # the training forward takes the sampled ids as inputs
        fused = self.fused(model) if past is None else False
        rows = prompt_ids.shape[0] * group_size
        eager = contextlib.ExitStack()
        if not fused:
            eager.enter_context(decode_linears(model, rows, self.linears))
            eager.enter_context(decode_attention(model, self.attention))
        with torch.inference_mode(), eager:
            tokens, logps = self._sample_steps(model, prompt_ids, prompt_attn, group_size, eos, pad_id, temperature,
                                               fused, past)
        return tokens.clone(), logps.clone()

    def _sample_steps(self, model, prompt_ids, prompt_attn, group_size, eos, pad_id,
                      temperature, fused: bool = False,
                      past: Optional["Prefix"] = None) -> tuple[torch.Tensor, torch.Tensor]:
        steps = (_FusedSteps(model, prompt_ids, prompt_attn, group_size, self.max_new_tokens) if fused
                 else _EagerSteps(model, prompt_ids, prompt_attn, group_size, past))
        logits = steps.first  # after each prompt's last token, one row per rollout
        del steps.first
        n = logits.shape[0]
        eos_t = torch.tensor(eos, device=logits.device)
        done = torch.zeros(n, dtype=torch.bool, device=logits.device)
        active = torch.arange(n, device=logits.device)  # rows still decoding; finished ones leave the batch
        tokens, logps = [], []
        for t in range(self.max_new_tokens):
            nxt = sample_next(logits, temperature, self.top_p)
            tok = torch.full((n,), pad_id, dtype=nxt.dtype, device=nxt.device)
            tokens.append(tok.index_copy_(0, active, nxt))
            lt = logits.float() if self.logprob_temperature == 1.0 else logits.float() / self.logprob_temperature
            lp = torch.log_softmax(lt, -1).gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
            logps.append(torch.zeros(n, dtype=lp.dtype, device=lp.device).index_copy_(0, active, lp))
            stopped = torch.isin(nxt, eos_t)
            done[active] |= stopped
            if bool(done.all()) or t == self.max_new_tokens - 1:
                break
            if bool(stopped.any()):  # a finished row costs nothing more: it leaves the batch
                keep = (~stopped).nonzero().squeeze(-1)
                steps.keep(keep)
                active, nxt = active[keep], nxt[keep]
            logits = steps(nxt)
        return torch.stack(tokens, dim=1), torch.stack(logps, dim=1)


class Prefix:
    """Rows already prefilled, kept between calls (a multi-turn episode's earlier turns): per
    layer the key and value tensors, and the attention mask over their positions (zeros where
    a row was padded). The tensors are the prefill's own: decode steps build new ones
    (concatenation, row selection) and never write into these, so no copy is made."""

    def __init__(self) -> None:
        self.kv: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None
        self.attn: Optional[torch.Tensor] = None

    def select(self, rows: list[int]) -> None:
        """Keep these rows (the episodes still playing), in this order."""
        if self.kv is not None:
            idx = torch.tensor(rows, device=self.attn.device)
            self.kv = [(k[idx], v[idx]) for k, v in self.kv]
            self.attn = self.attn[idx]


class _EagerSteps:
    """Steps through the transformers model: each prompt prefilled once, its KV cache
    repeated for the G rows of its group, then one token a call. With `past` (group size 1)
    only the new tokens are prefilled, on top of it, and `past` then holds them too."""

    def __init__(self, model, prompt_ids, prompt_attn, group_size, past: Optional[Prefix] = None):
        cache, attn = None, prompt_attn
        if past is not None and past.kv is not None:
            from transformers import DynamicCache

            assert group_size == 1, "a prefilled prefix is one row per episode"
            cache = DynamicCache(ddp_cache_data=past.kv, config=model.config)
            attn = torch.cat([past.attn, prompt_attn], dim=1)
        pos = position_ids(attn)[:, -prompt_ids.shape[1]:]
        out = model(input_ids=prompt_ids, attention_mask=attn, position_ids=pos, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        self.first = out.logits[:, -1].repeat_interleave(group_size, dim=0)
        self.cache = out.past_key_values
        if past is not None:  # what the next call prefills on top of: before any decode step
            past.kv = [(layer.keys, layer.values) for layer in self.cache.layers]
            past.attn = attn
        if group_size > 1:
            self.cache.batch_repeat_interleave(group_size)
        self.model = model
        self.attn = attn.repeat_interleave(group_size, dim=0)
        self.next_pos = pos[:, -1:].repeat_interleave(group_size, dim=0) + 1

    def keep(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)
        self.attn, self.next_pos = self.attn[rows], self.next_pos[rows]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.attn = torch.cat([self.attn, self.attn.new_ones((self.attn.shape[0], 1))], dim=1)
        out = self.model(input_ids=tokens.unsqueeze(-1), attention_mask=self.attn, position_ids=self.next_pos,
                         past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self.next_pos = self.next_pos + 1
        return out.logits[:, -1]


class _FusedSteps:
    """Steps in the fused kernel, the prompts' prefill included (each prompt once, its cache
    copied to its group's slots); a finished row keeps its slot, it is only no longer stepped."""

    def __init__(self, model, prompt_ids, prompt_attn, group_size, max_new_tokens):
        rows, P = prompt_attn.shape[0] * group_size, prompt_attn.shape[1]
        self.decoder = fused_decode.FusedDecoder(model, rows, P + max_new_tokens,
                                                 max_batch=max(rows, int(prompt_attn.sum())))
        self.first = self.decoder.prefill(prompt_ids, prompt_attn, group_size)
        self.t = P
        self.slots = torch.arange(rows, dtype=torch.int32)

    def keep(self, rows: torch.Tensor) -> None:
        self.slots = self.slots[rows]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        # the logits live in the decoder's buffer until the next step: the loop reads them first
        logits = self.decoder.step(tokens, self.slots, self.t)
        self.t += 1
        return logits


def make_rollout(cfg, logprob_temperature: float = 1.0) -> HFRollout:
    """logprob_temperature: the temperature of the log-probs the sampler records (the loss's,
    algo.loss_temperature, so the two are the same distribution whatever the sampling temperature)."""
    if cfg.name == "hf":
        return HFRollout(cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.engine, logprob_temperature, cfg.linears,
                         cfg.attention, cfg.kernel)
    raise ValueError(f"rollout.name={cfg.name!r}: must be hf")
