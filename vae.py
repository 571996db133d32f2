"""
The Stable Diffusion autoencoder, AutoencoderKL "kl-f8" (Rombach et al. 2022, sec. 3.1): an encoder E maps an
image x (B,3,H,W) in [-1,1] to a diagonal Gaussian q(z|x) = N(mean, exp(logvar)) over latents (B,4,H/8,W/8),
and a decoder D maps z back to pixels, x ~ D(z). Diffusion runs on z * scaling_factor (0.18215), which makes
the latents roughly unit variance; decode_latents undoes that and maps the image to [0,1].

Both halves are conv resnets with one single-head self-attention in the middle. Module names follow
diffusers' AutoencoderKL keys, so a diffusers state_dict loads with load_state_dict(strict=True); the two
older attention namings and their 1x1-conv weight shapes are renamed on the fly by a load hook.
"""

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-6   # every VAE GroupNorm (resnets, attention, output) uses 1e-6, unlike the UNet's 1e-5

# -----------------------------------------------------------------------------------------------------------
# config

# diffusers config keys that SD's VAE always has at these values; anything else is a different model
_FIXED = {"act_fn": "silu", "down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D",
          "shift_factor": None, "latents_mean": None, "latents_std": None}
# diffusers keys with no effect on the model itself (force_upcast is a pipeline hint for fp16 decoding)
_IGNORED = {"force_upcast"}


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    sample_size: int = 512
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"vae.py: block_out_channels {self.block_out_channels} must all be divisible by "
                             f"norm_num_groups={self.norm_num_groups}")

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        """Build from a diffusers vae/config.json dict; raises ValueError for anything but a kl-f8 style VAE."""
        for key, value in d.items():
            if key.startswith("_") or key in _IGNORED or key in cls.__dataclass_fields__:
                continue
            if key not in _FIXED:
                raise ValueError(f"vae.py: unknown VAE config key {key!r}={value!r}; not an AutoencoderKL config")
            values = set(value) if isinstance(value, (list, tuple)) else {value}
            if values != {_FIXED[key]}:
                raise ValueError(f"vae.py: config {key}={value!r} is not supported "
                                 f"(expected {_FIXED[key]!r} everywhere)")
        # diffusers' own defaults for absent keys differ from SD's (a 1-level toy), so take them from there
        defaults = dict(block_out_channels=(64,), layers_per_block=1, sample_size=32)
        return cls(**{k: d.get(k, defaults.get(k, f.default)) for k, f in cls.__dataclass_fields__.items()})

    def to_dict(self) -> dict:
        """A diffusers vae/config.json dict (AutoencoderKL.from_config builds the same model)."""
        n = len(self.block_out_channels)
        d = {"_class_name": "AutoencoderKL", **asdict(self), "act_fn": "silu",
             "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}
        d["block_out_channels"] = list(self.block_out_channels)
        return d

    @classmethod
    def preset(cls, name: str) -> "VAEConfig":
        if name != "sd":   # SD 1.x and 2.x share one VAE architecture
            raise ValueError(f"vae.py: unknown preset {name!r}; the only preset is 'sd'")
        return cls()


# -----------------------------------------------------------------------------------------------------------
# building blocks


class ResnetBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=EPS)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


# Attention-internal names of older checkpoints -> current diffusers names:
# (a) LDM attn_1 (norm, q/k/v/proj_out; 1x1-conv weights [C,C,1,1]), (b) older diffusers' AttentionBlock.
# weights.py uses the same table to check a single file's keys and shapes before it assigns them.
LEGACY_ATTENTION_NAMES = {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0", "norm": "group_norm",
                 "query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions of a feature map, with a residual."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=EPS)
        self.to_q = nn.Linear(c, c)
        self.to_k = nn.Linear(c, c)
        self.to_v = nn.Linear(c, c)
        # to_out.1 is diffusers' Dropout(p=0): never called, kept so that the to_out.0 keys line up
        self.to_out = nn.ModuleList([nn.Linear(c, c), nn.Dropout(0.0)])
        self.register_load_state_dict_pre_hook(self._rename_legacy)

    @staticmethod
    def _rename_legacy(module, state_dict, prefix, *args):
        # runs before this module loads its own keys, so strict loading sees only current names
        for old, new in LEGACY_ATTENTION_NAMES.items():
            for suffix in ("weight", "bias"):
                key = f"{prefix}{old}.{suffix}"
                if key in state_dict:
                    state_dict[f"{prefix}{new}.{suffix}"] = state_dict.pop(key)
        for name in ("to_q", "to_k", "to_v", "to_out.0"):
            w = state_dict.get(f"{prefix}{name}.weight")
            if w is not None and w.ndim == 4 and w.shape[2:] == (1, 1):
                state_dict[f"{prefix}{name}.weight"] = w[:, :, 0, 0]   # a 1x1 conv is a Linear

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)   # (B, HW, C), a view for either memory format
        q, k, v = (lin(h).unsqueeze(1) for lin in (self.to_q, self.to_k, self.to_v))   # (B, 1, HW, C)
        y = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        y = self.to_out[0](y).transpose(1, 2).reshape(B, C, H, W)   # a view with channels_last strides
        return y + x   # y first, as diffusers: the sum (and all that follows) keeps y's memory format


class Downsample2D(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        # asymmetric padding (right and bottom only), as the original LDM encoder was trained
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class VAEBlock(nn.Module):
    """Resnets followed by an optional resampler (diffusers' Down/UpDecoder block key layout)."""

    def __init__(self, cins: list, cout: int, groups: int, down: bool = False, up: bool = False):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(cin, cout, groups) for cin in cins])
        self.downsamplers = nn.ModuleList([Downsample2D(cout)]) if down else None
        self.upsamplers = nn.ModuleList([Upsample2D(cout)]) if up else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    def __init__(self, c: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(c, c, groups), ResnetBlock2D(c, c, groups)])
        self.attentions = nn.ModuleList([Attention(c, groups)]) if attention else None

    def forward(self, x):
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, n, g = cfg.block_out_channels, len(cfg.block_out_channels), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [VAEBlock([ch[max(i - 1, 0)]] + [ch[i]] * (cfg.layers_per_block - 1), ch[i], g, down=i < n - 1)
             for i in range(n)])
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)   # mean and logvar

    def forward(self, x):
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        rch, n, g = cfg.block_out_channels[::-1], len(cfg.block_out_channels), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, rch[0], 3, padding=1)
        self.mid_block = MidBlock(rch[0], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            [VAEBlock([rch[max(i - 1, 0)]] + [rch[i]] * cfg.layers_per_block, rch[i], g, up=i < n - 1)
             for i in range(n)])
        self.conv_norm_out = nn.GroupNorm(g, rch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(rch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


# -----------------------------------------------------------------------------------------------------------
# the autoencoder


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = cfg = config
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        c = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if cfg.use_post_quant_conv else None
        # SDXL's VAE overflows in fp16 (inf/NaN images; diffusers' force_upcast, which its SD pipelines ignore):
        # the loader sets this for SDXL, and encode/decode_latents then run an fp16 VAE in fp32. A runtime setting
        # of the pipeline, not architecture, so not in VAEConfig.
        self.upcast_fp16 = False

    def _upcast(self) -> None:
        """With upcast_fp16, an fp16 VAE becomes fp32 and stays so (160 MB): casting it back after every call, as
        diffusers does, would copy the weights twice per call."""
        if self.upcast_fp16 and self.decoder.conv_in.weight.dtype == torch.float16:
            self.float()

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B,3,H,W) in [-1,1] -> (mean, logvar), each (B,4,H/8,W/8), unscaled."""
        if self.upcast_fp16:   # SDXL: x in the VAE's (then fp32) dtype
            self._upcast()
            x = x.to(self.encoder.conv_in.weight.dtype)
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)   # keeps exp(logvar) finite and nonzero

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B,4,h,w) unscaled latents -> image (B,3,8h,8w) in about [-1,1]."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def decode_latents(self, latents: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """Scaled latents (what the UNet sees) -> float32 images in [0,1]. Decodes chunk_size samples at a
        time: the full-resolution activations of the last up blocks, not the weights, bound decode memory."""
        assert chunk_size is None or chunk_size >= 1, f"chunk_size must be a positive int or None, got {chunk_size}"
        self._upcast()
        dtype = self.decoder.conv_in.weight.dtype   # latents usually arrive in fp32 from the sampler
        z = (latents / self.config.scaling_factor).to(dtype)
        chunks = z.split(chunk_size or len(z))
        return torch.cat([(self.decode(c).float() / 2 + 0.5).clamp(0, 1) for c in chunks])
