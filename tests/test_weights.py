"""weights.py: every source loads the same model (diffusers folder == LDM single file == diffusers/transformers
themselves), the tokenizer matches transformers (SD1) and open_clip (SD2), "tiny" is deterministic, fp16 file
selection, and one-line errors for bad input. Offline, tiny random models."""
import copy
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora
import weights
from helpers_sd import (clip_text_state_dict, clip_to_openclip, save_diffusers_folder, save_single_file, tiny_sd,
                        to_ldm_state_dict, unet_to_ldm, vae_to_ldm)
from unet import UNetConfig
from vae import VAEConfig

PROMPTS = ["a photo of an astronaut riding a horse on mars", "", "Hello, world!!! (test) -- 3.14 #tag @user",
           "café naïve résumé — “quotes” ‘single’ don’t", "東京の夜景 🚀🌸 Ünïcödé ÅÄÖ ß",
           "It's I'M we'll THEY'D", "&amp; &lt;b&gt; ﬁ ½ ｆｕｌｌ",
           "  multiple   spaces\tand\nnewlines  ", " ".join(f"word{i}, and!" for i in range(60))]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """built(sd2) -> (tiny SD as diffusers/transformers modules, its diffusers folder, its single-file LDM
    checkpoint: SD1 as .safetensors, SD2 as .ckpt), each made once per module."""
    cache = {}

    def get(sd2: bool):
        if sd2 not in cache:
            root = tmp_path_factory.mktemp("sd2" if sd2 else "sd1")
            ref = tiny_sd(sd2=sd2, vae_layers=2 if sd2 else 1)
            folder = save_diffusers_folder(root / "folder", ref, legacy_vae_names=not sd2,
                                           prediction_type="v_prediction" if sd2 else "epsilon")
            single = save_single_file(root / ("model.ckpt" if sd2 else "model.safetensors"), to_ldm_state_dict(ref))
            cache[sd2] = ref, folder, single
        return cache[sd2]
    return get


@pytest.fixture(params=[False, True], ids=["sd1", "sd2"])
def sources(request, built):
    return built(request.param)


def _max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def _outputs(unet, vae, text_encoder, gen_seed=0):
    """UNet noise prediction, VAE decode + encode mean and text last_hidden_state on fixed random inputs;
    accepts our modules or the diffusers/transformers ones."""
    g = torch.Generator().manual_seed(gen_seed)
    ids = weights.tokenize(weights.clip_tokenizer(), ["a red cube on a table", "an astronaut!"])
    x, z = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    img = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        ctx = text_encoder(ids).last_hidden_state
        eps = unet(x, torch.tensor([999, 10]), ctx)
        dec, enc = vae.decode(z), vae.encode(img)
    eps = getattr(eps, "sample", eps)
    dec = getattr(dec, "sample", dec)
    mean = enc.latent_dist.mean if hasattr(enc, "latent_dist") else enc[0]
    return {"text": ctx, "unet": eps, "vae_decode": dec, "vae_encode": mean}


def test_folder_and_single_file_match_diffusers(sources):
    ref, folder, single = sources
    want = _outputs(ref.unet, ref.vae, ref.text_encoder)
    pipe_f = weights.load_pipeline(folder)
    pipe_s = weights.load_pipeline(single, prediction_type="v_prediction" if ref.sd2 else None)
    got_f = _outputs(pipe_f.unet, pipe_f.vae, pipe_f.text_encoder)
    got_s = _outputs(pipe_s.unet, pipe_s.vae, pipe_s.text_encoder)
    for name in want:
        d_ref, d_files = _max_diff(got_f[name], want[name]), _max_diff(got_s[name], got_f[name])
        print(f"{'sd2' if ref.sd2 else 'sd1'} {name}: folder vs diffusers {d_ref:.2e}, single vs folder {d_files:.2e}")
        assert d_ref <= 1e-5 and d_files <= 1e-6, name
    # the single file's config inferred from shapes equals the folder's config.json (sample size aside)
    cf, cs = pipe_f.unet.config, pipe_s.unet.config
    for field in ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
                  "num_attention_heads", "cross_attention_dim", "use_linear_projection"):
        assert getattr(cf, field) == getattr(cs, field), field
    assert pipe_f.vae.config.block_out_channels == pipe_s.vae.config.block_out_channels
    assert pipe_f.vae.config.layers_per_block == pipe_s.vae.config.layers_per_block
    assert pipe_s.text_encoder.config.num_hidden_layers == ref.text_encoder.config.num_hidden_layers  # 24th dropped
    assert pipe_s.text_encoder.config.hidden_act == ("gelu" if ref.sd2 else "quick_gelu")
    expected_pred = "v_prediction" if ref.sd2 else "epsilon"
    assert pipe_f.scheduler_config["prediction_type"] == pipe_s.scheduler_config["prediction_type"] == expected_pred
    assert weights.load_pipeline(single).scheduler_config["prediction_type"] == "epsilon"   # singles default
    assert pipe_s.unet.config.upcast_attention == ref.sd2   # SD 2.1-768 (v) upcasts attention
    for pipe in (pipe_f, pipe_s):
        assert pipe.openclip_tokens == ref.sd2
        emb = pipe.encode_prompts(["a cat", "a dog!!", "x"])
        assert emb.shape == (3, 77, 128) and emb.dtype == torch.float32
        assert not any(p.requires_grad for p in pipe.vae.parameters())


def test_tokenizer_sd1_matches_transformers():
    from transformers import CLIPTokenizer
    ref = CLIPTokenizer.from_pretrained(str(weights._clip_bpe_folder()))   # pads with <|endoftext|>
    want = ref(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    got = weights.tokenize(weights.clip_tokenizer(), PROMPTS)
    assert got.shape == (len(PROMPTS), 77) and torch.equal(got, want)
    # CLIP BPE ids of common words (as transformers' CLIPTokenizer gives them), and the empty prompt
    assert got[0, :12].tolist() == [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407]
    assert got[1].tolist() == [49406] + [49407] * 76
    assert got[-1, -1] == 49407 and (got[-1] != 49407).sum() == 76   # truncated: BOS + 75 + EOS


def test_tokenizer_sd2_matches_open_clip(built, tmp_path):
    import open_clip
    from transformers import CLIPTokenizer
    want = open_clip.tokenize(PROMPTS)   # zero padding
    assert torch.equal(want, open_clip.get_tokenizer("ViT-H-14")(PROMPTS))
    got = weights.tokenize(weights.clip_tokenizer(), PROMPTS, openclip=True)
    assert torch.equal(got, want)
    assert got[1, :3].tolist() == [49406, 49407, 0]
    # the SD2 folder's tokenizer declares pad "!": the pipeline tokenizes like open_clip, "!!!" included
    _, folder, single = built(True)
    for source in (folder, single):
        assert torch.equal(weights.load_pipeline(source).tokenize(PROMPTS), want)
    # the same from a tokenizer folder saved by transformers 5.x (tokenizer.json, "!" an added special token)
    CLIPTokenizer(str(folder / "tokenizer" / "vocab.json"), str(folder / "tokenizer" / "merges.txt"),
                  pad_token="!").save_pretrained(tmp_path)
    assert not (tmp_path / "vocab.json").exists()
    tokenizer, openclip = weights._folder_tokenizer(tmp_path)
    assert openclip and torch.equal(weights.tokenize(tokenizer, PROMPTS, openclip), want)


def test_tiny_is_deterministic_and_fast():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    t0 = time.perf_counter()
    a = weights.load_pipeline("tiny")
    seconds = time.perf_counter() - t0
    assert torch.equal(torch.get_rng_state(), state)   # the global RNG is neither used nor moved
    torch.manual_seed(999)
    b = weights.load_pipeline("tiny")
    for ma, mb in ((a.unet, b.unet), (a.vae, b.vae), (a.text_encoder, b.text_encoder)):
        sa, sb = ma.state_dict(), mb.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    emb = a.encode_prompts(["a cat", "a dog", "a photo of a horse", ""])
    assert emb.shape == (4, 77, weights.TINY["text_encoder"]["hidden_size"]) and torch.isfinite(emb).all()
    with torch.no_grad():
        eps = a.unet(torch.randn(4, 4, 8, 8), torch.tensor([999, 500, 10, 1]), emb)
        images = a.vae.decode_latents(eps)
    assert eps.shape == (4, 4, 8, 8) and images.shape == (4, 3, 64, 64)   # latents * 8 = pixels
    assert a.scheduler_config["prediction_type"] == "epsilon" and a.tokenize(["x"]).shape == (1, 77)
    print(f"load_pipeline('tiny'): {seconds:.2f} s")   # a figure for the reader, not an assertion


def test_half_precision(sources):
    ref, folder, single = sources
    ids = weights.tokenize(weights.clip_tokenizer(), ["a cat"], openclip=ref.sd2)
    with torch.no_grad():
        want = ref.text_encoder(ids).last_hidden_state
    for dtype in (torch.bfloat16, torch.float16):
        for source in (folder, single):
            pipe = weights.load_pipeline(source, dtype=dtype)
            assert all(p.dtype == dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())
            got = pipe.encode_prompts(["a cat"])
            assert got.dtype == dtype and _max_diff(got, want) < 0.1 * want.abs().max().item()


def test_fp16_variant_selection(built, tmp_path, monkeypatch):
    files = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
             "safety_checker/model.safetensors", "safety_checker/config.json", "v1-5-pruned-emaonly.safetensors",
             "feature_extractor/preprocessor_config.json"]
    for comp, stem in weights.COMPONENTS.items():
        files += [f"{comp}/config.json", f"{comp}/{stem}.safetensors", f"{comp}/{stem}.fp16.safetensors",
                  f"{comp}/{stem}.bin", f"{comp}/{stem}.fp16.bin"]
    files.append("unet/diffusion_pytorch_model.non_ema.safetensors")
    half = weights.hub_files(files, torch.float16)
    assert sorted(half) == sorted(
        ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
         "unet/config.json", "vae/config.json", "text_encoder/config.json",
         "unet/diffusion_pytorch_model.fp16.safetensors",
         "vae/diffusion_pytorch_model.fp16.safetensors", "text_encoder/model.fp16.safetensors"])
    assert weights.hub_files(files, torch.bfloat16) == half
    full = weights.hub_files(files, torch.float32)
    assert "unet/diffusion_pytorch_model.safetensors" in full and not any(".fp16." in f for f in full)
    no_variant = [f for f in files if ".fp16." not in f]   # half precision falls back to the full files
    assert "text_encoder/model.safetensors" in weights.hub_files(no_variant, torch.float16)
    assert weights.pick_weights(["model.bin", "model.fp16.bin"], "model", torch.float32) == "model.bin"
    assert weights.pick_weights(["model.fp16.safetensors"], "model", torch.float32) == "model.fp16.safetensors"
    with pytest.raises(ValueError, match=r"^org/x: the repo has no unet/diffusion_pytorch_model\.safetensors"):
        weights.hub_files([f for f in files if not f.startswith("unet/")], torch.float16, "org/x")

    # the hub path end to end, with the hub faked: only the chosen files are asked for, the folder is loaded
    _, folder, _ = built(False)
    local = Path(shutil.copytree(folder, tmp_path / "snapshot", copy_function=os.symlink))
    full = local / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v.half() for k, v in load_file(full).items()}, full.with_suffix(".fp16.safetensors"))
    listing = [str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()]
    calls, read = [], []
    monkeypatch.setattr(weights.hub, "unreachable", lambda: None)   # a hub that answers (conftest: offline)
    monkeypatch.setattr(weights.huggingface_hub, "list_repo_files", lambda repo: listing)
    monkeypatch.setattr(weights.huggingface_hub, "snapshot_download",
                        lambda repo, allow_patterns=None, **kw: calls.append(allow_patterns) or str(local))
    real_read = weights.read_weights
    monkeypatch.setattr(weights, "read_weights", lambda p, **kw: read.append(Path(p).name) or real_read(p, **kw))
    pipe = weights.load_pipeline("org/tiny-sd", dtype=torch.float16)
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in calls[0]
    assert "unet/diffusion_pytorch_model.safetensors" not in calls[0]
    assert read[0] == "diffusion_pytorch_model.fp16.safetensors" and pipe.source == "org/tiny-sd"
    read.clear()
    weights.load_pipeline(local)
    assert read[0] == "diffusion_pytorch_model.safetensors"   # fp32 reads the full file


def test_hub_offline_error(monkeypatch, tmp_path):
    monkeypatch.setattr(weights.huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert weights.huggingface_hub.constants.HF_HUB_OFFLINE   # conftest sets HF_HUB_OFFLINE=1
    with pytest.raises(RuntimeError) as e:
        weights.load_pipeline(weights.SD21_BASE_MODEL)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(weights.SD21_BASE_MODEL)
    assert "HF_HUB_OFFLINE=1" in msg and "hf download" in msg and "local diffusers folder" in msg


@pytest.fixture
def hub_down(monkeypatch, tmp_path):
    """A machine without network and without HF_HUB_OFFLINE: connections fail, the hub cache is empty, and any call
    that would go to the hub anyway (and retry for ~30 s) fails the test."""
    import huggingface_hub
    import hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)

    def refuse(*a, **k):
        raise OSError(101, "Network is unreachable")
    monkeypatch.setattr(hub.socket, "create_connection", refuse)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda *a, **k: pytest.fail("the hub was asked"))
    hub.unreachable.cache_clear()
    yield
    hub.unreachable.cache_clear()


def test_unreachable_hub_fails_fast_with_one_line(hub_down, monkeypatch):
    """No network: one connection attempt, then the cache, then one line (before: five retries over ~30 s)."""
    import huggingface_hub
    import rewards
    with pytest.raises(RuntimeError) as e:
        weights.load_pipeline("someone/some-model")
    msg = str(e.value)
    assert "\n" not in msg and "Hub is unreachable (cannot connect to huggingface.co: Network is unreachable)" in msg
    calls = []

    def download(repo, filename, **kw):
        calls.append(kw)
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    with pytest.raises(FileNotFoundError) as e:
        rewards.build_reward("hps")
    assert calls == [{"local_files_only": True}]   # the cache only: no retries against a dead network
    msg = str(e.value)
    assert "\n" not in msg and "the hub is unreachable: cannot connect to huggingface.co" in msg
    assert "--hps-checkpoint PATH" in msg


def test_bad_inputs(sources, tmp_path):
    ref, folder, single = sources

    def error(source, exc=ValueError, **kw):
        with pytest.raises(exc) as e:
            weights.load_pipeline(source, **kw)
        msg = str(e.value)
        assert "\n" not in msg, msg
        return msg

    msg = error(tmp_path / "nope" / "model.safetensors", FileNotFoundError)
    assert "nope/model.safetensors: no such file or folder" in msg and "hub id" in msg

    data = single.read_bytes()
    cut = tmp_path / f"cut{single.suffix}"
    cut.write_bytes(data[: len(data) // 2])
    msg = error(cut)
    assert msg.startswith(str(cut)) and "truncated" in msg and "download it again" in msg
    fake = tmp_path / "notes.safetensors"
    fake.write_text("just some text, not tensors")
    assert "not a readable safetensors file" in error(fake)
    assert "unsupported file type '.txt'" in error(fake.rename(tmp_path / "notes.txt"))

    # a pickle that would run code: refused by weights_only loading, and the code never runs
    class Evil:
        def __reduce__(self):
            return os.makedirs, (str(tmp_path / "pwned"),)
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "callback": Evil()}, evil)
    msg = error(evil)
    assert "refusing to unpickle" in msg and "makedirs" in msg and ".safetensors" in msg
    assert not (tmp_path / "pwned").exists()

    # an incomplete SDXL single file (recognised by its conditioner.* keys; complete ones: test_sdxl.py) and a
    # random state dict
    sdxl = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
            "model.diffusion_model.label_emb.0.0.weight": torch.zeros(1280, 2816),
            "first_stage_model.decoder.conv_in.weight": torch.zeros(512, 4, 3, 3),
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(768),
            "conditioner.embedders.1.model.ln_final.weight": torch.zeros(1280)}
    msg = error(save_single_file(tmp_path / "sdxl.safetensors", sdxl))
    assert "cannot infer the model configs from the weights" in msg and "pass an SDXL base checkpoint" in msg
    random_sd = {"fc.weight": torch.zeros(3, 3), "fc.bias": torch.zeros(3)}
    msg = error(save_single_file(tmp_path / "random.safetensors", random_sd))
    assert "missing keys 3 (model.diffusion_model.*, first_stage_model.*, cond_stage_model.*)" in msg
    assert "unexpected keys 2 (fc.bias, fc.weight)" in msg
    ldm = to_ldm_state_dict(ref)
    ldm["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(4, 4)
    del ldm["model.diffusion_model.out.2.bias"]
    msg = error(save_single_file(tmp_path / "extra.safetensors", ldm))
    assert "(UNet): the weights do not fit UNet2DConditionModel" in msg
    assert "missing keys 1 (conv_out.bias)" in msg and "unexpected keys 1 (add_embedding.linear_1.weight)" in msg

    # wrong shapes: a folder whose config does not match its weights
    bad = tmp_path / "bad_folder"
    for comp in ("vae", "text_encoder", "tokenizer", "scheduler"):
        (bad / comp).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(folder / comp, bad / comp)
    (bad / "unet").mkdir()
    unet_file = "diffusion_pytorch_model.safetensors"
    os.symlink(folder / "unet" / unet_file, bad / "unet" / unet_file)
    config = json.loads((folder / "unet" / "config.json").read_text())
    (bad / "unet" / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 64}))
    msg = error(bad)
    assert "attn2.to_k.weight has shape [32, 128] but the config expects [32, 64]" in msg
    assert msg.startswith(str(bad / "unet" / "diffusion_pytorch_model.safetensors"))
    (bad / "tokenizer").unlink()
    msg = error(bad, FileNotFoundError)
    assert "not a diffusers Stable Diffusion folder: tokenizer is missing" in msg
    assert "prediction_type" in error("tiny", prediction_type="v-pred")


def test_load_finetuned(built, tmp_path):
    _, folder, _ = built(False)
    pipe = weights.load_pipeline(folder)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500, 20])
    ctx = pipe.encode_prompts(["a", "b"])
    with torch.no_grad():
        base = pipe.unet(x, t, ctx)

    # a full UNet export: <run>/export/unet/{config.json, diffusion_pytorch_model.safetensors}
    tuned = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        tuned.conv_out.bias.add_(0.5)
        want = tuned(x, t, ctx)
    export = tmp_path / "run_full" / "export" / "unet"
    export.mkdir(parents=True)
    (export / "config.json").write_text(json.dumps(tuned.config.to_dict()))
    save_file(tuned.state_dict(), export / "diffusion_pytorch_model.safetensors",
              metadata={"format": "nanoddpo-unet", "base_model": str(folder)})
    weights.load_finetuned(pipe, tmp_path / "run_full")
    with torch.no_grad():
        assert torch.equal(pipe.unet(x, t, ctx), want)

    # a LoRA export: <run>/export/lora.safetensors
    pipe = weights.load_pipeline(folder)
    lora_unet = copy.deepcopy(pipe.unet)
    lora.add_lora(lora_unet, rank=2)
    with torch.no_grad():
        for p in lora.lora_parameters(lora_unet):
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        want = lora_unet(x, t, ctx)
    (tmp_path / "run_lora" / "export").mkdir(parents=True)
    lora.save_lora(tmp_path / "run_lora" / "export" / "lora.safetensors", lora_unet, {"base_model": str(folder)})
    weights.load_finetuned(pipe, tmp_path / "run_lora")
    with torch.no_grad():
        got = pipe.unet(x, t, ctx)
    assert _max_diff(got, want) <= 1e-6 and _max_diff(got, base) > 1e-3
    with pytest.raises(FileNotFoundError, match="no export/lora.safetensors"):
        weights.load_finetuned(pipe, tmp_path)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk\.safetensors: not a readable safetensors file \(.*\); pass"):
        weights.load_finetuned(pipe, tmp_path / "junk.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["sd15", "sd21-base", "sd21-v"])
def test_full_size_layouts(preset):
    """The real SD architectures, on the meta device (no memory): diffusers -> LDM -> our renaming gives back
    every key and shape, the configs inferred from the shapes are the presets, and the parameter counts are
    the published SD 1.x/2.x configs (diffusers' hub config.json files)."""
    from diffusers import AutoencoderKL as DiffusersVAE, UNet2DConditionModel as DiffusersUNet
    from transformers import CLIPTextConfig, CLIPTextModel
    sd2, v = preset != "sd15", preset == "sd21-v"
    with torch.device("meta"):
        unet = DiffusersUNet.from_config(UNetConfig.preset(preset).to_dict())
        vae = DiffusersVAE.from_config(VAEConfig.preset("sd").to_dict())
        text = CLIPTextModel(CLIPTextConfig(hidden_size=1024 if sd2 else 768, num_hidden_layers=23 if sd2 else 12,
                                            intermediate_size=4096 if sd2 else 3072, num_attention_heads=16 if sd2 else 12,
                                            hidden_act="gelu" if sd2 else "quick_gelu"))
    unet_sd, vae_sd = unet.state_dict(), vae.state_dict()
    shapes = lambda d: {k: tuple(t.shape) for k, t in d.items()}   # noqa: E731

    ldm = unet_to_ldm(unet_sd, 2, [t.startswith("CrossAttn") for t in unet.config.up_block_types])
    back = weights.ldm_unet_to_diffusers({k.removeprefix("model.diffusion_model."): t for k, t in ldm.items()})
    assert len(back) == 686 and shapes(back) == shapes(unet_sd)
    config = weights.unet_config_from_weights(back, v_prediction=v)
    assert config == UNetConfig.preset(preset)
    ours = weights._build_unet(config, back, preset)
    assert sum(p.numel() for p in ours.parameters()) == (865_910_724 if sd2 else 859_520_964)

    ldm = vae_to_ldm(vae_sd, 4)
    back = weights.ldm_vae_to_diffusers({k.removeprefix("first_stage_model."): t for k, t in ldm.items()})
    assert len(back) == 248 and shapes(back) == shapes(vae_sd)
    assert weights.vae_config_from_weights(back) == VAEConfig.preset("sd")
    ours = weights._build_vae(weights.vae_config_from_weights(back), back, "vae")
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863

    hub = clip_text_state_dict(text)
    if sd2:   # 24 OpenCLIP resblocks (fused in_proj) -> the 23-layer tower
        ldm = clip_to_openclip(hub, torch.Generator())
        assert sum(k.endswith("attn.in_proj_weight") for k in ldm) == 24
        hub_back = weights.openclip_to_clip({k.removeprefix("cond_stage_model.model."): t for k, t in ldm.items()
                                             if not weights.IGNORED.search(k)})
        assert shapes(hub_back) == shapes(hub)
    config = weights.clip_config_from_weights(hub, "gelu" if sd2 else "quick_gelu")
    for field in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "hidden_act",
                  "vocab_size", "max_position_embeddings"):
        assert getattr(config, field) == getattr(text.config, field), field
    ours = weights._build_text_encoder(config, hub, "text")
    assert sum(p.numel() for p in ours.parameters()) == (340_387_840 if sd2 else 123_060_480)
