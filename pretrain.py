"""
Pretraining the shapes model: the latent-diffusion recipe (Rombach et al. 2022) at toy width, in our own classes.

    stage 1  VAE        x (B,3,32,32) -> z ~ N(mu, sigma^2) (B,4,8,8) -> x_hat;  loss = ||x - x_hat||^2 + w_kl KL
    stage 2  latents    every dataset image encoded once; scaling_factor = 1 / std(z)   (SD's 0.18215 is the same
                        statistic of SD's own VAE)
    stage 3  UNet + CLIP text encoder, jointly, on the "simple" objective (scheduler.denoising_loss):
                 L = E_{x0, c, t, eps} w_t || eps - eps_theta(sqrt(a_t) x0 + sqrt(1 - a_t) eps, t, tau(c)) ||^2
             with P2 weights w_t = (1 + SNR_t)^-0.5 (Choi et al. 2022: more weight where layout is decided),
             10% of captions replaced by "" (the exact empty prompt the sampler's CFG uses) and an EMA of the
             weights (the EMA is what ships).

The data is the shapes world (shapes.py): a fixed set of captioned images, deterministic per index, drawn from the
training split only (held-out combinations never appear). The result is a diffusers folder (model_index.json,
unet/ vae/ text_encoder/ tokenizer/ scheduler/) that load_pipeline("shapes") and diffusers' StableDiffusionPipeline
load; weights are stored in fp16 to keep the folder small (the model computes in fp32).

    python pretrain.py                       # ~45-50 min on 2 CPU cores, writes models/shapes/
    python pretrain.py --resume              # continue an interrupted run from its last checkpoint
    python pretrain.py --relation-probe models/shapes   # does a model read "left of"? (also printed at the end)
    python pretrain.py --vae-steps 20 --unet-steps 20 --dataset-size 256 --out /tmp/p --export /tmp/m   # a smoke run

Every stage checkpoints atomically to --out/state.pt (models, optimizers, EMA, RNG, step), so a kill loses at
most --save-every steps and a resumed run continues exactly.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import shapes
from cli import ArgumentParser
from scheduler import DDIMScheduler, SchedulerConfig, denoising_loss
from unet import UNet2DConditionModel, UNetConfig
from vae import AutoencoderKL, VAEConfig

# The shapes model: SD's architecture at toy width. 32 px images through a 3-level VAE (f4) give SD's 4-channel
# latents at 8x8, the size at which this UNet costs ~0.26 s per batch of 64 (fwd + bwd) on 2 CPU cores. The
# text encoder is a CLIPTextModel on the real CLIP BPE vocabulary (its embedding table is most of its weights).
ARCH = dict(
    unet=dict(block_out_channels=(32, 64, 64), down_block_types=("CrossAttnDownBlock2D",) * 3,
              up_block_types=("CrossAttnUpBlock2D",) * 3, layers_per_block=1, num_attention_heads=(4, 4, 4),
              cross_attention_dim=32, sample_size=8),
    vae=dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=shapes.SIZE),
    text_encoder=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      hidden_act="quick_gelu"),
)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="pretrain.py", description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--out", default="runs/pretrain-shapes", help="work directory (state.pt, log.jsonl, samples)")
    p.add_argument("--export", default="models/shapes", help="where the finished diffusers folder is written")
    p.add_argument("--resume", action="store_true", help="continue from --out/state.pt with the run's saved flags")
    p.add_argument("--seed", type=int, default=0, help="weights, data order, noise")
    p.add_argument("--dataset-size", type=int, default=40000, help="captioned images drawn from the training split")
    p.add_argument("--vae-steps", type=int, default=2500, help="VAE optimizer steps")
    p.add_argument("--vae-batch-size", type=int, default=32, help="VAE batch size")
    p.add_argument("--vae-lr", type=float, default=2e-3, help="VAE peak learning rate (cosine decay)")
    p.add_argument("--kl-weight", type=float, default=1e-6, help="VAE KL weight (SD's kl-f8 uses 1e-6)")
    p.add_argument("--unet-steps", type=int, default=8000, help="UNet + text encoder optimizer steps")
    p.add_argument("--batch-size", type=int, default=64, help="UNet batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="UNet + text encoder peak learning rate (cosine decay)")
    p.add_argument("--warmup", type=int, default=200, help="linear warm-up steps of each stage")
    p.add_argument("--p2-gamma", type=float, default=0.5,
                   help="P2 loss weights (1 + SNR_t)^-gamma: more weight on high noise, where layout is decided "
                        "(0: SD's plain loss)")
    p.add_argument("--freeze-token-embedding", action="store_true",
                   help="keep the text encoder's token-embedding table at its random init (every word stays distinct)")
    p.add_argument("--caption-dropout", type=float, default=0.1, help="fraction of captions replaced by ''")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the shipped weights (0: no EMA)")
    p.add_argument("--save-every", type=int, default=250, help="checkpoint every N steps")
    p.add_argument("--log-every", type=int, default=50, help="append the loss to --out/log.jsonl every N steps")
    p.add_argument("--relation-probe", metavar="FOLDER",
                   help="only print how much the shapes model in FOLDER reads relation words (see relation_probe)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    return p


# -----------------------------------------------------------------------------------------------------------
# models and data


def progress(iterable, **kw):
    """tqdm, redrawn at most every 30 s when the output is a log file rather than a terminal."""
    return tqdm(iterable, mininterval=0.1 if sys.stderr.isatty() else 30, **kw)


def build_models(seed: int):
    """Fresh random VAE, UNet and text encoder (the same for a given seed)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from weights import CLIP_VOCAB, MAX_TOKENS
    torch.manual_seed(seed)
    vae = AutoencoderKL(VAEConfig(**ARCH["vae"]))
    unet = UNet2DConditionModel(UNetConfig(**ARCH["unet"]))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=CLIP_VOCAB, max_position_embeddings=MAX_TOKENS,
                                        **ARCH["text_encoder"]))
    return vae, unet, text


def make_dataset(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """n training-split items: images (n,3,32,32) uint8 and their captions."""
    items = [shapes.dataset_item(i, "train", seed) for i in progress(range(n), desc="drawing the dataset", leave=False)]
    images = torch.from_numpy(np.stack([im for im, _ in items])).permute(0, 3, 1, 2).contiguous()
    return images, [t for _, t in items]


def to_model(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float() / 127.5 - 1


def cosine_lr(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


class EMA:
    """Exponential moving average of parameters, decay warmed up as min(decay, (1+n)/(10+n))."""

    def __init__(self, modules: list[nn.Module], decay: float):
        self.decay = decay
        self.shadow = [p.detach().clone() for m in modules for p in m.parameters()]

    @torch.no_grad()
    def update(self, modules: list[nn.Module], step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        params = [p for m in modules for p in m.parameters()]
        torch._foreach_lerp_(self.shadow, [p.detach() for p in params], 1 - d)

    @torch.no_grad()
    def copy_to(self, modules: list[nn.Module]) -> None:
        for s, p in zip(self.shadow, [p for m in modules for p in m.parameters()]):
            p.copy_(s)


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)), summed over latent elements, averaged over the batch (as SD's VAE)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean()


# -----------------------------------------------------------------------------------------------------------
# checkpoints


def save_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def log(out: Path, row: dict) -> None:
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


# -----------------------------------------------------------------------------------------------------------
# the stages


def train_vae(args, vae, images, state, out: Path) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 1)
    step = 0
    if state.get("stage") == "vae":
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["vae_opt"])
        gen.set_state(state["gen"])
        step = state["step"]
    vae.train()
    bar = progress(range(step, args.vae_steps), desc="VAE", initial=step, total=args.vae_steps)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.vae_steps, args.warmup, args.vae_lr)
        idx = torch.randint(len(images), (args.vae_batch_size,), generator=gen)
        x = to_model(images[idx])
        mean, logvar = vae.encode(x)
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=gen)
        rec = (vae.decode(z) - x).pow(2).mean()
        loss = rec + args.kl_weight * kl_divergence(mean, logvar)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(mse=f"{rec.item():.4f}", refresh=False)   # shown at the next redraw
        if (step + 1) % args.log_every == 0:
            log(out, {"stage": "vae", "step": step + 1, "mse": rec.item(), "loss": loss.item()})
        if (step + 1) % args.save_every == 0 or step + 1 == args.vae_steps:
            save_state(out / "state.pt", {"stage": "vae", "step": step + 1, "vae": vae.state_dict(),
                                          "vae_opt": opt.state_dict(), "gen": gen.get_state()})
    vae.eval()


@torch.no_grad()
def encode_dataset(vae, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Posterior mean and std of every image, and SD's scaling factor 1/std of sampled latents."""
    means, stds = [], []
    for i in progress(range(0, len(images), batch), desc="encoding latents", leave=False):
        m, lv = vae.encode(to_model(images[i:i + batch]))
        means.append(m)
        stds.append((0.5 * lv).exp())
    mean, std = torch.cat(means), torch.cat(stds)
    sampled = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    return mean, std, float(1 / sampled.std())


@torch.no_grad()
def reconstruction_score(vae, images: torch.Tensor, captions: list[str], n: int = 256) -> float:
    """Mean shapes reward of VAE reconstructions of the first n images: 1.0 means the VAE loses nothing the
    reward can see."""
    x = to_model(images[:n])
    rec = ((vae.decode(vae.encode(x)[0]) / 2 + 0.5).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    return float(np.mean(shapes.score_batch(rec, captions[:n])["reward"]))


SWAPPED = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
PROBE_T_MIN = 600   # the relation probe's noise levels, t >= this: where layout is decided


@torch.no_grad()
def relation_probe(unet, encode, vae, n: int = 128, t_min: int = PROBE_T_MIN,
                   seed: int = 123) -> tuple[float, float]:
    """Does the denoiser read relation words? The ε-MSE at high noise (t >= t_min, where layout is decided) on n
    relation images of the training split with their own captions and with the relation swapped (left of <-> right
    of, above <-> below), on the same x_t: (own, swapped). Equal numbers mean the words change nothing.
    encode: list of captions -> (n, 77, D) conditioning."""
    drawn = (shapes.dataset_item(i, "train", seed) for i in range(100 * n))   # a quarter are relation captions
    items = list(itertools.islice(((im, c) for im, c in drawn if shapes.parse(c).relation), n))
    own = [c for _, c in items]
    swapped = [shapes.caption(dataclasses.replace(spec, relation=SWAPPED[spec.relation]))
               for spec in map(shapes.parse, own)]
    x0 = vae.encode(to_model(torch.from_numpy(np.stack([im for im, _ in items])).permute(0, 3, 1, 2)))[0]
    x0 = x0 * vae.config.scaling_factor
    sched = DDIMScheduler(SchedulerConfig(), num_steps=1)
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(t_min, sched.config.num_train_timesteps, (len(own),), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    return tuple(denoising_loss(unet, sched, x0, encode(c), t, noise).item() for c in (own, swapped))


def describe_probe(probe: tuple[float, float]) -> str:
    own, swapped = probe
    return (f"relation words: eps-MSE at t >= {PROBE_T_MIN} {own:.5f} with each caption's relation, {swapped:.5f} with it "
            f"swapped ({(swapped - own) / own:+.2%}; 0 means the model ignores them)")


def train_unet(args, unet, text, latents, captions, state, out: Path, tokenize, carry: dict) -> EMA:
    """carry: what every checkpoint of this stage also holds (the finished VAE)."""
    mean, std, scale = latents
    # a frozen table cannot merge words the UNet has not yet learned to tell apart (the shipped model's "left" and
    # "right" embeddings drifted to cosine 0.84); it is 1.58M of the text encoder's 1.6M weights
    text.get_input_embeddings().weight.requires_grad_(not args.freeze_token_embedding)
    params = [p for p in list(unet.parameters()) + list(text.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ema = EMA([unet, text], args.ema) if args.ema > 0 else None
    gen = torch.Generator().manual_seed(args.seed + 2)
    sched = DDIMScheduler(SchedulerConfig(), num_steps=1)   # only its alphas_cumprod: SD's training schedule
    T = sched.config.num_train_timesteps
    # every distinct caption is tokenized once; "" is row 0, the caption dropout target
    vocab = [""] + sorted(set(captions))
    row_of = {c: i for i, c in enumerate(vocab)}
    ids = tokenize(vocab)                                      # (V, 77)
    caption_rows = torch.tensor([row_of[c] for c in captions])
    step = 0
    if state.get("stage") == "unet":
        unet.load_state_dict(state["unet"])
        text.load_state_dict(state["text"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        if ema is not None:
            ema.shadow = state["ema"]
        step = state["step"]
    unet.train()
    text.train()
    bar = progress(range(step, args.unet_steps), desc="UNet", initial=step, total=args.unet_steps)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.unet_steps, args.warmup, args.lr)
        idx = torch.randint(len(mean), (args.batch_size,), generator=gen)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        rows = torch.where(torch.rand(args.batch_size, generator=gen) < args.caption_dropout, 0, caption_rows[idx])
        t = torch.randint(T, (args.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        loss = denoising_loss(unet, sched, x0, text(ids[rows]).last_hidden_state, t, noise, args.p2_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            ema.update([unet, text], step)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if (step + 1) % args.log_every == 0:
            log(out, {"stage": "unet", "step": step + 1, "loss": loss.item()})
        if (step + 1) % args.save_every == 0 or step + 1 == args.unet_steps:
            save_state(out / "state.pt", {**carry, "stage": "unet", "step": step + 1, "unet": unet.state_dict(),
                                          "text": text.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                                          "ema": ema.shadow if ema is not None else None})
    if ema is not None:
        ema.copy_to([unet, text])
    unet.eval()
    text.eval()
    return ema


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.relation_probe:
        from weights import load_pipeline
        pipe = load_pipeline(args.relation_probe)
        print(describe_probe(relation_probe(pipe.unet, pipe.encode_prompts, pipe.vae)))
        return
    out = Path(args.out)
    if args.resume:   # the run's own flags: a changed step count would change its learning-rate schedule
        if not (out / "state.pt").exists() or not (out / "config.json").exists():
            raise SystemExit(f"pretrain.py: error: --resume: no {out}/state.pt; start without --resume")
        saved = json.loads((out / "config.json").read_text())
        saved.setdefault("p2_gamma", 0.0)   # a run begun before --p2-gamma existed trains on the plain loss
        saved.setdefault("freeze_token_embedding", False)
        args = argparse.Namespace(**{**vars(build_parser().parse_args([])), **saved, "resume": True,
                                     "threads": args.threads})
    for name in ("dataset_size", "vae_steps", "unet_steps", "batch_size", "vae_batch_size", "save_every",
                 "log_every"):
        if getattr(args, name) < 1:
            raise SystemExit(f"pretrain.py: error: --{name.replace('_', '-')} must be >= 1")
    if args.p2_gamma < 0:
        raise SystemExit("pretrain.py: error: --p2-gamma must be >= 0 (0: the plain loss)")
    if not 0 <= args.caption_dropout < 1 or not 0 <= args.ema < 1:
        raise SystemExit("pretrain.py: error: --caption-dropout and --ema must be in [0, 1)")
    if (out / "state.pt").exists() and not args.resume:
        raise SystemExit(f"pretrain.py: error: {out} already holds a run; continue it with --resume or pick another "
                         "--out")
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    from weights import clip_tokenizer, save_pipeline, tokenize   # transformers: imported after the flags are checked
    tok = clip_tokenizer()
    state = torch.load(out / "state.pt", weights_only=False) if args.resume else {}
    if not args.resume:
        with open(out / "config.json", "w") as f:
            json.dump(vars(args), f, indent=2)
    t0 = time.perf_counter()
    vae, unet, text = build_models(args.seed)
    images, captions = make_dataset(args.dataset_size, args.seed)
    if state.get("stage") != "unet":
        train_vae(args, vae, images, state, out)
    else:
        vae.load_state_dict(state["vae"])
        vae.eval()
    recon = reconstruction_score(vae, images, captions)
    print(f"VAE: shapes reward of reconstructions {recon:.3f} (ground truth: 1.000)", flush=True)
    latents = encode_dataset(vae, images)
    vae.config.scaling_factor = latents[2]
    print(f"latent std {1 / latents[2]:.4f} -> scaling_factor {latents[2]:.4f}", flush=True)
    if state.get("stage") == "vae":   # the VAE is final from here on: stage 3 checkpoints carry it along
        state = {}
    train_unet(args, unet, text, latents, captions, state, out, lambda ps: tokenize(tok, ps), {"vae": vae.state_dict()})
    save_pipeline(args.export, unet, vae, text, dtype=torch.float16)
    minutes = (time.perf_counter() - t0) / 60
    probe = relation_probe(unet, lambda cs: text(tokenize(tok, cs)).last_hidden_state, vae)
    print(describe_probe(probe))
    log(out, {"stage": "done", "minutes_this_session": minutes, "vae_reconstruction_reward": recon,
              "scaling_factor": latents[2], "relation_probe": probe})
    print(f"wrote {args.export} ({minutes:.1f} min in this session)")


if __name__ == "__main__":
    main()
