"""Rollouts from vLLM on a GPU, colocated with training (`rollout=vllm`).

vLLM is an optional extra (`pip install '.[gpu]'`), imported only here and only when
selected; `check_available` runs before anything is loaded and says what is missing.

Colocation: vLLM takes `rollout.gpu_memory_utilization` of the GPU and, with
`rollout.sleep`, frees its weights and KV cache while the policy trains (sleep level 1),
waking before the next generation. After every `rollout.sync_every` optimizer steps the
policy's weights are pushed into vLLM's model (`load_weights` takes Hugging Face names;
under ZeRO-3 the trainer hands over gathered parameters).

What runs without a GPU, and is tested on CPU: the availability check, the weight-name
mapping and the sync schedule. Generation itself needs CUDA and vLLM (tests marked so).
"""

from __future__ import annotations

import importlib.util
from typing import Iterable, Iterator, Optional, Sequence

import torch

from envs.base import Prompt
from runner.config import ConfigError
from runner.rollout.hf import RolloutBatch, completion_mask, eos_token_ids, render


def check_available(cfg) -> None:
    if not torch.cuda.is_available():
        raise ConfigError("rollout=vllm: vLLM needs a CUDA GPU and none is visible here; "
                          "use rollout=hf (transformers sampling, the CPU default)")
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("rollout=vllm: the vllm package is not installed; pip install '.[gpu]' "
                          "(pinned to a version built for this torch), or use rollout=hf")


def weight_items(named_params: Iterable[tuple[str, torch.Tensor]], tied_embeddings: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs in the form vLLM's `load_weights` takes: Hugging Face names
    (vLLM fuses q/k/v and gate/up itself); a tied lm_head is left out (vLLM ties it), and
    DeepSpeed/PEFT wrapper prefixes are stripped."""
    for name, t in named_params:
        for prefix in ("module.", "_orig_mod.", "base_model.model."):
            if name.startswith(prefix):
                name = name[len(prefix):]
        if tied_embeddings and name == "lm_head.weight":
            continue
        yield name, t.detach()


class SyncSchedule:
    """Push weights after every `every` optimizer steps (1: each rollout is on-policy)."""

    def __init__(self, every: int = 1) -> None:
        self.every = every
        self.updates = 0
        self.synced_at: list[int] = []

    def due(self) -> bool:
        self.updates += 1
        if self.updates % self.every == 0:
            self.synced_at.append(self.updates)
            return True
        return False


class VLLMRollout:
    """Same contract as HFRollout.generate: a RolloutBatch of token ids and masks."""

    def __init__(self, cfg, weights: str, tokenizer, seed: int, dtype: str = "auto") -> None:
        from vllm import LLM

        self.cfg = cfg
        self.temperature, self.top_p, self.max_new_tokens = cfg.temperature, cfg.top_p, cfg.max_new_tokens
        self.llm = LLM(model=weights, tokenizer=weights, dtype="bfloat16" if dtype == "auto" else dtype,
                       gpu_memory_utilization=cfg.gpu_memory_utilization, enable_sleep_mode=cfg.sleep, seed=seed,
                       max_model_len=2048, enable_prefix_caching=True)
        self.schedule = SyncSchedule(cfg.sync_every)
        self.asleep = False

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def sleep(self) -> None:
        """Free vLLM's GPU memory for the update (weights are re-sent at the next sync)."""
        if self.cfg.sleep and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    @torch.no_grad()
    def on_policy_updated(self, named_params: Iterable[tuple[str, torch.Tensor]], tied: bool,
                          force: bool = False) -> bool:
        if not self.schedule.due() and not force:
            return False
        self._wake()
        model = self._engine_model()
        model.load_weights(weight_items(named_params, tied))
        return True

    def _engine_model(self):
        engine = self.llm.llm_engine
        executor = getattr(engine, "model_executor", None) or engine.engine_core.engine_core.model_executor
        return executor.driver_worker.worker.model_runner.model

    @torch.no_grad()
    def generate(self, model, tokenizer, prompts: Sequence[Prompt], group_size: int,
                 temperature: Optional[float] = None) -> RolloutBatch:
        from vllm import SamplingParams

        self._wake()
        params = SamplingParams(n=group_size, temperature=temperature or self.temperature, top_p=self.top_p,
                                max_tokens=self.max_new_tokens, logprobs=0)
        texts = [render(tokenizer, p) for p in prompts]
        outs = self.llm.generate(texts, params, use_tqdm=False)
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        device = next(model.parameters()).device
        eos = eos_token_ids(model, tokenizer)
        rows, logps = [], []
        for o in outs:
            for c in o.outputs:
                rows.append(list(c.token_ids))
                logps.append([next(iter(lp.values())).logprob for lp in (c.logprobs or [])])
        C = max(1, max(len(r) for r in rows))
        pad = tokenizer.pad_token_id
        comp = torch.tensor([r + [pad] * (C - len(r)) for r in rows], device=device)
        lp = torch.tensor([x + [0.0] * (C - len(x)) for x in logps], device=device)
        ids = enc["input_ids"].to(device).repeat_interleave(group_size, dim=0)
        attn = enc["attention_mask"].to(device).repeat_interleave(group_size, dim=0)
        mask, finished = completion_mask(comp, eos)
        length_ok = torch.arange(C, device=device)[None] < torch.tensor([len(r) for r in rows], device=device)[:, None]
        mask = mask & length_ok
        comp = torch.where(mask, comp, torch.full_like(comp, pad))
        return RolloutBatch(
            input_ids=torch.cat([ids, comp], 1), attention_mask=torch.cat([attn, mask.to(attn.dtype)], 1),
            completion_mask=mask, prompt_len=ids.shape[1],
            groups=torch.arange(len(prompts), device=device).repeat_interleave(group_size),
            prompts=[p for p in prompts for _ in range(group_size)],
            completions=tokenizer.batch_decode(comp, skip_special_tokens=True), finished=finished.tolist(),
            sampler_logprobs=lp,
        )
