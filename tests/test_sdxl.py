"""SDXL: our UNet (full-size layout and numerical parity), text encoders and prompt embedding, DDIM rollout and the
DDPO update with the added conditioning, and loading from a diffusers folder and an SGM single file, against
diffusers' UNet2DConditionModel / StableDiffusionXLPipeline and transformers (test-only references). Offline, tiny
random models in the real layouts, built at test time."""
import json
import math

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as DiffusersUNet

import ddpo
import lora
import scheduler as S
import weights
from helpers_sd import (SDXL_UNET, clip_text_state_dict, clip_to_openclip, diffusers_sdxl_pipeline, save_single_file,
                        sdxl_to_ldm_state_dict, sdxl_unet_to_ldm, tiny_sdxl)
from unet import Conditioning, UNet2DConditionModel, UNetConfig

TOL = 1e-5   # max |ours - diffusers| <= TOL * std(diffusers output), fp32 on CPU

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (reward_and_sdxl_facts.md §3.2)
HUB_SDXL_UNET = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0", "act_fn": "silu",
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "center_input_sample": False,
    "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True}
SDXL_PARAMS = 2_567_463_684   # facts §3.2 [ran], 1680 keys
PROMPTS = ["a photo of an astronaut riding a horse on mars", "", "a red cube left of a blue sphere, 4k"]


def rel_err(ours, ref) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().std()).item()


def shapes(d: dict) -> dict:
    return {k: tuple(v.shape) for k, v in d.items()}


def added(cfg: UNetConfig, B: int, seed: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [512, 768, 16, 32, 896, 640], [64, 64, 0, 0, 64, 64]])
    return {"text_embeds": torch.randn(B, pooled, generator=g), "time_ids": ids[:B]}


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """The tiny SDXL as diffusers/transformers modules, its StableDiffusionXLPipeline, that pipeline's
    save_pretrained folder and the same weights as an SGM single file."""
    root = tmp_path_factory.mktemp("sdxl")
    ref = tiny_sdxl()
    pipe = diffusers_sdxl_pipeline(ref, root / "tokenizers")
    pipe.save_pretrained(root / "folder")
    single = save_single_file(root / "sd_xl_tiny.safetensors", sdxl_to_ldm_state_dict(ref))
    return ref, pipe, root / "folder", single


# ---------------------------------------------------------------------------------------------------- the UNet

def test_full_size_unet_layout_and_params():
    """SDXL base at full size on the meta device: our preset == the hub config.json, every key and shape equal to
    diffusers', the parameter count, and the LDM single-file names map back onto the same keys and config."""
    cfg = UNetConfig.preset("sdxl-base")
    assert UNetConfig.from_dict(HUB_SDXL_UNET) == cfg
    with torch.device("meta"):
        ours = UNet2DConditionModel(cfg)
        ref = DiffusersUNet.from_config(HUB_SDXL_UNET)
        again = DiffusersUNet.from_config(cfg.to_dict())   # our to_dict() builds the same model in diffusers
    got = shapes(ours.state_dict())
    assert len(got) == 1680 and got == shapes(ref.state_dict()) == shapes(again.state_dict())
    assert sum(p.numel() for p in ours.parameters()) == SDXL_PARAMS
    assert got["add_embedding.linear_1.weight"] == (1280, 2816) and got["time_embedding.linear_1.weight"] == (1280, 320)
    assert len(ours.up_blocks[0].attentions[0].transformer_blocks) == 10 and ours.down_blocks[0].attentions is None
    ldm = {k.removeprefix("model.diffusion_model."): v for k, v in sdxl_unet_to_ldm(ref.state_dict(), ref.config).items()}
    assert "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight" in ldm and "label_emb.0.2.bias" in ldm
    back = weights.ldm_unet_to_diffusers(ldm)
    assert shapes(back) == got
    assert weights.unet_config_from_weights(back, pooled_dim=1280) == cfg


def test_full_size_text_encoders():
    """CLIP ViT-L and OpenCLIP ViT-bigG at full size (meta): parameter counts of facts §3.4, and bigG's open_clip
    names (fused in_proj, all 32 layers, x @ P projection) come back as CLIPTextModelWithProjection's."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    with torch.device("meta"):
        big_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                           num_attention_heads=20, hidden_act="gelu", projection_dim=1280))
        clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768))
    assert sum(p.numel() for p in big_g.parameters()) == 694_659_840
    assert sum(p.numel() for p in clip_l.parameters()) == 123_060_480
    tower = {k: v for k, v in big_g.state_dict().items() if k.startswith("text_model.") and "position_ids" not in k}
    openclip = {k.removeprefix("cond_stage_model.model."): v for k, v in clip_to_openclip(tower, torch.Generator()).items()
                if not k.startswith("cond_stage_model.model.transformer.resblocks.32.")}
    openclip["text_projection"] = torch.empty(1280, 1280, device="meta")
    back = weights.openclip_to_clip({k: v for k, v in openclip.items() if k != "logit_scale"}, drop_last=False)
    assert shapes(back) == shapes({k: v for k, v in big_g.state_dict().items() if "position_ids" not in k})
    config = weights.clip_config_from_weights(back, "gelu")
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "projection_dim"):
        assert getattr(config, field) == getattr(big_g.config, field), field
    assert weights.clip_config_from_weights(clip_text_state_dict(clip_l), "quick_gelu").num_attention_heads == 12


# the full SDXL block structure at reduced width: 3 levels, no attention at level 0, 1/2/3 transformer blocks
TINY_UNETS = {
    "sdxl-structure": dict(SDXL_UNET, block_out_channels=(32, 64, 64), attention_head_dim=(2, 4, 4),
                           cross_attention_dim=48, projection_class_embeddings_input_dim=16 + 6 * 8, norm_num_groups=16),
    "sdxl-depth-10": dict(SDXL_UNET, block_out_channels=(16, 32, 32), attention_head_dim=(1, 2, 2),
                          transformer_layers_per_block=(1, 2, 10), cross_attention_dim=24, addition_time_embed_dim=4,
                          projection_class_embeddings_input_dim=8 + 6 * 4, norm_num_groups=8),
}


@pytest.mark.parametrize("name", sorted(TINY_UNETS))
@pytest.mark.parametrize("hw", [(8, 8), (9, 7)])
def test_unet_parity(name, hw):
    torch.manual_seed(0)
    ref = DiffusersUNet(**TINY_UNETS[name]).eval()
    ours = UNet2DConditionModel(UNetConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, *hw, generator=g)
    ctx = torch.randn(3, 77, ours.config.cross_attention_dim, generator=g)
    t, cond = torch.tensor([1, 500, 999]), added(ours.config, 3)
    with torch.no_grad():
        want = ref(x, t, ctx, added_cond_kwargs=cond).sample
        got = ours(x, t, ctx, cond)
        packed = ours(x, t, Conditioning(ctx, cond["text_embeds"], cond["time_ids"]))
        # the added conditioning matters: other time ids give another output
        other = ours(x, t, ctx, {**cond, "time_ids": cond["time_ids"].flip(0)})
    err = rel_err(got, want)
    print(f"\n[measured] {name} {hw}: max|ours - diffusers| / std = {err:.2e}")
    assert err <= TOL and torch.equal(got, packed) and rel_err(other, got) > 1e-3
    with pytest.raises(AssertionError, match="added conditioning"):
        ours(x, t, ctx)


def test_conditioning_batch_ops():
    g = torch.Generator().manual_seed(0)
    c = Conditioning(torch.randn(3, 77, 8, generator=g), torch.randn(3, 4, generator=g), torch.randn(3, 6, generator=g))
    u = Conditioning(torch.zeros(1, 77, 8), torch.zeros(1, 4), torch.ones(1, 6))
    both = torch.cat([u.expand(3, *u.shape[1:]), c])
    assert both.shape == (6, 77, 8) and both.text_embeds.shape == (6, 4) and len(both) == 6
    assert torch.equal(both[3:].time_ids, c.time_ids) and torch.equal(both[:3].embeds, torch.zeros(3, 77, 8))
    s = torch.tensor([2, 0])
    assert torch.equal(c[s].text_embeds, c.text_embeds[s]) and c[s].shape == (2, 77, 8)
    half = c.to(torch.float16)
    assert half.dtype == half.time_ids.dtype == half.text_embeds.dtype == torch.float16 and half.device == c.device
    with pytest.raises(TypeError, match="mix"):
        torch.cat([c, c.embeds])
    with pytest.raises(TypeError, match="dim 0 only"):
        torch.cat([c, c], dim=1)
    with pytest.raises(TypeError):
        torch.stack([c, c])


# ------------------------------------------------------------------------------------------- text and prompts

def test_encode_prompts_match_diffusers(xl):
    """Our Pipeline (loaded from diffusers' save_pretrained folder) vs StableDiffusionXLPipeline.encode_prompt:
    (B,77,2048-style) embeds, pooled embeds, the zeroed empty negative prompt, an explicit negative prompt, time ids."""
    ref, dpipe, folder, _ = xl
    pipe = weights.load_pipeline(folder)
    assert pipe.sdxl and pipe.force_zeros_for_empty_prompt and pipe.vae.upcast_fp16
    assert not pipe.openclip_tokens and pipe.openclip_tokens_2   # CLIP-L pads with EOS, bigG with "!" (id 0)
    # the tokenizers: ours equal diffusers' for ordinary prompts (both pad tokens)
    for tok, ours_tok, openclip in ((dpipe.tokenizer, pipe.tokenizer, False), (dpipe.tokenizer_2, pipe.tokenizer_2, True)):
        want = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        assert torch.equal(weights.tokenize(ours_tok, PROMPTS, openclip), want)
    assert weights.tokenize(pipe.tokenizer_2, [""], True)[0, :3].tolist() == [49406, 49407, 0]
    with torch.no_grad():
        emb, neg, pooled, neg_pooled = dpipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                           do_classifier_free_guidance=True)
        c = pipe.encode_prompts(PROMPTS, size=64)
        u = pipe.encode_negative("", size=64)
        emb_n, neg_n, _, neg_pooled_n = dpipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                            do_classifier_free_guidance=True,
                                                            negative_prompt=["blurry, low quality"] * 3)
        u_n = pipe.encode_negative("blurry, low quality", size=64)
        # each encoder on its own, as transformers computes it: the penultimate hidden state, no final LayerNorm
        ids_2 = weights.tokenize(pipe.tokenizer_2, PROMPTS, True)
        out_2 = ref.text_encoder_2(ids_2, output_hidden_states=True)
        assert torch.equal(c.embeds[..., 64:], out_2.hidden_states[-2]) and torch.equal(c.text_embeds, out_2.text_embeds)
    assert c.embeds.shape == (3, 77, 192) and c.text_embeds.shape == (3, 32)
    errs = {"embeds": (c.embeds - emb).abs().max().item(), "pooled": (c.text_embeds - pooled).abs().max().item(),
            "negative embeds": (u_n.embeds - neg_n[:1]).abs().max().item(),
            "negative pooled": (u_n.text_embeds - neg_pooled_n[:1]).abs().max().item()}
    print(f"\n[measured] encode_prompts vs diffusers encode_prompt: {errs}")
    assert max(errs.values()) <= 1e-6
    # force_zeros_for_empty_prompt: diffusers' negative_prompt=None is zeros (embeds and pooled)
    assert torch.equal(neg, torch.zeros_like(neg)) and torch.equal(neg_pooled, torch.zeros_like(neg_pooled))
    assert torch.equal(u.embeds, torch.zeros(1, 77, 192)) and torch.equal(u.text_embeds, torch.zeros(1, 32))
    # time ids: diffusers' _get_add_time_ids for (64, 64), crop (0, 0); and per requested size
    want_ids = dpipe._get_add_time_ids((64, 64), (0, 0), (64, 64), torch.float32, text_encoder_projection_dim=32)
    assert torch.equal(c.time_ids, want_ids.expand(3, 6)) and torch.equal(u.time_ids, want_ids)
    assert pipe.time_ids((96, 128)).tolist() == [[96, 128, 0, 0, 96, 128]]
    assert pipe.time_ids().tolist() == [[64.0] * 2 + [0.0] * 2 + [64.0] * 2]   # native: sample_size 8 x 8
    # without force_zeros the empty negative prompt is encoded like any other
    index = json.loads((folder / "model_index.json").read_text())
    assert index["force_zeros_for_empty_prompt"] is True
    pipe.force_zeros_for_empty_prompt = False
    plain = pipe.encode_negative("", size=64)
    assert torch.equal(plain.embeds, pipe.encode_prompts([""], size=64).embeds) and plain.embeds.abs().max() > 0


# ------------------------------------------------------------------------------------------------ sampling

def our_parts(xl):
    ref, dpipe, folder, _ = xl
    pipe = weights.load_pipeline(folder)
    return pipe, S.DDIMScheduler(S.SchedulerConfig.from_dict(pipe.scheduler_config), 20)


def test_rollout_matches_diffusers_sdxl_pipeline(xl):
    """Our UNet/VAE + rollout vs StableDiffusionXLPipeline + DDIMScheduler: same embeddings, pooled embeddings,
    time ids and noise; eta 0 (latents and decoded images) and eta 1."""
    ref, dpipe, folder, _ = xl
    pipe, s = our_parts(xl)
    with torch.no_grad():
        cond = pipe.encode_prompts(PROMPTS, size=64)
        uncond = pipe.encode_negative("blurry", size=64)
    seeds = [11, 12, 13]
    kw = dict(prompt_embeds=cond.embeds, pooled_prompt_embeds=cond.text_embeds, height=64, width=64,
              negative_prompt_embeds=uncond.embeds.expand(3, -1, -1),
              negative_pooled_prompt_embeds=uncond.text_embeds.expand(3, -1), num_inference_steps=20, guidance_scale=5.0)

    def close(a, b, what, tol=1e-4):
        err = (a - b).abs().max().item()
        print(f"\n[measured] SDXL {what}: max|ours - diffusers| = {err:.2e} (max|x| {b.abs().max():.3g})")
        return err <= tol

    x_T = S.draw_noise(seeds, (4, 8, 8), 0)[:, 0]
    with torch.no_grad():
        want = dpipe(**kw, latents=x_T, eta=0.0, output_type="latent").images
        want_img = dpipe(**kw, latents=x_T, eta=0.0, output_type="pt").images
    traj = S.rollout(pipe.unet, pipe.vae, s, cond, uncond, guidance=5.0, eta=0.0, seeds=seeds)
    assert torch.equal(traj.latents[:, 0], x_T)
    assert close(traj.latents[:, -1], want, "eta=0 x_0") and close(traj.images, want_img, "eta=0 images")
    gens = [torch.Generator().manual_seed(sd) for sd in seeds]
    x_T = torch.stack([torch.randn(4, 8, 8, generator=g) for g in gens])
    with torch.no_grad():
        want = dpipe(**kw, latents=x_T, generator=gens, eta=1.0, output_type="latent").images
    traj = S.rollout(pipe.unet, pipe.vae, s, cond, uncond, guidance=5.0, eta=1.0, seeds=seeds, decode=False)
    assert close(traj.latents[:, -1], want, "eta=1 x_0")


def ddpo_log_prob_f64(s, eps, t, x, x_prev, eta=1.0):
    """DDPO's step log-prob written out in float64 numpy (epsilon prediction), mean over C,H,W."""
    ac = s.alphas_cumprod.double().numpy()
    out = []
    for b, tb in enumerate(t.tolist()):
        a_t, a_p = ac[tb], ac[tb - s.step_ratio] if tb - s.step_ratio >= 0 else s.final_alpha_cumprod.item()
        e, xb, xp = (v[b].double().numpy() for v in (eps, x, x_prev))
        x0 = (xb - math.sqrt(1 - a_t) * e) / math.sqrt(a_t)
        sigma = eta * math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
        mu = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - sigma ** 2) * e
        out.append((-((xp - mu) ** 2) / (2 * sigma ** 2) - math.log(sigma) - 0.5 * math.log(2 * math.pi)).mean())
    return np.array(out)


def test_log_probs_and_ddpo_update_carry_the_added_conditioning(xl):
    """The rollout's log-probs equal the float64 formula on our guided eps; ddpo_update (LoRA, CFG, shuffled
    mixed-timestep micro-batches that slice the Conditioning) re-scores the stored steps to ratio 1 and trains."""
    pipe, s = our_parts(xl)
    s = S.DDIMScheduler(s.config, 6)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompts(PROMPTS, size=64), pipe.encode_negative("", size=64)
    traj = S.rollout(pipe.unet, pipe.vae, s, cond, uncond, guidance=5.0, eta=1.0, seeds=[1, 2, 3], decode=False)
    errs = []
    with torch.no_grad():
        for j in range(len(s.timesteps)):
            x, t = traj.latents[:, j], traj.timesteps[:, j]
            eps = S.guided_eps(pipe.unet, x, t, cond, uncond, 5.0)
            want = ddpo_log_prob_f64(s, eps, t, x, traj.latents[:, j + 1])
            errs.append(np.abs(traj.log_probs[:, j].double().numpy() - want).max())
    print(f"\n[measured] SDXL rollout log-probs vs float64 formula: max abs diff {max(errs):.2e} "
          f"(max|x| {traj.latents.abs().max():.3g})")
    # the step math is fp32: rounding of μ (|x| ~ 10 with random weights) over the last step's σ (0.06 at 6 steps)
    assert max(errs) <= 1e-5

    unet = pipe.unet.requires_grad_(False)
    params = lora.add_lora(unet, rank=2)
    samples = ddpo.Samples(traj.latents, traj.log_probs, traj.timesteps, torch.tensor([1.0, -0.5, -0.5]))
    before = [p.detach().clone() for p in params]
    m = ddpo.ddpo_update(unet, params, s, samples, torch.optim.SGD(params, lr=1e-2),
                         ddpo.UpdateConfig(guidance=5.0, micro_batch=4, optimizer_steps_per_epoch=2),
                         cond_embeds=cond, uncond_embeds=uncond, generator=torch.Generator().manual_seed(0),
                         reference=ddpo.reference_policy(unet))
    print(f"[measured] SDXL ddpo_update first_ratio_max_dev {m['first_ratio_max_dev']:.2e}")
    assert m["first_ratio_max_dev"] <= 1e-5 and m["items"] == 18 and m["grad_norm"] > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, params))


# ------------------------------------------------------------------------------------------------ loading

def _outputs(pipe, size=64):
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    with torch.no_grad():
        c = pipe.encode_prompts(["a red cube on a table", "an astronaut!"], size=size)
        return {"embeds": c.embeds, "pooled": c.text_embeds, "unet": pipe.unet(x, torch.tensor([999, 10]), c),
                "vae_decode": pipe.vae.decode(z)}


def test_folder_and_single_file_load_to_the_same_model(xl, tmp_path):
    ref, dpipe, folder, single = xl
    pipe_f, pipe_s = weights.load_pipeline(folder), weights.load_pipeline(single)
    got_f, got_s = _outputs(pipe_f), _outputs(pipe_s)
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    with torch.no_grad():   # diffusers' own modules on the same inputs
        want = ref.unet(x, torch.tensor([999, 10]), got_f["embeds"],
                        added_cond_kwargs={"text_embeds": got_f["pooled"], "time_ids": dpipe._get_add_time_ids(
                            (64, 64), (0, 0), (64, 64), torch.float32, 32).expand(2, 6)}).sample
        want_dec = ref.vae.decode(z).sample
    assert rel_err(got_f["unet"], want) <= TOL and (got_f["vae_decode"] - want_dec).abs().max() <= 1e-5
    for name in got_f:
        d = (got_s[name] - got_f[name]).abs().max().item()
        print(f"\n[measured] SDXL {name}: single file vs folder {d:.2e}")
        assert d <= 1e-6, name
    cf, cs = pipe_f.unet.config, pipe_s.unet.config
    for field in ("block_out_channels", "down_block_types", "up_block_types", "num_attention_heads",
                  "transformer_layers_per_block", "cross_attention_dim", "addition_embed_type",
                  "addition_time_embed_dim", "projection_class_embeddings_input_dim", "use_linear_projection"):
        assert getattr(cf, field) == getattr(cs, field), field
    assert cs.sample_size == 128 and pipe_s.native_size == 1024 and pipe_s.vae.config.scaling_factor == 0.13025
    assert pipe_f.vae.config.scaling_factor == 0.13025
    assert pipe_s.force_zeros_for_empty_prompt and pipe_s.openclip_tokens_2 and pipe_s.vae.upcast_fp16
    assert pipe_s.text_encoder_2.config.num_hidden_layers == 3   # all of bigG's layers: the last one pools

    # our save_pipeline writes an SDXL folder that we and diffusers read back to the same model
    weights.save_pipeline(tmp_path / "saved", pipe_f.unet, pipe_f.vae, pipe_f.text_encoder,
                          text_encoder_2=pipe_f.text_encoder_2)
    again = weights.load_pipeline(tmp_path / "saved")
    for name, v in _outputs(again).items():
        assert torch.equal(v, got_f[name]), name
    from diffusers import StableDiffusionXLPipeline
    back = StableDiffusionXLPipeline.from_pretrained(tmp_path / "saved")
    assert back.config.force_zeros_for_empty_prompt and back.vae.config.force_upcast
    # (a prompt without "!": transformers' tokenizer_2 makes every "!" its pad token, id 0, where open_clip, which
    # bigG was trained with, and we keep the BPE token, e.g. "!</w>" 256)
    prompts = ["a red cube on a table", "an astronaut"]
    with torch.no_grad():
        emb, _, pooled, _ = back.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                               do_classifier_free_guidance=False)
        c = again.encode_prompts(prompts)
        assert not torch.equal(weights.tokenize(again.tokenizer_2, ["a!"], True), back.tokenizer_2(
            ["a!"], padding="max_length", max_length=77, return_tensors="pt").input_ids)
    assert (emb - c.embeds).abs().max() <= 1e-6 and (pooled - c.text_embeds).abs().max() <= 1e-6


def test_fp16_vae_decodes_in_fp32(xl):
    """SDXL's VAE overflows in fp16: an fp16 pipeline keeps it in fp32, and an fp16 VAE decodes in fp32. SD's
    VAE is left as it was (test_weights.test_half_precision)."""
    _, _, folder, single = xl
    pipe = weights.load_pipeline(single, dtype=torch.float16)
    assert pipe.unet.conv_in.weight.dtype == torch.float16 and pipe.vae.decoder.conv_in.weight.dtype == torch.float32
    vae = pipe.vae
    with torch.no_grad():   # activations past fp16's range (65504) right after the first conv
        vae.decoder.conv_in.weight.mul_(3e4)
        vae.decoder.conv_in.bias.mul_(3e4)
    z = torch.randn(2, 4, 4, 4)
    want = vae.decode_latents(z)
    vae.half()
    vae.upcast_fp16 = False
    assert not torch.isfinite(vae.decode_latents(z)).all()   # fp16 decoding overflows
    vae.upcast_fp16 = True
    got = vae.decode_latents(z)
    assert vae.decoder.conv_in.weight.dtype == torch.float32 and torch.isfinite(got).all()
    assert (got - want).abs().max() <= 2e-3   # the weights went through fp16 once
    # encoding too (the pretraining regulariser encodes images): an fp16 VAE and fp16 input run in fp32
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    mean32 = vae.encode(img)[0]
    mean = vae.half().encode(img.half())[0]
    assert mean.dtype == vae.encoder.conv_in.weight.dtype == torch.float32 and (mean - mean32).abs().max() <= 1e-2


def test_bad_sdxl_inputs(xl, tmp_path):
    ref, _, folder, single = xl

    def error(source, exc=ValueError):
        with pytest.raises(exc) as e:
            weights.load_pipeline(source)
        assert "\n" not in str(e.value), str(e.value)
        return str(e.value)

    sd = weights.read_weights(single)
    refiner = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in sd.items()
               if not k.startswith("conditioner.embedders.0.")}
    msg = error(save_single_file(tmp_path / "refiner.safetensors", refiner))
    assert "not an SDXL base checkpoint" in msg and "refiner" in msg
    no_proj = {k: v for k, v in sd.items() if not k.endswith("text_projection")}
    assert "text_projection" in error(save_single_file(tmp_path / "no_proj.safetensors", no_proj))
    bad = {**sd, "conditioner.embedders.1.model.text_projection": torch.zeros(128, 16)}
    msg = error(save_single_file(tmp_path / "bad_proj.safetensors", bad))
    assert "add_embedding.linear_1.weight takes 80 inputs, not a pooled embedding of 16 + 6 time ids" in msg

    partial = tmp_path / "partial"
    partial.mkdir()
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "scheduler", "model_index.json"):
        (partial / comp).symlink_to(folder / comp)
    assert "tokenizer_2 is missing" in error(partial, FileNotFoundError)
    (partial / "text_encoder_2").unlink()   # an SDXL UNet with only one text encoder
    (partial / "tokenizer_2").symlink_to(folder / "tokenizer_2")
    assert "needs SDXL's added conditioning" in error(partial)


def test_gradient_checkpointing_same_grads(monkeypatch):
    """Checkpointing every resnet and, in multi-block transformers, every transformer block: the same gradients,
    the added embedding's included."""
    import unet as unet_module
    calls = []
    real = unet_module.checkpoint
    monkeypatch.setattr(unet_module, "checkpoint", lambda *a, **k: calls.append(type(a[0]).__name__) or real(*a, **k))
    torch.manual_seed(0)
    model = UNet2DConditionModel(UNetConfig.from_dict(TINY_UNETS["sdxl-structure"])).train()
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 48, generator=g)
    cond, t = added(model.config, 2), torch.tensor([5, 600])
    grads = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.zero_grad()
        model(x, t, ctx, cond).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert calls.count("ResnetBlock2D") == sum(isinstance(m, unet_module.ResnetBlock2D) for m in model.modules())
    # depth 1 (none here), 2 and 3: single-block transformers whole, the others block by block
    blocks = sum(len(m.transformer_blocks) for m in model.modules() if isinstance(m, unet_module.Transformer2DModel))
    assert calls.count("BasicTransformerBlock") == blocks and "Transformer2DModel" not in calls
    assert grads[0]["add_embedding.linear_1.weight"].abs().max() > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


def test_tiny_sdxl_and_sample_images():
    """"tiny-sdxl" (deterministic, CPU-fast) through weights.sample_images, the sampler sample.py and evaluate.py
    use: the negative prompt is zeros, the time ids follow the requested size, one image per (prompt, seed)."""
    a, b = weights.load_pipeline("tiny-sdxl"), weights.load_pipeline("tiny-sdxl")
    assert a.sdxl and all(torch.equal(p, q) for p, q in zip(a.text_encoder_2.parameters(), b.text_encoder_2.parameters()))
    s = S.DDIMScheduler(S.SchedulerConfig.from_dict(a.scheduler_config), 4)
    images = weights.sample_images(a, s, ["a cat", "a dog", "a cat"], [1, 2, 1], guidance=5.0, size=32, batch_size=2)
    assert images.shape == (3, 3, 32, 32) and torch.isfinite(images).all()
    # the same (prompt, seed) in another batch (of 2 vs 1): the same image up to float rounding
    assert (images[0] - images[2]).abs().max() <= 1e-3 and (images[0] - images[1]).abs().max() > 1e-2
    c = a.encode_prompts(["a cat"], size=32)
    assert c.time_ids.tolist() == [[32, 32, 0, 0, 32, 32]] and c.embeds.shape == (1, 77, 64)


def test_hub_files_of_the_sdxl_repo():
    """The SDXL base repo's listing: both text encoders and tokenizers, fp16 variants, no single files."""
    files = ["model_index.json", "scheduler/scheduler_config.json", "sd_xl_base_1.0.safetensors",
             "sd_xl_offset_example-lora_1.0.safetensors", "vae_1_0/diffusion_pytorch_model.fp16.safetensors",
             "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer_2/vocab.json", "tokenizer_2/merges.txt",
             "tokenizer_2/special_tokens_map.json"]
    for comp, stem in weights.SDXL_COMPONENTS.items():
        files += [f"{comp}/config.json", f"{comp}/{stem}.safetensors", f"{comp}/{stem}.fp16.safetensors"]
    got = weights.hub_files(files, torch.float16, weights.SDXL_MODEL)
    assert sorted(got) == sorted(
        ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "vae/config.json",
         "text_encoder/config.json", "text_encoder_2/config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
         "tokenizer_2/vocab.json", "tokenizer_2/merges.txt", "tokenizer_2/special_tokens_map.json",
         "unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
         "text_encoder/model.fp16.safetensors", "text_encoder_2/model.fp16.safetensors"])
