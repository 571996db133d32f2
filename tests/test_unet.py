"""unet.py against diffusers' UNet2DConditionModel (the test-only reference) on identical random weights."""
import math
import os

import pytest
import torch
from diffusers import UNet2DConditionModel as DiffusersUNet

import unet
from unet import UNet2DConditionModel, UNetConfig

# key->shape dumps in the project's shared/ folder, which sits beside the checkout (dev machines and CI)
REF_KEYS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "reference", "keys")
PARAMS = {"sd15": 859_520_964, "sd21-base": 865_910_724, "sd21-v": 865_910_724}   # reference §1.1 [ran]
KEY_FILES = {"sd15": "unet_sd15_diffusers.txt", "sd21-base": "unet_sd21base_diffusers.txt",
             "sd21-v": "unet_sd21_diffusers.txt"}
TOL = 1e-5   # max |ours - diffusers| <= TOL * std(diffusers output), fp32 on CPU

# diffusers kwargs of the tiny models: conv and linear projections, heads as int and list, both
# context widths, 1-3 levels of every block type, plus the rarer knobs (no flip, freq shift, 9 in-channels)
TINY = {
    "conv-int-heads": dict(block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=16,
                           attention_head_dim=2, layers_per_block=2,
                           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "linear-list-heads": dict(block_out_channels=(32, 64, 64), norm_num_groups=16, cross_attention_dim=24,
                              attention_head_dim=[2, 4, 8], layers_per_block=1, use_linear_projection=True,
                              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    "sd-layout-knobs": dict(block_out_channels=(16, 32, 32), norm_num_groups=8, cross_attention_dim=16,
                            attention_head_dim=[1, 2, 4], layers_per_block=1, upcast_attention=True,
                            use_linear_projection=True, in_channels=9, flip_sin_to_cos=False, freq_shift=1,
                            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
}


def tiny_pair(name: str, seed: int = 0):
    """(diffusers model, our model) with the same random weights, loaded with strict=True."""
    torch.manual_seed(seed)
    ref = DiffusersUNet(**TINY[name]).eval()
    ours = UNet2DConditionModel(UNetConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def inputs(cfg: UNetConfig, B: int, h: int, w: int, T: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, h, w, generator=g)
    ctx = torch.randn(B, T, cfg.cross_attention_dim, generator=g)
    return x, ctx


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().std()).item()


def key_shapes(model: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def meta_diffusers(config: dict) -> torch.nn.Module:
    with torch.device("meta"):
        return DiffusersUNet.from_config(config)


# ---------------------------------------------------------------------------------------------------------
# tiny models: numerical parity


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("hw", [(8, 8), (9, 7), (13, 11)])
def test_tiny_parity(name, hw):
    ref, ours = tiny_pair(name)
    x, ctx = inputs(ours.config, 3, *hw)
    t = torch.tensor([1, 500, 999])   # different timesteps within the batch
    with torch.no_grad():
        want, got = ref(x, t, ctx).sample, ours(x, t, ctx)
    assert got.shape == (3, ours.config.out_channels, *hw)
    assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("t", [437, 437.5, torch.tensor(437), torch.tensor([437])])
def test_scalar_timestep_broadcasts(t):
    ref, ours = tiny_pair("conv-int-heads")
    x, ctx = inputs(ours.config, 2, 9, 7)
    with torch.no_grad():
        got = ours(x, t, ctx)
        per_sample = ours(x, torch.full((2,), float(t)), ctx)
        want = ref(x, t, ctx).sample
    assert rel_err(got, want) <= TOL
    assert torch.equal(got, per_sample)


def test_float_timesteps_and_batch_independence():
    ref, ours = tiny_pair("linear-list-heads")
    x, ctx = inputs(ours.config, 3, 13, 11)
    t = torch.tensor([12.25, 640.5, 999.0])   # k-diffusion style fractional timesteps
    with torch.no_grad():
        got, want = ours(x, t, ctx), ref(x, t, ctx).sample
        alone = torch.cat([ours(x[i:i + 1], t[i:i + 1], ctx[i:i + 1]) for i in range(3)])
    assert rel_err(got, want) <= TOL
    assert rel_err(alone, got) <= TOL   # each sample sees only its own timestep and context


def test_timestep_embedding_is_cos_first_fp32():
    t = torch.tensor([0, 1, 999])
    emb = unet.timestep_embedding(t, 320)
    freqs = torch.exp(-math.log(10000) * torch.arange(160, dtype=torch.float32) / 160)
    assert emb.dtype == torch.float32 and emb.shape == (3, 320)
    assert torch.equal(emb[:, :160], torch.cos(t[:, None].float() * freqs))
    assert torch.equal(emb[:, 160:], torch.sin(t[:, None].float() * freqs))


def test_channels_last_input_and_model():
    ref, ours = tiny_pair("linear-list-heads")
    x, ctx = inputs(ours.config, 2, 13, 11)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        want = ref(x, t, ctx).sample
        got = ours.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last), t, ctx)
    assert rel_err(got, want) <= TOL


def test_gradient_checkpointing_same_grads(monkeypatch):
    calls = []
    real = unet.checkpoint
    monkeypatch.setattr(unet, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, ours = tiny_pair("conv-int-heads")
    x, ctx = inputs(ours.config, 2, 8, 8)
    t = torch.tensor([5, 600])
    ours.train()
    grads = []
    for ckpt in (False, True):
        ours.gradient_checkpointing = ckpt
        ours.zero_grad()
        ours(x, t, ctx).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters()})
    n_blocks = sum(isinstance(m, (unet.ResnetBlock2D, unet.Transformer2DModel)) for m in ours.modules())
    assert len(calls) == n_blocks
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)
    with torch.no_grad():   # no checkpointing when there is nothing to backpropagate
        ours(x, t, ctx)
    assert len(calls) == n_blocks


# ---------------------------------------------------------------------------------------------------------
# half precision


def test_bf16_and_fp16_close_to_fp32():
    _, ours = tiny_pair("linear-list-heads")
    x, ctx = inputs(ours.config, 2, 9, 7)
    t = torch.tensor([50, 800])
    with torch.no_grad():
        want = ours(x, t, ctx)
        for dtype, tol in ((torch.bfloat16, 5e-2), (torch.float16, 1e-2)):
            got = ours.to(dtype)(x.to(dtype), t, ctx.to(dtype))
            assert got.dtype == dtype
            assert ((got.float() - want).norm() / want.norm()).item() < tol, dtype
            # a sampler's fp32 latents and context are cast to the model's dtype
            assert torch.equal(ours(x, t, ctx), got)


def naive_half_attention(q, k, v, scale=None):
    """A kernel that computes q.k in the input precision, like the classic attention of the fp16 NaN reports."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v


def test_fp16_upcast_attention_stays_finite(monkeypatch):
    torch.manual_seed(0)
    cfg = UNetConfig.from_dict(dict(TINY["linear-list-heads"], upcast_attention=True))
    model = UNet2DConditionModel(cfg).eval()
    with torch.no_grad():   # blow up q and k so raw q.k exceeds the fp16 range (65504), as in SD 2.1-v
        for name, p in model.named_parameters():
            if name.endswith(("to_q.weight", "to_k.weight")):
                p.mul_(110)
    attn = model.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    seen = {}
    attn.to_q.register_forward_hook(lambda m, i, o: seen.__setitem__("q", o))
    attn.to_k.register_forward_hook(lambda m, i, o: seen.__setitem__("k", o))
    x, ctx = inputs(cfg, 2, 8, 8)
    t = torch.tensor([20, 900])
    with torch.no_grad():
        model(x, t, ctx)
        q, k = (seen[n].unflatten(-1, (attn.heads, -1)).transpose(1, 2).half() for n in "qk")
        assert torch.isinf(q @ k.transpose(-1, -2)).any(), "test inputs must overflow a plain fp16 q.k"

        model.half()
        x, ctx = x.half(), ctx.half()
        assert torch.isfinite(model(x, t, ctx)).all()
        # even a kernel that accumulates q.k in fp16 stays finite, because q is scaled before the product...
        monkeypatch.setattr(unet.F, "scaled_dot_product_attention", naive_half_attention)
        assert torch.isfinite(model(x, t, ctx)).all()
        # ...which is what upcast_attention buys: without it the same kernel overflows
        for m in model.modules():
            if isinstance(m, unet.Attention):
                m.upcast = False
        assert not torch.isfinite(model(x, t, ctx)).all()


# ---------------------------------------------------------------------------------------------------------
# config: presets, diffusers round trip, errors

# written in the style of the hub's unet/config.json files of SD 1.5 and SD 2.1 (768, v)
HUB_SD15 = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
            "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
            "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
            "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
            "out_channels": 4, "sample_size": 64, "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
HUB_SD21V = dict(HUB_SD15, _diffusers_version="0.10.0.dev0", attention_head_dim=[5, 10, 20, 20],
                 cross_attention_dim=1024, dual_cross_attention=False, num_class_embeds=None,
                 only_cross_attention=False, sample_size=96, upcast_attention=True, use_linear_projection=True)


def test_from_dict_reads_hub_configs():
    assert UNetConfig.from_dict(HUB_SD15) == UNetConfig.preset("sd15")
    assert UNetConfig.from_dict(HUB_SD21V) == UNetConfig.preset("sd21-v")
    base = dict(HUB_SD21V, upcast_attention=False, sample_size=64)
    assert UNetConfig.from_dict(base) == UNetConfig.preset("sd21-base")
    inpaint = UNetConfig.from_dict(dict(HUB_SD15, in_channels=9))
    with torch.device("meta"):
        assert UNet2DConditionModel(inpaint).conv_in.weight.shape == (320, 9, 3, 3)


@pytest.mark.parametrize("preset", sorted(PARAMS))
def test_preset_keys_shapes_and_params(preset):
    cfg = UNetConfig.preset(preset)
    with torch.device("meta"):
        ours = UNet2DConditionModel(cfg)
    ref = meta_diffusers(cfg.to_dict())   # our to_dict() is a config diffusers accepts...
    assert UNetConfig.from_dict(dict(ref.config)) == cfg   # ...and reads back to the same config
    shapes = key_shapes(ours)
    assert len(shapes) == 686
    assert shapes == key_shapes(ref)
    assert sum(p.numel() for p in ours.parameters()) == PARAMS[preset]
    path = os.path.join(REF_KEYS, KEY_FILES[preset])
    if os.path.exists(path):   # the reference dump: "name [d0, d1, ...]" per line
        with open(path) as f:
            dump = {k: tuple(int(d) for d in s.strip("[]\n").split(", ") if d)
                    for k, s in (line.split(" ", 1) for line in f if line.strip())}
        assert shapes == dump


@pytest.mark.parametrize("name", sorted(TINY))
def test_to_dict_round_trips_through_diffusers(name):
    cfg = UNetConfig.from_dict(dict(meta_diffusers(TINY[name]).config))
    again = meta_diffusers(cfg.to_dict())
    assert UNetConfig.from_dict(dict(again.config)) == cfg
    with torch.device("meta"):
        assert key_shapes(UNet2DConditionModel(cfg)) == key_shapes(again)


@pytest.mark.parametrize("key,value", [
    ("addition_embed_type", "text"), ("class_embed_type", "timestep"), ("transformer_layers_per_block", [[1, 2]] * 4),
    ("addition_embed_type", "text_time"),   # without the sizes of its embedding
    ("time_cond_proj_dim", 256), ("only_cross_attention", [True, False, False, False]), ("my_new_knob", 1),
])
def test_from_dict_rejects_unsupported_features(key, value):
    with pytest.raises(ValueError, match=key):
        UNetConfig.from_dict(dict(HUB_SD15, **{key: value}))


def test_bad_inputs_raise_clear_errors():
    _, ours = tiny_pair("conv-int-heads")
    x, ctx = inputs(ours.config, 2, 8, 8)
    with pytest.raises(AssertionError, match="cross_attention_dim"):
        ours(x, 1, torch.randn(2, 7, 768))
    with pytest.raises(AssertionError, match="sample must be"):
        ours(x[:, :3], 1, ctx)
    with pytest.raises(ValueError, match="timestep must be"):
        ours(x, torch.tensor([1, 2, 3]), ctx)
    with pytest.raises(ValueError, match="preset"):
        UNetConfig.preset("sdxl")
    with pytest.raises(ValueError, match="divisible"):
        UNetConfig(block_out_channels=(32, 64), num_attention_heads=3, norm_num_groups=8,
                   down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)


# ---------------------------------------------------------------------------------------------------------
# full-size SD architectures: parity at a small latent with identical random weights


def fill_random_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights at copy speed: drawing 860M random numbers takes ~10 s here, copying them does not.
    Each tensor takes a window, at a random offset, of one random pool whose length is a prime (so no two
    rows of a weight are equal), scaled like PyTorch's default init, U(-1, 1) / sqrt(fan_in)."""
    g = torch.Generator().manual_seed(seed)
    P = 1_000_003
    pool = torch.rand(P, generator=g) * 2 - 1
    with torch.no_grad():
        for p in model.parameters():
            flat, pos, off = p.view(-1), 0, int(torch.randint(P, (), generator=g))
            while pos < flat.numel():
                n = min(P - off, flat.numel() - pos)
                flat[pos:pos + n] = pool[off:off + n]
                pos, off = pos + n, 0
            if p.ndim > 1:
                flat.mul_(p[0].numel() ** -0.5)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("presets", [("sd15",), ("sd21-base", "sd21-v")], ids=["sd15", "sd21"])
def test_full_size_parity(presets):
    # One diffusers model per architecture; ours is built on the meta device and takes the very same
    # tensors (assign=True), so no second init and no second copy. SD 2.1-base and 2.1-v share one: they
    # differ only in upcast_attention, which diffusers' SDPA attention processor ignores, so the reference
    # output is the same function for both.
    ref = meta_diffusers(UNetConfig.preset(presets[-1]).to_dict()).to_empty(device="cpu")
    ref = fill_random_(ref).eval()
    x, ctx = inputs(UNetConfig.preset(presets[0]), 2, 8, 8, T=77)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        want = ref(x, t, ctx).sample
        assert torch.isfinite(want).all() and want.std() > 0.1
        for preset in presets:
            with torch.device("meta"):
                ours = UNet2DConditionModel(UNetConfig.preset(preset))
            ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
            err = rel_err(ours.eval()(x, t, ctx), want)
            print(f"{preset}: max|ours - diffusers| / std = {err:.2e} (std {want.std():.3f})")
            assert err <= TOL, preset
