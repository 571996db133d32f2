"""
DDIM sampling as a Gaussian policy: the noise schedule, one DDIM step with its exact log-probability, classifier-
free guidance, and the rollout that produces the trajectories DDPO trains on.

Noise schedule (Ho et al. 2020; SD's "scaled_linear"): β = linspace(√β_start, √β_end, T)², ᾱ_t = Π_{s≤t} (1 − β_s).

DDIM step (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12), from x_t to x_{t'} with t' = t − T//N:
    x̂0  = (x_t − √(1−ᾱ_t)·ε̂) / √ᾱ_t                                  (ε-prediction; v-prediction below)
    μ    = √ᾱ_t' · x̂0 + √(1 − ᾱ_t' − σ_t²) · ε̂
    x_t' = μ + σ_t·z,   z ~ N(0, I)
with (eq. 16)
    σ_t  = η · √((1−ᾱ_t')/(1−ᾱ_t)) · √(1 − ᾱ_t/ᾱ_t')
v-prediction (Salimans & Ho 2022): x̂0 = √ᾱ_t·x_t − √(1−ᾱ_t)·v,  ε̂ = √ᾱ_t·v + √(1−ᾱ_t)·x_t.
The last step has t' < 0 and uses ᾱ_t' = 1 if set_alpha_to_one else ᾱ_0 (SD: ᾱ_0 = 0.99915). ddpo-pytorch clamps
t' to 0 instead, which is the same for SD's set_alpha_to_one=False.

DDPO (Black et al. 2023) treats each step as the action of a policy π(x_t' | x_t, c) = N(μ, σ_t² I), so
    log π = mean over the D = C·H·W latent elements of [ −(x_t' − μ)²/(2σ_t²) − log σ_t − ½ log 2π ].
That is the MEAN over elements, as in ddpo-pytorch and its successors, i.e. the true Gaussian log-density divided
by D. Consequence for PPO: the ratio exp(Δ log π) is (p/p_old)^(1/D), so a clip range of 1e-4 allows about
±1e-4·D nats of the true summed log-ratio (±1.64 nats at 512 px, D = 64·64·4 = 16384).

Step math is done in fp32 whatever the UNet's dtype: the last step has σ ≈ 0.02 (50 steps, η = 1), where fp16
rounding of x_t' alone moves the mean log-prob by ~1e-4, the size of the PPO clip range. Trajectories are stored in
fp32 so that re-scoring them with unchanged weights gives exactly the stored log-probs (PPO ratio 1).

The text conditioning (cond/uncond below) is the (B,77,D) embedding tensor of SD 1.x/2.x, or for SDXL a
unet.Conditioning (embeds, pooled text_embeds, time_ids), which batches, slices and concatenates like that tensor
and which the UNet unpacks: the CFG batch [uncond, cond] carries SDXL's added conditioning with no code of its own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, NamedTuple

import torch
from tqdm import tqdm

# σ = 0 happens for η = 0 (deterministic DDIM) and for the last step when set_alpha_to_one=True; the Gaussian
# log-density is then undefined. The log-prob uses max(σ, SIGMA_MIN) instead, as the original JAX DDPO does. It never
# binds for SD's η = 1 schedule (the smallest σ there is 0.0207), and a step with σ at the floor is deterministic:
# its log-prob carries no policy-gradient signal and must not be trained on.
SIGMA_MIN = 1e-6

BETA_SCHEDULES = ("scaled_linear", "linear")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing")


@dataclass
class SchedulerConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"

    def __post_init__(self):
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"scheduler: beta_schedule {self.beta_schedule!r} is not supported; use one of {BETA_SCHEDULES}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"scheduler: prediction_type {self.prediction_type!r} is not supported; use one of {PREDICTION_TYPES}")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            # "linspace" timesteps are not spaced by T//N, so x_{t-T//N} would not be the state the next step sees
            raise ValueError(f"scheduler: timestep_spacing {self.timestep_spacing!r} is not supported by the DDIM step "
                             f"(its timesteps are not T//N apart); use one of {TIMESTEP_SPACINGS}")

    @classmethod
    def from_dict(cls, d: dict) -> "SchedulerConfig":
        """From a diffusers scheduler_config.json dict (any scheduler class); unknown keys are ignored."""
        # options that would change the step math; silently ignoring them would sample a different chain
        for key in ("clip_sample", "thresholding", "rescale_betas_zero_snr", "trained_betas"):
            if d.get(key):
                raise ValueError(f"scheduler config: {key}={d[key]!r} is not supported; only SD's plain DDIM "
                                 f"({key} false/null) is implemented")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})


class StepOutput(NamedTuple):
    prev_sample: torch.Tensor  # (B,C,h,w) fp32, x_{t'}: drawn, or the given one that was scored
    log_prob: torch.Tensor     # (B,) fp32, mean over C·H·W of log N(x_{t'}; mean, std²)
    mean: torch.Tensor         # (B,C,h,w) fp32, μ (carries the gradient of the model output)
    std: torch.Tensor          # (B,1,1,1) fp32, max(σ_t, SIGMA_MIN): the std the log-prob uses


class DDIMScheduler:
    def __init__(self, config: SchedulerConfig, num_steps: int = 50, device="cpu"):
        T = config.num_train_timesteps
        if not 1 <= num_steps <= T:
            raise ValueError(f"scheduler: num_steps must be in 1..{T}, got {num_steps}")
        self.config, self.num_steps = config, num_steps
        # fp32 throughout, as diffusers builds it, so that sampling matches diffusers' DDIM bit for bit (LDM built the
        # schedule in float64; the fp32 cumprod differs from that by < 5e-7)
        if config.beta_schedule == "scaled_linear":
            betas = torch.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, T, dtype=torch.float32) ** 2
        else:
            betas = torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float32)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        final = 1.0 if config.set_alpha_to_one else alphas_cumprod[0].item()
        # every step jumps T//N timesteps back, for either spacing (as diffusers' DDIM and ddpo-pytorch do)
        self.step_ratio = T // num_steps
        if config.timestep_spacing == "leading":
            timesteps = torch.arange(num_steps - 1, -1, -1, dtype=torch.float64) * self.step_ratio + config.steps_offset
        else:  # trailing: start at T-1
            timesteps = torch.arange(T, 0, -T / num_steps, dtype=torch.float64).round() - 1
        if timesteps.max().item() >= T or timesteps.min().item() < 0:
            raise ValueError(f"scheduler: {num_steps} steps with steps_offset={config.steps_offset} give timesteps "
                             f"outside 0..{T - 1}; use fewer steps or a smaller steps_offset")
        self.timesteps = timesteps.long().to(device)  # (N,) descending, e.g. [981, 961, ..., 1]
        self.alphas_cumprod = alphas_cumprod.to(device)  # (T,) fp32
        self.final_alpha_cumprod = torch.tensor(final, dtype=torch.float32).to(device)

    def _batch_t(self, t, batch: int) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.alphas_cumprod.device)
        return t.expand(batch) if t.dim() == 0 else t

    def prev_timestep(self, t):
        """The timestep a step from t lands on; negative for the last step (then ᾱ = final_alpha_cumprod)."""
        return t - self.step_ratio

    def _alpha_prev(self, t: torch.Tensor) -> torch.Tensor:
        prev_t = self.prev_timestep(t)
        # a where() rather than a branch: t is per sample, and the rollout must not sync with the host
        return torch.where(prev_t >= 0, self.alphas_cumprod[prev_t.clamp(min=0)], self.final_alpha_cumprod)

    def _coefficients(self, t: torch.Tensor, eta: float):
        """Per-sample ᾱ_t, ᾱ_t', σ_t in float64. The (B,) coefficients are formed in float64 because 1 − ᾱ_t/ᾱ_t' at
        the last step is ~8.5e-4: in fp32 σ would carry a ~1e-5 relative error, straight into log σ."""
        a_t, a_prev = self.alphas_cumprod[t].double(), self._alpha_prev(t).double()
        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        return a_t, a_prev, eta * variance.sqrt()

    def sigma(self, t, eta: float) -> torch.Tensor:
        """σ_t of DDIM eq. 16 for timesteps t (B,) -> (B,) fp32 (without the SIGMA_MIN floor)."""
        return self._coefficients(torch.as_tensor(t, device=self.alphas_cumprod.device), eta)[2].float()

    def step(self, model_output: torch.Tensor, t, sample: torch.Tensor, eta: float,
             prev_sample: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> StepOutput:
        """One DDIM step from x_t = sample with per-sample timesteps t (B,) (or one int for all).

        Draws x_{t'} = μ + σ·noise (noise from the global RNG if not given), or, if prev_sample is given, scores
        that x_{t'} instead (re-scoring a stored trajectory). Gradients flow through μ only."""
        assert 0.0 <= eta <= 1.0, f"eta must be in [0, 1], got {eta}"
        assert prev_sample is None or noise is None, "pass prev_sample (to score it) or noise (to draw one), not both"
        x, out = sample.float(), model_output.float()
        a_t, a_prev, sigma = self._coefficients(self._batch_t(t, x.shape[0]), eta)
        # μ = √ᾱ'·x̂0 + √(1−ᾱ'−σ²)·ε̂ is linear in (x_t, model output): μ = cx·x_t + co·out, with the coefficients
        # in float64 (clamp: 1 − ᾱ' − σ² is exactly 0 at a final step with ᾱ' = 1; rounding must not make a NaN)
        direction = (1 - a_prev - sigma ** 2).clamp(min=0).sqrt()
        if self.config.prediction_type == "epsilon":  # x̂0 = (x − √(1−ᾱ)·ε)/√ᾱ
            cx = (a_prev / a_t).sqrt()
            co = direction - (a_prev * (1 - a_t) / a_t).sqrt()
        else:  # v_prediction: x̂0 = √ᾱ·x − √(1−ᾱ)·v, ε̂ = √ᾱ·v + √(1−ᾱ)·x
            cx = (a_prev * a_t).sqrt() + direction * (1 - a_t).sqrt()
            co = direction * a_t.sqrt() - (a_prev * (1 - a_t)).sqrt()
        bshape = (-1,) + (1,) * (x.dim() - 1)
        mean = cx.float().view(bshape) * x + co.float().view(bshape) * out
        if prev_sample is None:
            if eta == 0.0:
                prev_sample = mean.detach()
            else:
                noise = torch.randn_like(mean) if noise is None else noise.float()
                prev_sample = (mean + sigma.float().view(bshape) * noise).detach()
        else:
            prev_sample = prev_sample.detach().float()
        std = sigma.clamp(min=SIGMA_MIN)
        z = (prev_sample - mean) / std.float().view(bshape)
        log_prob = (-0.5 * z ** 2).mean(dim=tuple(range(1, x.dim()))) - (std.log() + 0.5 * math.log(2 * math.pi)).float()
        return StepOutput(prev_sample, log_prob, mean, std.float().view(bshape))


def guided_eps(unet: Callable, x: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor | None,
               guidance: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): u + g·(c − u), u/c the model outputs without/with the prompt.

    x (B,C,h,w), t (B,) or scalar, cond (B,77,D), uncond (B or 1,77,D) or None (or unet.Conditioning for SDXL,
    see the top of this file: torch.cat and expand below act on all its fields). One batched UNet call on
    cat([uncond, cond]) (the unconditional half first, as diffusers and ddpo-pytorch do); a single cond call when
    guidance == 1 or uncond is None. x is cast to the embeddings' dtype (the pipeline dtype); the result is fp32."""
    B = x.shape[0]
    x = x.to(cond.dtype)
    t = torch.as_tensor(t, device=x.device)
    t = t.expand(B) if t.dim() == 0 else t
    if uncond is None or guidance == 1.0:
        return unet(x, t, cond).float()
    uncond = uncond.expand(B, *uncond.shape[1:]) if uncond.shape[0] == 1 else uncond
    out = unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond.to(cond.dtype), cond])).float()
    u, c = out.chunk(2)
    return u + guidance * (c - u)


@dataclass
class Trajectory:
    images: torch.Tensor | None  # (B,3,H,W) fp32 in [0,1], or None when not decoded
    latents: torch.Tensor        # (B,N+1,C,h,w) fp32: x_T, ..., x_0
    log_probs: torch.Tensor      # (B,N) fp32: log π(x_{i+1} | x_i)
    timesteps: torch.Tensor      # (B,N) long: the t of each step


def draw_noise(seeds: list[int], shape: tuple, num_steps: int) -> torch.Tensor:
    """Per-sample noise (B, 1+num_steps, *shape) fp32 on the CPU: x_T, then one draw per step, each sample from its
    own torch.Generator(seed). A sample's noise depends only on its seed: same image at any batch size, on any
    device."""
    out = torch.empty(len(seeds), 1 + num_steps, *shape)
    for b, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(int(seed))
        for i in range(1 + num_steps):
            out[b, i] = torch.randn(shape, generator=g)
    return out


@torch.no_grad()
def rollout(unet: Callable, vae, scheduler: DDIMScheduler, cond: torch.Tensor, uncond: torch.Tensor | None, *,
            guidance: float = 5.0, eta: float = 1.0, seeds: list[int], latents: torch.Tensor | None = None,
            decode: bool = True, vae_chunk: int | None = None, progress: bool = False,
            height: int | None = None, width: int | None = None) -> Trajectory:
    """Sample a batch with CFG and record the trajectory DDPO trains on.

    cond (B,77,D) prompt embeddings; uncond (B or 1,77,D) negative-prompt embeddings (the caller encodes "" for the
    standard empty negative prompt: Pipeline.encode_negative); for SDXL both are unet.Conditioning (whose time ids
    should be those of the sampled size: Pipeline.encode_prompts(..., size=)); seeds: B ints. latents: optional x_T (B or 1,C,h,w), e.g. one shared x_T per
    GRPO group; the per-step noise still comes from each sample's seed. height/width: image size in pixels when
    latents is None (default: the UNet's native size). The UNet runs in its own dtype (wrap the call in autocast if
    needed); latents and log-probs are fp32. No grad, and no host sync inside the step loop: all noise is drawn up
    front."""
    B, device = cond.shape[0], cond.device
    assert len(seeds) == B, f"{len(seeds)} seeds for a batch of {B}: one seed per sample"
    N = len(scheduler.timesteps)
    if latents is not None:
        shape = tuple(latents.shape[1:])
    elif vae is None:
        raise ValueError("rollout: without a vae the latent shape is unknown; pass latents (x_T) or the vae")
    else:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        height = height or unet.config.sample_size * factor
        width = width or unet.config.sample_size * factor
        assert height % factor == 0 and width % factor == 0, f"size {height}x{width} is not a multiple of {factor}"
        shape = (vae.config.latent_channels, height // factor, width // factor)
    # x_T is drawn even when latents are given, so a seed's step noise never depends on that choice
    noise = draw_noise(seeds, shape, N if eta > 0 else 0).to(device)  # (B, 1+N or 1, C, h, w)
    x = noise[:, 0] if latents is None else latents.float().to(device).expand(B, *shape)
    traj = torch.empty(B, N + 1, *shape, device=device)
    log_probs = torch.empty(B, N, device=device)
    traj[:, 0] = x
    for i in tqdm(range(N), desc="denoising", disable=not progress, leave=False):
        t = scheduler.timesteps[i].expand(B)
        eps = guided_eps(unet, x, t, cond, uncond, guidance)
        out = scheduler.step(eps, t, x, eta, noise=noise[:, 1 + i] if eta > 0 else None)
        x = out.prev_sample
        traj[:, i + 1] = x
        log_probs[:, i] = out.log_prob
    images = vae.decode_latents(x, chunk_size=vae_chunk) if decode else None  # the VAE casts to its dtype
    return Trajectory(images, traj, log_probs, scheduler.timesteps.expand(B, N).clone())


def denoising_loss(unet: Callable, scheduler: DDIMScheduler, x0: torch.Tensor, cond: torch.Tensor,
                   t: torch.Tensor, noise: torch.Tensor, p2_gamma: float = 0.0) -> torch.Tensor:
    """The "simple" DDPM objective (Ho et al. 2020, eq. 14) that SD is pretrained with: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε,
    loss = mean ‖target − model(x_t, t, c)‖², target ε (epsilon models) or v = √ᾱ_t·ε − √(1−ᾱ_t)·x0.

    x0 (B,C,h,w) scaled latents, cond (B,77,D) (SDXL: unet.Conditioning), t (B,) long training timesteps, noise
    like x0. Scalar fp32 loss.
    pretrain.py trains the shapes model with it; the same function is the pretraining-loss regulariser L_pre.

    p2_gamma > 0: P2 weighting (Choi et al. 2022, "Perception Prioritized Training", k = 1), each sample's loss
    times (1 + SNR_t)^-γ, SNR_t = ᾱ_t/(1 − ᾱ_t). The plain loss is dominated by the nearly clean timesteps (the
    shapes model: ε-MSE 0.35 for t < 300, 0.03 for t > 600), while what a picture holds and where (counts, layout)
    is decided at high noise; P2 moves the weight there."""
    a = scheduler.alphas_cumprod[t].view(-1, *(1,) * (x0.dim() - 1))
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    target = noise if scheduler.config.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
    err = (unet(x_t.to(cond.dtype), t, cond).float() - target.float()).pow(2)
    if not p2_gamma:
        return err.mean()
    abar = a.flatten().float()
    weight = (1 + abar / (1 - abar)) ** -p2_gamma                             # (B,)
    return (err.flatten(1).mean(1) * weight).mean()
