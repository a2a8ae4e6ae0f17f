"""Where gradients are computed and applied: plain PyTorch in one process, or a DeepSpeed
engine in each of N processes.

The trainer speaks to one small interface (wrap, backward, step, checkpoint, and the few
collectives a step needs), so the training step, the loss and the metrics exist once and
do not know how many processes there are. The single-process backend's collectives are
identities.

Under DeepSpeed the gradient of the global batch is what each rank must get: DeepSpeed
averages gradients over ranks and divides each micro-batch loss by the accumulation
steps, so the loss of a micro-batch is normalised with whole-batch counts (summed over
ranks) and multiplied back by `loss_scale` (world x accumulation steps).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from runner import checkpoint as ckpt
from runner import lora

log = logging.getLogger(__name__)


def rollout_dtype(name: str, device: str) -> torch.dtype:
    """auto: bfloat16 where the hardware has it natively (CUDA, or a CPU with avx512_bf16 or
    AMX), else float32. Decoding is memory-bound, so half-size weights are ~2.5x faster."""
    if name != "auto":
        return getattr(torch, name)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.float32
    return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32


def low_precision_copy(model, dtype: torch.dtype):
    """The same module tree with floating weights and buffers in `dtype`, made without a
    full-precision temporary (deepcopy is handed the converted tensors; tied weights stay
    tied)."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
    for b in model.buffers():
        if b.is_floating_point():
            memo[id(b)] = b.to(dtype)
    return copy.deepcopy(model, memo)


def rollout_copy(model, dtype_name: str, device: str):
    """The weights rollouts sample from: the policy itself when dtypes agree, else a frozen
    low-precision copy kept in sync after every optimizer step (the fp32 policy stays the
    master for training, evaluation probabilities and checkpoints). A LoRA policy samples
    from a plain copy with the adapters merged, whatever the dtype: decoding through the
    adapters' extra products costs more than re-merging the adapted layers after a step."""
    dtype = rollout_dtype(dtype_name, device)
    if lora.is_lora(model):
        return lora.merged_copy(model, dtype).eval().requires_grad_(False)
    if dtype == next(model.parameters()).dtype:
        return model
    return low_precision_copy(model, dtype).eval().requires_grad_(False)


@torch.no_grad()
def sync_rollout_weights(rollout_model, model) -> None:
    if rollout_model is model:
        return
    adapted = lora.is_lora(model)
    if adapted and not lora.is_lora(rollout_model):  # the merged rollout copy: re-merge the adapted layers
        lora.sync_merged(rollout_model, model)
        return
    for r, p in zip(rollout_model.parameters(), model.parameters()):
        if p.requires_grad or not adapted:  # LoRA's frozen base weights never change
            r.copy_(p)


class TorchBackend:
    """One process, torch's optimizer; the collectives are identities."""

    rank, world, local_rank = 0, 1, 0
    loss_scale = 1.0
    group_placement = "local"

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.gas = cfg.trainer.grad_accum_steps

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- set-up ----------------------------------------------------------------------------
    def wrap(self, model, opt):
        """trainer.precision=bf16: forward and backward run on a bfloat16 copy of the weights
        (`compute_model`), whose gradients are added into the fp32 master weights the
        optimizer steps; the copy is refreshed after each step and, when rollouts sample in
        bfloat16 too, it is also the rollout copy (one low-precision copy, not two). On a
        CPU with AMX this cuts the training forward and backward by ~30% and lowers peak
        memory (bf16 activations, no second copy)."""
        self.model, self.opt = model, opt
        self.compute_model = model
        if precision(self.cfg) == "bf16" and next(model.parameters()).dtype == torch.float32:
            self.compute_model = low_precision_copy(model, torch.bfloat16).train()
        return model, opt

    def rollout_model(self, model, dtype_name: str, device: str):
        if (self.compute_model is not model and rollout_dtype(dtype_name, device) == torch.bfloat16
                and not lora.is_lora(model)):  # LoRA samples from a merged copy (rollout_copy)
            return self.compute_model
        return rollout_copy(model, dtype_name, device)

    def sync_rollout(self, rollout_model, model) -> None:
        self.sync_compute(model)
        if rollout_model is not self.compute_model:
            sync_rollout_weights(rollout_model, model)

    def sync_compute(self, model) -> None:
        """The bf16 compute copy (trainer.precision=bf16) brought up to the master weights."""
        sync_rollout_weights(self.compute_model, model)

    def gathered(self, model):
        """Whole parameters inside the block (ZeRO-3 gathers them; elsewhere they are whole)."""
        import contextlib

        return contextlib.nullcontext()

    def eval_model(self, model, rollout_model):
        """The weights evaluation's exact probabilities are read from (no collectives)."""
        return model

    # -- collectives -----------------------------------------------------------------------
    def all_sum(self, values: Sequence[float]) -> list[float]:
        return [float(v) for v in values]

    def all_true(self, flag: bool) -> bool:
        return bool(flag)

    def gather_objects(self, obj: Any) -> list[Any]:
        return [obj]

    def agree(self, code: int) -> int:
        """The largest of each rank's code (stop reasons are ranked so any rank can stop all)."""
        return code

    def barrier(self) -> None:
        pass

    # -- placement of groups on ranks --------------------------------------------------------
    def my_prompts(self, prompts: list) -> list:
        return prompts

    def my_group_size(self, group_size: int) -> int:
        return group_size

    def on_whole_groups(self, fn: Callable[[list, list, list], list], values: list, keys: list,
                        groups: list) -> list:
        """fn over whole groups: here every group is whole already."""
        return fn(values, keys, groups)

    # -- the update ------------------------------------------------------------------------
    def micro_batches(self, n_rows: int) -> list[list[int]]:
        """Rows cut into trainer.grad_accum_steps contiguous chunks (fewer if there are fewer
        rows): one forward and backward each, gradients summed, one optimizer step. Peak
        activation memory falls with the chunk size (long multi-turn episodes need it)."""
        k = max(1, min(self.gas, n_rows))
        bounds = [round(i * n_rows / k) for i in range(k + 1)]
        return [list(range(bounds[i], bounds[i + 1])) for i in range(k)]

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        if self.compute_model is not self.model:
            self.compute_model.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        if self.compute_model is not self.model:  # accumulate in fp32, free the bf16 gradients
            for m, c in zip(self.model.parameters(), self.compute_model.parameters()):
                if c.grad is not None:
                    m.grad = c.grad.to(m.dtype) if m.grad is None else m.grad.add_(c.grad)
                    c.grad = None

    def step(self, max_grad_norm: float) -> tuple[torch.Tensor, bool]:
        """Clip and step; a non-finite gradient norm skips the step (never NaN weights).
        The rescale (a pass over every gradient, ~40 ms for 135M parameters on 2 cores)
        runs only when the norm is over the limit, where clip_grad_norm_ would scale by 1."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if bool(torch.isfinite(grad_norm)):
            if float(grad_norm) + 1e-6 > max_grad_norm:
                torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, grad_norm)
            self.opt.step()
            return grad_norm, True
        self.opt.zero_grad(set_to_none=True)
        return grad_norm, False

    # -- checkpoints -----------------------------------------------------------------------
    def save(self, directory: Path, step: int, state: dict, keep: int) -> ckpt.Finish:
        """Gather a checkpoint (references to the weights and the optimizer state, no
        copies; the RNG streams as they are now); returns `finish(written)`: serialize,
        call `written()`, commit (fsync, digest, rename, pruning). The caller may run it on
        another thread up to the next optimizer step (runner/loop/saver.py). A LoRA policy's
        checkpoint holds the adapters (and their optimizer state) alone: the frozen base
        weights are the model preset's, loaded again on resume."""
        weights = lora.trainable_state(self.model) if lora.is_lora(self.model) else self.model.state_dict()
        payload = {"model": weights, "optimizer": self.opt.state_dict(), "rng": ckpt.rng_state(), **state}

        def finish(written: Callable[[], None]) -> Path:
            staged = ckpt.write(directory, step, payload)
            written()
            return staged.commit(keep)
        return finish

    def load(self, directory: Path, problems: Optional[list[str]] = None) -> Optional[dict]:
        state = ckpt.load_latest(directory, problems)
        if state is None:
            return None
        where = f"{directory} (step {state['step']})"
        if lora.is_lora(self.model):
            lora.load_trainable(self.model, state["model"], where)
        elif any(".lora_" in k for k in state["model"]):
            raise RuntimeError(f"checkpoint {where} holds LoRA adapters, not full weights; resume it with the "
                               f"run's own model.lora settings, or use another output_dir")
        else:
            self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        ckpt.set_rng_state(state["rng"])
        sync_rollout_weights(self.compute_model, self.model)
        return state

    def export_hf(self, model, tokenizer, out: Path) -> Optional[Path]:
        """Plain Hugging Face weights of the final policy (`save_pretrained` + tokenizer),
        written beside `out` and renamed into place. A LoRA policy is merged on a copy (the
        policy, and a resume from its checkpoint, keep the adapters)."""
        plain = lora.merged_copy(model, next(model.parameters()).dtype) if lora.is_lora(model) else model
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        return out

    def close(self) -> None:
        pass


def ds_config(cfg, world: int) -> dict:
    """The DeepSpeed JSON for a run, from the runner config (logged as an artifact).

    The micro-batch is a rank's share of the rollouts divided by the accumulation steps;
    DeepSpeed checks the product, not the shapes it is given, so dynamic sampling's
    varying batch sizes are fine."""
    t, a = cfg.trainer, cfg.algo
    groups_per_rank = cfg.train.prompts_per_step // world if t.group_placement == "local" else cfg.train.prompts_per_step
    per_group = a.group_size if t.group_placement == "local" else a.group_size // world
    rows = max(1, groups_per_rank * per_group)
    micro = max(1, rows // t.grad_accum_steps)
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if t.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if t.zero_stage == 3:
        # gather whole layers for the many small forwards of training on short completions
        zero["stage3_prefetch_bucket_size"] = 5e7
        zero["stage3_param_persistence_threshold"] = 1e5
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": micro * t.grad_accum_steps * world,
        "gradient_clipping": a.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": precision(cfg) == "bf16"},
        "zero_allow_untested_optimizer": True,  # our torch AdamW (fused where it can be)
        "zero_force_ds_cpu_optimizer": False,  # offload with torch's AdamW: slow, but no minutes of compiling
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def precision(cfg) -> str:
    """auto: bf16 on a CUDA device that has it, fp32 otherwise (CPU DeepSpeed runs fp32)."""
    p = cfg.trainer.precision
    if p != "auto":
        return p
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


STOP_CODES = {None: 0, "budget": 1, "sigint": 2, "sigterm": 3}


class DeepSpeedBackend(TorchBackend):
    """A DeepSpeed engine in each of `world` processes (started by runner.launch).

    Groups are placed on ranks by `trainer.group_placement`: `local` keeps each group on one
    rank (the step's prompts are split over ranks), `gather` spreads each group's rollouts
    over all ranks and gathers rewards and answer keys before shaping and advantages."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        import deepspeed
        import torch.distributed as dist

        if not cfg.trainer.cpu_shm_comm:
            # DeepSpeed's CPU all-reduce kernel is compiled on first use (~80 s on 2 cores);
            # gloo alone is plenty for models this size. trainer.cpu_shm_comm=true builds it.
            import importlib

            # (`import deepspeed.comm.torch as m` would give torch itself: the package has a `torch` attribute)
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        self.ds = deepspeed
        self.dist = dist
        backend = "nccl" if torch.cuda.is_available() and cfg.trainer.device != "cpu" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        deepspeed.init_distributed(dist_backend=backend)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.group_placement = cfg.trainer.group_placement
        self.stage = cfg.trainer.zero_stage
        self.loss_scale = float(self.world * self.gas)
        self.config = ds_config(cfg, self.world)
        self.engine = None

    # -- set-up ----------------------------------------------------------------------------
    def wrap(self, model, opt):
        engine, opt, _, _ = self.ds.initialize(model=model, optimizer=opt, config=self.config)
        self.engine, self.model, self.opt = engine, engine.module, opt
        self.compute_model = engine.module  # DeepSpeed keeps its own bf16/fp32 master split
        if self.world > 1:  # other rollouts on each rank; the weights were made (alike) before this
            torch.manual_seed(self.cfg.seed + 1_000_003 * self.rank)
        return engine.module, opt

    def gathered(self, model, modifier_rank: Optional[int] = None):
        if self.stage < 3:
            return super().gathered(model)
        return self.ds.zero.GatheredParameters(list(model.parameters()), modifier_rank=modifier_rank)

    @staticmethod
    def _fresh_like(model, dtype: torch.dtype, device: str = "cpu"):
        """An ordinary (unpartitioned) model of the same architecture, to copy weights into."""
        from transformers import AutoModelForCausalLM

        fresh = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
        fresh.generation_config = model.generation_config
        return fresh.to(device)

    def rollout_model(self, model, dtype_name: str, device: str):
        """Under ZeRO-3 each rank holds a slice of every weight, so rollouts sample from a
        whole copy, refreshed by gathering after each update; below stage 3 the weights are
        whole on every rank and the single-process rule applies."""
        if self.stage < 3:
            return super().rollout_model(model, dtype_name, device)
        copy = self._fresh_like(model, rollout_dtype(dtype_name, device), device).eval().requires_grad_(False)
        self.sync_rollout(copy, model)
        return copy

    @torch.no_grad()
    def sync_rollout(self, rollout_model, model) -> None:
        if rollout_model is model:
            return
        with self.gathered(model):
            dst = dict(rollout_model.named_parameters())
            for name, p in lora.plain_weights(model):  # by the plain model's names, LoRA merged
                dst[name].copy_(p.data)

    def eval_model(self, model, rollout_model):
        return rollout_model if self.stage == 3 else model

    # -- collectives -----------------------------------------------------------------------
    def all_sum(self, values: Sequence[float]) -> list[float]:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        self.dist.all_reduce(t)  # gloo for these small CPU tensors, whatever the device
        return t.tolist()

    def all_true(self, flag: bool) -> bool:
        t = torch.tensor([0.0 if flag else 1.0])
        self.dist.all_reduce(t)
        return t.item() == 0.0

    def gather_objects(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def agree(self, code: int) -> int:
        t = torch.tensor([code], dtype=torch.int64)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return int(t.item())

    def barrier(self) -> None:
        self.dist.barrier()

    # -- placement of groups on ranks --------------------------------------------------------
    def my_prompts(self, prompts: list) -> list:
        if self.group_placement == "gather":
            return prompts
        k = len(prompts) // self.world
        return prompts[self.rank * k:(self.rank + 1) * k]

    def my_group_size(self, group_size: int) -> int:
        return group_size // self.world if self.group_placement == "gather" else group_size

    def on_whole_groups(self, fn, values: list, keys: list, groups: list) -> list:
        """Gather each rank's rows (group g is the same prompt on every rank), apply fn to
        the whole groups, and hand each rank back the results for its own rows."""
        if self.group_placement == "local":
            return fn(values, keys, groups)
        parts = self.gather_objects((list(values), list(keys), list(groups)))
        all_v = [v for p in parts for v in p[0]]
        all_k = [k for p in parts for k in p[1]]
        all_g = [g for p in parts for g in p[2]]
        out = list(fn(all_v, all_k, all_g))
        start = sum(len(p[0]) for p in parts[: self.rank])
        return out[start:start + len(values)]

    # -- the update ------------------------------------------------------------------------
    def micro_batches(self, n_rows: int) -> list[list[int]]:
        if n_rows < self.gas:  # every rank must run the same number of micro-batches (collectives)
            raise RuntimeError(f"{n_rows} rollouts on rank {self.rank} cannot fill trainer.grad_accum_steps={self.gas} "
                               f"micro-batches; lower trainer.grad_accum_steps or raise train.prompts_per_step")
        return super().micro_batches(n_rows)

    def zero_grad(self) -> None:
        pass  # the engine zeroes after its step

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed counts micro-batches by its step() calls and updates the weights at the
        # accumulation boundary (after the last micro-batch), clipping by gradient_clipping
        self.engine.backward(loss)
        self.engine.step()

    def step(self, max_grad_norm: float) -> tuple[torch.Tensor, bool]:
        """The update happened in the last backward's engine.step(); report its norm."""
        norm = self.engine.get_global_grad_norm()
        norm = torch.tensor(float("nan") if norm is None else float(norm))
        return norm, True

    # -- checkpoints -----------------------------------------------------------------------
    def save(self, directory: Path, step: int, state: dict, keep: int) -> ckpt.Finish:
        """DeepSpeed's own save (every rank writes its shards), plus each rank's RNG streams;
        a tag counts as complete only once rank 0 has written COMPLETE after all ranks
        finished, so a crash mid-save leaves the previous tag in charge."""
        root = directory / "deepspeed"
        tag = f"step-{step:08d}"
        self.engine.save_checkpoint(str(root), tag=tag, client_state={"runner": ckpt.plain(state)}, save_latest=False)
        # per-rank state: RNG streams and counters (DeepSpeed's client_state is rank 0's only)
        torch.save(ckpt.plain({"rng": ckpt.rng_state(), "counters": state.get("counters", {})}),
                   root / tag / f"rank{self.rank}.pt")
        self.barrier()
        if self.is_main:
            tmp = root / tag / "COMPLETE.tmp"
            tmp.write_text(json.dumps({"step": step, "world": self.world, "zero_stage": self.stage}))
            os.replace(tmp, root / tag / "COMPLETE")
            for old in complete_tags(root)[:-keep]:
                shutil.rmtree(root / old, ignore_errors=True)
        self.barrier()

        def finish(written: Callable[[], None]) -> Path:  # complete on every rank already
            written()
            return root / tag
        return finish

    def load(self, directory: Path, problems: Optional[list[str]] = None) -> Optional[dict]:
        problems = [] if problems is None else problems
        root = directory / "deepspeed"
        for tag in reversed(complete_tags(root)):
            meta = json.loads((root / tag / "COMPLETE").read_text())
            if meta["world"] != self.world:
                raise RuntimeError(
                    f"checkpoint {root / tag} was written by {meta['world']} processes; resume it with "
                    f"trainer.num_procs={meta['world']} (this run has {self.world})")
            try:
                # DeepSpeed's own torch.load calls ask for weights_only=False: forced to the
                # weights-only unpickler and the allow-list here (runner/checkpoint.py)
                with ckpt.weights_only_loads(deepspeed=True):
                    path, client = self.engine.load_checkpoint(str(root), tag=tag)
                mine = ckpt.read(root / tag / f"rank{self.rank}.pt")
            except Exception as e:  # a corrupt or unsafe shard: fall back to the previous tag
                e = _named_unsafe(e, root / tag)
                log.warning("DeepSpeed checkpoint %s failed to load (%s); trying the previous one", tag, e)
                problems.append(f"{tag}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
                continue
            if path is None:
                log.warning("DeepSpeed checkpoint %s is incomplete; trying the previous one", tag)
                problems.append(f"{tag}: incomplete")
                continue
            ckpt.set_rng_state(mine["rng"])
            return {**client["runner"], "counters": mine["counters"], "step": meta["step"]}
        return None

    def export_hf(self, model, tokenizer, out: Path) -> Optional[Path]:
        """Plain Hugging Face weights of the final policy (gathered under ZeRO-3), by rank 0."""
        with self.gathered(model, modifier_rank=0):
            if self.is_main:
                fresh = self._fresh_like(model, torch.float32)
                src = dict(lora.plain_weights(model))  # LoRA merged
                with torch.no_grad():
                    for name, p in fresh.named_parameters():
                        p.copy_(src[name].data)
                out.mkdir(parents=True, exist_ok=True)
                fresh.save_pretrained(out)
                tokenizer.save_pretrained(out)
        self.barrier()
        return out

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.barrier()
            self.dist.destroy_process_group()


def _named_unsafe(e: Exception, tag_dir: Path) -> Exception:
    """A DeepSpeed load the weights-only unpickler stopped, as UnsafeCheckpoint naming the file."""
    import pickle

    if isinstance(e, ckpt.UnsafeCheckpoint) or not isinstance(e, pickle.UnpicklingError):
        return e
    bad = [f for f in sorted(tag_dir.glob("*.pt")) if ckpt.unsafe_globals(f, deepspeed=True)]
    return ckpt.unsafe(bad[0] if bad else tag_dir, deepspeed=True)


def complete_tags(root: Path) -> list[str]:
    if not root.exists():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "COMPLETE").exists())


def make_backend(cfg) -> TorchBackend:
    if cfg.trainer.name == "deepspeed":
        return DeepSpeedBackend(cfg)
    return TorchBackend(cfg)
