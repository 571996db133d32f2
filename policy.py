"""
The sampler as a policy (DDPO's view of a diffusion model): the UNet being trained, with everything a rollout needs
(scheduler, guidance, eta, the negative prompt's embedding, the compute dtype), and its evaluation on fixed prompt
sets with fixed seeds.

    pi_theta(x_{t-1} | x_t, c) = N( mu_theta(x_t, t, c), sigma_t^2 I ),   mu from the CFG-guided eps (scheduler.py)

    policy, reference = build_policy(cfg, pipe, device, world)   # LoRA or full UNet; frozen parts in the compute dtype
    traj, cond = policy.generate(prompts, seeds)                 # traj.latents (B,N+1,C,h,w), .log_probs (B,N), .images
    optimizer, grad_scaler, update_cfg = build_update(cfg, policy, device)
    metrics = evaluate_all(policy, run, epoch, tasks)           # eval_reward_*, heldout_reward_*, samples/*.png

Noise is a function of (seed, epoch, sample index) (sample_seed), never of the batch layout or the process: a run
samples the same images on one GPU or eight, and after a resume.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

import lora
from cli import DTYPES
from config import TrainConfig
from ddpo import UpdateConfig, reference_policy
from grid import make_grid, score_label
from run import Run, Task, category_means, gather_objects, reward_categories, reward_stats
from scheduler import DDIMScheduler, SchedulerConfig, rollout


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The noise seed of global sample `index` of `epoch`: the same on any rank, batch size or after a resume."""
    return ((seed * 1_000_003 + epoch) * 1_000_003 + index) % 2**63


@dataclass
class Policy:
    """The sampler as a policy: the UNet (LoRA-wrapped or whole) and what every rollout of it needs."""
    pipe: object                # weights.Pipeline: text encoder, VAE, the UNet
    model: torch.nn.Module      # the UNet as trained (DDP-wrapped with several processes)
    params: list                # the trainable fp32 parameters
    use_lora: bool
    low: torch.dtype | None     # autocast dtype of the frozen weights and the compute (None: fp32)
    scheduler: DDIMScheduler
    uncond: object              # (1,77,D) the negative prompt's embedding (SDXL: a unet.Conditioning of one)
    size: int                   # image size in pixels
    latent_shape: tuple         # (C, h, w)
    guidance: float
    eta: float
    vae_chunk: int | None

    @property
    def unet(self):
        return self.pipe.unet

    def describe(self) -> str:
        what = "LoRA" if self.use_lora else "full UNet"
        return (f"{what}, {sum(p.numel() for p in self.params):,} trainable parameters, "
                f"{str(self.low or torch.float32).removeprefix('torch.')}")

    def autocast(self):
        return torch.autocast(self.uncond.device.type, dtype=self.low) if self.low else contextlib.nullcontext()

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], x_T: torch.Tensor | None = None):
        """One rollout batch with the current policy: (trajectory, prompt conditioning: (B,77,D) embeddings, or for
        SDXL a unet.Conditioning that also carries the pooled embedding and the size's time ids)."""
        cond = self.pipe.encode_prompts(prompts, size=self.size)
        # folding LoRA into the weights is exact only in fp32: a bf16 base weight would round the update away
        fold = lora.merged(self.unet) if self.use_lora and self.low is None else contextlib.nullcontext()
        with fold, self.autocast():
            traj = rollout(self.unet, self.pipe.vae, self.scheduler, cond, self.uncond, guidance=self.guidance,
                           eta=self.eta, seeds=seeds, latents=x_T, vae_chunk=self.vae_chunk, height=self.size,
                           width=self.size)
        return traj, cond


def build_policy(cfg: TrainConfig, pipe, device: torch.device, world: int) -> tuple[Policy, object]:
    """(policy, KL reference or None). The frozen parts in the compute dtype, trainable weights in fp32
    (ddpo-pytorch #8, trl #1330); the caller has seeded torch, so LoRA's A starts the same on every rank."""
    low = DTYPES[cfg.precision] if cfg.precision != "fp32" else None
    use_lora, unet = cfg.lora_rank > 0, pipe.unet
    for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):   # text_encoder_2: SDXL's OpenCLIP bigG, or None
        if m is not None:
            m.requires_grad_(False).eval().to(low or torch.float32)
    if use_lora:
        unet.requires_grad_(False).to(low or torch.float32)
        params = lora.add_lora(unet, cfg.lora_rank, cfg.lora_alpha, tuple(cfg.lora_targets.split(",")))
    else:
        params = list(unet.requires_grad_(True).parameters())
    # the KL reference: the initial policy (LoRA: the same UNet with adapters off; full: a frozen low-precision copy)
    reference = None
    if cfg.kl_coef > 0:
        reference = reference_policy(unet) if use_lora else reference_policy(unet).to(low or torch.float32)
    unet.gradient_checkpointing = cfg.grad_checkpointing
    if cfg.compile:
        unet.compile()
    model = unet
    if world > 1:  # DDP sees exactly the trainable parameters (LoRA: A and B), all used in every forward
        model = torch.nn.parallel.DistributedDataParallel(
            unet, device_ids=[device.index] if device.type == "cuda" else None)
    scheduler = DDIMScheduler(SchedulerConfig.from_dict(pipe.scheduler_config), cfg.steps, device)
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    size = cfg.size or pipe.native_size
    uncond = pipe.encode_negative(cfg.negative_prompt, size=size)   # SDXL: zeros for an empty one, as diffusers
    policy = Policy(pipe, model, params, use_lora, low, scheduler, uncond, size,
                    (pipe.vae.config.latent_channels, size // factor, size // factor), cfg.guidance, cfg.eta,
                    cfg.vae_chunk)
    return policy, reference


def build_update(cfg: TrainConfig, policy: Policy, device: torch.device):
    """(AdamW on the trainable parameters, fp16 loss scaler or None, UpdateConfig)."""
    optimizer = torch.optim.AdamW(policy.params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    # fp16 gradients underflow below ~6e-8: scale the loss up (and skip the steps that overflow); bf16 needs none
    grad_scaler = torch.amp.GradScaler(device.type) if policy.low == torch.float16 else None
    update_cfg = UpdateConfig(clip_range=cfg.clip_range, adv_clip_max=cfg.adv_clip_max, loss=cfg.loss,
                              kl_coef=cfg.kl_coef, guidance=cfg.guidance, eta=cfg.eta,
                              micro_batch=cfg.train_batch_size,
                              optimizer_steps_per_epoch=cfg.optimizer_steps_per_epoch,
                              timestep_fraction=cfg.timestep_fraction, skip_last_steps=cfg.skip_last_steps,
                              max_grad_norm=cfg.max_grad_norm, num_inner_epochs=cfg.inner_epochs)
    return optimizer, grad_scaler, update_cfg


def sync(device: torch.device) -> None:
    """Wait for queued GPU work: the phase timings must include it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def grid_slots(n: int, seeds: int, grid_size: int) -> tuple[list[int], int]:
    """Which images of an evaluation set (n images, each prompt repeated `seeds` times in a row) its grid shows, in
    order, and the grid's columns. With repeated seeds, rows of up to 8 seeds, each prompt given an equal share of
    whole rows: a grid of 16 at 32 seeds shows 8 seeds of two prompts (not one prompt 16 times), and 16 seeds of a
    set with one prompt. With one seed, 8 prompts a row."""
    if seeds == 1:
        return list(range(min(n, grid_size))), 8
    cols = min(seeds, 8)
    per_prompt = min(seeds, max(cols, grid_size // max(n // seeds, 1) // cols * cols))
    return [i for i in range(n) if i % seeds < per_prompt][:grid_size], cols


def evaluate(policy: Policy, reward_fn, run: Run, epoch: int, name: str, prompts: list[str], seeds: int,
             score: bool, grid: bool) -> dict:
    """A prompt set with fixed seeds (image i always gets the same noise; each prompt `seeds` times in a row):
    `name`_reward_* metrics (and per category, if the reward reports categories) and a grid
    samples/[name_]epoch_NNNN.png of up to --grid-size of its images (grid_slots)."""
    cfg = run.cfg
    shown, ncols = grid_slots(len(prompts), seeds, cfg.grid_size)   # at most --grid-size indices
    policy.unet.eval()
    mine, rows, infos = list(range(run.rank, len(prompts), run.world)), [], []
    for b in range(0, len(mine), cfg.sample_batch_size):
        idx = mine[b:b + cfg.sample_batch_size]
        ps = [prompts[i] for i in idx]
        traj, _ = policy.generate(ps, [sample_seed(cfg.seed, -1, i) for i in idx])
        scores, info = reward_fn(traj.images, ps) if score else (torch.zeros(len(idx)), {})
        cats = reward_categories(info)
        infos.append(info)
        for j, i in enumerate(idx):
            image = (traj.images[j] * 255).round().byte().cpu() if i in shown else None
            rows.append((i, float(scores[j]), {k: float(v[j]) for k, v in cats.items()}, image))
    run.print_warnings(infos)
    rows = sorted((r for part in gather_objects(rows) for r in part), key=lambda r: r[0])
    out = {}
    if score:
        out = reward_stats(f"{name}_reward", torch.tensor([r[1] for r in rows], dtype=torch.float64))
        out.update(category_means(f"{name}_reward", {k: torch.tensor([r[2][k] for r in rows], dtype=torch.float64)
                                                     for k in rows[0][2]}))
    if grid and run.master and cfg.grid_size > 0:
        pictured = [r for r in rows if r[3] is not None]
        caps = [prompts[r[0]][:40] + (f" {score_label(r[1])}" if score else "") for r in pictured]
        image = make_grid(torch.stack([r[3].float() / 255 for r in pictured]), ncols=min(ncols, len(pictured)),
                          captions=caps)
        run.save_image(os.path.join("samples", f"{'' if name == 'eval' else name + '_'}epoch_{epoch:04d}.png"), image)
    return out


def evaluate_all(policy: Policy, run: Run, epoch: int, tasks: list[Task]) -> dict:
    """Each task's evaluation sets due at this epoch: scored every --eval-every epochs, a grid every --sample-every."""
    score, grid = run.due(run.cfg.eval_every, epoch), run.due(run.cfg.sample_every, epoch)
    out = {}
    for task in tasks:
        for kind, prompts in (("eval", task.eval_prompts), ("heldout", task.heldout_prompts)):
            if prompts and (score or grid):
                seeds = run.cfg.eval_seeds if kind == "eval" else run.cfg.heldout_seeds
                out.update(evaluate(policy, task.reward_fn, run, epoch, task.prefix + kind, prompts, seeds, score,
                                    grid))
    return out
