"""Rollouts from vLLM on a GPU, colocated with training (`rollout=vllm`), written to
vLLM 0.32's V1 engine.

vLLM is an optional extra (`pip install '.[gpu]'`, pinned to 0.32.0), imported only here
and only when selected; `check_available` runs before anything is loaded and says what is
missing. Paths below are files of the vLLM 0.32.0 wheel that each call relies on.

One engine per training rank, inside the trainer's own process
(VLLM_ENABLE_V1_MULTIPROCESSING=0, as TRL's colocate mode runs it): a weight update hands
vLLM the policy's own CUDA tensors, which cannot cross into a separate engine process
(vllm/v1/engine/llm_engine.py keeps `model_executor` only in-process). Under a multi-rank
launch the engine joins the ranks' process group with
distributed_executor_backend="external_launcher", as TRL does.

Weight updates take vLLM's supported in-place reload, `LLM.collective_rpc("reload_weights",
kwargs={"weights_iterator": ...})` (vllm/entrypoints/llm.py -> vllm/v1/worker/gpu_worker.py
`Worker.reload_weights` -> vllm/model_executor/model_loader/reload/inplace.py): Hugging Face
names and layouts in (vLLM fuses q/k/v and gate/up itself), each layer processed and copied
into the engine's own storage (CUDA graphs keep pointing at it), vLLM's derived caches
reset. It is also the route vLLM documents for restoring weights after sleep level 2.
Afterwards `LLM.reset_prefix_cache()`: KV blocks computed under the old weights must not
be reused.

Sleep mode (`rollout.sleep`): the engine frees its GPU memory while the policy trains.
Level 2 (weights and KV cache discarded, nothing kept in CPU memory) where every wake can
be preceded by a load of the policy's weights: `rollout.sync_every=1` and parameters that
are whole on this rank. Otherwise level 1 (weights offloaded to CPU memory and restored on
waking): between syncs (sync_every > 1) the engine must keep sampling from the older
weights it has, and ZeRO-3 partitions can only be gathered by the trainer, with every rank
at once, so a skipped update could not refill discarded weights. The order is TRL's:
sleep after generating (before the optimizer step); at a sync `wake_up(tags=["weights"])`
then the load; `wake_up(tags=["kv_cache"])` only right before generating, so the KV cache
is not allocated while weights load or the policy trains (`Colocation`).

What runs without a GPU, and is tested on CPU (tests/test_vllm_colocate.py): the
availability check, the engine arguments, the weight-name mapping, the sync schedule, the
sleep-level choice and the sleep/wake/load order against a fake engine. Generation itself
needs CUDA and vLLM (tests marked so).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
import os
import random
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol, Sequence

import torch

from envs.base import Prompt
from runner.config import ConfigError
from runner.rollout.hf import RolloutBatch, completion_mask, eos_token_ids, render

log = logging.getLogger(__name__)

TESTED_VLLM = "0.32"  # the [gpu] extra's pin; other versions get a warning, not a refusal
MAX_MODEL_LEN = 2048  # prompt + completion tokens per sequence inside vLLM
MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"  # vllm/envs.py, read when the engine starts

# Wrappers that add to a parameter's name without changing the parameter. At the start:
# DeepSpeed's engine and DDP (`module.`), torch.compile of the whole model (`_orig_mod.`), a
# PEFT model's base (`base_model.model.`), in any nesting. Anywhere: torch.compile of a
# submodule (`_orig_mod`) and activation checkpointing (`_checkpoint_wrapped_module`, which
# TRL strips too); neither is ever a real module's name.
LEADING_WRAPPERS = ("module.", "_orig_mod.", "base_model.model.")
INNER_WRAPPERS = ("_orig_mod", "_checkpoint_wrapped_module")
# Name segments that only a PEFT model has: its adapters and the layers they wrap
# (`lora_A`, `lora_B`, `lora_embedding_A`, ..., `base_layer`, `modules_to_save`, `original_module`).
PEFT_SEGMENTS = ("base_layer", "modules_to_save", "original_module")


def check_logprob_temperature(loss_temperature: float, sampling_temperature: float) -> None:
    """vLLM gives log-probs untempered or at the sampling temperature, nothing else: the loss
    temperature must be one of the two for the mismatch metrics and algo.is_cap to compare like
    with like."""
    if loss_temperature not in (1.0, sampling_temperature):
        raise ConfigError(f"algo.loss_temperature={loss_temperature}: with rollout=vllm it must be 1 (the model "
                          f"itself) or the sampling temperature rollout.temperature={sampling_temperature} "
                          "('${rollout.temperature}'): vLLM reports log-probs at one of those two")


def check_available(cfg) -> None:
    check_logprob_temperature(cfg.algo.loss_temperature, cfg.rollout.temperature)
    if not torch.cuda.is_available():
        raise ConfigError("rollout=vllm: vLLM needs a CUDA GPU and none is visible here; "
                          "use rollout=hf (transformers sampling, the CPU default)")
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("rollout=vllm: the vllm package is not installed; pip install '.[gpu]' "
                          "(pinned to a version built for this torch), or use rollout=hf")
    multiprocess_refused()


def multiprocess_refused() -> None:
    """A VLLM_ENABLE_V1_MULTIPROCESSING=1 set by hand would put vLLM's engine in its own
    process, where the colocated weight update cannot reach it."""
    if os.environ.get(MULTIPROCESSING_ENV, "0") != "0":
        raise ConfigError(f"rollout=vllm: {MULTIPROCESSING_ENV}={os.environ[MULTIPROCESSING_ENV]} puts vLLM's "
                          "engine in its own process, where the colocated weight update cannot reach it; "
                          "unset it")


# -- weight names ---------------------------------------------------------------------------
def vllm_name(name: str) -> str:
    """The Hugging Face name vLLM's `load_weights` expects for a trainer's parameter name.

    Raises ValueError for a PEFT adapter's parameters: vLLM's model has no place for them,
    and dropping them would silently sample from the base model instead of the trained
    policy. A LoRA policy is merged before its weights are pushed (peft's `merge_adapter`,
    then its base names are plain Hugging Face names) or served through vLLM's own LoRA
    support; neither is what this rollout does."""
    parts = name.split(".")
    if any(p.startswith("lora_") or p in PEFT_SEGMENTS for p in parts):
        raise ValueError(
            f"rollout=vllm: parameter {name!r} belongs to a PEFT adapter; vLLM's model has no such "
            "weight. Merge the adapter into the base weights before pushing (peft merge_adapter), "
            "pushing unmerged LoRA weights is not supported")
    name = ".".join(p for p in parts if p not in INNER_WRAPPERS)
    stripped = True
    while stripped:
        stripped = False
        for prefix in LEADING_WRAPPERS:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def weight_items(named_params: Iterable[tuple[str, torch.Tensor]],
                 tied_embeddings: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs in the form vLLM's `load_weights` takes (`vllm_name`); a tied
    lm_head is left out (vLLM ties it to the embedding itself). Lazy: the tensors are read
    while vLLM loads them, so under ZeRO-3 this is consumed inside the gathering block."""
    for name, t in named_params:
        name = vllm_name(name)
        if tied_embeddings and name == "lm_head.weight":
            continue
        yield name, t.detach()


def params_whole(model) -> bool:
    """Whether this rank holds whole parameters (not DeepSpeed ZeRO-3 partitions, which
    carry `ds_id` and an empty local tensor outside a gathering block)."""
    return not any(hasattr(p, "ds_id") or p.numel() == 0 for p in model.parameters())


def ties_embeddings(model) -> bool:
    return bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))


# -- when to sync, how deep to sleep ----------------------------------------------------------
class SyncSchedule:
    """Push weights after every `every` optimizer steps (1: each rollout is on-policy)."""

    def __init__(self, every: int = 1) -> None:
        if every < 1:
            raise ValueError(f"rollout.sync_every must be >= 1, got {every}")
        self.every = every
        self.updates = 0
        self.synced_at: list[int] = []

    def due(self) -> bool:
        """Count one optimizer step; True when its weights are to be pushed."""
        self.updates += 1
        if self.updates % self.every == 0:
            self.synced_at.append(self.updates)
            return True
        return False


def sleep_level(enabled: bool, sync_every: int, whole_params: bool) -> int:
    """0: never sleep. 2: discard weights and KV cache, when the next wake is always
    preceded by a load from the policy (a sync after every optimizer step, and whole
    parameters here so a skipped update can be refilled from the policy itself). 1:
    offload the weights to CPU memory, when the engine must keep what it has."""
    if not enabled:
        return 0
    return 2 if sync_every == 1 and whole_params else 1


# -- the sleep / wake / load order ------------------------------------------------------------
class Engine(Protocol):
    """The part of vLLM 0.32's `LLM` (vllm/entrypoints/llm.py) that colocation drives."""

    def sleep(self, level: int = 1) -> Any: ...

    def wake_up(self, tags: Optional[list[str]] = None) -> Any: ...

    def collective_rpc(self, method: Any, timeout: Optional[float] = None, args: tuple = (),
                       kwargs: Optional[dict[str, Any]] = None) -> list: ...

    def reset_prefix_cache(self) -> Any: ...

    def generate(self, prompts: Any, sampling_params: Any = None, *, use_tqdm: bool = True) -> list: ...


class Colocation:
    """Which of the engine's GPU memory is resident and whether its weights are a policy's,
    driving `sleep`, `wake_up(tags=...)`, the reload and the prefix-cache reset in the one
    order that is valid:

    awake --sleep(level)--> asleep (weights offloaded at level 1, discarded at level 2)
    asleep --load--> wake_up(["weights"]), reload: weights resident, KV cache still freed
    any --ready--> (discarded weights reloaded) wake_up(["weights"]) if asleep,
                   wake_up(["kv_cache"]), reset_prefix_cache if the weights changed: awake

    vLLM pauses its scheduler while any tag sleeps and resumes it only once all are awake
    (vllm/v1/engine/core.py `EngineCore.wake_up`), so `ready` must end fully awake; and
    its executor ignores a wake of a tag that is not asleep
    (vllm/v1/executor/abstract.py `Executor.wake_up`), so this object is the engine's one
    driver and keeps its own account."""

    def __init__(self, engine: Engine, level: int = 0) -> None:
        self.engine = engine
        self.level = level  # the depth of the next sleep (0: never sleep)
        self.weights_resident = True
        self.kv_resident = True
        self.weights_valid = True  # False from a level-2 sleep until a load
        self.cache_stale = False  # weights changed since the prefix cache was last reset

    @property
    def awake(self) -> bool:
        return self.weights_resident and self.kv_resident

    def sleep(self) -> None:
        """Free the engine's GPU memory (`LLM.sleep`; its default mode aborts requests in
        flight, and there are none between generate calls). Acts on a fully awake engine
        only: a partly awake one already freed its KV cache and keeps weights just loaded."""
        if self.level == 0 or not self.awake:
            return
        self.engine.sleep(level=self.level)
        self.weights_resident = self.kv_resident = False
        self.weights_valid = self.level == 1

    def load(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Weights into the engine, in place. Its weight memory is mapped back first
        (`wake_up(tags=["weights"])`): loading into a sleeping engine writes to freed
        memory (TRL's sync_weights, huggingface/trl issue 5142)."""
        if not self.weights_resident:
            self._wake(["weights"])
            self.weights_resident = True
        try:
            self.engine.collective_rpc("reload_weights",
                                       kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        except (NotImplementedError, TypeError) as e:
            raise RuntimeError(
                "rollout=vllm: this vLLM has no in-place weight reload from tensors "
                "(Worker.reload_weights(weights_iterator=...), vllm/v1/worker/gpu_worker.py in "
                f"vLLM {TESTED_VLLM}); install the [gpu] extra's pinned vllm ({e})") from e
        self.weights_valid = True
        self.cache_stale = True

    def ready(self, reload: Optional[Callable[[], Iterable[tuple[str, torch.Tensor]]]] = None) -> None:
        """Fully awake with a policy's weights, before generating. Weights discarded by a
        level-2 sleep and not loaded since (an update that was skipped, or found
        non-finite) are reloaded from `reload()`, the policy unchanged since the last sync."""
        if not self.weights_valid:
            if reload is None:
                raise RuntimeError(
                    "rollout=vllm: vLLM's weights were discarded by sleep level 2 and none were "
                    "loaded since, and this rank's parameters are not whole to reload them from; "
                    "push the policy's weights (on_policy_updated(..., force=True)) before generating")
            self.load(reload())
        if not self.weights_resident:
            self._wake(["weights"])
            self.weights_resident = True
        if not self.kv_resident:
            fully_awake = self._wake(["kv_cache"])
            self.kv_resident = True
            if fully_awake is False:  # LLM.wake_up returns whether every tag is resident
                raise RuntimeError("rollout=vllm: vLLM still reports part of its memory asleep after "
                                   "waking weights and KV cache; it would not schedule requests")
        if self.cache_stale:
            if self.engine.reset_prefix_cache() is False:  # vllm/v1/core/sched/scheduler.py: blocks in use
                log.warning("rollout=vllm: vLLM kept its prefix cache (requests still hold blocks); "
                            "it may reuse KV computed under the previous weights")
            self.cache_stale = False

    def _wake(self, tags: list[str]) -> Any:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the trainer's cached blocks, before vLLM maps its memory back (TRL)
        return self.engine.wake_up(tags=tags)


# -- vLLM's inputs and outputs ----------------------------------------------------------------
def engine_kwargs(cfg, weights: str, seed: int, dtype: str = "auto", multi_rank: bool = False,
                  logprob_temperature: float = 1.0) -> dict[str, Any]:
    """Arguments of vLLM 0.32's `LLM(...)` (vllm/entrypoints/llm.py; the ones it does not
    name pass to `EngineArgs`, vllm/engine/arg_utils.py)."""
    kw: dict[str, Any] = dict(
        model=weights, tokenizer=weights, dtype="bfloat16" if dtype == "auto" else dtype,
        gpu_memory_utilization=cfg.gpu_memory_utilization, enable_sleep_mode=bool(cfg.sleep), seed=seed,
        max_model_len=MAX_MODEL_LEN, enable_prefix_caching=True,
        # RolloutBatch.sampler_logprobs are at the loss temperature (vllm/config/model.py LogprobsMode):
        # untempered ("raw", vLLM's default) for algo.loss_temperature=1, else after the sampler's
        # temperature (and top-p), which check_logprob_temperature makes the same temperature
        logprobs_mode="raw_logprobs" if logprob_temperature == 1.0 else "processed_logprobs",
    )
    if multi_rank:  # one engine per rank in the ranks' own process group (RANK, LOCAL_RANK from the launcher)
        kw["distributed_executor_backend"] = "external_launcher"
    return kw


def prompt_token_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """Each prompt's tokens without padding, as vLLM takes them (`{"prompt_token_ids": ...}`,
    vllm/inputs/llm.py TokensPrompt): vLLM samples after exactly the tokens the batch holds,
    rather than re-tokenising text its own way (special tokens added or not)."""
    return [ids[m.bool()].tolist() for ids, m in zip(input_ids, attention_mask)]


def sampled(outputs: Sequence[Any]) -> tuple[list[list[int]], list[list[float]]]:
    """Token ids and their log-probs from `LLM.generate`'s RequestOutputs (vllm/outputs.py:
    `.outputs[i].token_ids`, `.outputs[i].logprobs`, one {token id: Logprob} per position,
    always holding the sampled token; vllm/logprobs.py), n completions per prompt in order."""
    rows, logps = [], []
    for o in outputs:
        for c in o.outputs:
            ids = list(c.token_ids)
            rows.append(ids)
            logps.append([pos[t].logprob for t, pos in zip(ids, c.logprobs or [])])
    return rows, logps


@contextlib.contextmanager
def kept_rng():
    """The trainer's random streams as they were: vLLM seeds Python's, NumPy's and torch's
    global generators while it starts (vllm/utils/torch_utils.py set_random_seed)."""
    import numpy as np

    cuda = torch.cuda.is_available()  # this rank's device only: reading every device's state starts a context on each
    states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state(),
              torch.cuda.get_rng_state() if cuda else None)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state(states[3])


def multi_rank() -> bool:
    d = torch.distributed
    return d.is_available() and d.is_initialized() and d.get_world_size() > 1


def in_process_env() -> None:
    """Ask for vLLM's engine in this process (vllm/envs.py reads the variable when the
    first engine starts and caches it after); a 1 set by hand is refused."""
    multiprocess_refused()
    os.environ[MULTIPROCESSING_ENV] = "0"
    if multi_rank():
        missing = [k for k in ("RANK", "LOCAL_RANK") if k not in os.environ]
        if missing:
            raise ConfigError(f"rollout=vllm: several ranks but {', '.join(missing)} unset; vLLM's "
                              "external_launcher executor reads them (torchrun/deepspeed launchers set them)")


class VLLMRollout:
    """Same contract as HFRollout.generate: a RolloutBatch of token ids and masks.

    The trainer calls `sleep()` after collecting a step's rollouts, `on_policy_updated`
    after each optimizer step (inside the block where its parameters are whole), and
    `generate` for rollouts and evaluation."""

    def __init__(self, cfg, weights: str, tokenizer, seed: int, dtype: str = "auto",
                 engine: Optional[Engine] = None, sampling_params: Optional[Callable[..., Any]] = None,
                 logprob_temperature: float = 1.0) -> None:
        """`engine`/`sampling_params`: an engine already started and the SamplingParams
        class to use with it (tests pass stand-ins); by default vLLM's own, started here."""
        self.cfg = cfg
        self.temperature, self.top_p, self.max_new_tokens = cfg.temperature, cfg.top_p, cfg.max_new_tokens
        self.schedule = SyncSchedule(cfg.sync_every)
        self.llm = engine if engine is not None else self._start(cfg, weights, seed, dtype, logprob_temperature)
        if sampling_params is None:
            from vllm import SamplingParams as sampling_params
        self.sampling_params = sampling_params
        self.whole: Optional[bool] = None  # whether the policy's parameters are whole here (first generate)
        self.state = Colocation(self.llm, sleep_level(cfg.sleep, cfg.sync_every, whole_params=False))

    @staticmethod
    def _start(cfg, weights: str, seed: int, dtype: str, logprob_temperature: float = 1.0) -> Engine:
        in_process_env()
        from vllm import LLM

        version = importlib.metadata.version("vllm")
        if not version.startswith(TESTED_VLLM + "."):
            log.warning("rollout=vllm: written to vLLM %s, found %s", TESTED_VLLM, version)
        try:
            with kept_rng():
                llm = LLM(**engine_kwargs(cfg, weights, seed, dtype, multi_rank(), logprob_temperature))
        except ValueError as e:
            if cfg.sleep and "leep mode" in str(e):  # vllm/config/model.py: no sleep mode on this platform
                raise ConfigError(f"rollout=vllm: {e}; run with rollout.sleep=false") from e
            raise
        if getattr(llm.llm_engine, "model_executor", None) is None:
            raise RuntimeError(f"rollout=vllm: vLLM started its engine in a separate process ({MULTIPROCESSING_ENV} "
                               "was read as 1, e.g. an engine started earlier in this process); the colocated "
                               "weight update needs it in this one")
        return llm

    def sleep(self) -> None:
        """Free vLLM's GPU memory for the update (level: `sleep_level`)."""
        self.state.level = sleep_level(self.cfg.sleep, self.cfg.sync_every, bool(self.whole))
        self.state.sleep()

    @torch.no_grad()
    def on_policy_updated(self, named_params: Iterable[tuple[str, torch.Tensor]], tied: bool,
                          force: bool = False) -> bool:
        """After an optimizer step: push the weights when the schedule says so (`force`: now,
        and not counted as a step, e.g. once at start). True when pushed."""
        if not force and not self.schedule.due():
            return False
        self.state.load(weight_items(named_params, tied))
        return True

    @torch.no_grad()
    def generate(self, model, tokenizer, prompts: Sequence[Prompt], group_size: int,
                 temperature: Optional[float] = None) -> RolloutBatch:
        if self.whole is None:
            self.whole = params_whole(model)
        reload = (lambda: weight_items(model.named_parameters(), ties_embeddings(model))) if self.whole else None
        self.state.ready(reload)
        device = next(model.parameters()).device
        eos = eos_token_ids(model, tokenizer)
        params = self.sampling_params(n=group_size, temperature=temperature or self.temperature, top_p=self.top_p,
                                      max_tokens=self.max_new_tokens, logprobs=0, stop_token_ids=eos)
        texts = [render(tokenizer, p) for p in prompts]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        tokens = prompt_token_ids(enc["input_ids"], enc["attention_mask"])
        outs = self.llm.generate([{"prompt_token_ids": t} for t in tokens], params, use_tqdm=False)
        rows, logps = sampled(outs)
        C = max(1, max(len(r) for r in rows))
        pad = tokenizer.pad_token_id
        # filled with -1 (no token id) past each row's end, so a pad id that is also an EOS id
        # does not count as one
        comp = torch.tensor([r + [-1] * (C - len(r)) for r in rows], device=device)
        lp = torch.tensor([x + [0.0] * (C - len(x)) for x in logps], device=device)
        ids = enc["input_ids"].to(device).repeat_interleave(group_size, dim=0)
        attn = enc["attention_mask"].to(device).repeat_interleave(group_size, dim=0)
        mask, finished = completion_mask(comp, eos)
        mask = mask & (comp >= 0)
        comp = torch.where(mask, comp, torch.full_like(comp, pad))
        return RolloutBatch(
            input_ids=torch.cat([ids, comp], 1), attention_mask=torch.cat([attn, mask.to(attn.dtype)], 1),
            completion_mask=mask, prompt_len=ids.shape[1],
            groups=torch.arange(len(prompts), device=device).repeat_interleave(group_size),
            prompts=[p for p in prompts for _ in range(group_size)],
            completions=tokenizer.batch_decode(comp, skip_special_tokens=True), finished=finished.tolist(),
            sampler_logprobs=lp,
        )
