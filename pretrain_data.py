"""
The pretraining-loss regulariser of Zhang et al. 2024 ("Large-scale Reinforcement Learning for Diffusion Models"):

    L(theta) = J_DDPO(theta) + beta * L_pre(theta),
    L_pre    = E_{(x, c) ~ D_pre, t, eps} || eps - eps_theta(sqrt(a_t) E(x) + sqrt(1 - a_t) eps, t, tau(c)) ||^2

the standard latent-diffusion loss (scheduler.denoising_loss, the one pretrain.py trains the shapes model with) on
image-caption pairs from a pretraining set, added to every optimizer step of the DDPO update. It keeps the policy
near the data distribution while the reward pulls it away (their App. G: without it, grainy artifacts appear).

Sources (--pretrain-data):
    shapes          the shapes world's training split, drawn on the fly (shapes.dataset_item), deterministic per index
    FOLDER          image files (png, jpg, jpeg, webp) each with a caption in a .txt of the same stem
    FILE.jsonl      one {"path": ..., "caption": ...} per line (paths relative to the file)

The batch of optimizer step g on rank r is a pure function of (seed, g, r): which pairs, which timesteps, which
noise. A resumed run (global step restored from its checkpoint) therefore draws exactly the batches the
uninterrupted run would have, with no sampler state to save.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rewards import resize_shortest_and_crop
from scheduler import denoising_loss

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SHAPES_PRETRAIN_SIZE = 40_000   # pretrain.py --dataset-size: items 0 .. 39,999 of the shapes training split


def read_pairs(source: str) -> list[tuple[object, str]]:
    """[(image path or shapes index, caption)]; one-line errors for a source that cannot be used."""
    if source == "shapes":   # the images pretrain.py trained the shapes model on; captions come with the drawing
        return [(i, None) for i in range(SHAPES_PRETRAIN_SIZE)]
    path = Path(source).expanduser()
    if path.is_dir():
        pairs = [(p, p.with_suffix(".txt")) for p in sorted(path.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        missing = [p.name for p, c in pairs if not c.is_file()]
        if missing:
            raise FileNotFoundError(f"--pretrain-data {source}: {len(missing)} image(s) without a caption file, e.g. "
                                    f"{missing[0]}; put each caption in a .txt of the same name")
        pairs = [(p, c.read_text(encoding="utf-8").strip()) for p, c in pairs]
    elif path.is_file() and path.suffix == ".jsonl":
        pairs = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pairs.append((path.parent / row["path"], str(row["caption"])))
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"--pretrain-data {source}: line {n} is not {{\"path\": ..., \"caption\": ...}}") \
                    from None
        absent = [str(p) for p, _ in pairs if not p.is_file()]
        if absent:
            raise FileNotFoundError(f"--pretrain-data {source}: {len(absent)} listed image(s) missing, e.g. "
                                    f"{absent[0]}")
    else:
        raise FileNotFoundError(f"--pretrain-data {source}: not 'shapes', a folder of images with .txt captions, "
                                "or a .jsonl of {\"path\", \"caption\"}")
    if not pairs:
        raise ValueError(f"--pretrain-data {source}: no image-caption pairs in it")
    return pairs


def load_image(item, size: int) -> tuple[torch.Tensor, str | None]:
    """(3,size,size) in [-1, 1] (shortest side resized, centre crop: rewards.resize_shortest_and_crop) and the
    shapes caption (None for files)."""
    caption = None
    if isinstance(item, int):
        import shapes
        array, caption = shapes.dataset_item(item)
    else:
        array = np.asarray(Image.open(item).convert("RGB"))
    x = torch.from_numpy(np.asarray(array, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return resize_shortest_and_crop(x, size, size)[0] * 2 - 1, caption


class PretrainLoss:
    """beta * L_pre on one batch of pairs per optimizer step. __call__(model, step) -> (scaled loss, raw L_pre)."""

    def __init__(self, pairs: list, pipe, scheduler, beta: float, batch_size: int, size: int, seed: int, rank: int):
        self.pairs = pairs   # read_pairs(source), read once where the flag is checked
        self.pipe, self.scheduler, self.beta, self.batch_size = pipe, scheduler, beta, batch_size
        self.size, self.seed, self.rank = size, seed, rank

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x0 scaled latents, text embeddings, timesteps, noise) of optimizer step `step` on this rank."""
        rng = random.Random(f"pretrain-{self.seed}-{step}-{self.rank}")   # a string seed hashes deterministically
        items = [self.pairs[i] for i in rng.choices(range(len(self.pairs)), k=self.batch_size)]
        loaded = [load_image(path, self.size) for path, _ in items]
        captions = [cap if cap is not None else shape_caption for (_, cap), (_, shape_caption) in zip(items, loaded)]
        vae, dev = self.pipe.vae, self.pipe.device
        with torch.no_grad():
            x = torch.stack([img for img, _ in loaded]).to(dev, next(vae.parameters()).dtype)
            mean, _ = vae.encode(x)   # the posterior mean, as SD fine-tuning scripts commonly use
            x0 = (mean * vae.config.scaling_factor).float()
            cond = self.pipe.encode_prompts(captions, size=self.size)   # SDXL: time ids of this size
        g = torch.Generator().manual_seed(rng.getrandbits(63))
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (self.batch_size,), generator=g).to(dev)
        noise = torch.randn(x0.shape, generator=g).to(dev)
        return x0, cond, t, noise

    def __call__(self, model, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x0, cond, t, noise = self.batch(step)
        loss = denoising_loss(model, self.scheduler, x0, cond, t, noise)
        return self.beta * loss, loss.detach()

