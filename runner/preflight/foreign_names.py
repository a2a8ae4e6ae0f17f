"""TRL's and verl's names for our keys, so a command line written from a TRL `GRPOConfig` or a
verl trainer config is answered with the key it meant, in one line, before Hydra's own
"Could not override" (five lines, exit 1, no hint).

The map is the README's "Coming from TRL or verl" table: a key is looked up by its last part
(`algo.beta`, `beta` and `+beta` all mean TRL's `beta`) and only when it is not a key of ours.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, get_args, get_origin, get_type_hints

# foreign name -> (our key, whose name it is, a note on how the values differ)
FOREIGN: dict[str, tuple[str, str, str]] = {
    "beta": ("algo.kl.coef", "TRL", ""),
    "epsilon": ("algo.clip_low", "TRL", ""),
    "epsilon_high": ("algo.clip_high", "TRL", ""),
    "num_generations": ("algo.group_size", "TRL", ""),
    "learning_rate": ("algo.lr", "TRL", ""),
    "lr_scheduler_type": ("algo.lr_schedule", "TRL", ""),
    "loss_type": ("algo.loss_agg", "TRL", "grpo = seq-mean-token-mean, dapo/bnpo = token-mean, "
                                          "dr_grpo = seq-mean-token-sum-norm"),
    "importance_sampling_level": ("algo.ratio_level", "TRL", ""),
    "max_steps": ("train.steps", "TRL", ""),
    "max_completion_length": ("rollout.max_new_tokens", "TRL", ""),
    "gradient_accumulation_steps": ("trainer.grad_accum_steps", "TRL", ""),
    "per_device_train_batch_size": ("train.prompts_per_step", "TRL",
                                    "TRL counts completions: prompts = per_device_train_batch_size x GPUs "
                                    "x gradient_accumulation_steps / num_generations"),
    "generation_batch_size": ("train.prompts_per_step", "TRL", "TRL counts completions: divide by num_generations"),
    "warmup_steps": ("algo.warmup_steps", "TRL", ""),
    "weight_decay": ("algo.weight_decay", "TRL", ""),
    "max_grad_norm": ("algo.max_grad_norm", "TRL", ""),
    "temperature": ("rollout.temperature", "TRL", ""),
    "top_p": ("rollout.top_p", "TRL", ""),
    "scale_rewards": ("algo.scale_rewards", "TRL", "group, batch or none"),
    "num_iterations": ("algo.num_iterations", "TRL", ""),
    "top_entropy_quantile": ("algo.top_entropy_quantile", "TRL", ""),
    "lora_alpha": ("model.lora.alpha", "TRL/verl", ""),
    "lora_dropout": ("model.lora.dropout", "TRL", ""),
    "entropy_coeff": ("algo.entropy.coef", "verl", ""),
    "kl_loss_coef": ("algo.kl.coef", "verl", ""),
    "kl_loss_type": ("algo.kl.estimator", "verl", "low_var_kl = k3"),
    "clip_ratio": ("algo.clip_low", "verl", "and algo.clip_high"),
    "clip_ratio_low": ("algo.clip_low", "verl", ""),
    "clip_ratio_high": ("algo.clip_high", "verl", ""),
    "ppo_epochs": ("algo.num_iterations", "verl", ""),
    "loss_agg_mode": ("algo.loss_agg", "verl", ""),
    "grad_clip": ("algo.max_grad_norm", "verl", ""),
    "total_training_steps": ("train.steps", "verl", ""),
    "max_response_length": ("rollout.max_new_tokens", "verl", ""),
    "train_batch_size": ("train.prompts_per_step", "verl", "prompts a step"),
    "lora_rank": ("model.lora.r", "verl", ""),
}


def _is_ours(key: str, cls: Any) -> bool:
    """Whether a dotted key is a key of the typed config (env.* and groups of free keys
    take anything beneath them: their keys are the environment's or the user's)."""
    parts = key.split(".")
    for i, name in enumerate(parts):
        if not (dataclasses.is_dataclass(cls) and name in {f.name for f in dataclasses.fields(cls)}):
            return False
        tp = get_type_hints(cls)[name]
        args = [a for a in get_args(tp) if a is not type(None)]
        tp = args[0] if get_origin(tp) is not None and len(args) == 1 and not get_origin(args[0]) else tp
        if not dataclasses.is_dataclass(tp):
            return True  # a leaf, or env/dict/list: what is below is not ours to judge here
        cls = tp
    return True


def foreign_name_hint(overrides: list[str]) -> Optional[str]:
    """The first override whose key is not ours but is a TRL/verl name, as a one-line refusal."""
    from runner.config import RunConfig

    for arg in overrides:
        if arg.startswith("-") or "=" not in arg:
            continue
        key = arg.split("=", 1)[0].lstrip("+~")
        if key.startswith("hydra.") or _is_ours(key, RunConfig):
            continue
        leaf = key.rsplit(".", 1)[-1]
        if leaf in FOREIGN:
            ours, lib, note = FOREIGN[leaf]
            return (f"{key}: not a key of this runner; did you mean {ours} ({lib}: {leaf}"
                    f"{'; ' + note if note else ''})? (README: Coming from TRL or verl)")
    return None
