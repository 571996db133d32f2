"""vae.py against diffusers' AutoencoderKL (the test-only reference) on identical random weights."""
import os

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE

from vae import AutoencoderKL, VAEConfig

# the key->shape dump in the project's shared/ folder, which sits beside the checkout (dev machines and CI)
REF_KEYS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "reference", "keys",
                        "vae_diffusers.txt")
SD_VAE_PARAMS = 83_653_863   # reference §2.1 [ran]
TOL = 1e-5   # max |ours - diffusers| <= TOL * std(diffusers output), fp32 on CPU

TINY = {
    "two-levels": dict(block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=2,
                       down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
    "three-levels-no-quant": dict(block_out_channels=(16, 32, 32), norm_num_groups=4, layers_per_block=1,
                                  latent_channels=3, use_quant_conv=False, use_post_quant_conv=False,
                                  down_block_types=("DownEncoderBlock2D",) * 3,
                                  up_block_types=("UpDecoderBlock2D",) * 3),
    "no-mid-attention": dict(block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1,
                             mid_block_add_attention=False, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2),
}


def tiny_pair(name: str, seed: int = 0):
    torch.manual_seed(seed)
    ref = DiffusersVAE(**TINY[name]).eval()
    ours = AutoencoderKL(VAEConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().std()).item()


def key_shapes(model: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def attention_keys_renamed(sd: dict, names: dict, conv_weights: bool) -> dict:
    """The diffusers state_dict with the mid-block attention internals in an older naming."""
    out = {}
    for key, value in sd.items():
        head, sep, tail = key.partition("mid_block.attentions.0.")
        if sep:
            module, param = tail.rsplit(".", 1)
            if conv_weights and param == "weight" and value.ndim == 2:
                value = value[:, :, None, None]   # LDM stores them as 1x1 convs
            key = f"{head}{sep}{names[module]}.{param}"
        out[key] = value
    return out


# (b) diffusers < 0.14 AttentionBlock; (a) LDM attn_1 internals with 4-D weights
OLD_DIFFUSERS = {"group_norm": "group_norm", "to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_encode_decode_parity(name):
    ref, ours = tiny_pair(name)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 40, 24, generator=g) * 2 - 1
    z = torch.randn(2, ours.config.latent_channels, 5, 3, generator=g)
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        mean, logvar = ours.encode(x)
        want, got = ref.decode(z).sample, ours.decode(z)
    scale = 2 ** (len(ours.config.block_out_channels) - 1)
    assert mean.shape == logvar.shape == (2, ours.config.latent_channels, 40 // scale, 24 // scale)
    assert rel_err(mean, dist.mean) <= TOL
    assert rel_err(logvar, dist.logvar) <= TOL
    assert got.shape == (2, 3, 5 * scale, 3 * scale)
    assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("names,conv_weights", [(OLD_DIFFUSERS, False), (LDM, True)],
                         ids=["query-key-value", "ldm-qkv-4d"])
def test_legacy_attention_names_load_strictly(names, conv_weights):
    ref, ours = tiny_pair("two-levels")
    sd = attention_keys_renamed(ref.state_dict(), names, conv_weights)
    assert "decoder.mid_block.attentions.0.to_q.weight" not in sd   # really the legacy layout
    legacy = AutoencoderKL(ours.config).eval()
    legacy.load_state_dict(sd, strict=True)
    assert "decoder.mid_block.attentions.0." + names["to_q"] + ".weight" in sd   # the caller's dict is untouched
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(legacy.decode(z), ours.decode(z))
        assert all(torch.equal(a, b) for a, b in zip(legacy.encode(x), ours.encode(x)))


def test_unknown_attention_key_still_fails_strict_loading():
    _, ours = tiny_pair("two-levels")
    sd = dict(ours.state_dict())
    sd["decoder.mid_block.attentions.0.qkv.weight"] = sd.pop("decoder.mid_block.attentions.0.to_q.weight")
    with pytest.raises(RuntimeError, match="to_q.weight"):
        AutoencoderKL(ours.config).load_state_dict(sd, strict=True)


def test_decode_latents_scales_chunks_and_clamps():
    ref, ours = tiny_pair("two-levels")
    latents = torch.randn(5, 4, 4, 3, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = (ref.decode(latents / ours.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        full = ours.decode_latents(latents)
        chunked = ours.decode_latents(latents, chunk_size=2)
        half = ours.to(torch.bfloat16).decode_latents(latents, chunk_size=3)
    assert full.dtype == chunked.dtype == half.dtype == torch.float32
    assert full.shape == (5, 3, 8, 6) and 0 <= full.min() and full.max() <= 1
    assert rel_err(full, want) <= TOL
    assert torch.allclose(chunked, full, atol=1e-6)
    assert (half - full).abs().max() < 0.05   # bf16 model, fp32 latents in, fp32 images out
    with pytest.raises(AssertionError, match="chunk_size"):
        ours.decode_latents(latents, chunk_size=0)


def test_logvar_is_clamped():
    _, ours = tiny_pair("two-levels")
    with torch.no_grad():
        ours.quant_conv.weight.zero_()
        ours.quant_conv.bias.copy_(torch.tensor([0.0, 0, 0, 0, 50, -50, 10, -10]))
        mean, logvar = ours.encode(torch.zeros(1, 3, 8, 8))
    assert logvar[0, :, 0, 0].tolist() == [20.0, -30.0, 10.0, -10.0]


def test_channels_last():
    ref, ours = tiny_pair("two-levels")
    z = torch.randn(2, 4, 5, 3, generator=torch.Generator().manual_seed(5))
    x = torch.rand(2, 3, 24, 16, generator=torch.Generator().manual_seed(6)) * 2 - 1
    with torch.no_grad():
        want_img, want_mean = ref.decode(z).sample, ref.encode(x).latent_dist.mean
        ours = ours.to(memory_format=torch.channels_last)
        got_img = ours.decode(z.contiguous(memory_format=torch.channels_last))
        got_mean, _ = ours.encode(x.contiguous(memory_format=torch.channels_last))
    assert rel_err(got_img, want_img) <= TOL and rel_err(got_mean, want_mean) <= TOL


# ---------------------------------------------------------------------------------------------------------
# config and the full SD VAE

HUB_SD = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
          "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
          "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
          "out_channels": 3, "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4}


def test_config_round_trip():
    assert VAEConfig.from_dict(HUB_SD) == VAEConfig.preset("sd")
    assert VAEConfig.from_dict(dict(HUB_SD, force_upcast=True, scaling_factor=0.18215)) == VAEConfig.preset("sd")
    for name in TINY:
        with torch.device("meta"):
            cfg = VAEConfig.from_dict(dict(DiffusersVAE(**TINY[name]).config))
            again = DiffusersVAE.from_config(cfg.to_dict())
            assert key_shapes(again) == key_shapes(AutoencoderKL(cfg))
        assert VAEConfig.from_dict(dict(again.config)) == cfg


@pytest.mark.parametrize("key,value", [("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
                                       ("shift_factor", 0.1159), ("act_fn", "gelu"), ("latent_magic", 1)])
def test_config_rejects_other_autoencoders(key, value):
    with pytest.raises(ValueError, match=key):
        VAEConfig.from_dict(dict(HUB_SD, **{key: value}))


def test_sd_vae_keys_shapes_and_params():
    cfg = VAEConfig.preset("sd")
    with torch.device("meta"):
        ours, ref = AutoencoderKL(cfg), DiffusersVAE.from_config(cfg.to_dict())
    shapes = key_shapes(ours)
    assert len(shapes) == 248 and shapes == key_shapes(ref)
    assert sum(p.numel() for p in ours.parameters()) == SD_VAE_PARAMS
    if os.path.exists(REF_KEYS):   # the reference dump: "name [d0, d1, ...]" per line
        with open(REF_KEYS) as f:
            dump = {k: tuple(int(d) for d in s.strip("[]\n").split(", ") if d)
                    for k, s in (line.split(" ", 1) for line in f if line.strip())}
        assert shapes == dump


@pytest.mark.slow
def test_sd_vae_parity():
    torch.manual_seed(0)
    ref = DiffusersVAE.from_config(VAEConfig.preset("sd").to_dict()).eval()
    with torch.device("meta"):
        ours = AutoencoderKL(VAEConfig.preset("sd"))
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)   # the same tensors, no second init
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 8, 8, generator=g)
    x = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        want, got = ref.decode(z).sample, ours.eval().decode(z)
        dist, (mean, logvar) = ref.encode(x).latent_dist, ours.encode(x)
    errs = [rel_err(got, want), rel_err(mean, dist.mean), rel_err(logvar, dist.logvar)]
    print("SD VAE max|ours - diffusers| / std: decode {:.2e}, mean {:.2e}, logvar {:.2e}".format(*errs))
    assert max(errs) <= TOL
