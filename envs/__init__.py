"""Environments: build one from its config with `make_env`."""

from __future__ import annotations

from typing import Any

from envs.base import INVALID, Environment, Prompt, Score
from envs.dice import DiceEnv, parse_answer

__all__ = ["INVALID", "Environment", "Prompt", "Score", "DiceEnv", "parse_answer", "make_env"]


def make_env(cfg: Any, seed: int = 0) -> Environment:
    """`cfg` is runner.config.EnvConfig (validated, so `name` is known)."""
    if cfg.name in ("dice", "even_dice"):
        return DiceEnv(
            name=cfg.name,
            prompt=cfg.prompt,
            system_prompt=cfg.system_prompt,
            assistant_prefix=cfg.assistant_prefix,
            strict_format=cfg.strict_format,
            faces=cfg.faces,
            even_only=cfg.name == "even_dice",
        )
    if cfg.name == "math":
        from envs.math_problems import MathEnv

        return MathEnv(tasks=cfg.tasks, train_size=cfg.train_size, eval_size=cfg.eval_size, eval_k=cfg.eval_k,
                       seed=seed, answer_format=cfg.answer_format, think=cfg.think, system_prompt=cfg.system_prompt,
                       assistant_prefix=cfg.assistant_prefix, format_reward=cfg.format_reward,
                       strict_format=cfg.strict_format)
    if cfg.name == "wordle":
        from envs.wordle import WordleEnv

        return WordleEnv.from_config(cfg, seed)
    raise ValueError(f"env.name={cfg.name!r}: no such environment")
