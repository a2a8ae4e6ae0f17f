"""Environments. Each is built from its config's `_target_` by runner.plugins.build_env; the
contract they implement is in envs/base.py."""

from __future__ import annotations

from envs.base import INVALID, Demonstration, Environment, Prompt, Score
from envs.dice import DiceEnv, parse_answer

__all__ = ["INVALID", "Demonstration", "Environment", "Prompt", "Score", "DiceEnv", "parse_answer"]
