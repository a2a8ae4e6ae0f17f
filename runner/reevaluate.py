"""Evaluate a run's last checkpoint again, with as many samples as the question needs.

    python -m runner.reevaluate OUTPUT_DIR [OUTPUT_DIR ...] [--samples 960] [--seed 1234]

A run's final evaluation is `train.eval_samples` completions (96 by default): enough to see
the shape of the answer distribution, not to tell 0.18 from 0.22 (the binomial standard error
at p = 0.2 and n = 96 is 0.04). This loads the run's own resolved config and its newest
checkpoint, samples again at temperature 1 with a seed of its own, and prints the answer
fractions with their standard errors, the exact first-token probabilities, and the spread and
collapse verdicts by the same rules as the reports. Nothing is trained and nothing is logged
to MLflow; the figures go to stdout and `OUTPUT_DIR/reevaluate_<samples>.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def with_target(env: dict) -> dict:
    """A run made before environments named their `_target_` (one union of keys): the
    conf/env YAML of its name gives the target; the keys that target takes are kept."""
    if "_target_" in env:
        return env
    from omegaconf import OmegaConf

    from runner.plugins import import_object, parameters

    conf = Path(__file__).resolve().parent.parent / "conf" / "env" / f"{env.get('name')}.yaml"
    node = OmegaConf.to_container(OmegaConf.load(conf))
    params, _ = parameters(import_object(node["_target_"], "env._target_"))
    return {**node, **{k: v for k, v in env.items() if k in params or k == "name"}}


def reevaluate(output_dir: Path, samples: int, seed: int) -> dict:
    import torch
    from omegaconf import OmegaConf

    from runner.config import validate
    from runner.track.phase import Outcome
    from runner.train import Trainer

    output_dir = output_dir.resolve()
    cfg_path = output_dir / "config.yaml"
    if not cfg_path.is_file():
        raise SystemExit(f"error: {cfg_path} not found: not a run's output dir")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(cfg_path))
        if not isinstance(raw, dict):
            raise ValueError(f"a YAML {type(raw).__name__}, not a config")
    except Exception as e:  # a damaged file: one line, not a parser's traceback
        raise SystemExit(f"error: {cfg_path} is damaged ({(str(e).splitlines() or [type(e).__name__])[0][:160]})")
    raw["env"] = with_target(raw.get("env") or {})
    cfg = validate(raw)
    cfg.train.eval_samples = samples
    trainer = Trainer(cfg, output_dir)
    trainer.setup()  # loads the newest checkpoint that verifies
    if trainer.step == 0:
        raise SystemExit(f"error: {output_dir} holds no checkpoint to evaluate")
    torch.manual_seed(seed)
    with torch.no_grad():
        m = trainer.evaluate()
    frac = {k[len("eval/answers/frac/"):]: v for k, v in m.items() if k.startswith("eval/answers/frac/")}
    probs = {k[len("eval/prob/"):]: v for k, v in m.items()
             if k.startswith("eval/prob/") and k[len("eval/prob/"):] in (trainer.env.answer_space or ())}
    valid = list(trainer.env.valid_answers or [])
    o = Outcome(cfg.algo.group_size, cfg.train.prompts_per_step, cfg.shaper.name, str(cfg.seed), frac, valid)
    out = {"output_dir": str(output_dir), "step": trainer.step, "samples": samples, "seed": seed,
           "answers": frac, "stderr": {k: math.sqrt(v * (1 - v) / samples) for k, v in frac.items()},
           "first_token_prob": probs, "spread": o.spread, "collapsed": o.collapsed}
    (output_dir / f"reevaluate_{samples}.json").write_text(json.dumps(out, indent=2))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m runner.reevaluate", description=__doc__.splitlines()[0])
    p.add_argument("output_dirs", nargs="+", type=Path)
    p.add_argument("--samples", type=int, default=960)
    p.add_argument("--seed", type=int, default=1234, help="sampling seed (independent of the run's own)")
    a = p.parse_args(argv)
    for d in a.output_dirs:
        r = reevaluate(d, a.samples, a.seed)
        shown = sorted(r["answers"], key=lambda k: (k == "invalid", k))
        cells = "  ".join(f"{k} {r['answers'][k]:.3f}±{r['stderr'][k]:.3f}" for k in shown)
        probs = " ".join(f"{k}:{v:.3f}" for k, v in r["first_token_prob"].items())
        print(f"{d} step {r['step']} n={r['samples']}: {cells} | P(first) {probs} | "
              f"spread={r['spread']} collapsed={r['collapsed']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
