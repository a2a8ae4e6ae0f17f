"""SFT tokens/s: our supervised step (algo=sft) against TRL 1.16's SFTTrainer on identical settings.

    python -m runner.bench --sft        # ours, trl: default model, 8 examples x 128 tokens a step, 6 steps x 3 repeats
    python -m runner.bench --sft --model tiny --steps 3 --repeats 1
    python -m runner.bench --sft --sides ours,ours_autocast,trl,trl_bf16 --shapes 8x128,16x256

The data is one seeded synthetic JSONL of prompt/completion rows (math prompts, a chain of
sums as the completion), every example exactly --max-length tokens: the prompt through the
chat template, then the completion and its EOS. Ours reads it as `sft.data` (the algo=sft
preset); TRL gets the same rows as standard prompt/completion text (the prompt rendered by
the same chat template), tokenizes them itself, and its tokens are checked to be ours, id for
id, with the same completion-only labels. Same weights (the default model's converted
safetensors, or the seeded tiny model), same batch and order (TRL samples sequentially
through the batches ours takes), same optimizer (fused AdamW, the preset's lr, schedule,
betas, weight decay and clipping), gradient accumulation 1, fp32 unless a side says bf16; no
evaluation, saving or logging on either side.

Each side runs in its own process (peak RSS is that side's alone), the sides alternate, and
the first step of every process is a warm-up that is not counted. It prints per-phase
seconds (forward, backward, optimizer, other), completion and total tokens per step and per
second, peak RSS, the first step's loss (the same batch and weights: the two losses agree),
ours/TRL ratios (min/median/max over repeats), and how far each side is from this machine's
floor: the step's matmul FLOPs (2 a parameter a token forward, 4 backward; the LM head only
where a token is predicted) at the matmul rate measured here, next to the rule of thumb 6 x
params x tokens, and the optimizer against torch's fused AdamW alone on as many parameters.
Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# one change each from `ours` (our SFT job's defaults, fp32): Hydra overrides
OURS = {
    "ours": {},
    # bf16 forward/backward weights, fp32 master weights and AdamW (trainer.precision=bf16)
    "ours_bf16": {"trainer.precision": "bf16"},
    # bf16 autocast over fp32 weights: what TRL's bf16=True does
    "ours_autocast": {"trainer.autocast": "bf16"},
    # no bf16 rollout copy at all (rollout.dtype=float32): what the copy costs in memory
    "ours_fp32_rollout": {"rollout.dtype": "float32"},
    # the shared-prefix passes padded (trainer.padding_free=false)
    "ours_padded": {"trainer.padding_free": "false"},
    # one plain forward per example, prompt and completion together (trainer.shared_prefix=false)
    "ours_full_forward": {"trainer.shared_prefix": "false"},
}
# one change each from `trl` (fp32, no gradient checkpointing: like ours): SFTConfig fields
TRL = {
    "trl": {},
    # TRL's own default precision: bf16 mixed precision (autocast) over fp32 weights
    "trl_bf16": {"bf16": True},
    # TRL's own default gradient checkpointing (recomputes the forward in the backward, less memory)
    "trl_gc": {"gradient_checkpointing": True},
}
SIDES = [*OURS, *TRL]
PROMPT = "What is {a} + {b}? Keep adding."


class BenchError(Exception):
    """A bench setting that cannot run (said in one line)."""


def no_reward(prompts, completions, **columns) -> list[float]:
    """The dataset environment's reward function (an SFT run never samples: never called)."""
    return [0.0] * len(completions)


# -- the data --------------------------------------------------------------------------------

def make_rows(tok, n: int, length: int, seed: int) -> list[dict]:
    """n prompt/completion rows, each exactly `length` tokens: the chat-templated prompt, the
    completion's text tokens and EOS (every number's digits are one token each, so the cut
    is exact). Raises where `length` leaves no completion token."""
    from envs.base import Prompt
    from runner.rollout.hf import render

    r = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = r.randrange(100, 1000), r.randrange(100, 1000)
        prompt = PROMPT.format(a=a, b=b)
        p_len = len(tok(render(tok, Prompt((("user", prompt),), "")), add_special_tokens=False)["input_ids"])
        want = length - p_len - 1  # the completion's text tokens; EOS is the last one
        if want < 1:
            raise BenchError(f"--max-length {length}: the prompt alone is {p_len} tokens; give at least {p_len + 2}")
        s, parts, ids = a + b, [f"{a} + {b} = {a + b}."], []
        while len(ids) < want:  # ~14 tokens a sum
            for _ in range(want // 8 + 2):
                x = r.randrange(100, 1000)
                parts.append(f"{s} + {x} = {s + x}.")
                s += x
            ids = tok(" ".join(parts), add_special_tokens=False)["input_ids"]
        text = tok.decode(ids[:want])
        if tok(text, add_special_tokens=False)["input_ids"] != ids[:want]:
            raise RuntimeError(f"the bench's completion does not round-trip through the tokenizer: {text!r}")
        rows.append({"prompt": prompt, "completion": text})
    return rows


def write_data(tok, n: int, length: int, seed: int, directory: Path) -> Path:
    path = directory / f"sft_bench_n{n}_len{length}_seed{seed}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in make_rows(tok, n, length, seed)))
    return path


# -- our side ------------------------------------------------------------------------------

def overrides(a, data: str, knobs: dict, out: str) -> list[str]:
    """The `python -m runner` command line of our side (composed here by Hydra as the CLI does)."""
    o = {"model": a.model, "algo": "sft", "env": "dataset", "env.path": data,
         "env.reward_funcs": "[runner.bench_sft.no_reward]", "env.eval_size": 1, "shaper": "none",
         "sft.data": data, "sft.batch_size": a.batch, "sft.max_length": a.max_length, "sft.eval_size": 0,
         "train.steps": a.steps, "train.eval_every": 0, "train.export": "false",
         "train.checkpoint_every": a.steps + 1000, "tracking.system_metrics": "false",
         "trainer.device": a.device, "trainer.num_threads": a.threads, "trainer.precision": "fp32",
         "trainer.grad_accum_steps": 1, "seed": a.seed, "output_dir": out}
    o.update(knobs)
    return [f"{k}={v}" for k, v in o.items()]


def compose(args: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    from runner.config import validate
    from runner.plugins import register_entry_points

    register_entry_points()
    conf = Path(__file__).resolve().parent.parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return validate(hydra_compose("config", overrides=args))


def param_split(model) -> dict:
    """Parameters, and those of the embedding and the LM head (one matrix where tied): the
    head's products run only where a token is predicted, the lookup runs none."""
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    tied = emb.data_ptr() == head.data_ptr()
    n = sum(p.numel() for p in model.parameters())
    return {"n_params": n, "n_head": head.numel(), "n_body": n - emb.numel() - (0 if tied else head.numel())}


def _peak_gpu_gb(device: str) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" and torch.cuda.is_available() else 0.0


def run_ours(a, knobs: dict) -> dict:
    """Our SFT job's Trainer in-process (as runner.bench drives the GRPO step): setup, then
    train_step after train_step, nothing else (no evaluation, checkpoint, export or tracking)."""
    from runner.algo.forward import PADDING_FREE_MAX_TOKENS, padding_free_tokens
    from runner.bench import _peak_rss_gb
    from runner.train import Trainer

    out = tempfile.mkdtemp(prefix="bench-sft-ours-")
    args = overrides(a, a.data, knobs, out)
    cfg = compose(args)
    t = Trainer(cfg, Path(out))
    t.setup()
    steps = []
    for _ in range(a.steps):
        t.step += 1
        encs = [t.kind.data.encoded[i] for i in t.kind.data.rows_for(t.step)]
        t0 = time.perf_counter()
        m = t.train_step()
        wall = time.perf_counter() - t0
        steps.append({"forward": m["time/forward_s"], "backward": m["time/backward_s"],
                      "optimizer": m["time/optimizer_s"], "step": wall, "loss": m["sft/loss"],
                      "completion_tokens": m["sft/tokens"],
                      "total_tokens": float(sum(len(e.prompt_ids) + len(e.comp) for e in encs))})
    batch = t.kind.data.batch(t.kind.data.rows_for(1), t.device)
    tr = cfg.trainer
    flat = padding_free_tokens(t.backend.compute_model, batch)
    prompts = len({tuple(e.prompt_ids) for e in (t.kind.data.encoded[i] for i in t.kind.data.rows_for(1))})
    if not tr.shared_prefix:
        path = "one full forward per example (trainer.shared_prefix=false)"
    elif tr.padding_free and flat is not None:
        path = f"padding-free: one flat stream of {flat} tokens with a block mask"
    else:
        why = ("trainer.padding_free=false" if not tr.padding_free else
               f"the flat stream is over {PADDING_FREE_MAX_TOKENS} tokens")
        path = f"shared-prefix, padded: a prompt pass, then a completion pass on its KV cache ({why})"
    rollout = ("none (the policy itself)" if t.rollout_model is t.model else
               f"{next(t.rollout_model.parameters()).dtype} copy, refreshed before evaluations only (none run here)")
    al = cfg.algo
    command = " ".join(x for x in args if not x.startswith("output_dir"))
    ran = (f"runner Trainer in-process: python -m runner {command}; "
           f"loss clip_mode={al.clip_mode} loss_agg={al.loss_agg}; fused AdamW lr={al.lr} {al.lr_schedule} "
           f"warmup_steps={al.warmup_steps} betas=({al.adam_beta1}, {al.adam_beta2}) weight_decay={al.weight_decay} "
           f"max_grad_norm={al.max_grad_norm}; precision={tr.precision} autocast={tr.autocast}; passes: {path}; "
           f"distinct prompts in a batch: {prompts} of {len(batch)}; rollout copy: {rollout}")
    shutil.rmtree(out, ignore_errors=True)
    return {"steps": steps, "rss_gb": _peak_rss_gb(), "gpu_gb": _peak_gpu_gb(a.device), **param_split(t.model),
            "ran": ran, "bf16": tr.precision == "bf16" or tr.autocast == "bf16"}


# -- TRL's side ----------------------------------------------------------------------------

def trl_schedule(name: str, warmup: int) -> str:
    return {"constant": "constant_with_warmup" if warmup else "constant"}.get(name, name)


def run_trl(a, knobs: dict) -> dict:
    """TRL's SFTTrainer on the same rows, weights, batches (in ours' order), optimizer and
    precision; its tokens checked against ours before it trains."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from runner.bench import _peak_rss_gb
    from runner.loop.sft_step import SFTData
    from runner.models import load_policy, load_tokenizer
    from runner.plugins import build_env
    from runner.rollout.hf import render

    out = tempfile.mkdtemp(prefix="bench-sft-trl-")
    cfg = compose(overrides(a, a.data, {}, out))  # ours' preset: the lr, schedule and AdamW settings TRL gets
    if a.threads:
        torch.set_num_threads(a.threads)
    data = SFTData(cfg, build_env(cfg.env, cfg.seed))  # ours' examples, tokens and batch order
    data.tokenize(load_tokenizer(cfg.model))
    order = [i for s in range(1, a.steps + 1) for i in data.rows_for(s)]
    torch.manual_seed(cfg.seed)  # as Trainer.setup seeds before the weights load (the tiny model is random)
    device = "cpu" if a.device == "cpu" else "cuda"
    model, tok = load_policy(cfg.model, device)
    exs = [data.examples[i] for i in order]
    ds = Dataset.from_dict({"prompt": [render(tok, e.prompt) for e in exs], "completion": [e.turns[0] for e in exs]})
    al = cfg.algo
    kw = dict(
        output_dir=out, max_steps=a.steps, per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
        max_length=a.max_length, packing=False, padding_free=False, completion_only_loss=True, loss_type="nll",
        bf16=False, gradient_checkpointing=False, optim="adamw_torch_fused", learning_rate=al.lr,
        lr_scheduler_type=trl_schedule(al.lr_schedule, al.warmup_steps), warmup_steps=al.warmup_steps,
        adam_beta1=al.adam_beta1, adam_beta2=al.adam_beta2, weight_decay=al.weight_decay,
        max_grad_norm=al.max_grad_norm, train_sampling_strategy="sequential", seed=cfg.seed,
        report_to="none", save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True,
        use_cpu=a.device == "cpu", dataloader_pin_memory=a.device != "cpu",
    )
    kw.update(knobs)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rec: dict = {}
    steps: list[dict] = []

    class Clock(TrainerCallback):
        last = None

        def on_step_begin(self, *args, **kw):
            rec.update(forward=0.0, backward=0.0, optimizer=0.0, completion_tokens=0.0, total_tokens=0.0)
            if self.last is None:  # the first step; later ones start where the previous ended (data loading in)
                self.last = time.perf_counter()

        def on_optimizer_step(self, *args, **kw):
            sync()
            rec["optimizer"] += time.perf_counter() - rec["backward_end"]  # clipping and AdamW, as ours'

        def on_step_end(self, *args, **kw):
            now = time.perf_counter()
            steps.append({k: rec[k] for k in ("forward", "backward", "optimizer", "completion_tokens",
                                              "total_tokens", "loss")} | {"step": now - self.last})
            self.last = now

    trainer = SFTTrainer(model=model, args=SFTConfig(**kw), train_dataset=ds, processing_class=tok,
                         callbacks=[Clock()])
    # like for like: TRL's own tokenization of the rows is ours, token for token, and its labels
    # train exactly ours' completion tokens
    for j, i in enumerate(order):
        row, enc = trainer.train_dataset[j], data.encoded[i]
        want = enc.prompt_ids + enc.comp
        labels = [-100] * len(enc.prompt_ids) + [c if m else -100 for c, m in zip(enc.comp, enc.train)]
        if row["input_ids"] != want or row["labels"] != labels:
            raise RuntimeError(f"TRL tokenized example {i} differently from ours:\n  trl  {row['input_ids']}\n"
                               f"  ours {want}")
    compute_loss, backward = trainer.compute_loss, trainer.accelerator.backward

    def timed_loss(model, inputs, *args, **kw):
        labels = inputs["labels"]
        rec["completion_tokens"] += float((labels[:, 1:] != -100).sum())
        mask = inputs.get("attention_mask")
        rec["total_tokens"] += float(mask.sum() if mask is not None else labels.numel())
        t0 = time.perf_counter()
        loss = compute_loss(model, inputs, *args, **kw)
        rec["loss"] = float(loss.detach())  # a sync on CUDA
        rec["forward"] += time.perf_counter() - t0
        return loss

    def timed_backward(*args, **kw):
        t0 = time.perf_counter()
        backward(*args, **kw)
        sync()
        rec["backward_end"] = time.perf_counter()
        rec["backward"] += rec["backward_end"] - t0

    trainer.compute_loss = timed_loss
    trainer.accelerator.backward = timed_backward
    trainer.train()
    import trl

    shown = {k: v for k, v in kw.items() if k != "output_dir"}
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # inside accelerate's wrapper
    ran = (f"trl {trl.__version__} SFTTrainer(model=<the same weights>, processing_class=<the same tokenizer>, "
           f"train_dataset=<the rows as prompt/completion text, in ours' batch order>, args=SFTConfig("
           + ", ".join(f"{k}={v!r}" for k, v in shown.items())
           + f")); in effect: attention {model.config._attn_implementation}, activation checkpointing "
           f"{bool(getattr(model, 'is_gradient_checkpointing', False))}, optimizer {type(opt).__name__}"
           f"{' (fused)' if opt.defaults.get('fused') else ''}, autocast bf16 {bool(kw['bf16'])}; "
           f"tokens checked identical to ours")
    shutil.rmtree(out, ignore_errors=True)
    return {"steps": steps, "rss_gb": _peak_rss_gb(), "gpu_gb": _peak_gpu_gb(a.device), **param_split(model),
            "ran": ran, "bf16": bool(kw["bf16"])}


def child(a) -> None:
    from runner import host

    host.configure()  # before torch loads, as `python -m runner` does
    res = run_ours(a, OURS[a.side]) if a.side in OURS else run_trl(a, TRL[a.side])
    res["omp_wait_policy"] = f"{host.POLICY.get('omp_wait_policy')} ({host.POLICY.get('why')})"
    print("BENCH_JSON " + json.dumps(res))


# -- the parent: data, sides, table, floors --------------------------------------------------

def _settings(a) -> list[str]:
    return ["--model", a.model, "--batch", str(a.batch), "--max-length", str(a.max_length), "--steps", str(a.steps),
            "--seed", str(a.seed), "--threads", str(a.threads), "--device", a.device, "--wait-policy", a.wait_policy,
            "--data", str(a.data)]


def _spawn(side: str, a) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")  # the same environment for every side (runner.bench's rules)
    if a.wait_policy.isdigit():
        env["GOMP_SPINCOUNT"] = a.wait_policy
    elif a.wait_policy != "auto":
        env["OMP_WAIT_POLICY"] = {"spin": "ACTIVE", "passive": "PASSIVE"}[a.wait_policy]
    p = subprocess.run([sys.executable, "-m", "runner.bench_sft", "--side", side, *_settings(a)], env=env,
                       capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON "):])
    raise RuntimeError(f"{side} failed:\n{p.stderr[-4000:]}")


PHASES = ["forward", "backward", "optimizer", "other", "step"]
ROWS = [*(f"{k}_s" for k in PHASES), "steps_per_s", "completion_tokens/step", "total_tokens/step",
        "completion_tokens/s", "total_tokens/s", "rss_gb", "loss_step1"]


def summarise(res: dict) -> dict:
    steps = res["steps"][1:] or res["steps"]  # the first step is warm-up
    for s in res["steps"]:
        s["other"] = s["step"] - s["forward"] - s["backward"] - s["optimizer"]
    out = {f"{k}_s": statistics.mean(s[k] for s in steps) for k in PHASES}
    step = out["step_s"]
    ctok = statistics.mean(s["completion_tokens"] for s in steps)
    ttok = statistics.mean(s["total_tokens"] for s in steps)
    out.update({"steps_per_s": 1 / step, "completion_tokens/step": ctok, "total_tokens/step": ttok,
                "completion_tokens/s": ctok / step, "total_tokens/s": ttok / step, "rss_gb": res["rss_gb"],
                "loss_step1": res["steps"][0]["loss"], "gpu_gb": res.get("gpu_gb", 0.0)})
    return out


def matmul_rate(threads: int, dtype: str) -> float:
    """GFLOP/s of a 1024^3 matmul in `dtype` (the compute-bound peak the floor uses)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    x, w = (torch.randn(1024, 1024).to(getattr(torch, dtype)) for _ in range(2))
    for _ in range(3):
        x @ w
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        x @ w
        reps += 1
    return 2 * 1024**3 * reps / (time.perf_counter() - t0) / 1e9


def adamw_seconds(threads: int, n_params: int, chunk: int = 16 * 1024 * 1024) -> float:
    """torch's fused AdamW step on `n_params` fp32 parameters, timed here on `chunk` of them and
    scaled: the optimizer's reference (memory-bound: no FLOP floor; the simple streams this
    could be compared with run slower than the fused kernel itself on some machines)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    p = torch.nn.Parameter(torch.randn(chunk))
    p.grad = torch.randn(chunk)
    opt = torch.optim.AdamW([p], lr=1e-5, fused=True)
    opt.step()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        opt.step()
        reps += 1
    return (time.perf_counter() - t0) / reps * n_params / chunk


def print_floors(a, sides: list[str], runs: dict, meta: dict) -> None:
    """Each side against the FLOPs a step needs at the matmul rate measured here: 2 a
    parameter a token forward and 4 backward for the layers (every token), the LM head only
    where a completion token is predicted, the embedding lookup none (attention's own products
    are ~1% at these lengths and not counted); the optimizer against torch's fused AdamW alone
    on as many parameters. The brief's rule of thumb, 6 x params x tokens, is printed beside it."""
    n, body, head = meta["n_params"], meta["n_body"], meta["n_head"]
    rates = {"float32": matmul_rate(a.threads, "float32")}
    if any(meta["bf16"].get(s) for s in sides):
        rates["bfloat16"] = matmul_rate(a.threads, "bfloat16")
    opt_ref = adamw_seconds(a.threads, n)
    print("\nmatmul throughput here: " + ", ".join(f"{r:.1f} GFLOP/s (1024^3 {d})" for d, r in rates.items())
          + f"; fused AdamW alone on {n / 1e6:.1f}M fp32 parameters: {opt_ref:.3f} s")
    print(f"floor ({n / 1e6:.1f}M params: {body / 1e6:.1f}M in the layers, {head / 1e6:.1f}M in the LM head; "
          f"x = measured / floor):")
    for s in sides:
        med = {k: statistics.median(x[k] for x in runs[s]) for k in ROWS}
        dtype = "bfloat16" if meta["bf16"].get(s) else "float32"
        peak = rates[dtype] * 1e9
        tokens, pred = med["total_tokens/step"], med["completion_tokens/step"]
        flops = body * tokens + head * pred
        fwd, bwd = 2 * flops / peak, 4 * flops / peak
        floor = fwd + bwd + opt_ref
        rule = 6 * n * tokens / peak
        print(f"  {s:<18} {tokens:.0f} tokens ({pred:.0f} predicted), {dtype} matmuls: forward {fwd:.3f} s "
              f"({med['forward_s'] / fwd:.1f}x), backward {bwd:.3f} s ({med['backward_s'] / bwd:.1f}x), optimizer "
              f"{opt_ref:.3f} s ({med['optimizer_s'] / opt_ref:.1f}x); step: floor {floor:.3f} s, measured "
              f"{med['step_s']:.3f} s = {med['step_s'] / floor:.1f}x ({pred / floor:.0f} completion tokens/s at the "
              f"floor); 6 x params x tokens at the matmul rate: {rule:.3f} s ({med['step_s'] / rule:.1f}x)")


def bench_shape(a, sides: list[str]) -> None:
    from runner.config import validate
    from runner.models import load_tokenizer

    model = {"name": "tiny", "source": "tiny", "tokenizer_from": "smollm2_135m"} if a.model == "tiny" else {}
    tok = load_tokenizer(validate({"model": model}).model)  # the sides' tokenizer (conf/model/<model>.yaml's)
    a.data = write_data(tok, a.examples, a.max_length, a.seed, a.data_dir)
    digest = hashlib.sha256(a.data.read_bytes()).hexdigest()[:16]
    first = json.loads(a.data.read_text().splitlines()[0])
    print(f"\nbench --sft: model={a.model} batch={a.batch} max_length={a.max_length} (every example: prompt + "
          f"completion + EOS = {a.max_length} tokens) examples={a.examples} steps={a.steps} (first is warm-up) "
          f"repeats={a.repeats} threads={a.threads} device={a.device}", flush=True)
    print(f"data: {a.data} (sha256 {digest}...), e.g. {first['prompt']!r} -> {first['completion'][:48]!r}...",
          flush=True)
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    meta: dict = {"ran": {}, "bf16": {}}
    for r in range(a.repeats):
        for s in sides:
            res = _spawn(s, a)
            for k in ("n_params", "n_head", "n_body"):
                meta.setdefault(k, res[k])
            meta["ran"][s], meta["bf16"][s] = res["ran"], res["bf16"]
            runs[s].append(summarise(res))
            print(f"  repeat {r + 1} {s:>18}: {runs[s][-1]['step_s']:.3f} s/step  "
                  f"(OpenMP wait policy: {res.get('omp_wait_policy')})", flush=True)
    print("\nwhat each side ran:")
    for s in sides:
        print(f"  {s}: {meta['ran'][s]}")
    rows = ROWS + (["gpu_gb"] if a.device == "cuda" else [])
    print(f"\n{'per step (median)':<24}" + "".join(f"{s:>18}" for s in sides))
    for k in rows:
        print(f"{k:<24}" + "".join(f"{statistics.median(x[k] for x in runs[s]):>18.4f}" for s in sides))
    ctoks = {s: statistics.median(x["completion_tokens/step"] for x in runs[s]) for s in sides}
    ttoks = {s: statistics.median(x["total_tokens/step"] for x in runs[s]) for s in sides}
    same = len(set(ctoks.values())) == 1 and len(set(ttoks.values())) == 1
    print(f"\nsame tokens per step on every side: {'yes' if same else 'NO'} "
          f"({', '.join(f'{s} {ctoks[s]:.0f} completion / {ttoks[s]:.0f} total' for s in sides)})")
    for s in sides:
        st = {k: statistics.median(x[f"{k}_s"] for x in runs[s]) for k in PHASES}
        print(f"time split {s}: " + ", ".join(f"{k} {st[k] / st['step']:.0%}" for k in PHASES[:-1]))
    pairs = [(s, base) for base in sides if base in TRL for s in sides if s in OURS]
    if pairs:
        print("\nspeed-up: tokens/s ours / TRL's on the same tokens (= TRL's s/step / ours), min / median / max "
              "over repeats; peak RSS ours / TRL's:")
    for s, base in pairs:
        ratios = sorted(t["step_s"] / o["step_s"] for o, t in zip(runs[s], runs[base]))
        rss = statistics.median(x["rss_gb"] for x in runs[s]) / statistics.median(x["rss_gb"] for x in runs[base])
        print(f"  {s + ' vs ' + base:<36} speed-up min {ratios[0]:.2f}x  median {statistics.median(ratios):.2f}x  "
              f"max {ratios[-1]:.2f}x   peak RSS {rss:.2f}")
    print_floors(a, sides, runs, meta)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """--shapes 8x128,16x256: batch x sequence length (runner.bench's parser)."""
    from runner.bench import parse_pairs

    return parse_pairs(text, "BxL", "8x128,16x256")


def trl_available() -> bool:
    return importlib.util.find_spec("trl") is not None


def main(argv=None) -> int:
    from runner.bench import wait_policy

    p = argparse.ArgumentParser(prog="python -m runner.bench --sft", description=__doc__.splitlines()[0])
    p.add_argument("--side", choices=SIDES, default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default="smollm2_135m", choices=["smollm2_135m", "tiny"])
    p.add_argument("--examples", type=int, default=256, help="rows in the synthetic data file")
    p.add_argument("--batch", type=int, default=8, help="examples a step (sft.batch_size, per_device_train_batch_size)")
    p.add_argument("--max-length", type=int, default=128,
                   help="tokens of every example: prompt (chat template) + completion + EOS")
    p.add_argument("--shapes", type=parse_shapes, default=None,
                   help="BxL,BxL,...: run every side at each batch x max-length (e.g. 8x128,16x256)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--wait-policy", default="auto", type=wait_policy,
                   help="OpenMP wait policy of the sides (as runner.bench): auto, spin, passive or a spin count")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="where the data files are written and kept (default: a temporary directory, removed)")
    p.add_argument("--sides", default="ours,trl", help=f"comma list of {', '.join(SIDES)}")
    a = p.parse_args(argv)
    if a.side:
        child(a)
        return 0
    sides = a.sides.split(",")
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        p.error(f"--sides: unknown {', '.join(unknown)}; choose from {', '.join(SIDES)}")
    if any(s in TRL for s in sides) and not trl_available():
        print("error: the TRL sides need trl: pip install '.[bench]' (trl==1.16.0), or --sides ours", file=sys.stderr)
        return 2
    if min(a.examples, a.batch, a.steps, a.repeats) < 1:
        p.error("--examples, --batch, --steps and --repeats must be >= 1")
    from runner.host import cpu_description

    print(f"cpu: {cpu_description()}", flush=True)
    if any(s in TRL for s in sides):
        from importlib.metadata import version

        v = version("trl")
        print(f"trl {v}" + ("" if v == "1.16.0" else " (the bench is written for 1.16.0)"), flush=True)
    keep = a.data_dir is not None
    a.data_dir = a.data_dir or Path(tempfile.mkdtemp(prefix="bench-sft-data-"))
    a.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        for b, length in a.shapes or [(a.batch, a.max_length)]:
            a.batch, a.max_length = b, length
            bench_shape(a, sides)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if not keep:
            shutil.rmtree(a.data_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
