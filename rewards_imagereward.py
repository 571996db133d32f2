"""
ImageReward v1.0 (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image
Generation"; THUDM/ImageReward): a BLIP image-text model fine-tuned on 137k expert comparisons of generated
images, read out by a small MLP. The prompt is encoded by BLIP's BERT, whose every layer cross-attends to the image
tokens of BLIP's ViT-L/16, and the [CLS] position of that image-grounded text feature is scored:

    e   = ViT-L/16(preprocess(x))                         (B, 197, 1024)   image tokens ([CLS] + 14 x 14 patches)
    h   = BERT(ids, mask, cross-attending to e)[:, 0]     (B, 768)         ids: [CLS] prompt [SEP] [PAD]*, 35 long
    r   = (MLP(h) - 0.16717362830052426) / 1.0333394966054072               (B,)  ~N(0, 1) over the training set

MLP is 768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropouts and no nonlinearities (the ReLUs are commented out in the
reference), so at eval it is one affine map. The mean/std are the published constants of ImageReward.py.

Preprocessing is the package's `_transform(224)` on tensors: shortest side -> 224 bicubic (antialias, as PIL's
bicubic), centre crop 224 with torchvision's rounding of the offset, OpenAI CLIP mean/std. Text: bert-base-uncased
WordPiece (vocabulary 30522 + BLIP's [DEC] 30522 and [ENC] 30523 = 30524 rows), padded to 35 with truncation. The
package keeps [CLS] (101) in front: ImageReward does not swap in [ENC] as BLIP's ITM head does, so neither do we.

Stock transformers cannot express the text tower (its BertModel cross-attends only as a causal decoder, with K/V of
the hidden width 768, not the image width 1024), so both towers are written here. Module attribute names mirror the
keys of THUDM/ImageReward's ImageReward.pt exactly (blip.visual_encoder.*, blip.text_encoder.*, blip.vision_proj.*,
blip.text_proj.*, mlp.layers.{0,2,4,6,7}.*; 625 keys: 446,665,953 parameters and position_ids), so it loads with
load_state_dict(strict=True) and no mapping table. vision_proj/text_proj (BLIP's contrastive heads) are in the
checkpoint but unused by the score. Inference only: the towers' dropouts and drop-path are left out (no weights).

rewards.py loads the weights and the tokenizer and registers the scorer as `--reward imagereward`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from reward_base import OPENAI_MEAN, OPENAI_STD, Reward, quantize



@dataclass(frozen=True)
class ImageRewardConfig:
    """The v1.0 architecture by default: blip.create_vit('large') at 224 px and BLIP's med_config.json."""
    # BLIP ViT-L/16 (vit.py VisionTransformer; qkv bias, LayerNorm eps 1e-6, pre-norm, final norm, no pooling)
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 1024          # also the cross-attention K/V input width (med_config encoder_width := this)
    vision_layers: int = 24
    vision_heads: int = 16
    vision_mlp_ratio: float = 4.0
    # BLIP's BERT-base (med.py BertModel, add_pooling_layer=False; LayerNorm eps 1e-12)
    vocab_size: int = 30524           # bert-base-uncased 30522 + [DEC] + [ENC]
    hidden_size: int = 768            # the MLP head reads this width (ImageReward.py: MLP(768))
    text_layers: int = 12
    text_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    pad_token_id: int = 0
    embed_dim: int = 256              # vision_proj / text_proj outputs (stored, unused)
    # the reward
    max_length: int = 35              # tokenizer padding='max_length', truncation
    mean: float = 0.16717362830052426
    std: float = 1.0333394966054072

    @classmethod
    def from_json(cls, path: str) -> "ImageRewardConfig":
        """Fields given in a JSON file override the v1.0 defaults (unknown names are an error)."""
        with open(path) as f:
            given = json.load(f)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ValueError(f"unknown ImageRewardConfig field(s) {unknown}; valid: {', '.join(sorted(known))}")
        return cls(**given)


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    b, t, d = x.shape   # (B, T, D) -> (B, n, T, D/n)
    return x.view(b, t, n, d // n).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, n, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, n * d)


# -----------------------------------------------------------------------------
# BLIP ViT (timm-style names: patch_embed.proj, cls_token, pos_embed, blocks.N.*, norm)

class PatchEmbed(nn.Module):
    def __init__(self, c: ImageRewardConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, c.vision_width, c.patch_size, stride=c.patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)   # (B, 3, H, W) -> (B, HW/p^2, D)


class VitAttention(nn.Module):
    def __init__(self, c: ImageRewardConfig):
        super().__init__()
        self.heads = c.vision_heads
        self.qkv = nn.Linear(c.vision_width, 3 * c.vision_width)   # qkv_bias=True
        self.proj = nn.Linear(c.vision_width, c.vision_width)

    def forward(self, x):
        q, k, v = (_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        return self.proj(_merge(F.scaled_dot_product_attention(q, k, v)))   # scale head_dim^-0.5, no mask


class VitMlp(nn.Module):
    def __init__(self, c: ImageRewardConfig):
        super().__init__()
        hidden = int(c.vision_width * c.vision_mlp_ratio)
        self.fc1, self.fc2 = nn.Linear(c.vision_width, hidden), nn.Linear(hidden, c.vision_width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))   # nn.GELU: the exact erf form


class VitBlock(nn.Module):
    def __init__(self, c: ImageRewardConfig):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(c.vision_width, eps=1e-6), nn.LayerNorm(c.vision_width, eps=1e-6)
        self.attn, self.mlp = VitAttention(c), VitMlp(c)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, c: ImageRewardConfig):
        super().__init__()
        n = (c.image_size // c.patch_size) ** 2
        self.patch_embed = PatchEmbed(c)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.vision_width))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, c.vision_width))
        self.blocks = nn.ModuleList(VitBlock(c) for _ in range(c.vision_layers))
        self.norm = nn.LayerNorm(c.vision_width, eps=1e-6)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1).to(x.dtype), x], dim=1) + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)   # (B, 1 + n, D): every token, the text tower cross-attends to all of them


# -----------------------------------------------------------------------------
# BLIP's BERT (med.py names: embeddings.*, encoder.layer.N.{attention, crossattention, intermediate, output}.*)

class BertEmbeddings(nn.Module):
    """Word + absolute position embeddings, LayerNorm. BLIP's BERT has no token-type embeddings."""

    def __init__(self, c: ImageRewardConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=1e-12)
        # persistent, as in med.py: ImageReward.pt stores it, so strict loading expects it
        self.register_buffer("position_ids", torch.arange(c.max_position_embeddings).expand((1, -1)))

    def forward(self, ids):
        pos = self.position_ids[:, :ids.shape[1]]
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(pos))


class BertSelfAttention(nn.Module):
    """query from the text; key/value from the text (self) or from the image tokens (cross, width kv_width)."""

    def __init__(self, c: ImageRewardConfig, kv_width: int):
        super().__init__()
        self.heads = c.text_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key, self.value = nn.Linear(kv_width, c.hidden_size), nn.Linear(kv_width, c.hidden_size)

    def forward(self, x, context, bias):
        q, k, v = _heads(self.query(x), self.heads), _heads(self.key(context), self.heads), \
            _heads(self.value(context), self.heads)
        return _merge(F.scaled_dot_product_attention(q, k, v, attn_mask=bias))


class BertSelfOutput(nn.Module):
    def __init__(self, c: ImageRewardConfig, inner: int):
        super().__init__()
        self.dense = nn.Linear(inner, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=1e-12)

    def forward(self, h, residual):
        return self.LayerNorm(self.dense(h) + residual)   # post-norm, as BERT


class BertAttention(nn.Module):
    def __init__(self, c: ImageRewardConfig, kv_width: int):
        super().__init__()
        self.self = BertSelfAttention(c, kv_width)
        self.output = BertSelfOutput(c, c.hidden_size)

    def forward(self, x, context, bias=None):
        return self.output(self.self(x, context, bias), x)


class BertIntermediate(nn.Module):
    def __init__(self, c: ImageRewardConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))   # hidden_act "gelu": the exact erf form


class BertLayer(nn.Module):
    """Bidirectional self-attention (padding masked), cross-attention to every image token, feed-forward: the
    'multimodal' mode of med.py, which ImageReward runs in every layer."""

    def __init__(self, c: ImageRewardConfig):
        super().__init__()
        self.attention = BertAttention(c, c.hidden_size)
        self.crossattention = BertAttention(c, c.vision_width)
        self.intermediate = BertIntermediate(c)
        self.output = BertSelfOutput(c, c.intermediate_size)

    def forward(self, x, image, pad_bias):
        x = self.attention(x, x, pad_bias)
        x = self.crossattention(x, image)   # the image mask is all ones: nothing to mask
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, c: ImageRewardConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(c) for _ in range(c.text_layers))


class BertModel(nn.Module):
    def __init__(self, c: ImageRewardConfig):
        super().__init__()
        self.embeddings = BertEmbeddings(c)
        self.encoder = BertEncoder(c)

    def forward(self, ids, mask, image):
        """ids, mask (B, L) long; image (B, N, vision_width) -> (B, L, hidden_size)."""
        x = self.embeddings(ids)
        # med.py get_extended_attention_mask: additive -10000 on padded keys (not finfo.min), broadcast over heads
        # and queries; cast to the activations' dtype as med.py does (fp16: -10000 is representable)
        pad_bias = ((1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0)
        for layer in self.encoder.layer:
            x = layer(x, image.to(x.dtype), pad_bias.to(x.dtype))
        return x


class BLIP(nn.Module):
    """The parts of BLIP_Pretrain that ImageReward.pt stores."""

    def __init__(self, c: ImageRewardConfig):
        super().__init__()
        self.visual_encoder = VisionTransformer(c)
        self.text_encoder = BertModel(c)
        self.vision_proj = nn.Linear(c.vision_width, c.embed_dim)
        self.text_proj = nn.Linear(c.hidden_size, c.embed_dim)


class MLP(nn.Module):
    """ImageReward.py's head; the Dropout slots keep the checkpoint's indices layers.{0,2,4,6,7}."""

    def __init__(self, dim: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


class ImageRewardModel(nn.Module):
    """pixels (B,3,S,S) normalised (see `preprocess`), ids/mask (B,L) -> (B,) the normalised ImageReward score."""

    def __init__(self, config: ImageRewardConfig | None = None):
        super().__init__()
        self.config = c = config or ImageRewardConfig()
        self.blip = BLIP(c)
        self.mlp = MLP(c.hidden_size)

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        image = self.blip.visual_encoder(pixels)                     # (B, N, vision_width)
        feature = self.blip.text_encoder(ids, mask, image)[:, 0]     # (B, hidden): the [CLS] position
        # the head in fp32 whatever the towers ran in (score() casts the feature .float() before the MLP)
        amp = feature.device.type in ("cuda", "cpu")   # (the meta device, used to count FLOPs, has no autocast)
        with torch.autocast(feature.device.type, enabled=False) if amp else contextlib.nullcontext():
            r = self.mlp(feature.float()).squeeze(-1)
        return (r - self.config.mean) / self.config.std


# -----------------------------------------------------------------------------
# preprocessing and text

def preprocess(x: torch.Tensor, size: int = 224) -> torch.Tensor:
    """(B,3,H,W) [0,1] -> (B,3,size,size) normalised: ImageReward's _transform (Resize(size, BICUBIC),
    CenterCrop(size), ToTensor, Normalize(OpenAI)) on tensors.

    Resize: the shorter side -> size, the longer int-truncated (torchvision's rule), bicubic with antialias (what
    torchvision's Resize does on tensors; PIL's bicubic on the package's PIL path differs by ~1 8-bit level, measured
    in tests/test_imagereward.py), clipped to [0,1] as the 8-bit PIL image is. CenterCrop: torchvision rounds the
    offset, round((n - size) / 2) (CLIPImageProcessor floors it; they differ by a pixel when n - size is 3 mod 4).
    """
    h, w = x.shape[-2:]
    long_side = int(size * max(h, w) / min(h, w))
    nh, nw = (size, long_side) if h <= w else (long_side, size)
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(OPENAI_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def add_blip_tokens(tokenizer):
    """BLIP's init_tokenizer on a bert-base-uncased BertTokenizer: bos [DEC] and the extra special [ENC] (ids 30522,
    30523 on the real vocabulary), so special-token handling and the vocabulary size (30524) are the package's."""
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def tokenize(tokenizer, prompts: list[str], max_length: int = 35) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ids, mask) (P, max_length) long: [CLS] ... [SEP] [PAD]*, truncated, as ImageReward.score tokenizes."""
    t = tokenizer(prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return t["input_ids"], t["attention_mask"]


# -----------------------------------------------------------------------------
# the reward

class ImageReward(Reward):
    """r(x, c): ImageReward v1.0 of each image with its prompt (~N(0,1); SD 1.4 ~0.13, SD 2.1 ~0.25 on real user
    prompts in the paper). The text tower runs once per image (it cross-attends to that image); each distinct prompt
    is tokenized once. Built by rewards.py (weights, tokenizer); fp32 by default, as the reference runs."""
    name = "imagereward"

    def __init__(self, model: ImageRewardModel, tokenizer, device="cpu", precision: str = "fp32",
                 chunk_size: int = 64, quantize: bool = True):
        super().__init__()
        self.device, self.precision = torch.device(device), precision
        self.chunk_size, self.quantize = chunk_size, quantize
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer

    def score(self, images, prompts):
        uniq = list(dict.fromkeys(prompts))   # DDPO batches hold k images per prompt: tokenize each once
        row = {p: i for i, p in enumerate(uniq)}
        where = torch.tensor([row[p] for p in prompts], device=self.device)
        ids, mask = (t.to(self.device) for t in tokenize(self.tokenizer, uniq, self.model.config.max_length))
        x = images.to(self.device, torch.float32)
        x = quantize(x) if self.quantize else x.clamp(0, 1)
        cuda_amp = self.device.type == "cuda" and self.precision != "fp32"
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        out = []
        for i in range(0, len(x), self.chunk_size):
            w = where[i:i + self.chunk_size]
            px = preprocess(x[i:i + self.chunk_size], self.model.config.image_size)
            with torch.autocast("cuda", dtype=dtype, enabled=cuda_amp):
                out.append(self.model(px, ids[w], mask[w]))
        return torch.cat(out).float(), {}


def flops_per_image(config: ImageRewardConfig | None = None) -> int:
    """Forward FLOPs (2 x multiply-adds of the matmuls, convolution and attention) of one image with one prompt of
    max_length tokens; the text tower is counted per image because it cross-attends to the image. Layer norms,
    softmax and GELU are left out (well under 1%). tests/test_imagereward.py checks this against torch's counter."""
    c = config or ImageRewardConfig()
    n, d = (c.image_size // c.patch_size) ** 2 + 1, c.vision_width
    hidden = int(d * c.vision_mlp_ratio)
    vit = (n - 1) * 3 * c.patch_size ** 2 * d + c.vision_layers * (n * (4 * d * d + 2 * d * hidden) + 2 * n * n * d)
    t, h = c.max_length, c.hidden_size
    per_layer = (4 * t * h * h + 2 * t * t * h                      # self-attention: q, k, v, out; scores and mix
                 + 2 * t * h * h + 2 * n * d * h + 2 * t * n * h     # cross-attention: q, out; k, v of n image tokens
                 + 2 * t * h * c.intermediate_size)                  # feed-forward
    head = h * 1024 + 1024 * 128 + 128 * 64 + 64 * 16 + 16
    return 2 * (vit + c.text_layers * per_layer + head)

