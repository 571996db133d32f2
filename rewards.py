"""
Rewards: the scalar r(x0, c) that DDPO maximises, J(theta) = E_{c, x0 ~ p_theta(.|c)} [ r(x0, c) ].

Every reward maps a batch of images x (B,3,H,W) float in [0,1] and their prompts c (list of B strings) to a float32
tensor (B,) on the images' device plus an info dict. Each model reward follows its published recipe exactly:

    hps        HPSv2 (Wu et al. 2023)    r = < f_I(x)/|f_I(x)| , f_T(c)/|f_T(c)| >         open_clip ViT-H-14, no scale
    aesthetic  LAION aesthetic v2        r = w . e + b,  e = g_I(x)/|g_I(x)|                CLIP ViT-L/14 + linear MLP
    pickscore  PickScore (Kirstain 2023) r = exp(s) < f_I(x)/|f_I(x)| , f_T(c)/|f_T(c)| >   CLIP ViT-H/14, learned s
    imagereward  ImageReward (Xu 2023)   r = (MLP(h) - 0.167) / 1.033, h = BERT(c | ViT-L/16(x))[CLS]  BLIP + MLP
    jpeg-*     DDPO compressibility      r = -/+ |JPEG_q95(x)| / 1000                       kB (1 kB = 1000 bytes)
    shapes     the shapes world          r = mean of the caption's atoms (object, count, relation, clean)  exact
    diversity  group diversity           r = 1/(n(n-1)) sum_{i!=j} (1 - cos(e_i, e_j))      shared by the group
    fairness   Zhang et al. 2024         r = -sum_a (P(h(x) = a) - 1/|A|)^2  (h: CLIP zero-shot) shared by the group
    ranker, remote                       an HTTP chat model / any scoring server (rewards_http.py)

and a spec like "hps=1,aesthetic=0.05" is the weighted sum R = sum_k w_k r_k, every r_k reported in
info["components"]. Images are rounded to 8-bit levels first (`quantize`, default on), because the published
recipes all score uint8 images: the reward of a sample is then exactly the score of its saved PNG.

Construct once (models load once), call many times:

    reward = build_reward("hps=1,aesthetic=0.05", device="cuda", hps_checkpoint="HPS_v2.1_compressed.pt")
    scores, info = reward(images, prompts)     # (B,) float32; info["components"], info["dropped"], info["warnings"]
    mask, message = drop_nonfinite(scores)     # the trainer drops NaN/inf images from the update, not the epoch
    options = options_from_flags(["precision=fp32"], hps_checkpoint=None)  # command-line flags -> options, checked

A reward that cannot score an image returns NaN for it (remote server down, ...); the weighted sum stays NaN
there, its index goes to info["dropped"], and drop_nonfinite gives the mask and a one-line warning for the trainer.
`reward.async_ok` says whether the reward may run in a background thread while the next batch samples: True for
CPU/network rewards (JPEG, HTTP), False for GPU models (they would compete with sampling for the same GPU and its
memory, for no overlap gain).

Model weights come from the hub by default (huggingface_hub) or from local paths (options below); everything runs
under no_grad, with fp16/bf16 autocast on CUDA (`precision`), in chunks of `chunk_size` images.
"""
import contextlib
import io
import json
import math
import os
import threading
import warnings
import weakref

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import hub
import rewards_detect
import rewards_http
import rewards_imagereward
from reward_base import (OPENAI_MEAN, OPENAI_STD, Reward, RewardWarning, drop_nonfinite, finite_mask,  # noqa: F401
                         prompt_groups, quantize, to_uint8)  # (re-exported: rewards.Reward etc.)

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.1": "HPS_v2.1_compressed.pt", "v2.0": "HPS_v2_compressed.pt"}
AESTHETIC_REPO, AESTHETIC_FILE = "trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth"
IMAGEREWARD_REPO, IMAGEREWARD_FILE = "THUDM/ImageReward", "ImageReward.pt"


# the interface and shared helpers live in reward_base.py (re-exported here: rewards.Reward etc.)


def _autocast(device: torch.device, precision: str):
    # the published scorers run under CUDA amp (fp16); on CPU we stay in fp32
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype={"fp16": torch.float16, "bf16": torch.bfloat16}[precision])


def _features(out) -> torch.Tensor:
    # transformers < 5 returns the projected tensor, >= 5 an output object with it in pooler_output
    return out if torch.is_tensor(out) else out.pooler_output


def _unique(prompts: list[str]) -> tuple[list[str], torch.Tensor]:
    # DDPO batches hold k images per prompt: encode each distinct prompt once
    uniq = list(dict.fromkeys(prompts))
    where = {p: i for i, p in enumerate(uniq)}
    return uniq, torch.tensor([where[p] for p in prompts])


# options that train.py and sample.py also take as flags of their own (--hps-checkpoint PATH, ...)
_FLAG_OPTIONS = ("hps_checkpoint", "aesthetic_checkpoint", "clip_path")


def _how_to_pass(option: str, value: str = "PATH") -> str:
    """'option=PATH' as build_reward takes it, and as a train.py / sample.py command line takes it."""
    cli = f"--reward-option {option}={value}"
    if option in _FLAG_OPTIONS:
        cli = f"--{option.replace('_', '-')} {value} or {cli}"
    return f"{option}={value} (command line: {cli})"


def _hub_file(repo: str, filename: str, option: str) -> str:
    """The file from the hub (or its cache); an unreachable hub is not retried: the cache, or a one-line error."""
    from huggingface_hub import hf_hub_download
    why = hub.unreachable()
    try:
        return hf_hub_download(repo, filename, local_files_only=why is not None)
    except Exception as e:
        reason = f"not in the hub cache, and the hub is unreachable: {why}" if why else type(e).__name__
        raise FileNotFoundError(f"rewards.py: could not get {filename} from the hub repo {repo} ({reason}); "
                                f"download it and pass {_how_to_pass(option)}") from None


def _from_pretrained(cls, path: str, option: str):
    why = None if os.path.isdir(path) else hub.unreachable()
    try:
        return cls.from_pretrained(path, local_files_only=why is not None)
    except OSError as e:
        reason = f"not in the hub cache, and the hub is unreachable: {why}" if why else e.__class__.__name__
        raise FileNotFoundError(f"rewards.py: cannot load {cls.__name__} from {path!r} ({reason}); "
                                f"pass {_how_to_pass(option)}, PATH a local folder or hub id") from None


def _torch_load(path: str, option: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"rewards.py: {option}={path!r} is not a file; pass the path of the checkpoint")
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_strict(model: nn.Module, sd: dict, what: str, option: str) -> None:
    # one clear line instead of torch's multi-line key dump
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = [k for k in set(own) & set(sd) if own[k].shape != sd[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"rewards.py: {what} does not fit the model ({len(missing)} missing keys e.g. {missing[:3]}, "
                         f"{len(unexpected)} unexpected e.g. {unexpected[:3]}, {len(shapes)} shape mismatches e.g. "
                         f"{sorted(shapes)[:3]}); check {option}")
    model.load_state_dict(sd, strict=True)


# -----------------------------------------------------------------------------
# preprocessing on tensors (B,3,H,W) in [0,1]

def resize_longest_and_pad(x: torch.Tensor, size: int = 224) -> torch.Tensor:
    """HPSv2 preprocess_val (light_augmentation): longest side -> size (bicubic, antialias), centred zero pad.

    torchvision >= 0.17 resizes tensors with antialias, so this is bit-identical to hpsv2's ToTensor -> ResizeMaxSize
    on the same [0,1] tensor. The pad is applied before normalisation (pixels of value 0, not of value mean).
    Unlike ResizeMaxSize we also pad when the longest side is already `size`, which it skips (a batch must be square).
    """
    h, w = x.shape[-2:]
    scale = size / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    ph, pw = size - nh, size - nw
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


def resize_shortest_and_crop(x: torch.Tensor, size: int = 224, crop: int = 224) -> torch.Tensor:
    """CLIPImageProcessor geometry: shortest side -> size (long side int-truncated as HF does), centre crop.

    Bicubic with antialias on the float tensor, clipped to [0,1]. This equals transformers' CLIPImageProcessor on
    the same float tensor exactly; on uint8 input the processor (torchvision's uint8 kernel in transformers 5, PIL in
    transformers 4 / DDPO; the two agree to 1 level) also rounds the resized pixels to 8 bits, a difference of about
    one 8-bit level on smooth images (more on pure noise), measured in tests/test_rewards.py.
    """
    h, w = x.shape[-2:]
    long_side = int(size * max(h, w) / min(h, w))
    nh, nw = (size, long_side) if h <= w else (long_side, size)
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - crop) // 2, (nw - crop) // 2
    return x[..., top:top + crop, left:left + crop].clamp(0, 1)  # the uint8 processors clip bicubic overshoot


def normalize(x: torch.Tensor, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


class ModelReward(Reward):
    """Common knobs of the neural scorers: device, autocast precision, chunking, 8-bit rounding."""

    def __init__(self, device, precision: str = "fp16", chunk_size: int = 64, quantize: bool = True):
        super().__init__()
        self.device, self.precision = torch.device(device), precision
        self.chunk_size, self.quantize = chunk_size, quantize

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, torch.float32)
        return quantize(x) if self.quantize else x.clamp(0, 1)


# -----------------------------------------------------------------------------
# HPSv2

def load_hps_state_dict(path: str) -> dict:
    """HPS checkpoint -> bare open_clip state dict (fp16 tensors as stored; a `module.` prefix is stripped)."""
    ckpt = _torch_load(path, "hps_checkpoint")
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"rewards.py: {path} is not an HPS checkpoint (expected a dict with a 'state_dict' of "
                         f"tensors); pass hps_checkpoint=HPS_v2.1_compressed.pt from the hub repo {HPS_REPO}")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def build_open_clip(arch: str):
    """(model, tokenizer) of an open_clip architecture, random init, no download: a config name such as 'ViT-H-14',
    or the path of a JSON model config {"embed_dim", "vision_cfg", "text_cfg"} (tests use a tiny one)."""
    import open_clip
    if arch.endswith(".json"):
        if not os.path.isfile(arch):
            raise FileNotFoundError(f"rewards.py: hps_arch={arch!r} is not a file; pass an open_clip model name "
                                    f"(e.g. ViT-H-14) or a JSON model config")
        with open(arch) as f:
            cfg = json.load(f)
        model = open_clip.model.CLIP(**cfg, output_dict=True)
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg["text_cfg"].get("context_length", 77))
        return model, tokenizer
    if open_clip.get_model_config(arch) is None:
        raise ValueError(f"rewards.py: unknown open_clip architecture hps_arch={arch!r}; use e.g. ViT-H-14 "
                         f"(see open_clip.list_models()) or a JSON model config path")
    return open_clip.create_model(arch, pretrained=None, output_dict=True), open_clip.get_tokenizer(arch)


class HPS(ModelReward):
    """HPSv2 / v2.1: cosine of the L2-normalised open_clip image and text features of matched pairs (no logit
    scale; the leaderboard prints x100). Scores are only comparable within a prompt and within a version."""

    def __init__(self, version: str = "v2.1", device="cpu", checkpoint: str | None = None, arch: str = "ViT-H-14",
                 **knobs):
        super().__init__(device, **knobs)
        self.name = f"hps-{version}"
        path = checkpoint or _hub_file(HPS_REPO, HPS_FILES[version], "hps_checkpoint")
        self.model, self.tokenizer = build_open_clip(arch)
        _load_strict(self.model, load_hps_state_dict(path), f"HPS checkpoint {path}", f"hps_arch (now {arch})")
        self.model.to(self.device).eval().requires_grad_(False)

    def score(self, images, prompts):
        uniq, where = _unique(prompts)
        px = torch.cat([normalize(resize_longest_and_pad(c)) for c in self._pixels(images).split(self.chunk_size)])
        with _autocast(self.device, self.precision):  # (B,3,224,224) fp32 in, the towers in fp16/bf16
            txt = self.model.encode_text(self.tokenizer(uniq).to(self.device))
            img = torch.cat([self.model.encode_image(c) for c in px.split(self.chunk_size)])
        txt = F.normalize(txt.float(), dim=-1)[where.to(self.device)]
        return (F.normalize(img.float(), dim=-1) * txt).sum(-1), {}


# -----------------------------------------------------------------------------
# CLIP ViT-L/14 image embeddings: LAION aesthetic predictor, group diversity, group fairness

class ClipImageEncoder:
    """L2-normalised CLIP image embeddings (transformers layout), preprocessed like CLIPProcessor on tensors.

    Keeps only the vision tower and its projection (get_image_features = visual_projection(vision pooler)).
    Shared by `aesthetic`, `diversity` and `fairness` in one spec; the last batch's embeddings are remembered (by
    tensor identity and version counter) so the set costs one forward.
    """

    def __init__(self, path: str, device, precision: str = "fp16", chunk_size: int = 64, quantize: bool = True):
        from transformers import CLIPModel
        self.path = path
        clip = _from_pretrained(CLIPModel, path, "clip_path").float()
        self.vision, self.proj = clip.vision_model, clip.visual_projection
        for m in (self.vision, self.proj):
            m.to(device).eval().requires_grad_(False)
        self.device, self.precision = torch.device(device), precision
        self.chunk_size, self.quantize = chunk_size, quantize
        self.dim = self.proj.out_features
        self._lock = threading.Lock()
        self._last = (None, -1, None)  # (weakref to the images, their _version, embeddings)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with self._lock:
            ref, version, emb = self._last
            if ref is not None and ref() is images and images._version == version:
                return emb
            x = images.to(self.device, torch.float32)
            x = quantize(x) if self.quantize else x.clamp(0, 1)
            px = torch.cat([normalize(resize_shortest_and_crop(c)) for c in x.split(self.chunk_size)])
            with _autocast(self.device, self.precision):
                emb = torch.cat([self.proj(self.vision(pixel_values=c).pooler_output)
                                 for c in px.split(self.chunk_size)])
            emb = F.normalize(emb.float(), dim=-1)
            self._last = (weakref.ref(images), images._version, emb)
            return emb

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """(T, dim) L2-normalised get_text_features of fixed texts, once: the same CLIP's text tower is loaded
        for this call only (fp32 on the CPU) and freed, so scoring keeps just the vision tower."""
        from transformers import CLIPModel, CLIPTokenizer
        tokenizer = _from_pretrained(CLIPTokenizer, self.path, "clip_path")
        if len(tokenizer.get_vocab()) <= len(set(tokenizer.all_special_ids)):  # a folder without tokenizer files
            raise FileNotFoundError(f"rewards.py: clip_path={self.path!r} has no CLIP tokenizer (vocab.json + "
                                    f"merges.txt or tokenizer.json); save one there with CLIPProcessor.save_pretrained")
        clip = _from_pretrained(CLIPModel, self.path, "clip_path").float().eval()
        tok = tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        with torch.no_grad():
            txt = _features(clip.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]))
        return F.normalize(txt.float(), dim=-1).to(self.device)


class AestheticMLP(nn.Module):
    """LAION aesthetic v2 head (improved-aesthetic-predictor, 'linearMSE'): dropouts but no nonlinearities, so at
    eval it is one affine map of the normalised embedding. Keys layers.{0,2,4,6,7}.{weight,bias}."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.layers(e)


class Aesthetic(Reward):
    """DDPO's aesthetic reward: MLP(CLIP ViT-L/14 embedding / its norm), typically ~5-6 for SD outputs."""
    name = "aesthetic"

    def __init__(self, encoder: ClipImageEncoder, checkpoint: str | None = None):
        super().__init__()
        self.encoder = encoder
        path = checkpoint or _hub_file(AESTHETIC_REPO, AESTHETIC_FILE, "aesthetic_checkpoint")
        self.mlp = AestheticMLP(encoder.dim)
        _load_strict(self.mlp, _torch_load(path, "aesthetic_checkpoint"), f"aesthetic MLP {path}",
                     "aesthetic_checkpoint (a LAION aesthetic v2 state dict for ViT-L/14 embeddings)")
        self.mlp.to(encoder.device).eval().requires_grad_(False)

    def score(self, images, prompts):
        return self.mlp(self.encoder(images)).squeeze(-1), {}


class Diversity(Reward):
    """Mean pairwise cosine distance of the CLIP embeddings of each prompt's group, given to every image of the group:
    a distribution-level reward in the spirit of Zhang et al. 2024's per-prompt fairness reward (-statistical parity
    over the 16 images of a prompt), with embedding spread instead of a skin-tone classifier. In [0, 2]; a group of
    one image gets 0 (nothing to compare), counted in info["single_image_groups"]."""
    name = "diversity"

    def __init__(self, encoder: ClipImageEncoder):
        super().__init__()
        self.encoder = encoder

    def score(self, images, prompts):
        e = self.encoder(images)
        out = torch.zeros(len(prompts), device=e.device)
        singles = 0
        for idx in prompt_groups(prompts).values():
            if len(idx) < 2:
                singles += 1
                continue
            g = e[idx]
            off = ~torch.eye(len(idx), dtype=torch.bool, device=e.device)
            out[idx] = (1 - g @ g.T)[off].mean()
        info = {"single_image_groups": singles}
        if singles:
            info["notes"] = [f"diversity: {singles} prompt(s) had a single image in the batch and got 0"]
        return out, info


def read_attributes(path: str) -> list[str]:
    """The fairness attribute texts A of a text file: one per line, '#' lines and blank lines skipped, >= 2."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"rewards.py: fairness_attributes={path!r} is not a file; pass a text file with one "
                                f"attribute text per line, e.g. 'a photo of a person with dark skin'")
    with open(path, encoding="utf-8") as f:
        texts = [line.strip() for line in f]
    texts = [t for t in texts if t and not t.startswith("#")]
    if len(texts) < 2:
        raise ValueError(f"rewards.py: fairness_attributes={path!r} has {len(texts)} attribute text(s); statistical "
                         f"parity needs at least 2, one per line")
    twice = sorted({t for t in texts if texts.count(t) > 1})
    if twice:
        raise ValueError(f"rewards.py: fairness_attributes={path!r} lists {twice[0]!r} twice; give each attribute once")
    return texts


def statistical_parity(buckets: torch.Tensor, n_buckets: int) -> float:
    """SP = sum_a (P(h(x) = a) - 1/|A|)^2 of one group's bucket indices (n,) int in 0..|A|-1, n >= 1."""
    assert len(buckets) > 0 and 0 <= int(buckets.min()) and int(buckets.max()) < n_buckets
    p = torch.bincount(buckets.cpu(), minlength=n_buckets).double() / len(buckets)  # P(h(x) = a), empirical
    return ((p - 1 / n_buckets) ** 2).sum().item()


class Fairness(Reward):
    """Zhang et al. 2024's distribution-level fairness reward (their Table 3 skin-tone task): minus the statistical
    parity of each prompt's group of images in the batch, given to every image of the group,

        r(x_i, c) = -SP(c),    SP(c) = sum_{a in A} ( P(h(x) = a | c) - 1/|A| )^2

    where P(h(x) = a | c) is the fraction of the group's images that the attribute classifier h puts in bucket a.
    In [-(1 - 1/|A|), 0]: 0 for a uniform group, -(1 - 1/|A|) when every image lands in one bucket.

    h is CLIP zero-shot over the attribute texts A (h(x) = argmax_a cos(f_I(x), f_T(a)), e.g. "a photo of a person
    with dark skin", ...), or a remote classifier (rewards_http.Remote) that answers bucket indices 0..|A|-1 (rounded
    to int). An image whose index is NaN or out of range is left out of its group's statistics and gets NaN (the
    trainer drops it). info: buckets (B ints, -1 where unknown), statistical_parity {prompt: SP}.
    """
    name = "fairness"

    def __init__(self, n_buckets: int, *, encoder: ClipImageEncoder | None = None, attributes: list[str] | None = None,
                 remote: Reward | None = None):
        super().__init__()
        assert n_buckets >= 2 and (encoder is None) != (remote is None)
        assert remote is not None or (attributes is not None and len(attributes) == n_buckets)
        self.n_buckets, self.encoder, self.remote, self.attributes = n_buckets, encoder, remote, attributes
        self.async_ok = remote is not None  # the CLIP path shares the GPU with sampling
        # the attribute texts never change: their embeddings are computed once, here
        self.text = encoder.embed_texts(attributes) if encoder is not None else None

    def classify(self, images, prompts) -> tuple[torch.Tensor, list[str]]:
        """(B,) long bucket index per image (-1 where unknown), and warning lines."""
        if self.encoder is not None:
            return (self.encoder(images) @ self.text.T).argmax(-1).cpu(), []  # h(x) = argmax_a cos(x, a)
        s, info = self.remote(images, prompts)
        s = s.cpu().double().round()
        known = torch.isfinite(s) & (s >= 0) & (s < self.n_buckets)
        warns = list(info.get("warnings", []))
        bad = (~known & ~s.isnan()).nonzero().flatten().tolist()
        if bad:  # NaN (null) means "cannot classify"; a number outside 0..|A|-1 is a server bug, said once
            warns.append(f"fairness: the remote classifier answered bucket indices {[s[i].item() for i in bad][:8]} "
                         f"outside 0..{self.n_buckets - 1} for images {bad[:8]}; they get NaN")
            warnings.warn(warns[-1], RewardWarning, stacklevel=4)
        return torch.where(known, s, -1).long(), warns

    def score(self, images, prompts):
        buckets, warns = self.classify(images, prompts)
        out = torch.full((len(prompts),), float("nan"))
        sp = {}
        for prompt, idx in prompt_groups(prompts).items():
            idx = torch.tensor(idx)
            idx = idx[buckets[idx] >= 0]   # the group's images with a known bucket
            sp[prompt] = statistical_parity(buckets[idx], self.n_buckets) if len(idx) else math.nan
            out[idx] = 0.0 - sp[prompt]    # every image of the group gets the same reward (0.0 -: no -0 in logs)
        info = {"buckets": buckets.tolist(), "statistical_parity": sp}
        if warns:
            info["warnings"] = warns
        return out, info


# -----------------------------------------------------------------------------
# PickScore

class PickScore(ModelReward):
    """PickScore_v1: exp(logit_scale) x cosine(image, text) of a CLIP ViT-H/14 (transformers CLIPModel), ~18-23."""
    name = "pickscore"

    def __init__(self, path: str, processor_path: str, device="cpu", **knobs):
        super().__init__(device, **knobs)
        from transformers import CLIPModel, CLIPProcessor
        self.model = _from_pretrained(CLIPModel, path, "pickscore_path").float().to(self.device).eval()
        self.model.requires_grad_(False)
        proc = _from_pretrained(CLIPProcessor, processor_path, "pickscore_processor")
        self.tokenizer, ip = proc.tokenizer, proc.image_processor
        get = lambda d, k: d[k] if isinstance(d, dict) else getattr(d, k)  # dict in transformers 4, SizeDict in 5
        self.size, self.crop = get(ip.size, "shortest_edge"), get(ip.crop_size, "height")
        self.mean, self.std = tuple(ip.image_mean), tuple(ip.image_std)

    def score(self, images, prompts):
        uniq, where = _unique(prompts)
        tok = self.tokenizer(uniq, padding=True, truncation=True, max_length=77, return_tensors="pt").to(self.device)
        px = torch.cat([normalize(resize_shortest_and_crop(c, self.size, self.crop), self.mean, self.std)
                        for c in self._pixels(images).split(self.chunk_size)])
        with _autocast(self.device, self.precision):
            txt = _features(self.model.get_text_features(input_ids=tok["input_ids"],
                                                         attention_mask=tok["attention_mask"]))
            img = torch.cat([_features(self.model.get_image_features(pixel_values=c))
                             for c in px.split(self.chunk_size)])
        txt = F.normalize(txt.float(), dim=-1)[where.to(self.device)]
        cos = (F.normalize(img.float(), dim=-1) * txt).sum(-1)
        return self.model.logit_scale.float().exp() * cos, {}


# -----------------------------------------------------------------------------
# JPEG (in)compressibility

def jpeg_size_kb(image: np.ndarray, quality: int = 95) -> float:
    """Size of the (H,W,3) uint8 image as JPEG at `quality`, in kB (1 kB = 1000 bytes), as in DDPO."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000


class JPEG(Reward):
    """DDPO jpeg_incompressibility (sign=+1) / jpeg_compressibility (sign=-1): +/- JPEG q95 size in kB."""
    async_ok = True

    def __init__(self, sign: int):
        super().__init__()
        self.sign = sign
        self.name = "jpeg-incompressibility" if sign > 0 else "jpeg-compressibility"

    def score(self, images, prompts):
        return self.sign * torch.tensor([jpeg_size_kb(im) for im in to_uint8(images)], dtype=torch.float32), {}


# -----------------------------------------------------------------------------
# the shapes world's exact compositional score

class Shapes(Reward):
    """shapes.py's exact score of a caption's atoms (objects, count, relation, no extras), in [0, 1].
    info["categories"]: {single, count, two, relation: (B,) the reward where the prompt is of that category, NaN
    elsewhere; object, count_atom, relation_atom, clean: (B,) each atom's score, NaN where the prompt has none}."""
    name, async_ok = "shapes", True

    def score(self, images, prompts):
        import shapes  # a bottom-floor module; imported here so the other rewards do not need scipy
        try:
            out = shapes.score_batch(to_uint8(images), prompts)
        except ValueError as e:
            raise ValueError(f"rewards.py: the shapes reward scores shapes-world captions only: {e}") from None
        cats = {k: torch.tensor(v, dtype=torch.float32) for k, v in out.items() if k != "reward"}
        return torch.tensor(out["reward"], dtype=torch.float32), {"categories": cats}


# -----------------------------------------------------------------------------
# weighted sums

class WeightedSum(Reward):
    """R = sum_k w_k r_k. info: components {name: (B,)}, weights, details {name: component info}, dropped (indices
    with a non-finite total), warnings (one line each)."""

    def __init__(self, parts: list[tuple[str, float, Reward]]):
        super().__init__()
        self.parts = parts
        self.name = ",".join(n if w == 1 else f"{n}={w:g}" for n, w, _ in parts)
        self.async_ok = all(r.async_ok for _, _, r in parts)

    def score(self, images, prompts):
        total = torch.zeros(len(prompts), device=images.device)
        components, details, warns = {}, {}, []
        for name, weight, reward in self.parts:
            s, info = reward(images, prompts)
            components[name] = s
            total = total + weight * s
            if info:
                details[name] = info
            warns += info.get("warnings", [])
            bad = (~finite_mask(s)).nonzero().flatten().tolist()
            if bad and len(self.parts) > 1:   # which part failed; with one part the total's message says it
                warns.append(f"{name}: non-finite score for images {bad}")
        mask, message = drop_nonfinite(total, self.name)
        if message:
            warns.append(message)
        return total, {"components": components, "weights": {n: w for n, w, _ in self.parts}, "details": details,
                       "dropped": (~mask).nonzero().flatten().tolist(), "warnings": warns}


# -----------------------------------------------------------------------------
# names, options, build_reward

REWARDS: dict[str, str] = {  # name -> one line for --help
    "hps": "HPSv2.1 human preference (= hps-v2.1): cosine of open_clip ViT-H-14 image/text features, ~0.25-0.37",
    "hps-v2.1": "HPSv2.1 (xswu/HPSv2 HPS_v2.1_compressed.pt)",
    "hps-v2.0": "HPSv2.0 (xswu/HPSv2 HPS_v2_compressed.pt); not comparable with v2.1 scores",
    "aesthetic": "LAION aesthetic predictor v2 on CLIP ViT-L/14 (DDPO), ~5-6 for SD images",
    "pickscore": "PickScore_v1: exp(logit_scale) x CLIP ViT-H/14 cosine, ~18-23",
    "imagereward": "ImageReward v1.0: BLIP's BERT cross-attending to ViT-L/16 image tokens, an MLP, normalised "
                   "(~N(0,1); SD 1.4 ~0.13); rewards_imagereward.py",
    "jpeg-compressibility": "minus the JPEG (q95) size in kB: rewards simple, smooth images (DDPO)",
    "jpeg-incompressibility": "the JPEG (q95) size in kB: rewards detailed, textured images (DDPO)",
    "shapes": "the shapes world's exact compositional score in [0, 1]: objects, counts, relations (shapes.py)",
    "compositional": "Zhang et al.'s detection reward: mean over the prompt's objects of OWLv2's best box "
                     "confidence (prompts like 'a cat next to a dog'; rewards_detect.py)",
    "diversity": "mean pairwise CLIP ViT-L/14 cosine distance within each prompt's group, shared by the group",
    "fairness": "minus the statistical parity of each prompt's group over attribute buckets (CLIP zero-shot over "
                "fairness_attributes, or a remote classifier): 0 when the group is spread evenly (Zhang et al.)",
    "ranker": "AI feedback: an OpenAI-compatible vision chat model ranks each prompt's images, best 1 .. worst 0",
    "remote": "POST PNGs + prompts as JSON to remote_url, read {'scores': [...]} back (any model, any machine)",
}
REWARD_NAMES = tuple(REWARDS)
_ALIASES = {"hps": "hps-v2.1"}

OPTIONS: dict[str, tuple[type, object, str]] = {  # name -> (type, default, help); values may come as CLI strings
    "precision": (str, "auto", "autocast dtype of model rewards on CUDA: auto (each recipe's own: fp16 amp for HPS, "
                               "fp32 for aesthetic, PickScore, diversity) | fp16 | bf16 | fp32"),
    "chunk_size": (int, 64, "images per model forward"),
    "quantize": (bool, True, "round images to 8-bit levels before scoring, as a saved PNG (published recipes)"),
    "hps_checkpoint": (str, None, f"local HPS .pt (default: hub {HPS_REPO})"),
    "hps_arch": (str, "ViT-H-14", "open_clip architecture of the HPS checkpoint, or a JSON model config path"),
    "clip_path": (str, "openai/clip-vit-large-patch14", "CLIP for aesthetic/diversity/fairness: hub id or local "
                                                        "folder"),
    "aesthetic_checkpoint": (str, None, f"local aesthetic MLP .pth (default: hub {AESTHETIC_REPO})"),
    "pickscore_path": (str, "yuvalkirstain/PickScore_v1", "PickScore CLIPModel: hub id or local folder"),
    "pickscore_processor": (str, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "PickScore processor: hub id or folder"),
    "imagereward_checkpoint": (str, None, f"local ImageReward.pt (default: hub {IMAGEREWARD_REPO})"),
    "imagereward_tokenizer": (str, "bert-base-uncased", "ImageReward's BERT WordPiece tokenizer: hub id, local folder "
                                                        "or vocab.txt"),
    "imagereward_config": (str, None, "JSON of ImageRewardConfig fields over the v1.0 architecture (tests use a "
                                      "tiny one)"),
    "ranker_url": (str, None, "base URL of an OpenAI-compatible API, e.g. http://localhost:8000/v1"),
    "ranker_model": (str, None, "model name sent to the ranker endpoint"),
    "ranker_api_key_env": (str, "OPENAI_API_KEY", "environment variable holding the ranker API key (if set)"),
    "ranker_criteria": (str, "how well the image matches the prompt and its overall visual quality",
                        "what the ranker judges"),
    "ranker_concurrency": (int, 4, "prompt groups ranked in parallel"),
    "detector_path": (str, "google/owlv2-base-patch16-ensemble", "OWLv2 detector of the compositional reward: "
                      "hub id or local folder (model + processor)"),
    "remote_url": (str, None, "URL that scores images (wire format in rewards_http.py)"),
    "fairness_attributes": (str, None, "text file of the fairness reward's attributes, one CLIP text per line (at "
                            "least 2; '#' lines skipped), e.g. 'a photo of a person with dark skin'"),
    "fairness_remote_url": (str, None, "URL of a classifier answering bucket indices 0..|A|-1 in the remote wire "
                            "format, instead of CLIP zero-shot"),
    "fairness_buckets": (int, None, "|A| for fairness_remote_url when no fairness_attributes file gives it"),
    "http_timeout": (float, 60.0, "seconds per HTTP attempt (ranker, remote, fairness_remote_url)"),
    "http_retries": (int, 3, "extra attempts after a failed request"),
    "http_backoff": (float, 1.0, "seconds before the first retry, doubled each retry"),
}


def reward_help() -> str:
    """Text for --help: every reward name and option."""
    import textwrap

    def rows(items) -> str:   # name, then its text wrapped to 100 columns under itself
        return "\n".join(textwrap.fill(text, 100, initial_indent=f"  {name:<24} ", subsequent_indent=" " * 27,
                                       break_on_hyphens=False)
                         for name, text in items)
    opts = ((n, h + ("" if d is None else f" (default: {d})")) for n, (_, d, h) in OPTIONS.items())
    return (f"rewards (spec: NAME or NAME=WEIGHT,NAME=WEIGHT,...):\n{rows(REWARDS.items())}\n"
            f"reward options (--reward-option NAME=VALUE):\n{rows(opts)}")


def parse_spec(spec: str) -> list[tuple[str, float]]:
    """'hps=1,aesthetic=0.05' -> [('hps', 1.0), ('aesthetic', 0.05)]; a bare name has weight 1."""
    items = [s.strip() for s in str(spec).split(",")]
    if not all(items):
        raise ValueError(f"rewards.py: empty entry in reward spec {spec!r}; use e.g. 'hps' or 'hps=1,aesthetic=0.05'")
    parts, seen = [], set()
    for item in items:
        name, eq, w = (s.strip() for s in item.partition("="))
        if name not in REWARDS:
            raise ValueError(f"rewards.py: unknown reward {name!r} in spec {spec!r}; valid names: {', '.join(REWARDS)}")
        try:
            weight = float(w) if eq else 1.0
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise ValueError(f"rewards.py: weight {w!r} of {name!r} in spec {spec!r} is not a finite number")
        if _ALIASES.get(name, name) in seen:
            raise ValueError(f"rewards.py: {name!r} appears twice in spec {spec!r}; give each reward once")
        seen.add(_ALIASES.get(name, name))
        parts.append((name, weight))
    return parts


def _coerce(name: str, value, typ: type):
    if value is None or isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
        return value
    words = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
    if typ is bool and isinstance(value, str) and value.lower() in words:
        return words[value.lower()]
    try:
        if typ is bool:
            raise ValueError
        return typ(value)
    except (TypeError, ValueError):
        raise ValueError(f"rewards.py: option {name}={value!r} is not a valid {typ.__name__}") from None


def resolve_options(options: dict) -> dict:
    """Defaults + given options, typed and checked (unknown names are an error, None means the default)."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"rewards.py: unknown reward option(s) {unknown}; valid options: {', '.join(OPTIONS)}")
    o = {k: d for k, (_, d, _) in OPTIONS.items()}
    o.update({k: _coerce(k, v, OPTIONS[k][0]) for k, v in options.items() if v is not None})
    checks = [(o["precision"] in ("auto", "fp16", "bf16", "fp32"), "precision", "one of auto, fp16, bf16, fp32"),
              (o["chunk_size"] >= 1, "chunk_size", ">= 1"), (o["http_timeout"] > 0, "http_timeout", "> 0"),
              (o["http_retries"] >= 0, "http_retries", ">= 0"), (o["http_backoff"] >= 0, "http_backoff", ">= 0"),
              (o["ranker_concurrency"] >= 1, "ranker_concurrency", ">= 1"),
              (o["fairness_buckets"] is None or o["fairness_buckets"] >= 2, "fairness_buckets", ">= 2")]
    for ok, k, want in checks:
        if not ok:
            raise ValueError(f"rewards.py: option {k}={o[k]!r} must be {want}")
    return o


def options_from_flags(pairs: list[str] | None = None, **flags) -> dict:
    """Command-line reward options -> build_reward's keyword options, checked now (before any model loads).

    pairs: the KEY=VALUE strings of a repeatable --reward-option; flags: options that have their own flag (e.g.
    hps_checkpoint=args.hps_checkpoint), None meaning not given. A dedicated flag wins over the same key in pairs."""
    options = {}
    for pair in pairs or []:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"rewards.py: --reward-option wants KEY=VALUE, got {pair!r}; e.g. --reward-option "
                             "precision=fp32")
        options[key.strip()] = value
    options.update({k: v for k, v in flags.items() if v is not None})
    resolve_options(options)
    return options


def _build_one(name: str, device: torch.device, o: dict, shared: dict) -> Reward:
    name = _ALIASES.get(name, name)
    # "auto": the precision each published recipe scores in — HPSv2 under CUDA amp (fp16), DDPO's aesthetic scorer
    # and PickScore's reference code in fp32 (fp16 moves their scores by ~1e-3)
    precision = o["precision"] if o["precision"] != "auto" else ("fp16" if name.startswith("hps-") else "fp32")
    knobs = dict(precision=precision, chunk_size=o["chunk_size"], quantize=o["quantize"])
    http = dict(timeout=o["http_timeout"], retries=o["http_retries"], backoff=o["http_backoff"])
    if name == "fairness":
        return _build_fairness(device, o, shared, knobs, http)
    if name.startswith("hps-"):
        return HPS(name.removeprefix("hps-"), device, o["hps_checkpoint"], o["hps_arch"], **knobs)
    if name in ("aesthetic", "diversity"):
        if "clip" not in shared:  # one CLIP ViT-L/14 for both
            shared["clip"] = ClipImageEncoder(o["clip_path"], device, **knobs)
        if name == "aesthetic":
            return Aesthetic(shared["clip"], o["aesthetic_checkpoint"])
        return Diversity(shared["clip"])
    if name == "pickscore":
        return PickScore(o["pickscore_path"], o["pickscore_processor"], device, **knobs)
    if name == "imagereward":
        return _build_imagereward(device, o, knobs)
    if name.startswith("jpeg-"):
        return JPEG(-1 if name == "jpeg-compressibility" else 1)
    if name == "shapes":
        return Shapes()
    if name == "compositional":
        from transformers import Owlv2ForObjectDetection, Owlv2Processor
        model = _from_pretrained(Owlv2ForObjectDetection, o["detector_path"], "detector_path")
        processor = _from_pretrained(Owlv2Processor, o["detector_path"], "detector_path")
        return rewards_detect.Compositional(model, processor, device, chunk_size=o["chunk_size"])
    if name == "ranker":
        if not o["ranker_url"] or not o["ranker_model"]:
            raise ValueError("rewards.py: the ranker reward needs ranker_url=<base URL, e.g. http://host:8000/v1> "
                             "and ranker_model=<model name>")
        return rewards_http.Ranker(o["ranker_url"], o["ranker_model"], api_key=os.environ.get(o["ranker_api_key_env"]),
                                   criteria=o["ranker_criteria"], concurrency=o["ranker_concurrency"], **http)
    if not o["remote_url"]:
        raise ValueError("rewards.py: the remote reward needs remote_url=<http://host:port/path>")
    return rewards_http.Remote(o["remote_url"], **http)


def _build_fairness(device: torch.device, o: dict, shared: dict, knobs: dict, http: dict) -> Fairness:
    # the buckets A: the attribute texts of the file (CLIP zero-shot), or a remote classifier's indices 0..|A|-1
    attributes = read_attributes(o["fairness_attributes"]) if o["fairness_attributes"] else None
    if o["fairness_remote_url"]:
        n = o["fairness_buckets"] or (len(attributes) if attributes else None)
        if n is None:
            raise ValueError("rewards.py: fairness_remote_url needs the number of buckets |A|: pass fairness_buckets=N "
                             "or fairness_attributes=FILE (one attribute per line)")
        if attributes and n != len(attributes):
            raise ValueError(f"rewards.py: fairness_buckets={n} but fairness_attributes lists {len(attributes)} "
                             f"attributes; give one of them, or make them agree")
        return Fairness(n, attributes=attributes, remote=rewards_http.Remote(o["fairness_remote_url"], **http))
    if attributes is None:
        raise ValueError("rewards.py: the fairness reward needs fairness_attributes=FILE (one CLIP text per line, e.g. "
                         "'a photo of a person with dark skin') or fairness_remote_url=URL of a bucket classifier")
    if "clip" not in shared:  # the same CLIP ViT-L/14 as aesthetic and diversity
        shared["clip"] = ClipImageEncoder(o["clip_path"], device, **knobs)
    return Fairness(len(attributes), encoder=shared["clip"], attributes=attributes)


def _build_imagereward(device: torch.device, o: dict, knobs: dict) -> rewards_imagereward.ImageReward:
    cfg_path = o["imagereward_config"]
    if cfg_path and not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"rewards.py: imagereward_config={cfg_path!r} is not a file; pass a JSON of "
                                f"ImageRewardConfig fields, or leave it out for the v1.0 architecture")
    try:
        config = rewards_imagereward.ImageRewardConfig.from_json(cfg_path) if cfg_path else \
            rewards_imagereward.ImageRewardConfig()
    except (ValueError, TypeError) as e:   # bad JSON, unknown field names
        raise ValueError(f"rewards.py: imagereward_config={cfg_path!r}: {e}") from None
    path = o["imagereward_checkpoint"] or _hub_file(IMAGEREWARD_REPO, IMAGEREWARD_FILE, "imagereward_checkpoint")
    try:
        sd = _torch_load(path, "imagereward_checkpoint")
    except FileNotFoundError:
        raise
    except Exception as e:   # torch's weights_only refusal is a paragraph; one line instead
        raise ValueError(f"rewards.py: imagereward_checkpoint={path!r} cannot be read by torch.load(weights_only=True) "
                         f"({type(e).__name__}); pass THUDM/ImageReward's {IMAGEREWARD_FILE}") from None
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"rewards.py: {path} is not an ImageReward checkpoint (expected a state dict of tensors); "
                         f"pass imagereward_checkpoint={IMAGEREWARD_FILE} from the hub repo {IMAGEREWARD_REPO}")
    # built on the meta device and given storage on the device without a random init (1.8 GB fp32 that the load
    # overwrites); _load_strict checks that every key of the model is in the file before it copies
    with torch.device("meta"):
        model = rewards_imagereward.ImageRewardModel(config)
    model = model.to_empty(device=device)
    _load_strict(model, sd, f"ImageReward checkpoint {path}",
                 "imagereward_checkpoint (THUDM/ImageReward's ImageReward.pt) and imagereward_config")
    return rewards_imagereward.ImageReward(model, _bert_tokenizer(o["imagereward_tokenizer"], config.vocab_size),
                                           device, **knobs)


def _bert_tokenizer(path: str, vocab_size: int):
    """bert-base-uncased WordPiece from a hub id, a folder or a vocab.txt, with BLIP's [DEC] and [ENC] added."""
    from transformers import BertTokenizer
    if os.path.isfile(path):   # positional: `vocab` in transformers 5, `vocab_file` in 4 (5 ignores vocab_file=)
        tokenizer = BertTokenizer(path)
    else:
        tokenizer = _from_pretrained(BertTokenizer, path, "imagereward_tokenizer")
    rewards_imagereward.add_blip_tokens(tokenizer)
    # transformers 5 gives a 5-token vocabulary instead of an error when bert-base-uncased is not in the cache
    if len(tokenizer) != vocab_size:
        raise ValueError(f"rewards.py: the ImageReward tokenizer from imagereward_tokenizer={path!r} has "
                         f"{len(tokenizer)} tokens with [DEC] and [ENC], the model's vocabulary {vocab_size}; pass "
                         f"{_how_to_pass('imagereward_tokenizer')}, PATH bert-base-uncased's folder or its vocab.txt")
    return tokenizer


def build_reward(spec: str, device="cpu", **options) -> Reward:
    """Build the reward named by `spec` ('hps', 'hps=1,aesthetic=0.05', ...) once; see OPTIONS for the options.

    Always returns a WeightedSum, so info always has components/dropped/warnings; a single bare name returns exactly
    that reward's scores (weight 1).
    """
    parts = parse_spec(spec)
    o = resolve_options(options)
    device, shared = torch.device(device), {}
    return WeightedSum([(name, w, _build_one(name, device, o, shared)) for name, w in parts])
