"""How far one AdamW step moves the SFT'd dice start's first answer token, at the dice
recipes' lr (5e-5) and below: Adam normalises its first step, so each weight moves by about
lr whatever the gradient's scale. Pushed toward the start's own favourite (-log P("4")), and
a control: a 1e-9 random gradient, below Adam's eps, that should move nothing.

    python docs/reproduce_2026-12-07_start/adam_first_step.py outputs/dice_post_start/hf_model
"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.manual_seed(0); torch.set_num_threads(1)
path = sys.argv[1] if len(sys.argv) > 1 else "outputs/dice_post_start/hf_model"
tok = AutoTokenizer.from_pretrained(path)
msgs = [{"role": "user", "content": "roll a dice. output the roll in <answer></answer> tags."}]
text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + "<answer>"
ids = tok(text, return_tensors="pt")["input_ids"]
faces = [tok(str(f), add_special_tokens=False)["input_ids"][0] for f in range(1, 7)]
def probs(m):
    with torch.no_grad():
        p = m(ids).logits[0, -1].softmax(-1)
    return " ".join(f"{f}:{p[t].item():.3f}" for f, t in zip(range(1, 7), faces))
for lr in (5e-5, 2e-5, 5e-6, 1e-6):
    for kind in ("push up 4", "random 1e-9"):
        m = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
        opt = torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
        if kind == "push up 4":
            logp = m(ids).logits[0, -1].log_softmax(-1)[faces[3]]
            (-logp).backward()
        else:
            for p in m.parameters():
                p.grad = 1e-9 * torch.randn_like(p)
        opt.step()
        print(f"lr {lr:g} {kind:12s} after one AdamW step: {probs(m)}", flush=True)
print("start:", probs(AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)))
