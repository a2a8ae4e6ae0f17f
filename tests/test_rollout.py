import torch

from envs import Prompt
from runner.algo.loss import BatchNorm, LossConfig, advantages, policy_loss
from runner.rollout.hf import HFRollout, completion_mask, render
from runner.algo.forward import sequence_logprobs


def test_completion_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 6, 2, 2], [5, 2, 7, 2], [5, 6, 7, 8]])
    mask, finished = completion_mask(ids, [2])
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert finished.tolist() == [True, True, False]


def prompts():
    return [Prompt((("user", "roll a dice."),), "<answer>"),
            Prompt((("user", "roll a dice, a fair one, please. output it in tags."),), "<answer>")]


def test_rollouts_shape_groups_and_left_padding(tiny):
    model, tok = tiny
    torch.manual_seed(0)
    b = HFRollout(max_new_tokens=6).generate(model, tok, prompts(), group_size=3)
    assert len(b) == 6 and b.groups.tolist() == [0, 0, 0, 1, 1, 1]
    assert b.completion_ids.shape[1] <= 6
    assert b.attention_mask[0, 0] == 0  # shorter prompt is left padded
    assert render(tok, prompts()[0]).endswith("<|im_start|>assistant\n<answer>")
    assert all(isinstance(c, str) for c in b.completions)


def test_batched_logprobs_equal_unpadded_ones(tiny):
    """Left padding and position ids must not change a completion's log-probs."""
    model, tok = tiny
    torch.manual_seed(1)
    b = HFRollout(max_new_tokens=5).generate(model, tok, prompts(), group_size=2)
    model.eval()
    with torch.no_grad():
        batched, _ = sequence_logprobs(model, b)
        for i in range(len(b)):
            keep = b.attention_mask[i].bool()
            ids = b.input_ids[i][keep].unsqueeze(0)
            n = int(b.completion_mask[i].sum())
            logits = model(input_ids=ids).logits[0].float()
            lp = torch.log_softmax(logits, -1)
            c = ids.shape[1] - (b.prompt_len - int((~keep[: b.prompt_len]).sum()))  # completion length kept
            start = ids.shape[1] - c
            own = lp[start - 1 : start - 1 + n].gather(-1, ids[0, start : start + n].unsqueeze(-1)).squeeze(-1)
            torch.testing.assert_close(batched[i, :n], own, atol=1e-4, rtol=1e-4)
    model.train()


def test_a_gradient_step_lowers_the_loss_on_a_fixed_batch(tiny):
    model, tok = tiny
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(2)
    b = HFRollout(max_new_tokens=6).generate(model, tok, prompts(), group_size=3)
    adv = advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0]) + torch.arange(6) * 0.1, b.groups)
    norm = BatchNorm(float(b.completion_mask.sum()), float(len(b)), 6.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with torch.no_grad():
        old, _ = sequence_logprobs(model, b)

    def loss_now():
        logp, ent = sequence_logprobs(model, b)
        return policy_loss(logp, old, adv, b.completion_mask, ent, LossConfig(clip_low=0.9, clip_high=10.0), norm)[0]

    before = loss_now()
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss_now()
    model.load_state_dict(state)
    assert after.item() < before.item() - 1e-4
