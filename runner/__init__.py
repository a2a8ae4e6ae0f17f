"""runner: a declarative experiment runner for RL post-training of language models."""

import os

# Before torch is imported anywhere: on small shared CPUs, OpenMP's default spin-waiting
# made small matmuls ~13x slower with 2 threads (DESIGN.md, "Machines").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__version__ = "0.1.0"
