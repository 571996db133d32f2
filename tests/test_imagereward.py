"""ImageReward v1.0 (rewards_imagereward.py) against the PyPI `image-reward` 1.5 package as the reference, on identical
random weights of a small architecture; the full-size key layout against THUDM/ImageReward's ImageReward.pt (facts
measured on the package) and against the package itself; loading through build_reward; the preprocessing.

The reference package cannot be a line of requirements-dev.txt: every image-reward release pins timm==0.6.13, which
open_clip_torch 3.x (timm>=1.0.17) excludes, so pip would downgrade open_clip to 2.32 for the whole environment.
The test command therefore installs its 42 KB pure-Python wheel on its own, `pip install --no-deps
image-reward==1.5` (the README's test command, .ci/run); without it the reference part skips. It is imported through a shim: its package __init__s (which pull in clip, diffusers, datasets and ReFL) are
skipped, fairscale (only its checkpoint_wrapper import) is stubbed when absent, and four transformers-5 breakages
are patched (reference_facts §1.2-1.3). Nothing else of the package is changed.
"""
import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import rewards_imagereward as R
from reward_base import quantize, to_uint8
from rewards import build_reward

# a test vocabulary in bert-base-uncased's layout of specials first ([PAD] 0); + [DEC], [ENC] = vocab_size
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "an", "the", "photo", "of", "cat", "dog", "horse",
         "riding", "red", "blue", "in", "space", "astronaut", "cafe", ",", ".", "##s", "##ing", "ride"]
PROMPTS = ["a photo of a cat riding a horse", "A red dog, in space.",
           "an astronaut riding a blue horse in space, " * 6,   # 60 tokens: truncated
           "a photo of a cat riding a horse", "The Café of zebra cats"]   # accents and case dropped; an [UNK]
SMALL = dict(vision_width=64, vision_layers=2, vision_heads=2, text_layers=2, text_heads=12, intermediate_size=256,
             max_position_embeddings=64, vocab_size=len(WORDS) + 2)   # hidden 768: the package's MLP(768)
MED_CONFIG = dict(architectures=["BertModel"], attention_probs_dropout_prob=0.1, hidden_act="gelu",
                  hidden_dropout_prob=0.1, hidden_size=768, initializer_range=0.02, intermediate_size=3072,
                  layer_norm_eps=1e-12, max_position_embeddings=512, model_type="bert", num_attention_heads=12,
                  num_hidden_layers=12, pad_token_id=0, type_vocab_size=2, vocab_size=30524, encoder_width=768,
                  add_cross_attention=True)   # BLIP's configs/med_config.json (not in the wheel)


# -----------------------------------------------------------------------------
# the reference package, imported through the shim

def _package_dir() -> Path | None:
    """The installed ImageReward package folder (the test command installs it with --no-deps), or None."""
    if "ImageReward" in sys.modules:   # imported (or stubbed by `pkg`) already in this process
        return Path(list(sys.modules["ImageReward"].__path__)[0])
    spec = importlib.util.find_spec("ImageReward")
    return Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bert") / "vocab.txt"
    path.write_text("\n".join(WORDS) + "\n")
    return path


@pytest.fixture(scope="module")
def pkg(vocab):
    """The package's modules (ImageReward.py, blip_pretrain, med, vit), made importable on transformers 5."""
    where = _package_dir()
    if where is None:
        pytest.skip("the image-reward reference is not installed: pip install --no-deps image-reward==1.5")
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu
    from transformers import BertTokenizer
    for name in ("apply_chunking_to_forward", "prune_linear_layer"):   # moved in transformers 5
        if not hasattr(mu, name):
            setattr(mu, name, getattr(pu, name))
    if not hasattr(mu, "find_pruneable_heads_and_indices"):            # removed; only prune_heads uses it
        mu.find_pruneable_heads_and_indices = None
    try:
        importlib.import_module("fairscale.nn.checkpoint.checkpoint_activations")
    except ImportError:   # vit.py imports checkpoint_wrapper, used only with use_grad_checkpointing
        names = ("fairscale", "fairscale.nn", "fairscale.nn.checkpoint",
                 "fairscale.nn.checkpoint.checkpoint_activations")
        for name in names:
            sys.modules[name] = types.ModuleType(name)
            sys.modules[name].__path__ = []

        def checkpoint_wrapper(*args, **kwargs):   # the package calls it only with use_grad_checkpointing=True
            raise RuntimeError("fairscale is not installed: this test's stub cannot checkpoint the ViT")
        sys.modules[names[-1]].checkpoint_wrapper = checkpoint_wrapper
    if "ImageReward.ImageReward" not in sys.modules:   # skip the __init__s (clip, ReFL, datasets, diffusers)
        for name, path in (("ImageReward", where), ("ImageReward.models", where / "models")):
            sys.modules[name] = types.ModuleType(name)
            sys.modules[name].__path__ = [str(path)]
    from ImageReward.models.BLIP import blip_pretrain, med, vit
    import ImageReward.ImageReward as IR

    def init_tokenizer():   # BLIP's, on the test vocabulary (transformers 5: vocab=, not vocab_file=)
        tok = BertTokenizer(vocab=str(vocab))
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tok.enc_token_id = tok.convert_tokens_to_ids("[ENC]")
        return tok
    blip_pretrain.init_tokenizer = init_tokenizer
    # BertModel.__init__ -> init_weights -> tie_weights reads all_tied_weights_keys (set only by post_init in 5.x)
    med.BertModel.all_tied_weights_keys = {}
    med.BertModel.get_head_mask = lambda self, head_mask, n: [None] * n if head_mask is None else head_mask
    med.BertModel.invert_attention_mask = \
        lambda self, m: (1.0 - m[:, None, None, :].to(self.dtype)) * torch.finfo(self.dtype).min
    return types.SimpleNamespace(IR=IR, blip_pretrain=blip_pretrain, vit=vit)


def _med_config(tmp_path: Path, c: R.ImageRewardConfig) -> str:
    cfg = dict(MED_CONFIG, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
               max_position_embeddings=c.max_position_embeddings, num_attention_heads=c.text_heads,
               num_hidden_layers=c.text_layers, vocab_size=c.vocab_size)
    path = tmp_path / "med_config.json"
    path.write_text(json.dumps(cfg, indent=2))
    return str(path)


def _package_model(pkg, tmp_path: Path, c: R.ImageRewardConfig):
    """The package's ImageReward with the ViT of config c (ImageReward.py hard-codes vit='large')."""
    create_vit = pkg.blip_pretrain.create_vit

    def small_vit(*args, **kwargs):
        return pkg.vit.VisionTransformer(img_size=c.image_size, patch_size=c.patch_size, embed_dim=c.vision_width,
                                         depth=c.vision_layers, num_heads=c.vision_heads,
                                         mlp_ratio=c.vision_mlp_ratio, drop_path_rate=0.1), c.vision_width
    pkg.blip_pretrain.create_vit = small_vit
    try:
        return pkg.IR.ImageReward(med_config=_med_config(tmp_path, c), device="cpu").eval()   # eval: drop-path
    finally:
        pkg.blip_pretrain.create_vit = create_vit


def scramble(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights whose scores spread: the default init gives every image and prompt the same score (its MLP is
    ~0, r = -mean/std), and zero biases or unit LayerNorm gains would hide a mis-wired one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.shape[0] > 1 else p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    return model


def smooth_images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """(n,3,h,w) in [0.1, 0.9], smooth: bicubic resizing neither overshoots [0,1] nor amplifies 8-bit rounding."""
    g = torch.Generator().manual_seed(seed)
    return 0.1 + 0.8 * F.interpolate(torch.rand(n, 3, 6, 7, generator=g), size=(h, w), mode="bilinear",
                                     align_corners=False)


def our_tokenizer(vocab: Path):
    from transformers import BertTokenizer
    return R.add_blip_tokens(BertTokenizer(str(vocab)))   # positional, as rewards.py passes a vocab.txt


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


# -----------------------------------------------------------------------------
# 1. parity on identical random weights

def test_parity_with_the_package_on_identical_random_weights(pkg, vocab, tmp_path):
    c = R.ImageRewardConfig(**SMALL)
    ref = scramble(_package_model(pkg, tmp_path, c))
    ours = R.ImageRewardModel(c).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)   # the same names: no mapping table

    # text: the package's tokenizer call, ids identical ([CLS] first, no [ENC]; [PAD] 0; truncated to 35)
    t = ref.blip.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    ids, mask = R.tokenize(our_tokenizer(vocab), PROMPTS)
    assert torch.equal(ids, t.input_ids) and torch.equal(mask, t.attention_mask)
    assert ids.shape == (len(PROMPTS), 35) and (ids[:, 0] == WORDS.index("[CLS]")).all()
    assert mask[2].all() and ids[2, -1] == WORDS.index("[SEP]") and mask[1].sum() < 35 and ids[1, -1] == 0
    assert (ids == WORDS.index("[UNK]")).any() and (ids == WORDS.index("cafe")).any()   # lower case, accents off

    # the same normalised pixels into both: the package's score_gard (its batched tensor entry)
    x = quantize(smooth_images(len(PROMPTS), 256, 264))
    px = R.preprocess(x)
    with torch.no_grad():
        want = ref.score_gard(t.input_ids, t.attention_mask, px).squeeze(-1)
        image = ref.blip.visual_encoder(px)
        want_h = ref.blip.text_encoder(t.input_ids, attention_mask=t.attention_mask, encoder_hidden_states=image,
                                       encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long),
                                       return_dict=True).last_hidden_state[:, 0]
        got = ours(px, ids, mask)
        got_h = ours.blip.text_encoder(ids, mask, ours.blip.visual_encoder(px))[:, 0]
    err, err_h = rel_err(got, want), rel_err(got_h, want_h)
    print(f"\nImageReward parity on identical random weights: score rel err {err:.2e}, [CLS] feature rel err "
          f"{err_h:.2e} (scores {[round(v, 4) for v in want.tolist()]})")
    assert err <= 1e-5 and err_h <= 1e-5
    assert want.std() > 0.1 and (want[0] - want[3]).abs() > 1e-3   # the weights spread scores; prompt 0 == prompt 3,
    #                                                                 images differ: the image reaches the score

    # the whole reward (8-bit rounding, preprocessing, each prompt tokenized once, chunks) against the package's
    # score(prompt, PIL image), its PIL path: Resize(224, BICUBIC) on the 8-bit image, CenterCrop, ToTensor, Normalize
    scores, _ = R.ImageReward(ours, our_tokenizer(vocab), chunk_size=2)(x, PROMPTS)
    pil = [Image.fromarray(a) for a in to_uint8(x)]
    with torch.no_grad():
        want_pil = torch.tensor([ref.score(p, im) for p, im in zip(PROMPTS, pil)])
    assert rel_err(scores, want) <= 1e-5
    gap = (scores - want_pil).abs().max().item()
    print(f"ImageReward against the package's PIL path: max |score difference| {gap:.2e} (score std "
          f"{want_pil.std():.3f})")
    assert gap <= 5e-2 * want_pil.std()


# -----------------------------------------------------------------------------
# 2. full-size layout

# THUDM/ImageReward ImageReward.pt: prefix -> (keys, elements) [reward_and_sdxl_facts.md §1.5, measured on the package]
FULL_PREFIXES = {"blip.visual_encoder.": (294, 303_301_632), "blip.text_encoder.": (317, 141_977_600),
                 "blip.vision_proj.": (2, 262_400), "blip.text_proj.": (2, 196_864), "mlp.layers.": (10, 927_969)}


def test_full_size_keys_and_shapes_are_imagereward_v1():
    with torch.device("meta"):
        model = R.ImageRewardModel()
    sd = model.state_dict()
    assert len(sd) == 625 and sum(p.numel() for p in model.parameters()) == 446_665_953
    for prefix, (keys, elements) in FULL_PREFIXES.items():
        mine = [v for k, v in sd.items() if k.startswith(prefix)]
        assert (len(mine), sum(v.numel() for v in mine)) == (keys, elements), prefix
    assert {k.split(".")[2] for k in sd if k.startswith("mlp.")} == {"0", "2", "4", "6", "7"}
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["blip.visual_encoder.pos_embed"] == (1, 197, 1024)
    assert shapes["blip.visual_encoder.patch_embed.proj.weight"] == (1024, 3, 16, 16)
    assert shapes["blip.text_encoder.embeddings.word_embeddings.weight"] == (30524, 768)
    assert shapes["blip.text_encoder.embeddings.position_ids"] == (1, 512)
    assert shapes["blip.text_encoder.encoder.layer.11.crossattention.self.key.weight"] == (768, 1024)
    assert not any("token_type" in k or "pooler" in k for k in sd)   # BLIP's BERT has neither


def test_full_size_keys_and_shapes_equal_the_package(pkg, tmp_path, monkeypatch):
    linspace = torch.linspace   # vit.py takes .item() of a linspace (drop-path rates): that one stays on the CPU
    monkeypatch.setattr(torch, "linspace", lambda *a, **k: linspace(*a, **{**k, "device": "cpu"}))
    with torch.device("meta"):
        ref = pkg.IR.ImageReward(med_config=_med_config(tmp_path, R.ImageRewardConfig()), device="cpu")
        ours = R.ImageRewardModel()
    monkeypatch.undo()
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want and len(want) == 625


def test_flops_per_image_is_torchs_count():
    """README's cost: the formula equals torch's FLOP counter on the meta device, tiny and full size."""
    from torch.utils.flop_counter import FlopCounterMode
    for c in (R.ImageRewardConfig(**SMALL), R.ImageRewardConfig()):
        with torch.device("meta"):
            model = R.ImageRewardModel(c)
            ids = torch.zeros(1, 35, dtype=torch.long)
            args = torch.zeros(1, 3, 224, 224), ids, torch.ones_like(ids)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(*args)
        assert counter.get_total_flops() == R.flops_per_image(c)
    print(f"\nImageReward v1.0: {R.flops_per_image() / 1e9:.1f} GFLOP per image (224 px, 35 tokens)")
    assert round(R.flops_per_image() / 1e9, 1) == 137.8


# -----------------------------------------------------------------------------
# 3. build_reward: the checkpoint, the tokenizer, the errors

@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory, vocab):
    folder = tmp_path_factory.mktemp("imagereward")
    model = scramble(R.ImageRewardModel(R.ImageRewardConfig(**SMALL)), seed=1).eval()
    torch.save(model.state_dict(), folder / "ImageReward.pt")
    (folder / "config.json").write_text(json.dumps(SMALL))
    return dict(imagereward_checkpoint=str(folder / "ImageReward.pt"), imagereward_tokenizer=str(vocab),
                imagereward_config=str(folder / "config.json")), model


def test_build_reward_loads_a_saved_checkpoint(tiny_files, vocab):
    options, model = tiny_files
    reward = build_reward("imagereward", **options, chunk_size=3)
    x = smooth_images(len(PROMPTS), 200, 300, seed=2)
    scores, info = reward(x, PROMPTS)
    want, _ = R.ImageReward(model, our_tokenizer(vocab))(x, PROMPTS)
    assert scores.shape == (len(PROMPTS),) and scores.dtype == torch.float32
    assert torch.allclose(scores, want, rtol=1e-6, atol=1e-6) and info["components"]["imagereward"] is not None
    # a folder with the vocab.txt works as the tokenizer path too
    same = build_reward("imagereward", **dict(options, imagereward_tokenizer=str(vocab.parent)))(x, PROMPTS)[0]
    assert torch.allclose(same, want, rtol=1e-6, atol=1e-6)


def _one_line_error(exc_type, options: dict, names: str) -> str:
    with pytest.raises(exc_type) as e:
        build_reward("imagereward", **options)
    text = str(e.value)
    assert "\n" not in text and names in text, text
    return text


def test_one_line_errors_name_the_option(tiny_files, tmp_path):
    options, _ = tiny_files
    _one_line_error(FileNotFoundError, dict(options, imagereward_checkpoint=str(tmp_path / "missing.pt")),
                    "imagereward_checkpoint")
    hub = {k: v for k, v in options.items() if k != "imagereward_checkpoint"}   # default: the hub, offline here
    assert "THUDM/ImageReward" in _one_line_error(FileNotFoundError, hub, "imagereward_checkpoint")
    (tmp_path / "deeper.json").write_text(json.dumps(dict(SMALL, text_layers=3)))
    _one_line_error(ValueError, dict(options, imagereward_config=str(tmp_path / "deeper.json")), "imagereward_config")
    # bert-base-uncased is not in the cache offline: transformers 5 would give a 5-token tokenizer, not an error
    _one_line_error((ValueError, FileNotFoundError), dict(options, imagereward_tokenizer="bert-base-uncased"),
                    "imagereward_tokenizer")
    _one_line_error(FileNotFoundError, dict(options, imagereward_config=str(tmp_path / "none.json")),
                    "imagereward_config")
    (tmp_path / "typo.json").write_text(json.dumps(dict(SMALL, text_layer=3)))
    assert "text_layer" in _one_line_error(ValueError, dict(options, imagereward_config=str(tmp_path / "typo.json")),
                                           "imagereward_config")
    _one_line_error(ValueError, dict(options, imagereward_checkpoint=options["imagereward_tokenizer"]),
                    "imagereward_checkpoint")   # a vocab.txt is no checkpoint: torch's paragraph becomes one line


# -----------------------------------------------------------------------------
# 4. preprocessing

def test_preprocessing_matches_the_package(pkg):
    # 256 x 264: the short side -> 224, the long one int(224 * 264 / 256) = 231, so the crop offset is 3.5:
    # torchvision rounds it to 4 (CLIPImageProcessor's floor gives 3, a different crop)
    x = quantize(smooth_images(1, 256, 264, seed=3))
    ours = R.preprocess(x)
    assert ours.shape == (1, 3, 224, 224)
    resize, crop, _to_rgb, _to_tensor, normalize = pkg.IR._transform(224).transforms
    want = normalize(crop(resize(x[0])))[None]   # the package's transforms on the tensor (its ReFL path)
    assert (ours - want).abs().max() < 1e-5
    resized = F.interpolate(x, size=(224, 231), mode="bicubic", align_corners=False, antialias=True)
    floor_crop = R.preprocess(resized[..., :, 3:227])
    assert (floor_crop - want).abs().max() > 1e-3   # the test can tell the two offsets apart
    # the package's PIL path (what score() runs): PIL's 8-bit bicubic, ~1 level from the float resize
    want_pil = pkg.IR._transform(224)(Image.fromarray(to_uint8(x)[0]))[None]
    std = torch.tensor(R.OPENAI_STD).view(1, 3, 1, 1)
    levels = ((ours - want_pil) * std * 255).abs()
    print(f"\nImageReward preprocessing against the package's PIL path: max {levels.max():.2f}, mean "
          f"{levels.mean():.3f} 8-bit levels")
    assert levels.max() <= 1.5 and levels.mean() < 0.5   # 8-bit rounding of both PIL passes
