"""FR3E: anchor selection, branching from prefixes, grouping and masking, a tiny-model run."""

import pytest
import torch

from conftest import only_run, run_cli
from runner.rollout.fr3e import FR3ERollout, select_anchors
from runner.rollout.hf import HFRollout, render

ENT = [0.1, 2.0, 1.9, 0.2, 3.0, 0.1, 0.3, 0.2]


@pytest.mark.parametrize("kw,want", [
    ({"k": 3}, [1, 4]),                                 # top-3 = {4, 1, 2}; 1 and 2 are one decision point
    ({"k": 3, "merge_adjacent": False}, [1, 2, 4]),
    ({"k": 1}, [4]),
    ({"k": None, "percentile": 50}, [1, 4, 6]),         # above the median 0.25: {1, 2}, {4}, {6}
    ({"k": 2, "percentile": 50}, [1, 4]),               # the two runs with the highest peaks
    ({"k": 2, "percentile": 90}, [4]),
])
def test_anchor_selection(kw, want):
    assert select_anchors(ENT, **kw) == want


def test_anchor_selection_edge_cases():
    assert select_anchors([], k=3) == []
    assert select_anchors([1.0, 1.0, 1.0], k=2) == [0]  # ties: earliest first, then merged
    assert select_anchors([1.0, 1.0, 1.0], k=2, merge_adjacent=False) == [0, 1]


def test_branches_share_their_prefix_which_is_never_trained(tiny):
    model, tok = tiny
    from envs import DiceEnv

    env = DiceEnv()
    torch.manual_seed(0)
    r = FR3ERollout(HFRollout(max_new_tokens=6), base_samples=2, anchors=2)
    batch = r.generate(model, tok, env.prompts(0, 2), 3)
    stats = r.last
    n_groups = int(batch.groups.max()) + 1
    assert len(batch) == 3 * n_groups and n_groups == len(stats.anchor_depth)
    assert 1 <= stats.anchors_per_trajectory <= 2
    for g in range(n_groups):
        rows = (batch.groups == g).nonzero().flatten()
        context = batch.input_ids[rows, : batch.prompt_len]
        assert (context == context[0]).all()  # one prefix per group: the group's prompt
        # the prefix (prompt + base tokens before the anchor) is all before prompt_len: no
        # completion_mask there, so no rollout of the group trains on it
        assert batch.completion_mask[rows].sum() == batch.attention_mask[rows, batch.prompt_len:].sum()
        # the scored text is the base trajectory's prefix followed by the continuation
        real = context[0][batch.attention_mask[rows[0], : batch.prompt_len].bool()].tolist()
        n_prompt = len(tok(render(tok, batch.prompts[rows[0]]), add_special_tokens=False)["input_ids"])
        for i in rows.tolist():
            cont = batch.completion_ids[i][batch.completion_mask[i]].tolist()
            assert batch.completions[i] == tok.decode(real[n_prompt:] + cont, skip_special_tokens=True)
    # continuations never exceed what the base trajectory left of the token budget
    assert stats.branch_tokens == int(batch.completion_mask.sum())
    assert (batch.completion_mask.sum(-1) <= 6).all()


def test_fr3e_runs_with_the_divisor_shaper(tmp_path):
    p = run_cli(["model=tiny", "rollout.strategy=fr3e", "rollout.fr3e.anchors=2", "shaper=divisor", "train.steps=2",
                 "train.eval_every=0", "train.eval_samples=8", "rollout.max_new_tokens=6", "algo.clip_high=0.28",
                 "algo.group_size=6", "train.prompts_per_step=2",
                 f"output_dir={tmp_path / 'o'}"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    run, m = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    for k in ("fr3e/anchors_per_trajectory", "fr3e/anchor_entropy", "fr3e/generated_tokens", "fr3e/branch_tokens"):
        assert k in m
    # the generation budget counts the base trajectories as well as the branches
    assert m["tokens/generated"] == m["fr3e/generated_tokens"] > m["fr3e/branch_tokens"]
    # the random tiny model scores 0 everywhere: every anchor group is rejected, nothing is trained
    assert m["groups/dropped"] > 0 and m["train/skipped"] == 1.0


def test_fr3e_needs_single_turn_hf_rollouts():
    from runner.config import ConfigError, validate

    with pytest.raises(ConfigError, match="^rollout.strategy"):
        validate({"env": {"_target_": "envs.wordle.WordleEnv", "name": "wordle"}, "rollout": {"strategy": "fr3e"}})
    with pytest.raises(ConfigError, match="^rollout.fr3e.percentile"):
        validate({"rollout": {"strategy": "fr3e", "fr3e": {"percentile": 120}}})
