"""runner: a declarative experiment runner for RL post-training of language models.

Importing the package changes nothing in the process: the host settings (OpenMP wait policy,
allocator; runner/host.py) are applied by the command-line entry points, before torch loads.
"""

__version__ = "0.1.0"
