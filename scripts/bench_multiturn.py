"""Multi-turn generation: keeping the episodes' KV cache between turns against prefilling the
whole episode every turn, side by side in one process on identical work (same seed, so the
same sampled games token for token, as tests/test_envs_math_wordle.py checks).

    python scripts/bench_multiturn.py --games 12 --repeats 3      # an RL step's 6 x 2 Wordle games
    python scripts/bench_multiturn.py --games 64 --repeats 2      # one chunk of a held-out evaluation

Prints seconds per call for each side (min over repeats), the ratio, and the tokens each side
prefilled. Not a test: it prints figures; run it alone on the machine.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--games", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--feedback", default="summary", choices=["marks", "summary"])
    p.add_argument("--model", default="smollm2_135m", choices=["smollm2_135m", "tiny"])
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from envs.wordle import WordleEnv
    from runner.config import validate
    from runner.models import load_policy
    from runner.host import cpu_description
    from runner.rollout.hf import HFRollout
    from runner.rollout.multiturn import MultiTurnRollout

    model_cfg = {"name": "tiny", "source": "tiny", "tokenizer_from": "smollm2_135m"} if a.model == "tiny" else {}
    model, tok = load_policy(validate({"model": model_cfg}).model)
    env = WordleEnv(feedback_format=a.feedback)
    prompts = env.prompts(0, a.games)
    best: dict[bool, float] = {}
    lengths = {}
    for r in range(a.repeats):
        for reuse in (False, True):  # alternating, so drift on the machine hits both sides
            torch.manual_seed(r)
            rollout = MultiTurnRollout(env, HFRollout(max_new_tokens=8, kernel="eager"), reuse_cache=reuse)
            t = time.perf_counter()
            batch = rollout.generate(model, tok, prompts, 1)
            dt = time.perf_counter() - t
            best[reuse] = min(best.get(reuse, dt), dt)
            lengths[reuse] = int(batch.attention_mask.sum())
    print(f"{cpu_description()} | torch {torch.__version__} | {a.threads} threads | {a.games} games, "
          f"{lengths[True] // a.games} tokens an episode on average")
    print(f"full prefill every turn : {best[False]:7.2f} s a call (min of {a.repeats})")
    print(f"KV cache kept (default) : {best[True]:7.2f} s a call  ->  {best[False] / best[True]:.2f}x")


if __name__ == "__main__":
    main()
