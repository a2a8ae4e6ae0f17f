"""What one training step of a job is: its step kind.

A job's lifecycle is one for every kind (runner/train.py: the output dir, tracking,
checkpoints and resume, the budget, signals, the environment's evaluation, the export);
what a step does is the kind's: `rl` samples rollouts, scores, shapes and updates on them
(runner/loop/rl_step.py), `sft` updates on a batch of supervised examples
(runner/loop/sft_step.py). A third kind (say DPO) is one new module with a StepKind
subclass, named by `algo.kind`: a built-in name below, or an import path
(`algo.kind=my_pkg.dpo.DPOStep`) the way a user's environment or shaper is named. Built-in
kinds are found the same way, by the import paths of BUILT_IN.

The split follows Lightning's module/trainer: the kind holds what differs (its data, its
step, its extra held-out metrics, its tags), the Trainer holds everything that must not.
"""

from __future__ import annotations

from typing import Any

from runner.config import ConfigError

BUILT_IN = {
    "rl": "runner.loop.rl_step.RLStep",
    "sft": "runner.loop.sft_step.SFTStep",
}


class StepKind:
    """One kind of training step. Subclasses override what their step needs; the defaults
    are a kind with no data of its own and nothing extra to log."""

    # True: rollouts are sampled every step, so the low-precision rollout copy must follow
    # every optimizer step. False: only evaluations sample, and the Trainer refreshes the
    # copy just before one (a supervised step never reads it).
    samples_each_step = True

    @classmethod
    def check_config(cls, cfg) -> None:
        """The kind's own rules on the whole config, its own keys `algo.kind_options`
        included, before anything loads: raise ConfigError (one line naming the key). The
        default refuses options, since a kind that reads none would silently ignore them."""
        if cfg.algo.kind_options:  # None or {}: no options
            raise ConfigError(f"algo.kind_options={dict(cfg.algo.kind_options)!r}: algo.kind={cfg.algo.kind!r} "
                              f"takes no options")

    def __init__(self, cfg, env) -> None:
        self.cfg, self.env = cfg, env

    def before_weights(self, load_tokenizer) -> None:
        """Work that needs the tokenizer but not the weights (e.g. refusing a too-long
        example before the model loads); `load_tokenizer()` returns it."""

    def tags(self) -> dict[str, Any]:
        """Tags on the MLflow run: what this run trains on."""
        return {}

    def log_inputs(self, tracker) -> None:
        """Datasets the run trains on, as MLflow inputs."""

    def step(self, trainer) -> dict[str, float]:
        """One step of `trainer` (its step counter already advanced): the step's metrics."""
        raise NotImplementedError

    def eval_metrics(self, trainer) -> dict[str, float]:
        """What the kind adds to each evaluation (e.g. a held-out loss)."""
        return {}

    def progress(self, m: dict[str, float]) -> dict[str, str]:
        """The progress bar's fields for a step's metrics."""
        return {}


def kind_class(name: Any) -> type[StepKind]:
    """The StepKind subclass `algo.kind` names, or a ConfigError naming the key."""
    from runner.plugins import PluginError, import_object

    path = BUILT_IN.get(name, name)
    if name not in BUILT_IN and (not isinstance(name, str) or "." not in name):
        raise ConfigError(f"algo.kind={name!r}: must be one of {', '.join(BUILT_IN)}, or the import path of a "
                          f"runner.loop.step_kind.StepKind subclass")
    try:
        cls = import_object(path, "algo.kind")
    except PluginError as e:
        raise ConfigError(str(e)) from None
    if not (isinstance(cls, type) and issubclass(cls, StepKind)):
        raise ConfigError(f"algo.kind={name!r}: {path} is not a runner.loop.step_kind.StepKind subclass")
    return cls


def make(cfg, env) -> StepKind:
    return kind_class(cfg.algo.kind)(cfg, env)
