"""
DDPO: the denoising chain as a policy, trained with policy gradients (Black et al. 2023, "Training Diffusion
Models with Reinforcement Learning": DDPO_SF, the score-function estimator, and DDPO_IS, importance sampling with
a PPO-style clip).

Each DDIM step with eta > 0 is a Gaussian action x_{t-1} ~ N(mu_theta(x_t, t, c), sigma_t^2 I), and its
log-prob (mean over C,H,W, as in every public implementation) comes from scheduler.step(..., prev_sample=x_{t-1}).
Every (sample, timestep) pair of a rollout is one training item:

    A     = clip(advantage(r), -adv_clip_max, adv_clip_max)          (per sample, shared by its steps)
    ratio = exp(logp_theta(x_{t-1} | x_t) - logp_old)                 (= 1 on the first micro-step)
    DDPO_IS (PPO-clip):      L = mean( max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) )
    DDPO_SF (score function): L = mean( -A * logp_theta )             (on-policy: one optimizer step per batch)
    optional KL to the reference policy on the step means (Flow-GRPO):
                              kl = mean_dims((mu_theta - mu_ref)^2) / (2 sigma_t^2),   L += kl_coef * kl

Advantages are rewards normalised per prompt (ddpo-pytorch's persistent per-prompt buffer), per group (GRPO:
K images of a prompt in one epoch), or over the batch. Non-finite rewards get advantage 0 and are masked out of
the loss.

Public API (used by train.py)
    PerPromptStatTracker(buffer_size=16, min_count=16)
        .update(prompts, rewards) -> Tensor (B,)       ddpo-pytorch advantages; NaN/inf rewards -> 0, not buffered
        .state_dict() -> dict (JSON-serialisable) / .load_state_dict(d) / .get_stats() / .clear()
    group_advantages(rewards, group_ids, *, global_std=False, eps=1e-6) -> Tensor (B,)   (r - mean_g)/(std_g + eps)
    batch_advantages(rewards, *, eps=1e-8) -> Tensor (B,)                                 (r - mean)/(std + eps)
    permute_within_groups(advantages, group_size, generator) -> Tensor (B,)   null control: shuffled in groups
    ppo_loss(log_prob, old_log_prob, advantages, clip_range) -> (loss (B,), ratio (B,))   per item, no reduction
    sf_loss(log_prob, advantages) -> loss (B,)
    gaussian_kl(mean, ref_mean, std) -> kl (B,)
    reference_policy(unet) -> callable(x, t, c)   LoRA model: adapters off; otherwise a frozen deep copy
    Samples(latents (B,N+1,4,h,w), log_probs (B,N), timesteps (B,N), advantages (B,), valid (B,) bool | None)
    UpdateConfig(clip_range, adv_clip_max, loss, kl_coef, guidance, eta, micro_batch,
                 optimizer_steps_per_epoch, timestep_fraction, skip_last_steps, max_grad_norm, train_cfg,
                 num_inner_epochs)
    ddpo_update(model, params, scheduler, samples, optimizer, cfg, *, cond_embeds, uncond_embeds, generator,
                reference=None, autocast_dtype=None, grad_scaler=None, progress=False) -> dict[str, float]
        one epoch: shuffled mixed-timestep micro-batches, grad accumulation, clipping, optimizer steps; returns
        loss, approx_kl, clipfrac, clipfrac_gt_one, clipfrac_lt_one, ratio_mean, kl (with a reference), grad_norm,
        first_ratio_max_dev, items, optimizer_steps, and skipped_steps (with a grad_scaler)
        grad_scaler: a torch.amp.GradScaler for fp16 autocast (loss scaling against gradient underflow); a step whose
        gradients overflow is skipped and the scale lowered
"""
import copy
import math
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import lora
from scheduler import guided_eps

# -----------------------------------------------------------------------------
# advantages


def _to_numpy(rewards) -> np.ndarray:
    if isinstance(rewards, torch.Tensor):
        rewards = rewards.detach().double().cpu().numpy()
    r = np.asarray(rewards, dtype=np.float64)
    assert r.ndim == 1, f"rewards must be 1-D (B,), got shape {r.shape}"
    return r


def _like(adv: np.ndarray, rewards) -> torch.Tensor:
    out = torch.from_numpy(adv).float()
    return out.to(rewards.device) if isinstance(rewards, torch.Tensor) else out


class PerPromptStatTracker:
    """ddpo-pytorch's per-prompt reward normaliser. Each prompt keeps a FIFO buffer of its last `buffer_size`
    rewards across epochs; a batch's rewards are appended first, then normalised by the buffer's mean and
    population std (+1e-6), or by the whole current batch's when the buffer holds fewer than `min_count`."""

    def __init__(self, buffer_size: int = 16, min_count: int = 16):
        assert buffer_size >= 1 and min_count >= 1, (buffer_size, min_count)
        self.buffer_size, self.min_count = int(buffer_size), int(min_count)
        self.stats: dict[str, deque] = {}

    def update(self, prompts: Sequence[str], rewards) -> torch.Tensor:
        """prompts: B strings, rewards: (B,) -> advantages (B,) float32 (on the rewards' device)."""
        r = _to_numpy(rewards)
        assert len(prompts) == len(r), f"{len(prompts)} prompts for {len(r)} rewards"
        valid = np.isfinite(r)
        adv = np.zeros_like(r)
        if valid.any():
            batch_mean, batch_std = r[valid].mean(), r[valid].std() + 1e-6
            keys = np.array(prompts, dtype=object)
            for p in dict.fromkeys(keys[valid]):
                sel = valid & (keys == p)
                buf = self.stats.setdefault(p, deque(maxlen=self.buffer_size))
                buf.extend(r[sel].tolist())
                if len(buf) < self.min_count:
                    mean, std = batch_mean, batch_std
                else:
                    mean, std = np.mean(buf), np.std(buf) + 1e-6
                adv[sel] = (r[sel] - mean) / std
        return _like(adv, rewards)

    def get_stats(self) -> dict[str, dict]:
        return {p: {"mean": float(np.mean(b)), "std": float(np.std(b)), "count": len(b)} for p, b in self.stats.items()}

    def clear(self) -> None:
        self.stats = {}

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "stats": {p: list(b) for p, b in self.stats.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restores the buffers (kept to this tracker's buffer_size, newest values last)."""
        self.stats = {p: deque((float(v) for v in vals), maxlen=self.buffer_size)
                      for p, vals in state["stats"].items()}


def _group_index(group_ids, n: int, device) -> torch.Tensor:
    if isinstance(group_ids, torch.Tensor):
        ids = group_ids.to(device=device).long()
        assert ids.shape == (n,), f"group_ids must have shape ({n},), got {tuple(ids.shape)}"
        return torch.unique(ids, return_inverse=True)[1]
    assert len(group_ids) == n, f"{len(group_ids)} group ids for {n} rewards"
    index: dict[Hashable, int] = {}
    return torch.tensor([index.setdefault(g, len(index)) for g in group_ids], device=device, dtype=torch.long)


def group_advantages(rewards: torch.Tensor, group_ids, *, global_std: bool = False,
                     eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: (r - mean_g) / (std_g + eps) within each group (e.g. the K images of one prompt in this
    epoch); with global_std the std is the whole batch's (Flow-GRPO). Population std. group_ids: (B,) int tensor or
    a list of hashables (e.g. prompts). NaN/inf rewards get 0 and do not enter any statistic."""
    r = torch.as_tensor(rewards).detach().double()
    assert r.ndim == 1, f"rewards must be 1-D (B,), got shape {tuple(r.shape)}"
    idx = _group_index(group_ids, r.shape[0], r.device)
    valid = torch.isfinite(r)
    rz = torch.where(valid, r, 0.0)
    g = int(idx.max()) + 1 if r.numel() else 0
    count = torch.zeros(g, dtype=r.dtype, device=r.device).index_add_(0, idx, valid.double()).clamp(min=1)
    mean = torch.zeros_like(count).index_add_(0, idx, rz) / count
    dev = torch.where(valid, r - mean[idx], 0.0)
    if global_std:
        std = dev.new_full((g,), float(r[valid].std(correction=0)) if valid.any() else 0.0)
    else:
        std = (torch.zeros_like(count).index_add_(0, idx, dev * dev) / count).sqrt()
    return (dev / (std[idx] + eps)).float()


def permute_within_groups(advantages: torch.Tensor, group_size: int, generator: torch.Generator) -> torch.Tensor:
    """The null control: each run of group_size consecutive advantages (one prompt's images of the epoch) permuted at
    random. The update keeps its sizes and each prompt the distribution of its advantages, but which image earned
    which is forgotten; what a run learns beyond this control is what the reward taught it. (B,) -> (B,)"""
    b = advantages.shape[0]
    assert b % group_size == 0, f"{b} advantages are not groups of {group_size}"
    order = torch.rand(b // group_size, group_size, generator=generator).argsort(dim=1)   # a permutation per group
    order = order + torch.arange(0, b, group_size).unsqueeze(1)
    return advantages[order.flatten().to(advantages.device)]


def batch_advantages(rewards: torch.Tensor, *, eps: float = 1e-8) -> torch.Tensor:
    """(r - mean) / (std + eps) over the (global) batch: ddpo-pytorch without per-prompt tracking."""
    r = torch.as_tensor(rewards)
    return group_advantages(r, torch.zeros(r.shape[0], dtype=torch.long, device=r.device), eps=eps)


# -----------------------------------------------------------------------------
# losses (per item, unreduced)


def ppo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
             clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DDPO_IS: max(-A r, -A clip(r, 1-eps, 1+eps)), r = exp(logp - logp_old). Returns (loss (B,), ratio (B,))."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), ratio


def sf_loss(log_prob: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """DDPO_SF (REINFORCE): -A logp; its gradient is -A grad logp."""
    return -advantages * log_prob


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL between N(mean, std^2 I) and N(ref_mean, std^2 I) per dimension, averaged over C,H,W: (B,)."""
    d = (mean - ref_mean).flatten(1)
    return d.square().mean(1) / (2 * std.flatten().square())


def reference_policy(unet: nn.Module) -> Callable:
    """The policy the KL penalty pulls towards: for a LoRA model the same UNet with adapters off (no extra
    memory); otherwise a frozen deep copy of the UNet as it is now (call this before training starts)."""
    if lora.lora_parameters(unet):
        def base(x, t, c):
            with lora.disabled(unet):
                return unet(x, t, c)
        return base
    return copy.deepcopy(unet).requires_grad_(False).eval()


# -----------------------------------------------------------------------------
# the fused update


@dataclass
class Samples:
    latents: torch.Tensor          # (B, N+1, 4, h, w) fp32: x_T, ..., x_0
    log_probs: torch.Tensor        # (B, N) fp32: log p_old(x_{t-1} | x_t) at rollout
    timesteps: torch.Tensor        # (B, N) long
    advantages: torch.Tensor       # (B,)
    valid: torch.Tensor | None = None  # (B,) bool: False drops the sample from the loss (e.g. NaN reward)


@dataclass
class UpdateConfig:
    clip_range: float = 1e-4            # PPO clip on the ratio of mean-over-dims log-probs
    adv_clip_max: float = 5.0
    loss: str = "ppo"                   # "ppo" (DDPO_IS) | "sf" (DDPO_SF, on-policy)
    kl_coef: float = 0.0                # weight of the KL to the reference policy (needs `reference`)
    guidance: float = 5.0               # CFG scale, the same as at rollout
    eta: float = 1.0                    # DDIM eta, the same as at rollout
    micro_batch: int = 4                # (sample, timestep) items per UNet call (x2 with CFG)
    optimizer_steps_per_epoch: int = 2  # the epoch's items are split into this many optimizer steps
    timestep_fraction: float = 1.0      # train on a random int(N * fraction) steps of each sample
    skip_last_steps: int = 0            # never train the last N steps (their tiny sigma: see config.py)
    max_grad_norm: float | None = 1.0   # None: no clipping (the norm is still logged)
    train_cfg: bool = True              # False: condition-only UNet call, no guidance
    num_inner_epochs: int = 1           # passes over the epoch's items (each reshuffled)


def _check(samples: Samples, cfg: UpdateConfig, cond_embeds, uncond_embeds, reference, params) -> None:
    lat, lp, ts, adv = samples.latents, samples.log_probs, samples.timesteps, samples.advantages
    assert lp.ndim == 2 and lat.ndim == 5 and lat.shape[:2] == (lp.shape[0], lp.shape[1] + 1), \
        f"samples need latents (B,N+1,C,h,w) and log_probs (B,N), got {tuple(lat.shape)} and {tuple(lp.shape)}"
    b = lp.shape[0]
    assert ts.shape == lp.shape and adv.shape == (b,), \
        f"timesteps {tuple(ts.shape)} and advantages {tuple(adv.shape)} for log_probs {tuple(lp.shape)}"
    assert samples.valid is None or samples.valid.shape == (b,), tuple(samples.valid.shape)
    # fp32 latents and log-probs: low-precision latents shift the re-scored log-probs by about the clip range
    assert lat.dtype == torch.float32 and lp.dtype == torch.float32, (lat.dtype, lp.dtype)
    assert cond_embeds.shape[0] == b and uncond_embeds.shape[0] in (1, b), \
        (tuple(cond_embeds.shape), tuple(uncond_embeds.shape))
    assert cfg.loss in ("ppo", "sf"), cfg.loss
    assert cfg.loss != "sf" or (cfg.optimizer_steps_per_epoch == 1 and cfg.num_inner_epochs == 1), \
        "loss='sf' is on-policy: one optimizer step per epoch, one inner epoch"
    assert cfg.kl_coef == 0 or reference is not None, "kl_coef > 0 needs a reference policy (reference_policy(unet))"
    assert 0 < cfg.timestep_fraction <= 1 and cfg.micro_batch >= 1 and cfg.num_inner_epochs >= 1, cfg
    assert all(p.dtype == torch.float32 for p in params), "trainable parameters are fp32 master weights; " \
        "use autocast_dtype for bf16/fp16 compute"


_ITEM_METRICS = ("loss", "approx_kl", "clipfrac", "clipfrac_gt_one", "clipfrac_lt_one", "ratio_mean", "kl")


def _eps(net: Callable, x, t, c, u, cfg: UpdateConfig) -> torch.Tensor:
    """The noise prediction the policy acts on: CFG as one batched call (as at rollout) or condition-only."""
    return guided_eps(net, x, t, c, u if cfg.train_cfg else None, cfg.guidance)


def _item_losses(model, scheduler, samples: Samples, s, j, cond_embeds, uncond_embeds, adv, valid, reference,
                 cfg: UpdateConfig, autocast):
    """The loss of the (sample s, step j) items of one micro-batch: PPO or SF on the re-scored log-prob of the
    stored x_{t-1}, plus kl_coef * KL to the reference; 0 where the sample is masked. Returns (loss, ratio,
    log-ratio, kl), each (m,)."""
    x, x_next = samples.latents[s, j], samples.latents[s, j + 1]
    t, old = samples.timesteps[s, j], samples.log_probs[s, j]
    c = cond_embeds[s]
    u = uncond_embeds[s] if uncond_embeds.shape[0] > 1 else uncond_embeds.expand(len(s), *uncond_embeds.shape[1:])
    ref_mean = None
    if reference is not None:  # before the policy forward: adapters are off only inside this call
        with torch.no_grad(), autocast:
            eps_ref = _eps(reference, x, t, c, u, cfg)
        ref_mean = scheduler.step(eps_ref.float(), t, x, cfg.eta, prev_sample=x_next).mean
    with autocast:
        eps = _eps(model, x, t, c, u, cfg)
    out = scheduler.step(eps.float(), t, x, cfg.eta, prev_sample=x_next)
    if cfg.loss == "ppo":
        loss, ratio = ppo_loss(out.log_prob, old, adv[s], cfg.clip_range)
    else:
        loss, ratio = sf_loss(out.log_prob, adv[s]), torch.exp(out.log_prob.detach() - old)
    kl = gaussian_kl(out.mean, ref_mean, out.std) if ref_mean is not None else torch.zeros_like(loss)
    loss = torch.where(valid[s], loss + cfg.kl_coef * kl, 0.0)
    return loss, ratio, out.log_prob.detach() - old, kl


class _Tally:
    """The update's metrics, summed on the device and synced once at the end: per-item sums over valid items
    (_ITEM_METRICS), the gradient norms of the optimizer steps taken, the first micro-step's ratio deviation."""

    def __init__(self, dev: torch.device):
        self.sums = torch.zeros(len(_ITEM_METRICS), device=dev)
        self.count, self.grad_norm_sum, self.skipped = (torch.zeros((), device=dev) for _ in range(3))
        self.first_dev = None
        self.aux_sum, self.n_aux = torch.zeros((), device=dev), 0

    @torch.no_grad()
    def items(self, loss, ratio, logr, kl, valid, clip_range: float) -> None:
        r = ratio.detach()
        if self.first_dev is None:
            self.first_dev = (r - 1).abs().max()
        hi, lo = r > 1 + clip_range, r < 1 - clip_range
        per_item = torch.stack([loss.detach(), 0.5 * logr.square(), (hi | lo).float(), hi.float(), lo.float(), r,
                                kl.detach()])
        self.sums += (per_item * valid).sum(1)
        self.count += valid.sum()

    def step(self, norm: torch.Tensor, finite: torch.Tensor) -> None:
        self.grad_norm_sum += torch.where(finite, norm, 0.0)
        self.skipped += ~finite

    def metrics(self, n_steps: int, kl: bool, scaled: bool) -> dict[str, float]:
        grad_norm = self.grad_norm_sum / (n_steps - self.skipped)  # NaN if every step was skipped
        vals = torch.cat([self.sums / self.count.clamp(min=1),
                          torch.stack([grad_norm, self.first_dev, self.count, self.skipped])]).tolist()
        out = dict(zip(_ITEM_METRICS + ("grad_norm", "first_ratio_max_dev", "items", "skipped_steps"), vals))
        if not kl:
            del out["kl"]
        if not scaled:
            del out["skipped_steps"]
        if self.n_aux:
            out["pretrain_loss"] = float(self.aux_sum) / self.n_aux
        out["optimizer_steps"] = float(n_steps)
        return out


def _draw_items(b: int, n_train: int, t_per_sample: int, generator: torch.Generator, dev) -> tuple:
    """(sample index, step index) of every item of one inner epoch, (b * t_per_sample,) each: per sample a random
    subset of its steps (ddpo-pytorch: per-sample time permutation, first T), then one shuffle over all items so
    that every micro-batch mixes samples and timesteps."""
    steps = torch.rand(b, n_train, generator=generator, device=generator.device).argsort(1)[:, :t_per_sample]
    order = torch.randperm(b * t_per_sample, generator=generator, device=generator.device)
    return (order // t_per_sample).to(dev), steps.flatten()[order].to(dev)


def ddpo_update(model: Callable, params: Sequence[torch.Tensor], scheduler, samples: Samples,
                optimizer: torch.optim.Optimizer, cfg: UpdateConfig, *, cond_embeds: torch.Tensor,
                uncond_embeds: torch.Tensor, generator: torch.Generator, reference: Callable | None = None,
                autocast_dtype: torch.dtype | None = None, grad_scaler: torch.amp.GradScaler | None = None,
                aux_loss: Callable | None = None, progress: bool = False) -> dict[str, float]:
    """One epoch of DDPO training on a batch of rollouts.

    model: the UNet as called for training, model(x (m,4,h,w), t (m,), c (m,77,D)) -> eps; may be DDP-wrapped
      (its no_sync() is used on all but the last micro-step of each optimizer step). For SDXL, c is a
      unet.Conditioning (embeds + pooled text_embeds + time_ids), indexed and concatenated like the tensor.
    params: the trainable parameters (fp32) for grad-norm clipping. optimizer: built by the caller on params.
    samples: the epoch's rollouts on the training device; cond_embeds (B,77,D), uncond_embeds (1 or B,77,D), or for
      SDXL the unet.Conditioning of the rollout (torch.cat of the rollout batches' conditionings works as for tensors).
    generator: draws the timestep subsets and the item shuffle (save its state for exact resume).
    reference: callable like `model` for the KL term (reference_policy(unet)); its kl is logged when given.
    autocast_dtype: e.g. torch.bfloat16 for the UNet calls; step math and the loss stay fp32.
    grad_scaler: torch.amp.GradScaler(device.type), needed with fp16 (whose gradients underflow below ~6e-8): the
      loss is scaled before backward and the gradients unscaled before clipping; a step with inf/NaN gradients is
      skipped (counted in skipped_steps, left out of grad_norm) and the scale backs off.
    aux_loss: aux_loss(model, i) -> (loss to add, value to log), called once per optimizer step i = 0, 1, ... of this
      call, its gradient accumulated with the step's items (Zhang et al.'s beta * L_pre, pretrain_data.py); logged
      as the mean pretrain_loss.

    All (sample, trained step) items are shuffled and split into cfg.optimizer_steps_per_epoch contiguous
    chunks; each chunk runs in micro-batches of cfg.micro_batch mixed-timestep items, each micro-loss divided by
    the chunk's item count, so an optimizer step sees the mean over its items whatever the micro-batch size (or
    the number of DDP ranks). Masked items (valid=False, non-finite advantage) count in that mean with loss 0.
    Returns metrics local to this process, averaged over items (loss, approx_kl, clipfrac, kl, ratio) or over
    the optimizer steps taken (grad_norm, unscaled), plus first_ratio_max_dev = max|ratio - 1| on the first
    micro-step (~0 when the rollout was scored by the same weights).
    """
    _check(samples, cfg, cond_embeds, uncond_embeds, reference, params)
    b, n = samples.log_probs.shape
    dev = samples.latents.device
    n_train = n - cfg.skip_last_steps
    t_per_sample = int(n_train * cfg.timestep_fraction)
    n_items = b * t_per_sample
    assert t_per_sample >= 1 and 1 <= cfg.optimizer_steps_per_epoch <= n_items, \
        f"{b} samples x {t_per_sample} steps = {n_items} items for {cfg.optimizer_steps_per_epoch} optimizer steps"

    adv = samples.advantages.to(dev).float()
    valid = torch.isfinite(adv)
    if samples.valid is not None:
        valid &= samples.valid.to(dev).bool()
    adv = torch.where(valid, adv, 0.0).clamp(-cfg.adv_clip_max, cfg.adv_clip_max)
    cond_embeds, uncond_embeds = cond_embeds.to(dev), uncond_embeds.to(dev)
    autocast = torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm else math.inf
    no_sync = getattr(model, "no_sync", None)
    # no loss scaling (fp32/bf16) is the same code path with a disabled scaler: scale, unscale_ and update are no-ops
    scaler = grad_scaler if grad_scaler is not None else torch.amp.GradScaler(dev.type, enabled=False)
    k_steps = cfg.optimizer_steps_per_epoch
    splits = [i * n_items // k_steps for i in range(k_steps + 1)]  # item ranges of the optimizer steps
    n_micro = sum(-(-(end - start) // cfg.micro_batch) for start, end in zip(splits, splits[1:]))
    bar = tqdm(total=cfg.num_inner_epochs * n_micro, desc="train", disable=not progress, leave=False)
    tally = _Tally(dev)

    if hasattr(model, "train"):
        model.train()
    optimizer.zero_grad(set_to_none=True)
    for _ in range(cfg.num_inner_epochs):
        item_s, item_j = _draw_items(b, n_train, t_per_sample, generator, dev)
        for start, end in zip(splits, splits[1:]):   # one optimizer step on items [start, end)
            if aux_loss is not None:   # first, so that DDP all-reduces it with the step's last micro-batch
                with no_sync() if no_sync is not None else nullcontext():
                    with autocast:
                        extra, value = aux_loss(model, tally.n_aux)
                    scaler.scale(extra).backward()
                tally.aux_sum += value.to(dev)
                tally.n_aux += 1
            micro = list(range(start, end, cfg.micro_batch))
            for k, a in enumerate(micro):
                s, j = item_s[a:min(a + cfg.micro_batch, end)], item_j[a:min(a + cfg.micro_batch, end)]
                # DDP: all-reduce the gradients only on the last micro-step of an optimizer step
                with no_sync() if (no_sync is not None and k < len(micro) - 1) else nullcontext():
                    loss, ratio, logr, kl = _item_losses(model, scheduler, samples, s, j, cond_embeds, uncond_embeds,
                                                         adv, valid, reference, cfg, autocast)
                    scaler.scale(loss.sum() / (end - start)).backward()  # / items of this optimizer step
                tally.items(loss, ratio, logr, kl, valid[s], cfg.clip_range)
                bar.update()
            scaler.unscale_(optimizer)  # clip (and log) the true gradient, not the scaled one
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm).detach().to(dev)
            scaler.step(optimizer)  # with loss scaling: skipped when a gradient is inf/NaN
            scaler.update()
            tally.step(norm, torch.isfinite(norm) | (not scaler.is_enabled()))  # the scaler's own test, when on
            optimizer.zero_grad(set_to_none=True)
    bar.close()
    return tally.metrics(cfg.num_inner_epochs * k_steps, kl=reference is not None, scaled=grad_scaler is not None)
