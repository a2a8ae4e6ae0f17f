"""One DeepSpeed update on a fixed global batch, as one rank of a torchrun job.

    torchrun --nproc_per_node N tests/helpers/ds_update.py OUT.pt STAGE PLACEMENT [GAS]

Every rank builds the same tiny model and samples the same 2 groups x 6 rollouts (same
seed), then trains only on its share: whole groups (local) or half of each group
(gather, where shaping and advantages must see the whole group through the backend's
gather). Rank 0 saves the loss and the updated weights, to compare across world sizes.
"""

import sys
from pathlib import Path

import torch

from runner.config import validate
from runner.rollout.hf import select
from runner.algo.shapers import shape
from runner.algo.loss import advantages
from runner.train import Trainer

out, stage, placement = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
gas = int(sys.argv[4]) if len(sys.argv) > 4 else 1
cfg = validate({
    "model": {"name": "tiny", "source": "tiny", "tokenizer_from": "smollm2_135m"},
    "env": {"_target_": "envs.dice.DiceEnv", "name": "dice"},
    "shaper": {"name": "divisor"},
    "algo": {"lr": 1e-2, "group_size": 6, "entropy": {"coef": 0.01}},
    "rollout": {"max_new_tokens": 6, "dtype": "float32"},
    "trainer": {"name": "deepspeed", "zero_stage": stage, "group_placement": placement, "grad_accum_steps": gas,
                "shared_prefix": True},
    "train": {"prompts_per_step": 2},
})
trainer = Trainer(cfg, out.parent / f"run-{out.stem}")
trainer.setup()
bk = trainer.backend
torch.manual_seed(123)  # the same global batch on every rank
batch = trainer.rollout.generate(trainer.rollout_model, trainer.tok, trainer.env.prompts(0, 2), 6)
g = torch.Generator().manual_seed(7)
keys = [str(int(k)) for k in torch.randint(1, 4, (12,), generator=g)]  # made-up answers: shaping has work to do
raw = [1.0 if k != "3" else 0.0 for k in keys]
groups = batch.groups.tolist()

if placement == "local":
    per = 12 // bk.world
    rows = list(range(bk.rank * per, (bk.rank + 1) * per))
else:  # each rank holds 6 / world rollouts of every group
    per = 6 // bk.world
    rows = [grp * 6 + bk.rank * per + i for grp in range(2) for i in range(per)]
mine = select(batch, rows)
r_mine, k_mine, g_mine = [raw[i] for i in rows], [keys[i] for i in rows], [groups[i] for i in rows]
shaped = bk.on_whole_groups(lambda r, k, gg: shape("divisor", r, k, gg), r_mine, k_mine, g_mine)
adv = torch.tensor(bk.on_whole_groups(lambda r, _k, gg: advantages(torch.tensor(r), torch.tensor(gg), "group", None,
                                                                    "mean").tolist(), shaped, k_mine, g_mine))
whole = shape("divisor", raw, keys, groups)  # what one process computes on the whole batch
assert shaped == [whole[i] for i in rows], (shaped, [whole[i] for i in rows])
scores = [type("S", (), {"answer_span": None})() for _ in rows]
m = trainer.update(mine, adv, scores)
with bk.gathered(trainer.model):
    flat = torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()])
if bk.is_main:
    torch.save({"loss": m["train/loss"], "grad_norm": m["train/grad_norm"], "params": flat, "shaped": whole,
                "adv_mine": adv}, out)
bk.close()
