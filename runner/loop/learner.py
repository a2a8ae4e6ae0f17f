"""The second half of a step: advantages -> loss -> optimizer step, in micro-batches."""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import AbstractContextManager
from typing import Callable, Optional

import torch

from runner.algo.loss import (AdaptiveEntropy, BatchNorm, LossConfig, advantages, lr_factor, policy_loss,
                               rollout_correction, top_entropy_mask)
from runner.algo.forward import length_buckets, padding_free_tokens, sequence_logprobs
from runner.rollout.hf import RolloutBatch, completion_extents, select, span_token_mask, trim_completions

log = logging.getLogger("runner.train")


class NonFiniteError(RuntimeError):
    """Too many non-finite updates in a row (train.max_nonfinite_steps)."""


class Learner:
    """Turns a step's shaped rewards into one optimizer step (`algo.num_iterations` of
    them): advantages per whole group, the one policy loss of runner.algo.loss with the
    preset's switches, gradients summed over micro-batches normalised by whole-batch counts
    (all ranks), so they add up to the full batch's. Never lets a non-finite loss or
    gradient reach the weights."""

    def __init__(self, cfg, backend, tok, opt, autocast: Callable[[], AbstractContextManager],
                 on_weights_changed: Callable[[], None], ref_model=None,
                 before_update: Callable[[], None] = lambda: None) -> None:
        self.cfg, self.backend, self.tok, self.opt = cfg, backend, tok, opt
        self.autocast, self.on_weights_changed = autocast, on_weights_changed
        # waits while a checkpoint on a thread still reads the weights the optimizer is about to change
        self.before_update = before_update
        self.ref_model = ref_model  # a frozen copy of the starting policy where algo.kl.coef > 0
        a = cfg.algo
        self.loss_cfg = LossConfig.from_algo(a)
        e = a.entropy
        self.adaptive = AdaptiveEntropy(e.coef, e.target, e.delta, e.coef_min, e.coef_max) if e.adaptive else None
        self.nonfinite_streak = self.nonfinite_total = 0
        self.step = 0
        # rollouts sampled by other weights than the training forward's (a bf16 copy, vLLM): the
        # trainer sets it once the rollout model exists; algo.is_cap then corrects them
        self.rollout_differs = False

    def advantages(self, shaped: list[float], batch: RolloutBatch) -> torch.Tensor:
        a = self.cfg.algo
        return torch.tensor(self.backend.on_whole_groups(
            lambda r, _k, g: advantages(torch.tensor(r), torch.tensor(g), a.scale_rewards, a.adv_clip,
                                        a.baseline).tolist(),
            shaped, [None] * len(shaped), batch.groups.tolist()))

    def skips_zero_advantage(self) -> bool:
        """Rows with zero advantage can be left out of the training passes only where nothing
        but the policy-gradient term needs them: no entropy bonus, no KL, and no top-entropy
        token selection (its quantile is taken over the whole batch)."""
        a = self.cfg.algo
        return (self.cfg.trainer.skip_zero_advantage and a.entropy.coef == 0 and not a.entropy.adaptive
                and a.kl.coef == 0 and a.top_entropy_quantile >= 1.0)

    def buckets_by_length(self, batch: RolloutBatch) -> bool:
        """Training passes cut by completion length (runner/algo/forward.length_buckets): plain torch
        only (DeepSpeed counts its micro-batches), single-turn, and no term computed per pass
        over the whole batch (top-entropy quantile, the adaptive entropy coefficient)."""
        a = self.cfg.algo
        return (self.cfg.trainer.name == "torch" and self.cfg.trainer.length_buckets and batch.token_turn is None
                and a.top_entropy_quantile >= 1.0 and not a.entropy.adaptive)

    def micro_batches(self, batch: RolloutBatch, adv: torch.Tensor) -> tuple[list, int]:
        """[(rows, sub-batch)] for the training passes, and how many rows they hold."""
        bk = self.backend
        chunks = [rows for rows in bk.micro_batches(len(batch)) if rows]
        if self.skips_zero_advantage():
            # a rollout with advantage exactly 0 adds exactly 0 to the policy-gradient term (the
            # batch counts in `norm` still include it): no forward or backward for it. Each
            # micro-batch keeps one row, so every rank runs the same passes and the optimizer
            # still steps (Adam's momentum moves the weights even on a zero gradient).
            a_list = adv.tolist()
            chunks = [[i for i in rows if a_list[i] != 0.0] or rows[:1] for rows in chunks]
        kept = sum(len(rows) for rows in chunks)
        whole = list(range(len(batch)))
        part = lambda rows: trim_completions(batch if rows == whole else select(batch, rows))  # noqa: E731
        if self.buckets_by_length(batch):
            # a pass that runs padding-free pads nothing: cutting it would only run its prompt again
            ext = completion_extents(batch)
            chunks = [b for rows in chunks
                      for b in ([rows] if self.padding_free(part(rows)) else
                                length_buckets(rows, ext, overhead=batch.prompt_len + 8.0))]
        return [(rows, part(rows)) for rows in chunks], kept

    def padding_free(self, mb: RolloutBatch) -> bool:
        """Whether this pass runs as one flat stream (runner/algo/forward.py)."""
        t = self.cfg.trainer
        return t.shared_prefix and t.padding_free and padding_free_tokens(self.backend.compute_model, mb) is not None

    def update(self, batch: RolloutBatch, adv: torch.Tensor, scores: list, step: int) -> dict[str, float]:
        a, bk = self.cfg.algo, self.backend
        self.step = step
        lr = a.lr * lr_factor(a.lr_schedule, max(step, 1), self.cfg.train.steps, a.warmup_steps)
        for g in getattr(self.opt, "param_groups", []):  # set before any backward: DeepSpeed steps inside it
            g["lr"] = lr
        mask = batch.completion_mask
        tokens, seqs = bk.all_sum([mask.sum().item(), len(batch)])
        norm = BatchNorm(tokens=max(tokens, 1.0), seqs=seqs, max_len=float(self.cfg.rollout.max_new_tokens))
        entropy_mask = None
        if a.entropy.scope == "answer":
            entropy_mask = span_token_mask(self.tok, batch.completion_ids, [s.answer_span for s in scores]) & mask
        micro, kept = self.micro_batches(batch, adv)
        shared, temp, pf = self.cfg.trainer.shared_prefix, a.loss_temperature, self.cfg.trainer.padding_free
        ref_logp: list = [None] * len(micro)
        if self.ref_model is not None:
            with torch.no_grad(), self.autocast():
                ref_logp = [sequence_logprobs(self.ref_model, mb, shared, temp, pf)[0] for _, mb in micro]
        old_logp: list = [None] * len(micro)
        is_weight: list = [None] * len(micro)
        cap = a.is_cap if self.rollout_differs else None
        mismatch = dict.fromkeys(("abs_delta", "k3", "tokens", "weight", "capped"), 0.0)
        loss_cfg = self.loss_cfg
        out: dict[str, float] = {}
        timing = {"time/forward_s": 0.0, "time/backward_s": 0.0, "time/optimizer_s": 0.0}
        ent_sums = [0.0, 0.0]  # the sampling policy's token entropy over every micro-batch
        for it in range(a.num_iterations):
            bk.zero_grad()
            finite, loss_sum, stat_sums = True, 0.0, {}
            for j, (rows, mb) in enumerate(micro):
                t0 = time.perf_counter()
                idx = torch.as_tensor(rows, device=mask.device)
                mb_mask = mb.completion_mask  # mask[idx] without the columns trimmed off
                mb_emask = None if entropy_mask is None else entropy_mask[idx][:, :mb_mask.shape[1]]
                with self.autocast():
                    logp, ent = sequence_logprobs(bk.compute_model, mb, shared, temp, pf)
                if old_logp[j] is None:  # the policy that sampled: this first forward, detached
                    old_logp[j] = logp.detach()
                    if mb.sampler_logprobs is not None:  # what the sampler saw, and the correction
                        is_weight[j], sums = rollout_correction(old_logp[j], mb.sampler_logprobs, mb_mask, cap)
                        mismatch = {k: mismatch[k] + sums[k] for k in mismatch}
                    ent_sums[0] += (ent.detach() * mb_mask).sum().item()
                    ent_sums[1] += mb_mask.sum().item()
                    if j == 0:
                        loss_cfg = self._entropy_stats(ent, mb_mask, mb_emask, out)
                        if mb.token_turn is not None:  # multi-turn: the policy's entropy per turn
                            for t in sorted(set(mb.token_turn[mb.token_turn >= 0].tolist())):
                                out[f"policy/entropy_turn{t + 1}"] = ent.detach()[mb.token_turn == t].mean().item()
                pg_mask = top_entropy_mask(ent, mb_mask, a.top_entropy_quantile)
                loss, stats = policy_loss(logp, old_logp[j], adv[idx], mb_mask, ent, loss_cfg, norm, pg_mask=pg_mask,
                                          entropy_mask=mb_emask, ref_logp=ref_logp[j], is_weight=is_weight[j])
                t1 = time.perf_counter()
                ok = bk.all_true(bool(torch.isfinite(loss)))
                if ok:
                    bk.backward(loss * bk.loss_scale)
                finite = finite and ok
                loss_sum += loss.item() if ok else float("nan")
                for k, v in stats.items():  # kl is a share of the batch's (sums up), the rest are means
                    stat_sums[k] = stat_sums.get(k, 0.0) + v.item() / (1 if k == "kl" else len(micro) * bk.world)
                t2 = time.perf_counter()
                timing["time/forward_s"] += t1 - t0
                timing["time/backward_s"] += t2 - t1
            t2 = time.perf_counter()
            if finite:
                self.before_update()
                grad_norm, stepped = bk.step(a.max_grad_norm)
                finite = stepped
                if stepped:
                    self.on_weights_changed()
            else:  # never let a NaN/inf reach the weights (or a checkpoint)
                bk.zero_grad()
                grad_norm = torch.tensor(float("nan"))
            self.count_nonfinite(finite)
            timing["time/optimizer_s"] += time.perf_counter() - t2
            # each rank's loss is its share of the global loss; their mean is the global loss
            keys = list(stat_sums)
            reduced = bk.all_sum([loss_sum] + [stat_sums[k] for k in keys])
            out.update({"train/loss": reduced[0], "train/grad_norm": float(grad_norm)})
            out.update({f"train/{k}": v for k, v in zip(keys, reduced[1:])})
            if it == 0 and len(micro) > 1:  # over the whole batch, not the first micro-batch
                tot = bk.all_sum(ent_sums)
                out["policy/token_entropy"] = tot[0] / tot[1] if tot[1] else 0.0
        if self.adaptive is not None:
            self.adaptive.update(out["policy/token_entropy"])
            out["train/entropy_coef_next"] = self.adaptive.coef
        out.update(self._mismatch_metrics(mismatch, cap))
        out["train/adv_abs_mean"] = bk.all_sum([adv.abs().sum().item()])[0] / max(seqs, 1.0)
        out["train/skipped_seq_frac"] = 1.0 - bk.all_sum([kept])[0] / max(seqs, 1.0)
        out["train/nonfinite_total"] = float(self.nonfinite_total)
        out["train/lr"] = lr
        out.update(timing)
        return out

    def _mismatch_metrics(self, sums: dict[str, float], cap: Optional[float]) -> dict[str, float]:
        """How far the sampler's log-probs are from the training forward's (all ranks), and
        what the correction did; nothing when the sampler records no log-probs (`generate`)."""
        keys = list(sums)
        tot = dict(zip(keys, self.backend.all_sum([sums[k] for k in keys])))
        n = tot["tokens"]
        if not n:
            return {}
        out = {"rollout/logp_abs_diff": tot["abs_delta"] / n, "rollout/kl_sampler_train": tot["k3"] / n,
               "rollout/is_corrected": float(cap is not None)}
        if cap is not None:
            out.update({"rollout/is_weight_mean": tot["weight"] / n, "rollout/is_capped_frac": tot["capped"] / n})
        return out

    def _entropy_stats(self, ent: torch.Tensor, mask: torch.Tensor, emask: Optional[torch.Tensor],
                       out: dict[str, float]) -> LossConfig:
        """Token entropy of the sampling policy (all ranks' first micro-batch: the whole batch
        unless gradients are accumulated), logged and fed to the adaptive coefficient."""
        e = ent.detach()
        m = mask.bool()
        sums = [e[m].sum().item(), m.sum().item()]
        if emask is not None:
            em = emask.bool()
            sums += [e[em].sum().item(), em.sum().item()]
        sums = self.backend.all_sum(sums)
        token_entropy = sums[0] / sums[1] if sums[1] else 0.0
        out["policy/token_entropy"] = token_entropy
        if emask is not None:
            out["policy/answer_entropy"] = sums[2] / sums[3] if sums[3] else 0.0
        loss_cfg = self.loss_cfg
        if self.adaptive is not None:
            loss_cfg = dataclasses.replace(self.loss_cfg, entropy_coef=self.adaptive.effective(token_entropy))
        out["train/entropy_coef"] = loss_cfg.entropy_coef
        return loss_cfg

    def count_nonfinite(self, finite: bool) -> None:
        if finite:
            self.nonfinite_streak = 0
            return
        self.nonfinite_streak += 1
        self.nonfinite_total += 1
        log.warning("non-finite loss or gradient at step %d: update skipped (%d in a row)", self.step,
                    self.nonfinite_streak)
        limit = self.cfg.train.max_nonfinite_steps
        if self.nonfinite_streak >= limit:
            raise NonFiniteError(
                f"{self.nonfinite_streak} updates in a row had a non-finite loss or gradient (step {self.step}); "
                f"stopping (train.max_nonfinite_steps={limit}); try a lower algo.lr or algo.max_grad_norm.")
