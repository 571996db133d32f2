"""Test builders: tiny random Stable Diffusion models, built with diffusers/transformers (test-only references),
saved as a diffusers folder and converted to the single-file LDM layout by our own diffusers -> LDM renaming
(the key tables of diffusers' convert_from_ckpt / single_file_utils, written independently of weights.py's LDM -> diffusers).

    sd = tiny_sd(sd2=False)                 # TinySD(unet, vae, text_encoder, sd2): diffusers/transformers modules
    save_diffusers_folder(root, sd)         # model_index.json, unet/ vae/ text_encoder/ tokenizer/ scheduler/
    ldm = to_ldm_state_dict(sd)             # "model.diffusion_model.*", "first_stage_model.*", "cond_stage_model.*"
    save_single_file(path, ldm)             # .safetensors or .ckpt (a plain torch.save of {"state_dict": ...})

The tiny configs follow the rules a single file's config is inferred by (LDM: 32 GroupNorm groups; SD1 UNets 8
heads per level, SD2 UNets and CLIP 64-wide heads), so both layouts describe the same model.
"""
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import weights

SD1_UNET = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_head_dim=8,
                cross_attention_dim=128, norm_num_groups=32, sample_size=8)
SD2_UNET = dict(block_out_channels=(32, 64, 128), layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                attention_head_dim=(1, 1, 2), use_linear_projection=True, upcast_attention=True,
                cross_attention_dim=128, norm_num_groups=32, sample_size=8)
VAE = dict(block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=32, sample_size=32)
TEXT = dict(vocab_size=49408, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77)


@dataclass
class TinySD:
    unet: object           # diffusers.UNet2DConditionModel
    vae: object            # diffusers.AutoencoderKL
    text_encoder: object   # transformers.CLIPTextModel
    sd2: bool


def _perturb(model, gen):
    """diffusers/transformers init GroupNorm/LayerNorm to ones/zeros, which would hide a swapped norm: add noise
    to every tensor so that each key carries its own values."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def tiny_sd(sd2: bool = False, seed: int = 0, vae_layers: int = 1) -> TinySD:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**(SD2_UNET if sd2 else SD1_UNET))
        vae = AutoencoderKL(**VAE, layers_per_block=vae_layers)
        text = CLIPTextModel(CLIPTextConfig(**TEXT, hidden_act="gelu" if sd2 else "quick_gelu"))
    return TinySD(_perturb(unet, gen), _perturb(vae, gen), _perturb(text, gen), sd2)


def clip_text_state_dict(text_encoder) -> dict:
    """Hub naming ("text_model.*") whichever transformers version built the model."""
    return {("" if k.startswith("text_model.") else "text_model.") + k: v.detach().clone()
            for k, v in text_encoder.state_dict().items() if not k.endswith("position_ids")}


def write_tokenizer_folder(folder: Path, pad: str) -> None:
    """A hub-style tokenizer/ folder (vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(weights._clip_bpe_folder() / name, folder / name)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**special, "model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}))


def save_diffusers_folder(root: Path, sd: TinySD, *, legacy_vae_names: bool = False,
                          prediction_type: str = "epsilon") -> Path:
    """What save_pretrained writes for an SD pipeline. SD1's text encoder is stored with the hub's "text_model."
    prefix, SD2's as transformers 5.x writes it (no prefix), so both conventions are exercised. legacy_vae_names
    stores the VAE attention as query/key/value/proj_attn, as the SD 1.5 hub VAE does."""
    root = Path(root)
    sd.unet.save_pretrained(root / "unet")
    sd.vae.save_pretrained(root / "vae")
    sd.text_encoder.save_pretrained(root / "text_encoder")
    te_file = root / "text_encoder" / "model.safetensors"
    te = load_file(te_file)
    te = clip_text_state_dict(sd.text_encoder) if not sd.sd2 else te
    save_file({k: v.contiguous() for k, v in te.items()}, te_file, metadata={"format": "pt"})
    if legacy_vae_names:
        vae_file = root / "vae" / "diffusion_pytorch_model.safetensors"
        old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        vae = {re.sub(r"\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: f".{old[m[1]]}.", k): v
               for k, v in load_file(vae_file).items()}
        save_file(vae, vae_file, metadata={"format": "pt"})
    write_tokenizer_folder(root / "tokenizer", "!" if sd.sd2 else "<|endoftext|>")
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
         "num_train_timesteps": 1000, "steps_offset": 1, "set_alpha_to_one": False, "skip_prk_steps": True,
         "prediction_type": prediction_type}))
    (root / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
         "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
         "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"]}))
    return root

# -----------------------------------------------------------------------------------------------------------
# diffusers -> LDM single file


_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_to_ldm(sd: dict, layers: int, up_attention: list[bool]) -> dict:
    """diffusers UNet keys -> LDM (the CompVis ldm openaimodel layout): down level i, layer j is input_blocks
    3i+j+1 for SD's 2 layers, i.e. i*(layers+1)+j+1; the downsampler input_blocks (i+1)*(layers+1) ".0.op";
    up level i, layer j is output_blocks i*(layers+1)+j; the upsampler sits after the last resnet (".1") or
    after its attention (".2")."""
    per = layers + 1
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        if p[0] in ("time_embedding", "conv_in", "conv_norm_out", "conv_out"):
            head = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
            k = next(new + k[len(old):] for old, new in head.items() if k.startswith(old + "."))
        elif p[0] == "down_blocks":
            i, kind, j, rest = int(p[1]), p[2], int(p[3]), ".".join(p[4:])
            if kind == "resnets":
                k = f"input_blocks.{1 + i * per + j}.0.{_RESNET[p[4]]}.{'.'.join(p[5:])}"
            elif kind == "attentions":
                k = f"input_blocks.{1 + i * per + j}.1.{rest}"
            else:   # downsamplers.0.conv.*
                k = f"input_blocks.{(i + 1) * per}.0.op.{'.'.join(p[5:])}"
        elif p[0] == "mid_block":
            index = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[f"{p[1]}.{p[2]}"]
            rest = f"{_RESNET[p[3]]}.{'.'.join(p[4:])}" if p[1] == "resnets" else ".".join(p[3:])
            k = f"middle_block.{index}.{rest}"
        elif p[0] == "up_blocks":
            i, kind, j = int(p[1]), p[2], int(p[3])
            if kind == "resnets":
                k = f"output_blocks.{i * per + j}.0.{_RESNET[p[4]]}.{'.'.join(p[5:])}"
            elif kind == "attentions":
                k = f"output_blocks.{i * per + j}.1.{'.'.join(p[4:])}"
            else:   # upsamplers.0.conv.*
                k = f"output_blocks.{i * per + layers}.{2 if up_attention[i] else 1}.{'.'.join(p[4:])}"
        out["model.diffusion_model." + k] = v
    return out


def vae_to_ldm(sd: dict, levels: int) -> dict:
    """diffusers VAE keys -> LDM (§2.3), attention as LDM's 1x1 convs q/k/v/proj_out."""
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for k, v in sd.items():
        k = re.sub(r"\.down_blocks\.(\d+)\.resnets\.", r".down.\1.block.", k)
        k = re.sub(r"\.down_blocks\.(\d+)\.downsamplers\.0\.", r".down.\1.downsample.", k)
        k = re.sub(r"\.up_blocks\.(\d+)\.resnets\.", lambda m: f".up.{levels - 1 - int(m[1])}.block.", k)
        k = re.sub(r"\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f".up.{levels - 1 - int(m[1])}.upsample.", k)
        k = k.replace(".mid_block.resnets.0.", ".mid.block_1.").replace(".mid_block.resnets.1.", ".mid.block_2.")
        k = k.replace(".conv_norm_out.", ".norm_out.").replace(".conv_shortcut.", ".nin_shortcut.")
        if m := re.fullmatch(r"(\w+)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)", k):
            k = f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
            v = v[:, :, None, None] if v.ndim == 2 else v
        out["first_stage_model." + k] = v
    return out


def clip_to_openclip(sd: dict, gen: torch.Generator) -> dict:
    """Hub-named CLIP text weights -> OpenCLIP layout (§3.2) with fused in_proj, plus one more (dummy) resblock
    on top, as SD2 files hold all 24 ViT-H layers and SD2 uses the penultimate one, and text_projection."""
    layer_map = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                 "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    out, n = {}, 0
    for k, v in sd.items():
        k = k.removeprefix("text_model.")
        if k == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = v
        elif k == "embeddings.position_embedding.weight":
            out["positional_embedding"] = v
        elif k.startswith("final_layer_norm."):
            out["ln_final." + k.split(".")[-1]] = v
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", k):
            i, name, kind = int(m[1]), m[2], m[3]
            n = max(n, i + 1)
            if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                if name.endswith("q_proj"):
                    qkv = [sd[f"text_model.encoder.layers.{i}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                    out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(qkv)
            else:
                out[f"transformer.resblocks.{i}.{layer_map[name]}.{kind}"] = v
    def dummy(*shape):   # (meta tensors stay meta: full-size layouts are checked without memory)
        return torch.empty(shape, device="meta") if meta else torch.randn(shape, generator=gen)
    meta = out["token_embedding.weight"].is_meta
    for k in [k for k in out if k.startswith("transformer.resblocks.0.")]:   # the unused last layer
        out[k.replace(".0.", f".{n}.", 1)] = dummy(*out[k].shape)
    width = out["token_embedding.weight"].shape[1]
    out["text_projection"] = dummy(width, width)
    out["logit_scale"] = dummy()
    return {"cond_stage_model.model." + k: v for k, v in out.items()}


def to_ldm_state_dict(sd: TinySD, seed: int = 1) -> dict:
    """The single-file layout of a TinySD, with the extras real files carry (schedule buffers, an EMA entry,
    position_ids / text_projection / logit_scale), which a loader must ignore."""
    gen = torch.Generator().manual_seed(seed)
    cfg = sd.unet.config
    unet = unet_to_ldm({k: v.detach().clone() for k, v in sd.unet.state_dict().items()}, cfg.layers_per_block,
                       [t.startswith("CrossAttn") for t in cfg.up_block_types])
    vae = vae_to_ldm({k: v.detach().clone() for k, v in sd.vae.state_dict().items()},
                     len(sd.vae.config.block_out_channels))
    text = clip_text_state_dict(sd.text_encoder)
    if sd.sd2:
        text = clip_to_openclip(text, gen)
    else:
        text = {"cond_stage_model.transformer." + k: v for k, v in text.items()}
        text["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    extras = {"betas": betas, "alphas_cumprod": torch.cumprod(1 - betas, 0), "model_ema.num_updates": torch.tensor(7),
              "model_ema.diffusion_modelconv_inweight": torch.randn(3, generator=gen)}
    return {**unet, **vae, **text, **extras}


def save_single_file(path: Path, state_dict: dict) -> Path:
    path = Path(path)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state_dict.items()}, path)
    else:
        torch.save({"state_dict": state_dict, "global_step": 1000}, path)
    return path

# -----------------------------------------------------------------------------------------------------------
# SDXL: a tiny random SDXL (diffusers/transformers modules), its diffusers pipeline and its SGM single-file layout
#
#     xl = tiny_sdxl()                        # TinySDXL(unet, vae, text_encoder, text_encoder_2)
#     pipe = diffusers_sdxl_pipeline(xl)      # StableDiffusionXLPipeline (tokenizers: CLIP BPE, EOS / "!" padding)
#     pipe.save_pretrained(root)              # the diffusers folder
#     save_single_file(path, sdxl_to_ldm_state_dict(xl))   # model.diffusion_model / first_stage_model / conditioner.*
#
# The structure of SDXL base at toy width: 3 levels, no attention at level 0, 1/2/3 transformer blocks (10 in the
# real model), text_time added conditioning, linear projections, context = 64 + 128 (CLIP-L + bigG widths), pooled
# 32 wide. Heads are 64 wide and GroupNorm has 32 groups, the rules a single file's config is inferred by.

SDXL_UNET = dict(block_out_channels=(32, 64, 128), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(1, 1, 2), transformer_layers_per_block=(1, 2, 3), use_linear_projection=True,
                 cross_attention_dim=64 + 128, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=32, sample_size=8)
SDXL_VAE = dict(VAE, scaling_factor=0.13025, force_upcast=True)
# the hub configs' legacy special ids (bos 0, eos 2, pad 1): transformers then pools at the argmax of the ids
_LEGACY_IDS = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)
SDXL_TEXT = dict(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=1,
                 max_position_embeddings=77, hidden_act="quick_gelu", **_LEGACY_IDS)
SDXL_TEXT_2 = dict(vocab_size=49408, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                   num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu", projection_dim=32, **_LEGACY_IDS)


@dataclass
class TinySDXL:
    unet: object             # diffusers.UNet2DConditionModel
    vae: object              # diffusers.AutoencoderKL
    text_encoder: object     # transformers.CLIPTextModel (CLIP ViT-L's role)
    text_encoder_2: object   # transformers.CLIPTextModelWithProjection (OpenCLIP bigG's role)


def tiny_sdxl(seed: int = 0) -> TinySDXL:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**SDXL_VAE)
        text = CLIPTextModel(CLIPTextConfig(**SDXL_TEXT))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2))
    return TinySDXL(*(_perturb(m, gen) for m in (unet, vae, text, text_2)))


def sdxl_tokenizers(folder: Path):
    """SDXL's two tokenizers as transformers loads them from hub-style folders: CLIP-L pads with <|endoftext|>,
    the bigG tokenizer with "!" (tokenizer_2/special_tokens_map.json of SDXL base)."""
    from transformers import CLIPTokenizer
    write_tokenizer_folder(Path(folder) / "tokenizer", "<|endoftext|>")
    write_tokenizer_folder(Path(folder) / "tokenizer_2", "!")
    return (CLIPTokenizer.from_pretrained(str(Path(folder) / "tokenizer")),
            CLIPTokenizer.from_pretrained(str(Path(folder) / "tokenizer_2")))


def diffusers_sdxl_pipeline(xl: TinySDXL, tokenizer_folder: Path, force_zeros_for_empty_prompt: bool = True):
    """diffusers' StableDiffusionXLPipeline on the tiny modules, with SD's DDIM schedule (our sampler's)."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    tok, tok_2 = sdxl_tokenizers(tokenizer_folder)
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                          steps_offset=1, set_alpha_to_one=False, clip_sample=False, prediction_type="epsilon")
    pipe = StableDiffusionXLPipeline(vae=xl.vae, text_encoder=xl.text_encoder, text_encoder_2=xl.text_encoder_2,
                                     tokenizer=tok, tokenizer_2=tok_2, unet=xl.unet, scheduler=sched,
                                     force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_unet_to_ldm(sd: dict, config) -> dict:
    """diffusers SDXL UNet keys -> LDM: unet_to_ldm, plus add_embedding.linear_{1,2} -> label_emb.0.{0,2}."""
    sd = dict(sd)
    label = {f"model.diffusion_model.label_emb.0.{2 * i}.{kind}": sd.pop(f"add_embedding.linear_{i + 1}.{kind}")
             for i in (0, 1) for kind in ("weight", "bias")}
    up_attention = [t.startswith("CrossAttn") for t in config.up_block_types]
    return {**unet_to_ldm(sd, config.layers_per_block, up_attention), **label}


def sdxl_to_ldm_state_dict(xl: TinySDXL, seed: int = 1) -> dict:
    """The SGM single-file layout of sd_xl_base_1.0.safetensors: the LDM UNet (add_embedding as label_emb.0.{0,2})
    and VAE, CLIP-L as conditioner.embedders.0.transformer.text_model.* (HF names), bigG as
    conditioner.embedders.1.model.* in open_clip names: all its layers, fused in_proj, text_projection = W^T (x @ P),
    plus the extras a loader must ignore (position_ids, logit_scale, schedule buffers)."""
    gen = torch.Generator().manual_seed(seed)
    unet = sdxl_unet_to_ldm({k: v.detach().clone() for k, v in xl.unet.state_dict().items()}, xl.unet.config)
    vae = vae_to_ldm({k: v.detach().clone() for k, v in xl.vae.state_dict().items()},
                     len(xl.vae.config.block_out_channels))
    text = {"conditioner.embedders.0.transformer." + k: v for k, v in clip_text_state_dict(xl.text_encoder).items()}
    text["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    tower = {k: v.detach().clone() for k, v in xl.text_encoder_2.state_dict().items()
             if k.startswith("text_model.") and not k.endswith("position_ids")}
    # clip_to_openclip writes SD2's layout: all layers plus one dummy on top, and a dummy text_projection. SDXL
    # files hold exactly the model's layers (32 for bigG) and the real projection.
    openclip = clip_to_openclip(tower, gen)
    n = xl.text_encoder_2.config.num_hidden_layers
    openclip = {k.replace("cond_stage_model.model.", "conditioner.embedders.1.model.", 1): v for k, v in openclip.items()
                if not k.startswith(f"cond_stage_model.model.transformer.resblocks.{n}.")}
    openclip["conditioner.embedders.1.model.text_projection"] = xl.text_encoder_2.text_projection.weight.detach().T.clone()
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    return {**unet, **vae, **text, **openclip, "alphas_cumprod": torch.cumprod(1 - betas, 0)}
