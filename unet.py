"""
The Stable Diffusion denoiser: a text-conditioned UNet eps_theta(x_t, t, c) (Rombach et al. 2022, eq. 2),
trained with the "simple" DDPM objective  E || eps - eps_theta(x_t, t, tau(y)) ||^2  on VAE latents x_t.

x_t (B,4,h,w) goes down through resnet(+cross-attention) levels, through a middle block and back up with
skip connections; the timestep enters every resnet as a sinusoidal embedding (Ho et al. 2020), the text
context c enters every transformer via cross-attention softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017).
Covers SD 1.x (conv proj_in/out, 8 heads, 768-wide context), SD 2.x (linear proj_in/out, head dim 64,
1024-wide context, fp16-safe attention for 2.1-v) and SDXL (Podell et al. 2023): three levels, the first without
attention, 1/2/10 transformer blocks per level, a 2048-wide context, and "micro-conditioning": the pooled text
embedding and six size/crop numbers (time ids) are embedded and added to the timestep embedding. Every module is
named after diffusers' UNet2DConditionModel keys, so a diffusers state_dict loads with
load_state_dict(strict=True) and no mapping.
"""

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------------------------------------
# config

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers config keys that describe features SD 1.x/2.x never use: accepted only at the value SD has
_FIXED = {
    "act_fn": "silu", "center_input_sample": False, "downsample_padding": 1, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False, "dual_cross_attention": False,
    "reverse_transformer_layers_per_block": None, "dropout": 0.0,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "class_embed_type": None, "num_class_embeds": None,
    "class_embeddings_concat": False, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
    "mid_block_only_cross_attention": None, "cross_attention_norm": None,
}
# diffusers keys that only matter together with a feature rejected above (their defaults are harmless):
# the heads of addition_embed_type "text" (Kandinsky-style), which SDXL's "text_time" does not use
_IGNORED = {"addition_embed_type_num_heads"}
# added embeddings we implement: None (SD 1.x/2.x) and SDXL's pooled text + size/crop "time ids"
_ADDITION_TYPES = (None, "text_time")


def _off(v) -> bool:
    return v is None or v is False   # diffusers writes "feature off" both ways


def _uniform(d: dict, key: str, default):
    """A diffusers per-level value (int or list) that we support only when the same on every level."""
    v = d.get(key, default)
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise ValueError(f"unet.py: config {key}={v} varies per level; only one value for all levels is supported")
        v = v[0]
    return v


@dataclass
class UNetConfig:
    in_channels: int = 4                  # 9 for inpainting models (only conv_in changes)
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280, 1280)
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: int = 2
    num_attention_heads: tuple = (8, 8, 8, 8)   # heads per level (diffusers' misnamed attention_head_dim)
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    sample_size: int = 64
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    # transformer blocks in each attention of a level (SDXL: 1, 2, 10); the mid block uses the last level's
    # count and the up levels the reversed list, as diffusers builds them
    transformer_layers_per_block: tuple = 1   # an int: the same on every level
    # SDXL's added conditioning ("text_time"): the 6 time ids through the sinusoidal embedding of width
    # addition_time_embed_dim (256), concatenated after the pooled text embedding (1280), give
    # projection_class_embeddings_input_dim (2816) inputs to add_embedding, whose output is added to the time
    # embedding. None for SD 1.x/2.x.
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    def __post_init__(self):
        n = len(self.block_out_channels)
        for name in ("num_attention_heads", "transformer_layers_per_block"):
            if isinstance(getattr(self, name), int):
                setattr(self, name, (getattr(self, name),) * n)
        for name in ("block_out_channels", "down_block_types", "up_block_types", "num_attention_heads",
                     "transformer_layers_per_block"):
            setattr(self, name, tuple(getattr(self, name)))
            if len(getattr(self, name)) != n:
                raise ValueError(f"unet.py: UNetConfig.{name} has {len(getattr(self, name))} entries but "
                                 f"block_out_channels has {n}; give one per level")
        if not all(isinstance(k, int) and k >= 1 for k in self.transformer_layers_per_block):
            raise ValueError(f"unet.py: transformer_layers_per_block={list(self.transformer_layers_per_block)} must "
                             "be one positive int per level (per-layer lists are not supported)")
        if self.addition_embed_type not in _ADDITION_TYPES:
            raise ValueError(f"unet.py: addition_embed_type={self.addition_embed_type!r} is not supported; only "
                             "SDXL's 'text_time' (or none) is implemented")
        if self.addition_embed_type == "text_time":
            dim, total = self.addition_time_embed_dim, self.projection_class_embeddings_input_dim
            if not isinstance(dim, int) or not isinstance(total, int) or total <= 6 * dim:
                raise ValueError(f"unet.py: addition_embed_type 'text_time' needs addition_time_embed_dim (SDXL: 256) "
                                 f"and projection_class_embeddings_input_dim = pooled width + 6 * that (SDXL: 2816), "
                                 f"got {dim} and {total}")
        if not set(self.down_block_types) <= set(_DOWN_TYPES) or not set(self.up_block_types) <= set(_UP_TYPES):
            raise ValueError(f"unet.py: unsupported block types {self.down_block_types} / {self.up_block_types}; "
                             f"use {_DOWN_TYPES} for down blocks and {_UP_TYPES} for up blocks")
        if not isinstance(self.norm_num_groups, int):
            raise ValueError(f"unet.py: norm_num_groups must be an int (SD uses 32), got {self.norm_num_groups!r}")
        for c, h in zip(self.block_out_channels, self.num_attention_heads):
            if c % self.norm_num_groups or c % h:
                raise ValueError(f"unet.py: {c} channels must be divisible by norm_num_groups="
                                 f"{self.norm_num_groups} and by the {h} attention heads of that level")

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        """Build from a diffusers unet/config.json dict; raises ValueError for features SD 1.x/2.x lack."""
        for key, value in d.items():
            if key.startswith("_") or key in _IGNORED or key in cls.__dataclass_fields__ or key == "attention_head_dim":
                continue
            if key not in _FIXED:
                raise ValueError(f"unet.py: unknown UNet config key {key!r}={value!r}; not a SD 1.x/2.x UNet config")
            required = _FIXED[key]
            if isinstance(value, (list, tuple)) and not isinstance(required, (list, tuple)):
                value = _uniform(d, key, required)   # e.g. only_cross_attention [false, false, ...]
            if value != required and not (_off(value) and _off(required)):
                raise ValueError(f"unet.py: config {key}={value!r} is not supported (SD 1.x/2.x use {required!r}); "
                                 "SDXL-style, class-conditional and other UNet variants are out of scope")
        n = len(d.get("block_out_channels", cls.block_out_channels))
        # The diffusers naming bug (issue #2011): the field called `attention_head_dim` holds the number of
        # heads, and UNet2DConditionModel uses it as `num_attention_heads` (which diffusers itself refuses to be
        # set). So SD1's "attention_head_dim": 8 means 8 heads of dim 40/80/160, and SD2's [5, 10, 20, 20]
        # means a fixed head dim of 64. A real `num_attention_heads`, if ever given, wins.
        heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
        heads = (heads,) * n if isinstance(heads, int) else tuple(heads)
        kw = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k != "num_attention_heads"}
        kw["layers_per_block"] = _uniform(d, "layers_per_block", cls.layers_per_block)
        kw["cross_attention_dim"] = _uniform(d, "cross_attention_dim", 1280)  # diffusers' default is 1280
        kw["use_linear_projection"] = bool(d.get("use_linear_projection", False))
        kw["upcast_attention"] = bool(d.get("upcast_attention", False))
        return cls(num_attention_heads=heads, **kw)

    def to_dict(self) -> dict:
        """A diffusers unet/config.json dict (UNet2DConditionModel.from_config builds the same model)."""
        d = {"_class_name": "UNet2DConditionModel", **asdict(self)}
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        d["attention_head_dim"] = d.pop("num_attention_heads")   # the naming bug, see from_dict
        # SD's config.json stays as it was before SDXL support: the SDXL keys only when they are in use
        if self.addition_embed_type is None:
            for k in ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                del d[k]
        if set(self.transformer_layers_per_block) == {1}:
            del d["transformer_layers_per_block"]
        d.update(act_fn="silu", center_input_sample=False, downsample_padding=1, mid_block_scale_factor=1,
                 mid_block_type="UNetMidBlock2DCrossAttn")   # diffusers' defaults, written out as the hub files do
        return d

    @classmethod
    def preset(cls, name: str) -> "UNetConfig":
        sd2 = dict(num_attention_heads=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True)
        presets = {
            "sd15": dict(),
            "sd21-base": sd2,
            "sd21-v": dict(sd2, upcast_attention=True, sample_size=96),
            # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (heads: 64 wide; level 0 has none)
            "sdxl-base": dict(block_out_channels=(320, 640, 1280), num_attention_heads=(5, 10, 20),
                              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                              transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
                              use_linear_projection=True, sample_size=128, addition_embed_type="text_time",
                              addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
        }
        if name not in presets:
            raise ValueError(f"unet.py: unknown preset {name!r}; choose one of {sorted(presets)}")
        return cls(**presets[name])


# -----------------------------------------------------------------------------------------------------------
# SDXL's conditioning: token embeddings plus the added conditioning, carried as one batch


@dataclass
class Conditioning:
    """What an SDXL UNet is conditioned on, as one object that samplers and the trainer move around like the
    (B,77,D) embedding tensor of SD 1.x/2.x: `c[idx]`, `c.expand(B, *c.shape[1:])`, `c.to(device or dtype)`,
    `torch.cat([u, c])`, `c.shape` / `c.dtype` / `c.device` (those of the token embeddings) act on the batch
    dimension of every field. So CFG (cat of uncond and cond), batch slicing and the DDPO update carry the added
    conditioning without a code path of their own; UNet2DConditionModel.forward accepts it in place of the tensor.

    embeds (B,77,2048): both text encoders' penultimate hidden states, concatenated on the feature axis;
    text_embeds (B,1280): text_encoder_2's pooled, projected embedding; time_ids (B,6): original size (h, w),
    crop top-left (top, left), target size (h, w) in pixels. Field names are diffusers' added_cond_kwargs keys."""
    embeds: torch.Tensor
    text_embeds: torch.Tensor
    time_ids: torch.Tensor

    def _map(self, fn) -> "Conditioning":
        return Conditioning(*(fn(getattr(self, f.name)) for f in fields(self)))

    @property
    def added_cond_kwargs(self) -> dict:
        return {"text_embeds": self.text_embeds, "time_ids": self.time_ids}

    @property
    def shape(self) -> torch.Size:
        return self.embeds.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.embeds.dtype

    @property
    def device(self) -> torch.device:
        return self.embeds.device

    def __len__(self) -> int:
        return len(self.embeds)

    def __getitem__(self, idx) -> "Conditioning":
        assert not isinstance(idx, tuple), "index a Conditioning on its batch dimension only"
        return self._map(lambda v: v[idx])

    def expand(self, batch: int, *rest) -> "Conditioning":
        """Broadcast a batch of 1 to `batch`; `rest` is the token embeddings' trailing shape (Tensor.expand style)."""
        assert all(r in (-1, s) for r, s in zip(rest, self.embeds.shape[1:])), (rest, tuple(self.embeds.shape))
        return self._map(lambda v: v.expand(batch, *v.shape[1:]))

    def to(self, *args, **kwargs) -> "Conditioning":
        return self._map(lambda v: v.to(*args, **kwargs))   # time ids too: diffusers keeps them in the embeds' dtype

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # only torch.cat along the batch, which CFG and the trainer use; anything else is a bug, not a silent no-op
        kwargs = kwargs or {}
        if func is not torch.cat or kwargs.get("dim", args[1] if len(args) > 1 else 0) != 0:
            raise TypeError(f"unet.Conditioning supports torch.cat along dim 0 only, not {func.__name__}")
        parts = list(args[0])
        if not all(isinstance(p, Conditioning) for p in parts):
            raise TypeError("torch.cat: cannot mix unet.Conditioning (SDXL) with plain embedding tensors")
        return Conditioning(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)))


# -----------------------------------------------------------------------------------------------------------
# building blocks


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: int = 0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim) fp32: f_i = exp(-ln(10000) i / (half - shift))."""
    half = dim // 2
    # written exactly as diffusers/LDM do: 10000**(-i/half) differs in the last bits
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    args = t[:, None].float() * torch.exp(exponent)[None, :]
    sin, cos = torch.sin(args), torch.cos(args)
    return torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, cin: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(cin, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        # no activation after linear_2: every resnet applies its own SiLU before time_emb_proj
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))   # (dropout 0 in SD: omitted)
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Multi-head (cross-)attention over tokens (B, L, C); keys/values from `context` when given."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, upcast: bool = False):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        # to_out.1 is diffusers' Dropout(p=0): never called, kept so that the to_out.0 keys line up
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])

    def forward(self, x, context=None):
        B, L, C = x.shape
        ctx = x if context is None else context
        q = self.to_q(x).view(B, L, self.heads, -1).transpose(1, 2)   # (B, nh, L, hd)
        k = self.to_k(ctx).view(B, ctx.shape[1], self.heads, -1).transpose(1, 2)
        v = self.to_v(ctx).view(B, ctx.shape[1], self.heads, -1).transpose(1, 2)
        if self.upcast and q.dtype == torch.float16:
            # SD 2.1-v: raw q.k overflows fp16 (NaN, black images). SDPA's fused kernels accumulate the scores
            # in fp32 anyway; scaling q first keeps q.k/sqrt(d) in range even for a kernel that does not.
            # (bf16 has fp32's exponent range and fp32 needs no help, so they take the plain path.)
            y = F.scaled_dot_product_attention(q * q.shape[-1] ** -0.5, k, v, scale=1.0)
        else:
            y = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](y.transpose(1, 2).reshape(B, L, C))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)   # the gate is the SECOND half
        return a * F.gelu(gate)                    # exact erf GELU, not tanh


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        # net.1 is diffusers' Dropout(p=0), never called; it keeps net.2 at index 2
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, GEGLU MLP; each with a residual."""

    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
    """Image (B,C,H,W) -> H*W tokens -> transformer block(s) -> image, plus a residual ("SpatialTransformer")."""

    def __init__(self, dim: int, heads: int, cfg: UNetConfig, layers: int = 1):
        super().__init__()
        self.linear = cfg.use_linear_projection
        self.norm = nn.GroupNorm(cfg.norm_num_groups, dim, eps=1e-6)   # 1e-6 here, not norm_eps
        # SD1: 1x1 convs applied on the image; SD2: Linears on the tokens. Equal maths, not equal bits.
        proj = nn.Linear if self.linear else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = proj(dim, dim)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(dim, heads, cfg.cross_attention_dim, cfg.upcast_attention) for _ in range(layers)])
        self.proj_out = proj(dim, dim)

    def forward(self, x, context, run=None):
        """run(block, h, context): how to call each transformer block (the UNet passes its checkpointing)."""
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)   # tokens (B, HW, C); a free view for channels_last
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context) if run is None else run(block, h, context)
        if self.linear:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)   # (B, C, H, W) view with channels_last strides
        if not self.linear:
            fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
            return self.proj_out(h.contiguous(memory_format=fmt)) + x
        return x + h   # x first: the add writes its result in x's memory format, no separate copy


class Downsample2D(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, size):
        # nearest x2 to the size of the skip it meets next, so odd latent sizes line up (e.g. 7 -> 4 -> 7)
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class UNetBlock(nn.Module):
    """One resolution level: resnets, optionally a transformer after each, optionally a resampler. Only a
    container (diffusers' key layout); UNet2DConditionModel.forward runs it, so the data flow reads in one place."""

    def __init__(self, resnets: list, attentions: list | None = None, downsample: nn.Module | None = None,
                 upsample: nn.Module | None = None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        self.downsamplers = nn.ModuleList([downsample]) if downsample else None
        self.upsamplers = nn.ModuleList([upsample]) if upsample else None


# -----------------------------------------------------------------------------------------------------------
# the UNet


class UNet2DConditionModel(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        self.gradient_checkpointing = False
        ch, n, L = cfg.block_out_channels, len(cfg.block_out_channels), cfg.layers_per_block
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], 4 * ch[0])
        if cfg.addition_embed_type == "text_time":   # SDXL: [pooled text, time-id embeddings] -> + time embedding
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, 4 * ch[0])

        res = lambda cin, cout: ResnetBlock2D(cin, cout, 4 * ch[0], cfg.norm_num_groups, cfg.norm_eps)
        attn = lambda c, heads, k, depth: [Transformer2DModel(c, heads, cfg, depth) for _ in range(k)]
        depth = cfg.transformer_layers_per_block

        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.down_block_types):
            cin = ch[max(i - 1, 0)]
            self.down_blocks.append(UNetBlock(
                [res(cin if j == 0 else ch[i], ch[i]) for j in range(L)],
                attn(ch[i], cfg.num_attention_heads[i], L, depth[i]) if kind.startswith("CrossAttn") else None,
                downsample=Downsample2D(ch[i]) if i < n - 1 else None))
        self.mid_block = UNetBlock([res(ch[-1], ch[-1]), res(ch[-1], ch[-1])],
                                   attn(ch[-1], cfg.num_attention_heads[-1], 1, depth[-1]))

        # Up level i (deepest first) has L+1 resnets; resnet j sees cat(h, skip), where the skips come back in
        # reverse push order: the L outputs of the matching down level, then that level's input.
        self.up_blocks = nn.ModuleList()
        rch, rheads, rdepth = ch[::-1], cfg.num_attention_heads[::-1], depth[::-1]
        for i, kind in enumerate(cfg.up_block_types):
            skip = [rch[i]] * L + [rch[min(i + 1, n - 1)]]
            cins = [(rch[max(i - 1, 0)] if j == 0 else rch[i]) + skip[j] for j in range(L + 1)]
            self.up_blocks.append(UNetBlock(
                [res(cin, rch[i]) for cin in cins],
                attn(rch[i], rheads[i], L + 1, rdepth[i]) if kind.startswith("CrossAttn") else None,
                upsample=Upsample2D(rch[i]) if i < n - 1 else None))

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def _text_time(self, added: dict | None, B: int, dtype: torch.dtype) -> torch.Tensor:
        """SDXL's add_embedding input (B, P + 6*d): [pooled text embedding, sinusoidal embedding of each time id]."""
        assert added is not None and "text_embeds" in added and "time_ids" in added, \
            "an SDXL UNet needs the added conditioning: added_cond_kwargs={'text_embeds', 'time_ids'} or a Conditioning"
        text, ids = added["text_embeds"], added["time_ids"]
        d = self.config.addition_time_embed_dim
        assert text.shape[0] == ids.shape[0] == B and text.shape[-1] + ids.shape[-1] * d == \
            self.config.projection_class_embeddings_input_dim, \
            f"added conditioning text_embeds {tuple(text.shape)} + time_ids {tuple(ids.shape)} do not fit the UNet"
        # each of the 6 numbers (sizes in pixels, not timesteps) gets the same cos-first fp32 embedding as t
        time = timestep_embedding(ids.flatten(), d, self.config.flip_sin_to_cos, self.config.freq_shift)
        return torch.cat([text.to(dtype), time.reshape(B, -1).to(dtype)], dim=-1)

    def _run(self, module: nn.Module, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            if isinstance(module, Transformer2DModel) and len(module.transformer_blocks) > 1:
                # SDXL's 10-block transformers: one block at a time, so that a backward pass recomputes (and holds)
                # one block's activations, not ten; norm and projections are kept
                return module(*args, run=self._run)
            return checkpoint(module, *args, use_reentrant=False)   # recompute in backward, save memory
        return module(*args)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor | Conditioning,
                added_cond_kwargs: dict | None = None) -> torch.Tensor:
        """sample (B,C,h,w) any h,w; timestep scalar or (B,); encoder_hidden_states (B,T,D) -> (B,C_out,h,w).
        sample and context are cast to the model's dtype (samplers keep fp32 latents for a bf16/fp16 UNet).
        SDXL ("text_time") also needs added_cond_kwargs {"text_embeds": (B,P), "time_ids": (B,6)}, as in diffusers,
        or a Conditioning in place of encoder_hidden_states, which carries both."""
        if isinstance(encoder_hidden_states, Conditioning):
            assert added_cond_kwargs is None, "pass a Conditioning or added_cond_kwargs, not both"
            cond = encoder_hidden_states
            encoder_hidden_states, added_cond_kwargs = cond.embeds, cond.added_cond_kwargs
        cfg, B = self.config, sample.shape[0]
        assert sample.ndim == 4 and sample.shape[1] == cfg.in_channels, \
            f"sample must be (B, {cfg.in_channels}, h, w), got {tuple(sample.shape)}"
        assert encoder_hidden_states.shape[-1] == cfg.cross_attention_dim, \
            f"text context width {encoder_hidden_states.shape[-1]} != cross_attention_dim {cfg.cross_attention_dim}"
        t = torch.as_tensor(timestep, device=sample.device)
        if t.numel() == 1:
            t = t.reshape(1).expand(B)
        elif t.shape != (B,):
            raise ValueError(f"unet.py: timestep must be a scalar or shape ({B},), got {tuple(t.shape)}")
        dtype = self.conv_in.weight.dtype
        sample, ctx = sample.to(dtype), encoder_hidden_states.to(dtype)
        emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = self.time_embedding(emb.to(dtype))   # (B, 4*C0)
        if cfg.addition_embed_type == "text_time":
            emb = emb + self.add_embedding(self._text_time(added_cond_kwargs, B, dtype))

        h = self.conv_in(sample)
        skips = [h]
        for block in self.down_blocks:
            for j, resnet in enumerate(block.resnets):
                h = self._run(resnet, h, emb)
                if block.attentions is not None:
                    h = self._run(block.attentions[j], h, ctx)
                skips.append(h)
            if block.downsamplers is not None:
                h = block.downsamplers[0](h)
                skips.append(h)

        mid = self.mid_block
        h = self._run(mid.resnets[0], h, emb)
        h = self._run(mid.attentions[0], h, ctx)
        h = self._run(mid.resnets[1], h, emb)

        for block in self.up_blocks:
            for j, resnet in enumerate(block.resnets):
                h = torch.cat([h, skips.pop()], dim=1)   # (h, skip): the order conv1's weights expect
                h = self._run(resnet, h, emb)
                if block.attentions is not None:
                    h = self._run(block.attentions[j], h, ctx)
            if block.upsamplers is not None:
                h = block.upsamplers[0](h, skips[-1].shape[-2:])

        return self.conv_out(F.silu(self.conv_norm_out(h)))
