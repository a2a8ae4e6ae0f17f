"""runner: a declarative experiment runner for RL post-training of language models."""

import os

from runner import threads

# Before torch is imported anywhere: spin or sleep between ops (runner/threads.py).
threads.choose()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__version__ = "0.1.0"
