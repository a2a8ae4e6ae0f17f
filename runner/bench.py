"""Step-time benchmark: our training step against TRL's GRPOTrainer on identical settings.

    python -m runner.bench                       # ours, ours_bf16, trl: default model, G=6, 24 new tokens, 6 steps x 3 repeats
    python -m runner.bench --model tiny --steps 4 --repeats 1
    python -m runner.bench --sft                 # SFT: our algo=sft step vs TRL's SFTTrainer (runner/bench_sft.py)
    make bench

Each side runs in its own process (so peak RSS is that side's alone), the sides
alternate, and the first step of every process is a warm-up that is not counted. It
prints per-phase seconds, steps/s, generated tokens/s, peak RSS, ours/TRL ratios
(min/median/max over repeats), and a "limit" line: the FLOPs of one step divided by this
machine's matmul throughput, measured here. Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

PROMPT = "roll a dice. output the roll in <answer></answer> tags."


def _settings(a) -> list[str]:
    return ["--model", a.model, "--group", str(a.group), "--prompts", str(a.prompts), "--new-tokens", str(a.new_tokens),
            "--steps", str(a.steps), "--contend-after", str(a.contend_after), "--wait-policy", a.wait_policy,
            "--seed", str(a.seed), "--threads", str(a.threads), "--device", a.device, "--lora-r", str(a.lora_r)]


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _config(a, engine: str = "loop", shared_prefix: bool = True, autocast: str = "none",
            rollout_dtype: str = "auto", precision: str = "fp32", rollout: str = "hf", lora: int = 0,
            linears: str = "auto", padding_free: bool = True, attention: str = "auto", kernel: str = "auto"):
    from runner.config import validate

    model = {"name": "tiny", "source": "tiny", "tokenizer_from": "smollm2_135m"} if a.model == "tiny" else {}
    model["lora"] = {"r": lora}
    return validate({
        "seed": a.seed,
        "model": model,
        "env": {"_target_": "envs.dice.DiceEnv", "name": "even_dice", "even_only": True},
        "shaper": {"name": "none"},
        "algo": {"group_size": a.group, "lr": 5e-5},
        "rollout": {"name": rollout, "max_new_tokens": a.new_tokens, "engine": engine, "dtype": rollout_dtype,
                    "linears": linears, "attention": attention, "kernel": kernel},
        "trainer": {"device": a.device, "num_threads": a.threads, "shared_prefix": shared_prefix,
                    "autocast": autocast, "precision": precision, "padding_free": padding_free},
        "train": {"prompts_per_step": a.prompts},
    })


def run_ours(a, **knobs) -> dict:
    """Our training step on the bench's settings; `knobs` are _config's (one side, one change)."""
    from pathlib import Path
    import tempfile

    from runner.train import Trainer

    cfg = _config(a, **knobs)
    if cfg.rollout.name == "vllm":
        from runner.rollout.vllm import check_available

        check_available(cfg)  # a one-line reason (no GPU, no vllm) before anything loads
    t = Trainer(cfg, Path(tempfile.mkdtemp()))
    t.setup()
    steps = []
    rival = None
    for i in range(a.steps):
        if a.contend_after and i == a.contend_after:  # load that appears mid-run
            rival = subprocess.Popen([sys.executable, "-c", RIVAL])
        t.step += 1
        m = t.train_step()
        steps.append({
            "generate": m["time/generate_s"], "forward": m.get("time/forward_s", 0.0),
            "backward": m.get("time/backward_s", 0.0), "optimizer": m.get("time/optimizer_s", 0.0),
            "step": m["time/step_s"], "tokens": m["completion/mean_length"] * a.group * a.prompts,
            "decode_steps": m["completion/max_length"], "skipped": m.get("train/skipped_seq_frac", 0.0),
            "reward": m["reward/raw_mean"], "contended": rival is not None,
        })
    if rival is not None:
        rival.kill()
        rival.wait()
    for s in steps:
        s["score+other"] = s["step"] - s["generate"] - s["forward"] - s["backward"] - s["optimizer"]
    from runner.rollout.hf import render

    n_params = sum(p.numel() for p in t.model.parameters())
    prompt_len = len(t.tok(render(t.tok, t.env.prompts(0, 1)[0]), add_special_tokens=False)["input_ids"])
    return {"steps": steps, "rss_gb": _peak_rss_gb(), "n_params": n_params, "prompt_len": prompt_len,
            "rollout_bytes": next(t.rollout_model.parameters()).element_size()}


def wait_policy(value: str) -> str:
    """--wait-policy: auto, spin, passive or a whole number of spins (GOMP_SPINCOUNT)."""
    if value in ("auto", "spin", "passive") or value.isdigit():
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: use auto, spin, passive or a spin count (a whole number >= 0)")


# a second job on the machine: one thread of matmuls, as a one-thread training job would be
RIVAL = "import torch\ntorch.set_num_threads(1)\nx = torch.randn(512, 512)\nwhile True:\n    x @ x"


def run_trl(a, bf16: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from runner.models import load_policy
    from runner.plugins import build_env
    from runner.rollout.hf import render

    cfg = _config(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    model, tok = load_policy(cfg.model, "cpu" if a.device == "cpu" else "cuda")
    env = build_env(cfg.env, cfg.seed)
    prompt = env.prompts(0, 1)[0]
    text = render(tok, prompt)

    def reward(completions, **kw):
        return [env.score(prompt, c, True).reward for c in completions]

    times = {"generate": 0.0, "backward": 0.0, "optimizer": 0.0}
    steps: list[dict] = []

    def timed(name, fn):
        def wrapper(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                times[name] += time.perf_counter() - t0
        return wrapper

    class Clock(TrainerCallback):
        def on_step_begin(self, *args, **kw):
            times.update(generate=0.0, backward=0.0, optimizer=0.0)
            self.t0 = time.perf_counter()

        def on_pre_optimizer_step(self, *args, **kw):
            self.o0 = time.perf_counter()

        def on_optimizer_step(self, *args, **kw):
            times["optimizer"] += time.perf_counter() - self.o0

        def on_step_end(self, *args, **kw):
            step = time.perf_counter() - self.t0
            steps.append({**times, "step": step, "forward": 0.0,
                          "score+other": step - times["generate"] - times["backward"] - times["optimizer"]})

    args = GRPOConfig(
        output_dir=os.path.join(os.environ.get("TMPDIR", "/tmp"), "trl-bench"), num_generations=a.group,
        per_device_train_batch_size=a.group * a.prompts, max_completion_length=a.new_tokens, max_steps=a.steps,
        learning_rate=5e-5, temperature=1.0, beta=0.0, logging_steps=1, report_to="none", save_strategy="no",
        use_cpu=a.device == "cpu", bf16=bf16, seed=a.seed, top_k=0, disable_tqdm=True,
    )
    ds = Dataset.from_dict({"prompt": [text] * (a.steps * a.group * a.prompts)})
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                          callbacks=[Clock()])
    model.generate = timed("generate", model.generate)
    trainer.accelerator.backward = timed("backward", trainer.accelerator.backward)
    trainer.train()
    # TRL's forward (old/ref log-probs and the loss forward) is inside score+other here
    return {"steps": steps, "rss_gb": _peak_rss_gb()}


def matmul_gflops(threads: int | None) -> dict:
    """Measured throughput: a large square fp32 matmul (compute-bound peak) and a
    decode-shaped one (batch x hidden times the vocabulary head, as `F.linear` computes it,
    and in the weight-major and oneDNN-packed layouts runner/rollout/decode_linears.py can
    switch to; the packing itself not counted)."""
    import torch
    import torch.nn.functional as F

    from runner.rollout import decode_linears as dl

    if threads:
        torch.set_num_threads(threads)
    out = {}
    shapes = {"square_1024": (1024, 1024, 1024), "decode_6x576x49152": (6, 576, 49152),
              "decode_weight_major_6x576x49152": (6, 576, 49152), "decode_packed_6x576x49152": (6, 576, 49152)}
    for name, (m, k, n) in shapes.items():
        if "packed" in name and not dl.onednn_available():
            continue
        x = torch.randn(m, k)
        if name == "square_1024":
            w = torch.randn(k, n)
            f = lambda: x @ w  # noqa: E731
        else:  # an nn.Linear's weight: out x in
            w = torch.randn(n, k)
            if "weight_major" in name:
                f = lambda: dl.weight_major(w, None, x)  # noqa: E731
            elif "packed" in name:
                packed = dl.pack(w, m)
                f = lambda: dl.packed_linear(packed, None, x)  # noqa: E731
            else:
                f = lambda: F.linear(x, w)  # noqa: E731
        for _ in range(3):
            f()
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 1.0:
            f()
            reps += 1
        out[name] = 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9
    return out


def fused_gflops(threads: int | None, rows: int) -> float | None:
    """The fused decode kernel's bf16 product rate at `rows` rows with its weight in cache
    (a 3072 x 576 gate/up-sized matrix): the compute ceiling of a decode step that reads its
    weights once; None where the kernel does not run (no avx512_bf16, no compiler)."""
    import torch

    from runner.rollout import fused_decode as fd

    if threads:
        torch.set_num_threads(threads)
    if not fd.has_bf16_dot():
        return None
    try:
        lib = fd.library()
    except RuntimeError:
        return None
    from runner.rollout.decode_linears import _best_time

    n, k, calls = 3072, 576, 50
    packed = fd.pack([torch.randn(n, k)], lib)
    x = torch.randn(rows, k).to(torch.bfloat16)
    best = _best_time(lambda: [fd.linear(x, packed, n, lib) for _ in range(calls)], repeats=5) / calls
    return 2 * rows * n * k / best / 1e9


def read_gbs(threads: int | None) -> float:
    """Measured memory read bandwidth: summing a 512 MB tensor (larger than any cache)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    x = torch.randn(128 * 1024 * 1024)
    x.sum()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        x.sum()
        reps += 1
    return x.numel() * 4 * reps / (time.perf_counter() - t0) / 1e9


def step_flops(n_params: int, prompt_len: int, group: int, new_tokens: float) -> dict:
    """2N FLOPs per token forward, 4N backward (attention terms are small at these lengths).
    Generation: one prompt prefill plus G x new tokens decoded; training: shared prompt
    once plus G completions, forward and backward."""
    gen_tokens = prompt_len + group * new_tokens
    train_tokens = prompt_len + group * new_tokens
    return {"generate": 2 * n_params * gen_tokens, "forward": 2 * n_params * train_tokens,
            "backward": 4 * n_params * train_tokens}


SIDES = {
    "ours": lambda a: run_ours(a),
    "ours_fp32_rollout": lambda a: run_ours(a, rollout_dtype="float32"),
    # every sampling linear as F.linear computes it (rollout.linears=plain)
    "ours_plain_linears": lambda a: run_ours(a, linears="plain"),
    # the shared-prefix training passes padded and cut by length (trainer.padding_free=false)
    "ours_padded": lambda a: run_ours(a, padding_free=False),
    # transformers' own SDPA dispatch at decode steps (rollout.attention=sdpa)
    "ours_sdpa_decode": lambda a: run_ours(a, attention="sdpa"),
    # one-token decode steps through the transformers model, not the fused C step (rollout.kernel=eager)
    "ours_eager_decode": lambda a: run_ours(a, kernel="eager"),
    # bf16 forward/backward weights (shared with the rollouts), fp32 master weights and AdamW
    "ours_bf16": lambda a: run_ours(a, precision="bf16"),
    "ours_autocast": lambda a: run_ours(a, autocast="bf16"),
    # LoRA adapters (rank --lora-r, all linear layers) instead of full fine-tuning
    "ours_lora": lambda a: run_ours(a, lora=a.lora_r),
    "ours_lora_bf16": lambda a: run_ours(a, precision="bf16", lora=a.lora_r),
    # GPU only (--device cuda, pip install '.[gpu]'): vLLM generation, bf16 training
    "ours_vllm": lambda a: run_ours(a, precision="bf16", rollout="vllm"),
    # the straightforward path: transformers generate, full forward per rollout
    "ours_reference": lambda a: run_ours(a, engine="generate", shared_prefix=False, rollout_dtype="float32"),
    "trl": lambda a: run_trl(a),
    # TRL's own default: bf16 mixed precision (autocast) with fp32 weights
    "trl_bf16": lambda a: run_trl(a, bf16=True),
}


def child(a) -> None:
    from runner import host

    host.configure()  # before torch loads, as `python -m runner` does
    res = SIDES[a.side](a)
    spins = f", GOMP_SPINCOUNT={host.POLICY['gomp_spincount']}" if "gomp_spincount" in host.POLICY else ""
    res["omp_wait_policy"] = f"{host.POLICY.get('omp_wait_policy')}{spins} ({host.POLICY.get('why')})"
    print("BENCH_JSON " + json.dumps(res))


def _spawn(side: str, a) -> dict:
    # both sides get this process's environment: each child then picks the same OpenMP wait
    # policy (runner/host.py; spinning on an idle machine) unless the caller set one
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if a.wait_policy.isdigit():  # a spin count: spin that long, then sleep
        env["GOMP_SPINCOUNT"] = a.wait_policy
    elif a.wait_policy != "auto":  # fixed for the comparison of policies under load
        env["OMP_WAIT_POLICY"] = {"spin": "ACTIVE", "passive": "PASSIVE"}[a.wait_policy]
    p = subprocess.run([sys.executable, "-m", "runner.bench", "--side", side, *_settings(a)], env=env,
                       capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON "):])
    raise RuntimeError(f"{side} failed:\n{p.stderr[-4000:]}")


PHASES = ["generate", "forward", "backward", "optimizer", "score+other", "step"]


def summarise(res: dict, rows: int) -> dict:
    steps = res["steps"][1:] or res["steps"]  # first step is warm-up
    out = {k: statistics.mean(s.get(k, 0.0) for s in steps) for k in PHASES}
    out["steps_per_s"] = 1 / out["step"]
    toks = [s.get("tokens") for s in steps if s.get("tokens") is not None]
    out["gen_tokens_per_s"] = (statistics.mean(toks) / out["generate"]) if toks else float("nan")
    out["new_tokens"] = statistics.mean(toks) / rows if toks else float("nan")
    dec = [s["decode_steps"] for s in steps if s.get("decode_steps") is not None]
    out["decode_steps"] = statistics.mean(dec) if dec else float("nan")
    out["skipped_seq_frac"] = statistics.mean(s.get("skipped", 0.0) for s in steps)
    out["rss_gb"] = res["rss_gb"]
    alone = [s["step"] for s in steps if not s.get("contended")]
    loaded = [s["step"] for s in steps if s.get("contended")]
    out["step_alone"] = statistics.mean(alone) if alone else float("nan")
    out["step_contended"] = statistics.mean(loaded) if loaded else float("nan")
    return out


def bench_shape(a, sides: list[str]) -> tuple[dict[str, list[dict]], dict]:
    """Every side at a's shape (--group x --prompts), `repeats` times, sides alternating."""
    print(f"bench: model={a.model} G={a.group} x {a.prompts} prompts new_tokens={a.new_tokens} steps={a.steps} "
          f"(first is warm-up) repeats={a.repeats} threads={a.threads} device={a.device}", flush=True)
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    meta: dict = {}
    for r in range(a.repeats):
        for s in sides:
            res = _spawn(s, a)
            if "n_params" in res and not meta:  # the limit lines describe the first side
                meta = res
            runs[s].append(summarise(res, a.group * a.prompts))
            print(f"  repeat {r + 1} {s:>14}: {runs[s][-1]['step']:.2f} s/step  "
                  f"(OpenMP wait policy: {res.get('omp_wait_policy')})", flush=True)
    print(f"\n{'phase (s/step)':<18}" + "".join(f"{s:>16}" for s in sides))
    extra = ["step_alone", "step_contended"] if a.contend_after else []
    for k in PHASES + ["steps_per_s", "gen_tokens_per_s", "decode_steps", "skipped_seq_frac", "rss_gb", *extra]:
        print(f"{k:<18}" + "".join(f"{statistics.median(x[k] for x in runs[s]):>16.3f}" for s in sides))
    for base in ("trl", "trl_bf16"):
        if base not in sides:
            continue
        for s in sides:
            if s.startswith("trl"):
                continue
            ratios = sorted(t["step"] / o["step"] for o, t in zip(runs[s], runs[base]))
            rss = statistics.median(x["rss_gb"] for x in runs[s]) / statistics.median(x["rss_gb"] for x in runs[base])
            print(f"\nspeed-up {s} vs {base} ({base} s/step / ours): min {ratios[0]:.2f}x  median "
                  f"{statistics.median(ratios):.2f}x  max {ratios[-1]:.2f}x")
            print(f"peak RSS {s}/{base}: {rss:.2f}")
    return runs, meta


def print_limits(a, runs: list[dict], meta: dict, side: str) -> None:
    """How far `side` is from this machine's compute and bandwidth floors at a's shape."""
    g = matmul_gflops(a.threads)
    rows = a.group * a.prompts
    new_tokens = statistics.median(x["new_tokens"] for x in runs)
    fl = step_flops(meta["n_params"], meta["prompt_len"] * a.prompts, rows, new_tokens)
    peak = g["square_1024"]
    print(f"\nmatmul throughput here: {g['square_1024']:.1f} GFLOP/s (1024^3 fp32), "
          f"{g['decode_6x576x49152']:.1f} GFLOP/s (decode-shaped: F.linear of 6x576 by the 49152x576 head), "
          f"{g['decode_weight_major_6x576x49152']:.1f} (the same product weight-major), "
          f"{g.get('decode_packed_6x576x49152', float('nan')):.1f} (oneDNN-packed)")
    print(f"limit (FLOPs / {peak:.0f} GFLOP/s, {meta['n_params'] / 1e6:.1f}M params, prompt {meta['prompt_len']} tokens "
          f"x {a.prompts}, {new_tokens:.1f} new tokens (mean) x {rows}):")
    for k, f in fl.items():
        got = statistics.median(x[k] for x in runs)
        lim = f / peak / 1e9
        print(f"  {k:<10} limit {lim:.3f} s   {side} {got:.3f} s   ({got / lim:.1f}x the limit)")
    # decoding reads every weight once per decode step, and the batch decodes until its
    # longest row ends (finished rows leave it, the weights are read all the same)
    bw = read_gbs(a.threads)
    wbytes = meta["n_params"] * meta.get("rollout_bytes", 2)
    dec = statistics.median(x["decode_steps"] for x in runs)
    lim = wbytes * dec / bw / 1e9
    got = statistics.median(x["generate"] for x in runs)
    print(f"  generate   bandwidth limit {lim:.3f} s ({wbytes / 1e6:.0f} MB of rollout weights read per decode "
          f"step x {dec:.1f} decode steps (the longest completion) at {bw:.1f} GB/s measured)   {side} {got:.3f} s   "
          f"({got / lim:.1f}x)")
    # many rows make a decode step compute-bound: its FLOPs at the bf16 kernel's own rate
    rate = fused_gflops(a.threads, rows) if meta.get("rollout_bytes", 2) == 2 else None
    if rate:
        lim_c = fl["generate"] / rate / 1e9
        print(f"  generate   bf16 compute limit {lim_c:.3f} s (its FLOPs at {rate:.0f} GFLOP/s, the fused kernel's "
              f"product at {rows} rows, weights in cache)   {side} {got:.3f} s   ({got / lim_c:.1f}x); "
              f"{got / max(lim, lim_c):.1f}x the larger of the two")


def parse_pairs(text: str, form: str = "GxP", example: str = "6x2,48x1") -> list[tuple[int, int]]:
    """"6x2,48x1" -> [(6, 2), (48, 1)], each >= 1; `form` and `example` word the error."""
    try:
        shapes = [tuple(int(x) for x in part.split("x")) for part in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(sh) != 2 or min(sh) < 1 for sh in shapes):
        raise argparse.ArgumentTypeError(f"{text!r}: must be {form}[,{form}...] with integers >= 1, e.g. {example}")
    return shapes


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """--shapes 6x2,48x1: group size x prompts."""
    return parse_pairs(text)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if "--sft" in args:  # the supervised step against TRL's SFTTrainer (runner/bench_sft.py)
        from runner import bench_sft

        return bench_sft.main([x for x in args if x != "--sft"])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sft", action="store_true",
                   help="SFT instead: our algo=sft step against TRL's SFTTrainer (python -m runner.bench --sft --help)")
    p.add_argument("--side", choices=list(SIDES), default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default="smollm2_135m", choices=["smollm2_135m", "tiny"])
    p.add_argument("--group", type=int, default=6)
    p.add_argument("--prompts", type=int, default=1, help="groups (distinct prompts) per step")
    p.add_argument("--shapes", type=parse_shapes, default=None,
                   help="GxP,GxP,...: run every side at each group size x prompts and print each shape's "
                        "step time against the first's (e.g. 6x2,48x1: 4x the rollouts in one group)")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--lora-r", type=int, default=16, help="rank of the ours_lora sides' adapters")
    p.add_argument("--contend-after", type=int, default=0,
                   help="start a second job (one busy thread) after this many steps: how each OpenMP "
                        "policy copes with load that appears mid-run (step_alone / step_contended)")
    p.add_argument("--wait-policy", default="auto", type=wait_policy,
                   help="OpenMP wait policy of the sides: auto (runner/host.py decides at start), spin, passive, "
                        "or a number: GOMP_SPINCOUNT, spins before a waiting thread sleeps")
    p.add_argument("--sides", default="ours,ours_bf16,trl", help=f"comma list of {', '.join(SIDES)}")
    a = p.parse_args(args)
    if a.side:
        child(a)
        return 0
    sides = a.sides.split(",")
    from runner.host import cpu_description

    print(f"cpu: {cpu_description()}", flush=True)
    shapes = a.shapes or [(a.group, a.prompts)]
    results = []
    for g, n in shapes:
        a.group, a.prompts = g, n
        runs, meta = bench_shape(a, sides)
        results.append(runs)
        if meta:
            print_limits(a, runs[sides[0]], meta, sides[0])
        print()
    if len(shapes) > 1:
        (g0, n0), first = shapes[0], results[0]
        for (g, n), runs in zip(shapes[1:], results[1:]):
            for s in sides:
                def ratio(k: str) -> float:
                    base = statistics.median(x[k] for x in first[s])
                    return statistics.median(x[k] for x in runs[s]) / base if base else float("nan")

                cost = {k: ratio(k) for k in ("step", "generate", "forward", "backward")}  # TRL times no forward
                print(f"{s}: a step at G={g} x {n} ({g * n} rollouts) costs {cost['step']:.2f}x one at G={g0} x {n0} "
                      f"({g0 * n0} rollouts; {g * n / (g0 * n0):.0f}x the rollouts): generate {cost['generate']:.2f}x, "
                      f"forward {cost['forward']:.2f}x, backward {cost['backward']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
