"""Math and Wordle environments, clusterers, pass@k, multi-turn masking."""

import pytest
import torch

from conftest import only_run, run_cli
from envs.base import INVALID, Prompt
from envs.math_problems import MathEnv, equivalent, extract_answer, normalise
from envs.wordle import GRAY, GREEN, YELLOW, WordleEnv, consistent, feedback
from runner.algo.clustering import cluster_keys, clusters_per_group
from runner.track.metrics import pass_at_k


# -- Wordle ---------------------------------------------------------------------------------
@pytest.mark.parametrize("secret,guess,marks", [
    ("apple", "papal", "YYG.Y"),   # one p green, the other p yellow, the second a gray (only one a)
    ("speed", "erase", "Y..YY"),   # two e's in the secret: both e's of the guess yellow
    ("abbey", "babes", "YYGG."),
    ("crane", "crane", "GGGGG"),
    ("eerie", "sleep", "..YY."),   # three e's in the secret, two in the guess, none in place
])
def test_wordle_feedback_handles_repeated_letters(secret, guess, marks):
    assert feedback(secret, guess).replace(GRAY, ".") == marks


def test_wordle_feedback_counts_copies():
    # secret has one l: the guess's two l's get one mark between them, the green one first
    assert feedback("world", "hello") == GRAY + GRAY + GRAY + GREEN + YELLOW
    assert feedback("hello", "lllll") == GRAY * 2 + GREEN * 2 + GRAY


def test_consistency_with_history():
    hist = [("crane", feedback("slate", "crane"))]
    assert consistent("slate", hist) and not consistent("crane", hist)


def _env(**kw):
    return WordleEnv(words=["crane", "slate", "apple", "papal", "world", "hello", "bench", "quiet"], eval_size=2,
                     max_turns=3, **kw)


def test_wordle_game_turns_rewards_and_end():
    env = _env()
    p = env.prompts(0, 1)[0]
    g = env.new_game(p)
    g.secret = "slate"
    reply = env.play(g, "crane</guess>")
    assert reply is not None and "C=gray" in reply and "A=green" in reply and "2 turn(s) left" in reply
    reply = env.play(g, "zzzzz</guess>")  # not a word in the list: a turn spent, told why
    assert "not in the word list" in reply and not g.turns[-1]["valid"]
    assert env.play(g, "slate</guess>") is None and g.solved and g.done
    s = env.score_game(g)
    # solve 1.0 + no unused turns + format 0.1 x 2/3 valid
    assert s.correct and s.reward == pytest.approx(1.0 + 0.1 * 2 / 3) and s.answer_key == "crane"
    lost = env.new_game(p)
    lost.secret = "apple"
    for w in ("hello", "hello", "papal"):
        env.play(lost, f"{w}</guess>")
    assert lost.done and not lost.solved
    s = _env(reward_weights={"repeat": 0.05}).score_game(lost)
    best = max(m.count(GREEN) + 0.5 * m.count(YELLOW) for m in (feedback("apple", "hello"), feedback("apple", "papal")))
    assert s.reward == pytest.approx(0.1 + 0.2 * best / 5 - 0.05) and not s.correct


def test_wordle_train_and_eval_secrets_are_disjoint():
    env = _env()
    assert not set(env.eval_secrets) & set(env.train_secrets)
    assert {env.secret(p) for p in env.eval_prompts()} == set(env.eval_secrets)


def test_multiturn_rollout_masks_environment_tokens(tiny):
    from runner.rollout.multiturn import MultiTurnRollout
    from runner.rollout.hf import HFRollout

    model, tok = tiny
    env = _env()
    torch.manual_seed(0)
    batch = MultiTurnRollout(env, HFRollout(max_new_tokens=4)).generate(model, tok, env.prompts(0, 2), 3)
    assert len(batch) == 6 and batch.episodes is not None
    P = batch.prompt_len
    for i, game in enumerate(batch.episodes):
        comp = batch.input_ids[i, P:]
        real = batch.attention_mask[i, P:].bool()
        model_tokens = batch.completion_mask[i] & real
        env_tokens = real & ~batch.completion_mask[i]
        assert len(game.turns) == 3  # a random model never wins: all 3 turns played
        env_text = tok.decode(comp[env_tokens])
        assert env_text.count("turn(s) left") == 2  # the two replies between three turns, never trained on
        assert "turn(s) left" not in tok.decode(comp[model_tokens])
        turns = batch.token_turn[i][model_tokens]
        assert set(turns.tolist()) == {0, 1, 2} and (batch.token_turn[i][env_tokens] == -1).all()


# -- math -----------------------------------------------------------------------------------
def test_math_answer_checking_accepts_equivalent_forms():
    assert equivalent("0.5", "1/2") and equivalent("1/2", "\\frac{1}{2}") and equivalent("12", "12.0")
    assert not equivalent("3", "4") and not equivalent("3", "three apples")
    assert normalise("12.0") == normalise("24/2") == "12" and normalise("0.5") == "1/2"


@pytest.mark.parametrize("text,fmt,strict,want", [
    ("<answer>42</answer>", "answer", True, "42"),
    ("<answer> 42 </answer>", "answer", True, "42"),
    ("<answer>1</answer><answer>2</answer>", "answer", False, None),  # two answers: none
    ("<answer></answer>", "answer", False, None),
    ("<answer>42 and then more", "answer", False, "42 and then more"),  # lenient: open tag to end of line
    ("<answer>42 and then more", "answer", True, None),
    ("so \\boxed{\\frac{3}{4}}.", "boxed", True, "\\frac{3}{4}"),
    ("\\boxed{1} or \\boxed{2}", "boxed", True, None),
])
def test_math_answer_extraction(text, fmt, strict, want):
    assert extract_answer(text, fmt, strict)[0] == want


def test_math_env_scores_against_the_generated_answer():
    env = MathEnv(tasks={"basic_arithmetic": {"weight": 1, "min_terms": 2, "max_terms": 2, "min_digits": 1,
                                              "max_digits": 1}}, train_size=8, eval_size=4)
    p = env.prompts(0, 1)[0]
    gold = str(env.entry(p)["answer"])
    right = env.score(p, f"{gold}</answer>", True)
    assert right.reward == 1.0 and right.correct and right.exact_format and right.answer_key == normalise(gold)
    assert env.score(p, f"{gold}.0</answer>", True).correct  # an equivalent form
    wrong = env.score(p, f"{int(float(gold)) + 1}</answer>", True)
    assert wrong.reward == 0.0 and wrong.correct is False
    assert env.score(p, "</answer>", True).answer_key == INVALID  # an empty answer
    assert env.score(p, "1</answer><answer>2</answer>", True).answer_key == INVALID  # two answers
    assert len(env.eval_prompts()) == 4 and not {e["question"] for e in env.eval} & {e["question"] for e in env.train}


@pytest.mark.parametrize("n,c,k,want", [(4, 1, 1, 0.25), (4, 1, 4, 1.0), (4, 0, 2, 0.0), (5, 2, 2, 0.7), (3, 3, 1, 1.0)])
def test_pass_at_k_unbiased_estimator(n, c, k, want):
    assert pass_at_k(n, c, k) == pytest.approx(want)


# -- clusterers -----------------------------------------------------------------------------
def test_exact_and_normalized_clusters():
    keys = ["12", "12.0", "24/2", "13", INVALID, INVALID]
    groups = [0] * 6
    assert clusters_per_group(cluster_keys("exact", keys, [""] * 6, groups), groups) == 5
    norm = cluster_keys("normalized", keys, [""] * 6, groups)
    assert norm[0] == norm[1] == norm[2] != norm[3] and norm[4] == norm[5] and clusters_per_group(norm, groups) == 3
    # rollouts of different groups never share a cluster
    two = cluster_keys("normalized", ["7", "7"], ["", ""], [0, 1])
    assert two[0] != two[1]


def test_embedding_clusters_paraphrases_together():
    texts = ["The answer is twelve.", "the answer is twelve", "I like turtles very much.", "Turtles are what I like a lot."]
    keys = cluster_keys("embedding", [INVALID] * 4, texts, [0] * 4, threshold=0.9)
    assert keys[0] == keys[1] and keys[2] != keys[0]


def test_divisor_shaper_counts_equivalent_math_answers_as_one():
    from runner.algo.shapers import shape

    keys = cluster_keys("normalized", ["0.5", "1/2", "3"], ["", "", ""], [0, 0, 0])
    assert shape("divisor", [1.0, 1.0, 0.0], keys, [0, 0, 0]) == [0.5, 0.5, 0.0]


# -- a few steps of each environment on the tiny model ----------------------------------------
@pytest.mark.parametrize("env_args", [
    ["env=math", "env.train_size=16", "env.eval_size=2", "env.eval_k=2", "shaper.cluster=normalized"],
    ["env=wordle", "env.eval_size=2", "env.eval_k=2", "env.max_turns=2"],
])
def test_environment_runs_on_the_tiny_model(tmp_path, env_args):
    p = run_cli(["model=tiny", *env_args, "train.steps=2", "train.eval_every=2", "rollout.max_new_tokens=4",
                 "algo.group_size=6", "train.prompts_per_step=2",
                 f"output_dir={tmp_path / 'o'}"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    run, m = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert "eval/accuracy" in m and "eval/pass_at_2" in m and "eval/maj_at_2" in m and "groups/clusters_mean" in m
    if "env=wordle" in env_args:
        assert "game/solve_rate" in m and "eval/game/opening_entropy" in m and "policy/entropy_turn1" in m
    # samples.md: each held-out sample with its prompt and the right answer beside the model's
    lines = (tmp_path / "o" / "artifacts" / "samples.md").read_text().splitlines()
    assert lines[0] == "| # | prompt | completion | answer | reference | reward |" and len(lines) == 2 + 4
    refs = [line.split(" | ")[4] for line in lines[2:]]
    assert all(refs) and (all(len(r) == 5 and r.isalpha() for r in refs) if "env=wordle" in env_args else True)


def test_multiturn_forward_matches_the_full_forward_on_model_tokens(tiny):
    import dataclasses

    from runner.algo.forward import sequence_logprobs
    from runner.rollout.multiturn import MultiTurnRollout
    from runner.rollout.hf import HFRollout

    model, tok = tiny
    env = _env()
    torch.manual_seed(1)
    batch = MultiTurnRollout(env, HFRollout(max_new_tokens=4)).generate(model, tok, env.prompts(0, 1), 3)
    fast_lp, fast_ent = sequence_logprobs(model, batch)
    full_lp, full_ent = sequence_logprobs(model, dataclasses.replace(batch, token_turn=None))
    m = batch.completion_mask.bool()
    assert torch.allclose(fast_lp[m], full_lp[m], atol=1e-5) and torch.allclose(fast_ent[m], full_ent[m], atol=1e-4)
    assert (fast_lp[~m] == 0).all()


def test_wordle_knowledge_states_what_all_the_feedback_says():
    from envs.wordle import knowledge

    h = [("slate", feedback("brine", "slate")), ("crane", feedback("brine", "crane"))]
    assert knowledge(h) == "Known: _ R _ N E. Not in the word: A C L S T."
    # a letter marked yellow once and gray once is in the word once: not absent, not in either place
    assert knowledge([("speed", feedback("abide", "speed"))]) == (
        "Known: _ _ _ _ _. In the word, place unknown: D (not 5th), E (not 3rd, 4th). Not in the word: P S.")


def test_wordle_summary_feedback_adds_the_knowledge_line():
    marks, summary = _env(), _env(feedback_format="summary")
    for env in (marks, summary):
        g = env.new_game(env.prompts(0, 1)[0])
        g.secret = "slate"
        reply = env.play(g, "crane</guess>")
        assert "C=gray" in reply and ("Known: _ _ A _ E." in reply) == (env is summary), reply
    with pytest.raises(ValueError, match="feedback_format"):
        WordleEnv.check_config({"max_turns": 6, "eval_size": 1, "eval_k": 1, "reward_weights": {},
                                "feedback_format": "emoji", "demo_openings": 1})


def test_wordle_game_metrics_read_consistency_repeats_and_openings():
    env = _env()
    p = env.prompts(0, 1)[0]
    games = []
    for guesses in (("crane", "slate"), ("zzzzz", "crane", "crane"), ("crane", "hello", "slate")):
        g = env.new_game(p)
        g.secret = "slate"
        for w in guesses:
            env.play(g, f"{w}</guess>")
        games.append(g)
    m = env.game_metrics(games, "game")
    # later valid guesses: slate (consistent with crane's marks), crane again (a repeat: not
    # consistent, crane's own marks rule it out), hello (not), slate (yes); the game opened
    # with an invalid guess counts its first *valid* one as its first
    assert m["game/consistent_rate"] == pytest.approx(2 / 4)
    assert m["game/repeat_rate"] == pytest.approx(1 / 8)
    assert m["game/solve_rate"] == pytest.approx(2 / 3) and m["game/opening_distinct"] == 2.0


class _ShortGames(WordleEnv):
    """Some games end after their first turn, so the episodes still playing change mid-rollout."""

    def play(self, game, turn_text):
        reply = super().play(game, turn_text)
        if reply is not None and game.secret in ("crane", "apple", "world"):
            game.done = True
            return None
        return reply


@pytest.mark.parametrize("env_cls", [WordleEnv, _ShortGames])
def test_multiturn_cache_reuse_samples_what_the_full_prefill_samples(tiny, env_cls):
    """Keeping the episodes' KV cache between turns (prefilling only each turn's new tokens,
    left-padded, with masked gaps) must give the same next-token distribution as prefilling
    the whole episode: same seed, same sampled episodes, token for token."""
    from runner.rollout.hf import HFRollout
    from runner.rollout.multiturn import MultiTurnRollout

    model, tok = tiny
    words = ["crane", "slate", "apple", "papal", "world", "hello", "bench", "quiet"]
    env = env_cls(words=words, eval_size=2, max_turns=4)
    out = {}
    for reuse in (False, True):
        torch.manual_seed(0)
        rollout = MultiTurnRollout(env, HFRollout(max_new_tokens=5, kernel="eager"), reuse_cache=reuse)
        out[reuse] = rollout.generate(model, tok, env.prompts(0, 3), 2)
    a, b = out[False], out[True]
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.completion_mask, b.completion_mask)
    assert [len(g.turns) for g in a.episodes] == [len(g.turns) for g in b.episodes]
    if env_cls is _ShortGames:  # the case under test: episodes left the batch at different turns
        assert len({len(g.turns) for g in b.episodes}) > 1


def _splits(name, seed, tmp_path):
    """(held-out items, training items) of each environment with a held-out set, at a run seed."""
    if name == "wordle":
        env = WordleEnv(eval_size=16, seed=seed)
        return env.eval_secrets, env.train_secrets
    if name == "math":
        env = MathEnv(train_size=64, eval_size=8, seed=seed)
        return [e["question"] for e in env.eval], [e["question"] for e in env.train]
    import json

    from envs.dataset import DatasetEnv

    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) + "\n" for i in range(40)))
    env = DatasetEnv(path=str(f), reward_funcs=[], eval_size=8, seed=seed)
    return ([env.row(p)["prompt"] for p in env.eval_prompts()],
            [env.row(p)["prompt"] for p in env.prompts(0, len(env.splits["train"][1]))])


@pytest.mark.parametrize("name", ["wordle", "math", "dataset"])
def test_the_held_out_set_is_the_same_for_every_seed_and_never_trained_on(name, tmp_path):
    """A recipe's stages (or a study's seeds) run at different seeds are judged on the same
    held-out items, and no seed trains on another seed's held-out items; the seed still
    changes the order of the training items."""
    held = {}
    for seed in (0, 1, 2):
        held[seed], train = _splits(name, seed, tmp_path)
        assert held[seed] and not set(held[seed]) & set(train)
        if seed == 0:
            first_train = train
    assert held[0] == held[1] == held[2]
    assert train != first_train
