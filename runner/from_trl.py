"""`python -m runner.from_trl CONFIG.json|yaml`: a TRL `GRPOConfig` as this runner's overrides.

    python -c "from trl import GRPOConfig; import json; print(json.dumps(GRPOConfig('o').to_dict()))" > trl.json
    python -m runner.from_trl trl.json                  # prints: python -m runner algo=grpo algo.lr=1e-06 ...
    python -m runner $(python -m runner.from_trl trl.json --overrides-only) env=math

The file is a mapping of GRPOConfig fields (`GRPOConfig.to_dict()`, or a hand-written YAML
with the fields you set); it is read as data (JSON, or YAML's safe loader), never run. Each
field maps to our key (the README's "Coming from TRL or verl" table), is noted as not
supported with the reason, or, when it is not about the algorithm (output_dir, logging,
push_to_hub, ...), left out. The batch: TRL counts completions, we count prompts, so
train.prompts_per_step = per_device_train_batch_size x gradient_accumulation_steps /
num_generations on one device, and trainer.grad_accum_steps = gradient_accumulation_steps.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

LOSS_TYPES = {"grpo": "seq-mean-token-mean", "dapo": "token-mean", "bnpo": "token-mean",
              "dr_grpo": "seq-mean-token-sum-norm"}
SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}
# TRL field -> our key, for values that carry over as they are
SAME = {"learning_rate": "algo.lr", "num_generations": "algo.group_size", "beta": "algo.kl.coef",
        "epsilon": "algo.clip_low", "max_completion_length": "rollout.max_new_tokens",
        "temperature": "rollout.temperature", "top_p": "rollout.top_p", "max_steps": "train.steps",
        "warmup_steps": "algo.warmup_steps", "weight_decay": "algo.weight_decay",
        "max_grad_norm": "algo.max_grad_norm", "adam_beta1": "algo.adam_beta1", "adam_beta2": "algo.adam_beta2",
        "seed": "seed", "num_iterations": "algo.num_iterations", "top_entropy_quantile": "algo.top_entropy_quantile",
        "importance_sampling_level": "algo.ratio_level", "gradient_accumulation_steps": "trainer.grad_accum_steps"}
# fields with no key here, when set to anything but TRL's default (None / 1 / False)
UNSUPPORTED = {
    "steps_per_generation": "every step samples anew (algo.num_iterations updates several times on one batch)",
    "mask_truncated_completions": "a cut rollout is trained on with its reward; algo.overlong penalises length",
    "top_k": "the sampler has temperature and top_p only (the loss replays the sampled distribution)",
    "repetition_penalty": "the sampler has temperature and top_p only (the loss replays the sampled distribution)",
    "delta": "INTELLECT-2's upper clip is not implemented",
}
UNSET = (None, False, 1, 1.0, -1)


def convert(trl: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(our overrides, notes on what did not carry over)."""
    out, notes = ["algo=grpo"], []
    for field, key in SAME.items():
        if trl.get(field) is not None and not (field == "max_steps" and trl[field] <= 0):  # -1: TRL's "by epochs"
            out.append(f"{key}={trl[field]}")
    if trl.get("epsilon_high") is not None:  # TRL's None: the same as epsilon
        out.append(f"algo.clip_high={trl['epsilon_high']}")
    elif trl.get("epsilon") is not None:
        out.append(f"algo.clip_high={trl['epsilon']}")
    if trl.get("loss_type") is not None:
        if trl["loss_type"] not in LOSS_TYPES:
            notes.append(f"loss_type={trl['loss_type']!r}: no such loss here ({', '.join(LOSS_TYPES)})")
        else:
            out.append(f"algo.loss_agg={LOSS_TYPES[trl['loss_type']]}")
    if trl.get("scale_rewards") is not None:
        v = trl["scale_rewards"]
        out.append(f"algo.scale_rewards={'group' if v is True else 'none' if v is False else v}")
    if trl.get("lr_scheduler_type") is not None:
        s = str(trl["lr_scheduler_type"])
        if s in SCHEDULES:
            out.append(f"algo.lr_schedule={SCHEDULES[s]}")
        else:
            notes.append(f"lr_scheduler_type={s!r}: not here (constant, linear, cosine)")
    batch, gas, g = (trl.get("per_device_train_batch_size"), trl.get("gradient_accumulation_steps") or 1,
                     trl.get("num_generations"))
    if batch and g:
        completions = batch * gas
        if completions % g:
            notes.append(f"per_device_train_batch_size x gradient_accumulation_steps = {completions} completions "
                         f"is not a whole number of groups of num_generations={g}")
        else:
            out.append(f"train.prompts_per_step={completions // g}")
    for field, why in UNSUPPORTED.items():
        # steps_per_generation defaults to gradient_accumulation_steps: one generation a step, as here
        if field == "steps_per_generation" and trl.get(field) == gas:
            continue
        if trl.get(field) not in UNSET:
            notes.append(f"{field}={trl[field]!r}: not supported: {why}")
    if trl.get("use_vllm"):
        out.append("rollout=vllm")
    return out, notes


def read(path: Path) -> dict[str, Any]:
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of GRPOConfig fields, got {type(data).__name__}")
    return data


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--")]
    if len(args) != 1 or "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0 if ("-h" in argv or "--help" in argv) else 2
    try:
        overrides, notes = convert(read(Path(args[0])))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    quoted = " ".join(shlex.quote(o) for o in overrides)
    print(quoted if "--overrides-only" in argv else f"python -m runner {quoted}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
