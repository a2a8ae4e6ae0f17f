"""runner: a declarative experiment runner for RL post-training of language models."""

import os

from runner import host

# Before torch is imported anywhere: OpenMP wait policy, allocator (runner/host.py).
host.configure()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__version__ = "0.1.0"
