"""lora.py: identity at init, merged == unmerged, disabled == base, save/load round trip, PEFT key naming,
merge_and_remove export, low-precision base weights."""
import json

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

import lora


class Attention(nn.Module):
    def __init__(self, d: int, ctx: int):
        super().__init__()
        self.to_q = nn.Linear(d, d, bias=False)
        self.to_k = nn.Linear(ctx, d, bias=False)
        self.to_v = nn.Linear(ctx, d, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(d, d), nn.Dropout(0.0)])

    def forward(self, x, c):
        q, k, v = self.to_q(x), self.to_k(c), self.to_v(c)
        a = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, -1)
        return self.to_out[1](self.to_out[0](a @ v))


class Toy(nn.Module):
    """Diffusers-like module paths: blocks.N.attn{1,2}.to_{q,k,v,out.0}, blocks.N.ff.net.{0.proj,2}, proj_in."""

    def __init__(self, d=16, ctx=12, n=2):
        super().__init__()
        self.proj_in = nn.Conv1d(d, d, 1)
        self.blocks = nn.ModuleList()
        for _ in range(n):
            b = nn.Module()
            b.attn1, b.attn2 = Attention(d, d), Attention(d, ctx)
            b.ff = nn.Module()
            b.ff.net = nn.ModuleList([nn.Module(), nn.GELU(), nn.Linear(4 * d, d)])
            b.ff.net[0].proj = nn.Linear(d, 4 * d)
            self.blocks.append(b)

    def forward(self, x, c):
        x = self.proj_in(x.transpose(1, 2)).transpose(1, 2)
        for b in self.blocks:
            x = x + b.attn1(x, x)
            x = x + b.attn2(x, c)
            x = x + b.ff.net[2](b.ff.net[1](b.ff.net[0].proj(x)))
        return x


def make(seed=0):
    torch.manual_seed(seed)
    return Toy()


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 5, 16, generator=g), torch.randn(3, 7, 12, generator=g)


def randomize_lora(model, seed=2, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def test_zero_init_is_identity_and_keys_unchanged():
    base, m = make(), make()
    base_keys = set(m.state_dict())
    params = lora.add_lora(m, rank=4)
    x, c = inputs()
    assert torch.equal(m(x, c), base(x, c))  # B = 0: bit-identical to the base model
    # 2 blocks x 2 attentions x 4 projections, A and B each
    assert len(params) == 2 * 2 * 4 * 2 and all(p.requires_grad and p.dtype == torch.float32 for p in params)
    assert all(p.abs().sum() == 0 for p in params[1::2]) and all(p.abs().sum() > 0 for p in params[0::2])
    sd = m.state_dict()
    assert base_keys <= set(sd)
    assert all(k in base_keys or ".lora_A.weight" in k or ".lora_B.weight" in k for k in sd)
    m2 = make()
    m2.load_state_dict({k: sd[k] for k in base_keys}, strict=True)  # base keys still load into a plain model


def test_state_dict_naming_and_shapes():
    m = make()
    lora.add_lora(m, rank=3, alpha=6.0, targets=("to_q", "to_out.0", "ff.net.2"))
    sd = lora.lora_state_dict(m)
    assert "unet.blocks.0.attn1.to_q.lora_A.weight" in sd and "unet.blocks.1.ff.net.2.lora_B.weight" in sd
    assert "unet.blocks.0.attn2.to_out.0.lora_A.weight" in sd
    assert not any("to_k" in k or "to_v" in k for k in sd)
    assert sd["unet.blocks.0.attn1.to_q.lora_A.weight"].shape == (3, 16)   # [r, in]
    assert sd["unet.blocks.1.ff.net.2.lora_B.weight"].shape == (16, 3)     # [out, r]
    assert sd["unet.blocks.1.ff.net.2.lora_A.weight"].shape == (3, 64)
    assert all(mod.scale == 2.0 for mod in m.modules() if isinstance(mod, lora.LoRALinear))
    assert set(lora.lora_state_dict(m, prefix="")) == {k[len("unet."):] for k in sd}


def test_lora_forward_matches_formula():
    m = make()
    lora.add_lora(m, rank=2, alpha=5.0, targets=("to_q",))
    randomize_lora(m)
    q = m.blocks[0].attn1.to_q
    x = torch.randn(4, 16)
    want = x @ q.weight.T + (2.5 * (x @ q.lora_A.weight.T) @ q.lora_B.weight.T)
    torch.testing.assert_close(q(x), want, atol=1e-6, rtol=1e-6)


def test_merged_matches_and_restores_bit_exactly():
    m = make()
    lora.add_lora(m, rank=4)
    randomize_lora(m)
    x, c = inputs()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    y = m(x, c)
    with lora.merged(m):
        q = m.blocks[0].attn1.to_q
        assert not torch.equal(q.weight, before["blocks.0.attn1.to_q.weight"])  # really folded in
        y_merged = m(x, c)
    torch.testing.assert_close(y_merged, y, atol=1e-5, rtol=1e-5)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(m(x, c), y)


def test_disabled_equals_base_and_gradients_reach_only_adapters():
    base, m = make(), make()
    m.requires_grad_(False)
    params = lora.add_lora(m, rank=4)
    randomize_lora(m)
    x, c = inputs()
    assert not torch.allclose(m(x, c), base(x, c))
    with lora.disabled(m):   # equal to float rounding: the disabled path may take another matmul kernel
        torch.testing.assert_close(m(x, c), base(x, c), rtol=0, atol=1e-5)
    assert not torch.allclose(m(x, c), base(x, c))  # re-enabled
    m(x, c).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for n, p in m.named_parameters() if "lora_" not in n)
    with lora.merged(m), pytest.raises(RuntimeError, match="inside merged"):
        with lora.disabled(m):
            pass


def test_save_load_round_trip(tmp_path):
    m = make()
    targets = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj")
    lora.add_lora(m, rank=4, alpha=8.0, targets=targets)
    randomize_lora(m)
    path = tmp_path / "lora.safetensors"
    lora.save_lora(path, m, {"base_model": "tiny", "epoch": 3})
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(lora.lora_state_dict(m))
    assert meta["format"] == "nanoddpo-lora" and int(meta["rank"]) == 4 and float(meta["alpha"]) == 8.0
    assert json.loads(meta["targets"]) == list(targets) and meta["base_model"] == "tiny" and meta["epoch"] == "3"

    fresh = make()  # same base weights, no adapters: load_lora adds them with the stored rank/alpha/targets
    got = lora.load_lora(fresh, path)
    assert got["base_model"] == "tiny"
    x, c = inputs()
    assert torch.equal(fresh(x, c), m(x, c))

    wrong = make()
    lora.add_lora(wrong, rank=2, targets=targets)
    with pytest.raises(ValueError, match="shape"):
        lora.load_lora(wrong, path)
    other = make()
    lora.add_lora(other, rank=4, targets=("to_q",))
    with pytest.raises(ValueError, match="does not match"):
        lora.load_lora(other, path)
    with pytest.raises(FileNotFoundError):
        lora.load_lora(make(), tmp_path / "nope.safetensors")


def test_bad_targets_give_clear_errors():
    with pytest.raises(ValueError, match="no nn.Linear"):
        lora.add_lora(make(), targets=("to_qq",))
    with pytest.raises(ValueError, match="nn.Linear and nn.Conv2d only"):
        lora.add_lora(make(), targets=("proj_in",))   # a Conv1d
    m = make()
    lora.add_lora(m)
    with pytest.raises(ValueError, match="already has a LoRA"):
        lora.add_lora(m)


class ResBlock(nn.Module):
    """Diffusers-like convolution paths: conv1 (3x3), conv2 (3x3, stride 2), conv_shortcut (1x1, stride 2)."""

    def __init__(self, c=6, out=8):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, out, 3, stride=2, padding=1)
        self.conv_shortcut = nn.Conv2d(c, out, 1, stride=2, bias=False)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x))) + self.conv_shortcut(x)


def test_conv_lora_is_a_low_rank_kernel_update_and_merges_exports_and_round_trips(tmp_path):
    """LoRAConv2d: identity at init; its output equals the convolution with W + scale * B A as the kernel; merged
    and merge_and_remove give the same function; disabled gives the base; save/load restores it."""
    torch.manual_seed(0)
    base = ResBlock()
    m = ResBlock()
    m.load_state_dict(base.state_dict())
    x = torch.randn(2, 6, 10, 10)
    targets = ("conv1", "conv2", "conv_shortcut")
    lora.add_lora(m.requires_grad_(False), rank=2, alpha=3.0, targets=targets)
    assert torch.equal(m(x), base(x))                               # B = 0: the base model exactly
    assert set(m.state_dict()) == set(base.state_dict()) | {f"{t}.lora_{p}.weight" for t in targets for p in "AB"}
    assert m.conv2.lora_A.weight.shape == (2, 6, 3, 3) and m.conv2.lora_B.weight.shape == (8, 2, 1, 1)
    randomize_lora(m)
    y = m(x)
    kernel = base.conv2.weight + 1.5 * (m.conv2.lora_B.weight.flatten(1) @ m.conv2.lora_A.weight.flatten(1)).view(8, 6, 3, 3)
    h = torch.relu(torch.nn.functional.conv2d(x, base.conv1.weight + m.conv1.delta_weight(), base.conv1.bias, padding=1))
    want = torch.nn.functional.conv2d(h, kernel, base.conv2.bias, stride=2, padding=1) + torch.nn.functional.conv2d(
        x, base.conv_shortcut.weight + m.conv_shortcut.delta_weight(), stride=2)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    with lora.merged(m):
        torch.testing.assert_close(m(x), y, atol=1e-5, rtol=1e-5)
    with lora.disabled(m):
        torch.testing.assert_close(m(x), base(x), atol=1e-6, rtol=0)
    m(x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.lora_parameters(m))

    path = tmp_path / "conv.safetensors"
    lora.save_lora(path, m)
    fresh = ResBlock()
    fresh.load_state_dict(base.state_dict())
    lora.load_lora(fresh, path, prefix="unet.")
    assert torch.equal(fresh(x), y)
    lora.merge_and_remove(m)
    assert all(type(mod) is nn.Conv2d for mod in m.modules() if isinstance(mod, nn.Conv2d))
    plain = ResBlock()
    plain.load_state_dict(m.state_dict(), strict=True)
    torch.testing.assert_close(plain(x), y, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="plain convolutions only"):
        grouped = nn.Module()
        grouped.conv = nn.Conv2d(4, 4, 3, groups=2)
        lora.add_lora(grouped, targets=("conv",))


def test_merge_and_remove_exports_plain_layout():
    m = make()
    lora.add_lora(m, rank=4, alpha=2.0)
    randomize_lora(m)
    x, c = inputs()
    y = m(x, c)
    lora.merge_and_remove(m)
    assert not any(isinstance(mod, lora.LoRALinear) for mod in m.modules())
    assert all(type(mod) is nn.Linear for n, mod in m.named_modules() if n.endswith(("to_q", "to_out.0")))
    fresh = make(seed=5)
    fresh.load_state_dict(m.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x, c), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_base_with_fp32_adapters(dtype):
    ref = make()
    lora.add_lora(ref, rank=4)
    randomize_lora(ref, std=0.1)
    x, c = inputs()
    y32 = ref(x, c)
    m = make().to(dtype)  # a low-precision base, as for LoRA training: adapters are created in fp32
    m.requires_grad_(False)
    params = lora.add_lora(m, rank=4)
    with torch.no_grad():
        for p, q in zip(params, lora.lora_parameters(ref)):
            p.copy_(q)
    assert all(p.dtype == torch.float32 for p in params) and m.blocks[0].attn1.to_q.weight.dtype == dtype
    tol = dict(atol=0.05 if dtype == torch.bfloat16 else 0.01, rtol=0.02)  # measured: 0.021 / 0.0018 at |y| ~ 2.4
    y = m(x.to(dtype), c.to(dtype))  # no autocast: the adapter runs in the input dtype
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), y32, **tol)
    if dtype == torch.bfloat16:  # CPU autocast supports bf16
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ya = m(x, c)
        ya.float().square().mean().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
        torch.testing.assert_close(ya.float(), y32, **tol)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with lora.merged(m):
        torch.testing.assert_close(m(x.to(dtype), c.to(dtype)).float(), y32, **tol)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_sd15_unet_adapter_count_and_diffusers_paths():
    """On unet.py's full SD1.5 UNet (meta device, no memory): rank 4 on to_q/k/v/out.0 gives ddpo-pytorch's 797,184
    trainable parameters (ddpo-pytorch's LoRA on SD 1.5), the base (diffusers) keys are unchanged, and the adapter keys are the
    PEFT/diffusers names of those Linear layers."""
    from unet import UNet2DConditionModel, UNetConfig
    with torch.device("meta"):
        unet = UNet2DConditionModel(UNetConfig.preset("sd15"))
    base = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    params = lora.add_lora(unet, rank=4)
    assert sum(p.numel() for p in params) == 797_184
    assert {k for k in unet.state_dict() if ".lora_" not in k} == set(base)
    sd = lora.lora_state_dict(unet)
    assert len(sd) == 16 * 2 * 4 * 2  # 16 transformer blocks x attn1/attn2 x 4 projections x (A, B)
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight" in sd
    for k, v in sd.items():
        path = k[len("unet."):-len(".lora_A.weight")]
        out_f, in_f = base[path + ".weight"]
        assert tuple(v.shape) == ((4, in_f) if ".lora_A." in k else (out_f, 4)), k


def test_on_a_tiny_unet_forward():
    """merged/disabled/merge_and_remove on unet.py's real forward pass."""
    from unet import UNet2DConditionModel, UNetConfig
    cfg = UNetConfig(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                     num_attention_heads=(2, 4), cross_attention_dim=24, norm_num_groups=8, sample_size=8)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(cfg)
    base_sd = {k: v.clone() for k, v in unet.state_dict().items()}
    unet.requires_grad_(False)
    lora.add_lora(unet, rank=4)
    randomize_lora(unet, std=0.05)
    g = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]), torch.randn(2, 5, 24, generator=g)
    y = unet(x, t, c)
    plain = UNet2DConditionModel(cfg)
    plain.load_state_dict(base_sd, strict=True)
    with lora.disabled(unet):
        assert torch.equal(unet(x, t, c), plain(x, t, c))
    with lora.merged(unet):
        torch.testing.assert_close(unet(x, t, c), y, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in base_sd.items())
    lora.merge_and_remove(unet)
    fresh = UNet2DConditionModel(cfg)
    fresh.load_state_dict(unet.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x, t, c), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("targets", [lora.DEFAULT_TARGETS, lora.DEFAULT_TARGETS + ("conv1", "conv2")],
                         ids=["attention", "attention+resnet-convs"])
def test_exported_lora_loads_in_diffusers_and_peft_at_our_strength(tmp_path, targets):
    """pytorch_lora_weights.safetensors (what train.py exports next to lora.safetensors) trained with alpha != rank:
    diffusers builds its PEFT adapters with scale 1, so without the scale folded into B the file would load at the
    wrong strength, silently (alpha 8, rank 4: 0.0089 relative error in eps, measured before). Both diffusers entry
    points, on the shipped shapes model: pipe.load_lora_weights(folder) and unet.load_lora_adapter(file)."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    import weights
    pipe = weights.load_pipeline("shapes")
    unet = pipe.unet.requires_grad_(False)
    lora.add_lora(unet, rank=4, alpha=8.0, targets=targets)
    randomize_lora(unet, std=0.05)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([50, 700])
    c = pipe.encode_prompts(["three red squares", "a blue circle left of a yellow triangle"])
    with torch.no_grad():
        ours = unet(x, t, c)
        with lora.disabled(unet):
            base = unet(x, t, c)
    path = lora.save_diffusers_lora(tmp_path, unet)
    assert path.name == "pytorch_lora_weights.safetensors"

    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(weights.SHAPES_MODEL), safety_checker=None, requires_safety_checker=False)
    ref.load_lora_weights(str(tmp_path))   # the bare-directory call finds the file by its name
    fresh = diffusers.UNet2DConditionModel.from_pretrained(str(weights.SHAPES_MODEL), subfolder="unet")
    fresh.load_lora_adapter(str(path), prefix="unet")
    scale = (ours - base).abs().max()
    for name, model in (("pipe.load_lora_weights", ref.unet), ("unet.load_lora_adapter", fresh)):
        with torch.no_grad():
            theirs = model(x, t, encoder_hidden_states=c).sample
        err = float((theirs - ours).abs().max() / scale)
        print(f"{name}: max |eps diffusers - eps ours| / max |LoRA effect| = {err:.2e}")
        assert err < 1e-3, name   # the LoRA effect is reproduced; a wrong scale (x0.5) would be an error of 0.5


def test_sdxl_lora_file_loads_in_the_diffusers_sdxl_pipeline(tmp_path):
    """The same file for SDXL: an adapter (alpha 8, rank 4) on the tiny SDXL, saved by save_diffusers_lora, loads
    through StableDiffusionXLPipeline.load_lora_weights(folder) and reproduces our eps under SDXL's added
    conditioning (pooled embedding + time ids)."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    import weights
    pipe = weights.load_pipeline("tiny-sdxl")
    folder = tmp_path / "tiny-sdxl"
    weights.save_pipeline(folder, pipe.unet, pipe.vae, pipe.text_encoder, pipe.scheduler_config,
                          text_encoder_2=pipe.text_encoder_2)
    unet = pipe.unet.requires_grad_(False)
    lora.add_lora(unet, rank=4, alpha=8.0)
    randomize_lora(unet, std=0.05)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([50, 700])
    cond = pipe.encode_prompts(["a cat", "a dog"], size=64)
    with torch.no_grad():
        ours = unet(x, t, cond)
        with lora.disabled(unet):
            base = unet(x, t, cond)
    (tmp_path / "lora").mkdir()
    lora.save_diffusers_lora(tmp_path / "lora", unet)
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(str(folder))
    ref.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():
        theirs = ref.unet(x, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=cond.added_cond_kwargs).sample
    err = float((theirs - ours).abs().max() / (ours - base).abs().max())
    print(f"SDXL pipe.load_lora_weights: max |eps diffusers - eps ours| / max |LoRA effect| = {err:.2e}")
    assert err < 1e-3
