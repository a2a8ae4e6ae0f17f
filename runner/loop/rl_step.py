"""The RL step kind (algo.kind=rl): the flow of one step from DESIGN.md.

    prompts -> rollouts -> scores -> shaped rewards (the collector)
            -> advantages -> loss -> optimizer step (the learner)
            -> what the step's rollouts say (step_metrics)

The trainer holds the samplers, the collector and the learner (evaluation and the
supervised kind use them too); this module is the order they run in for an RL step.
"""

from __future__ import annotations

import time

import torch

from runner.loop.step_kind import StepKind
from runner.loop.step_metrics import record, step_metrics
from runner.track import completions


class RLStep(StepKind):
    samples_each_step = True

    def step(self, t) -> dict[str, float]:
        cfg, bk = t.cfg, t.backend
        t0 = time.perf_counter()
        with t.autocast():
            c = t.collector.collect(t.rollout, t.rollout_model, t.tok, t.step)
        if cfg.rollout.name == "vllm":
            t.rollout.sleep()  # free vLLM's GPU memory for the update
        t_gen = time.perf_counter()
        if bk.all_true(c.batch is None):  # dynamic sampling found no group with any signal anywhere
            train_m = {"train/skipped": 1.0}
        elif c.batch is None:
            # other ranks have groups to learn from and every rank must take part in the
            # update's collectives: this rank trains on its last round with zero advantage
            batch, scores, _ = c.sampled[-1]
            train_m = t.update(batch, torch.zeros(len(batch)).to(t.device), scores)
        else:
            adv = t.learner.advantages(c.shaped, c.batch)
            self.log_completions(t, c, adv)
            train_m = t.update(c.batch, adv.to(t.device), c.scores)
        t_end = time.perf_counter()
        out = step_metrics(bk.gather_objects(record(c, bk.rank, t.env)), cfg, t.env, t.evaluator,
                           local_groups=bk.group_placement == "local")
        t.generated_tokens += out.generated
        if t.env.answer_space:
            t.history.train.append((t.step, t.evaluator.answer_dist(out.keys)))
        return {**out.metrics,
                "time/generate_s": t_gen - t0, "time/train_s": t_end - t_gen,
                "throughput/tokens_per_s": out.completion_tokens / (t_end - t0),
                "tokens/generated_total": float(t.generated_tokens),
                "errors/reward_total": bk.all_sum([t.collector.reward_errors])[0],
                **train_m}

    @staticmethod
    def log_completions(t, c, adv: torch.Tensor) -> None:
        """Every tracking.samples_every steps, and the last step (so a run shorter than that has
        a table too): this step's rollouts into the completions table."""
        every = t.cfg.tracking.samples_every
        last = t.step == t.cfg.train.steps
        if not every or (t.step % every and not last) or not t.backend.is_main or t.tracker is None:
            return
        path = completions.append(t.output_dir / completions.TABLE, t.step,
                                  completions.rows(t.step, c.batch, c.scores, c.shaped, adv.tolist()))
        t.tracker.log_artifact(path)

    def progress(self, m: dict[str, float]) -> dict[str, str]:
        """reward, answer entropy, and the environment's own success rate where it judges right
        and wrong (math, Wordle, datasets: `acc`), else the share of parsed answers (`valid`)."""
        out = {"reward": f"{m['reward/raw_mean']:.2f}", "H": f"{m.get('answers/entropy', 0.0):.2f}"}
        if "reward/accuracy" in m:
            out["acc"] = f"{m['reward/accuracy']:.2f}"
        else:
            out["valid"] = f"{m['answers/valid_rate']:.2f}"
        return out
