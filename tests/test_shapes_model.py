"""The shipped shapes model (models/shapes/, made by pretrain.py): it loads through load_pipeline("shapes") and
through diffusers' StableDiffusionPipeline with equal text/UNet/VAE outputs and equal DDIM samples, it fits the
size budget (DDPO on it: test_shapes_rl.py)."""
import pytest
import torch

import weights
from scheduler import DDIMScheduler, SchedulerConfig, rollout

PROMPTS = ["a red circle", "three blue squares", "a green triangle left of a yellow square", ""]


@pytest.fixture(scope="module")
def pipes():
    from diffusers import StableDiffusionPipeline
    ours = weights.load_pipeline("shapes")
    ref = StableDiffusionPipeline.from_pretrained(str(weights.SHAPES_MODEL), torch_dtype=torch.float32,
                                                  safety_checker=None, requires_safety_checker=False)
    return ours, ref


def test_folder_is_small_and_complete():
    files = [p for p in weights.SHAPES_MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 10 * 2 ** 20
    names = {str(p.relative_to(weights.SHAPES_MODEL)) for p in files}
    assert {"model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
            "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt"} <= names


@torch.no_grad()
def test_components_equal_diffusers(pipes):
    ours, ref = pipes
    ids = ours.tokenize(PROMPTS)
    ref_ids = ref.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt").input_ids
    assert torch.equal(ids, ref_ids)
    ctx = ours.text_encoder(ids).last_hidden_state
    assert (ctx - ref.text_encoder(ids).last_hidden_state).abs().max() <= 1e-5
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([999, 500, 20, 1])
    a, b = ours.unet(x, t, ctx), ref.unet(x, t, encoder_hidden_states=ctx).sample
    assert (a - b).abs().max() <= 1e-5 * b.std()
    assert ours.vae.config.scaling_factor == ref.vae.config.scaling_factor
    assert (ours.vae.decode(x) - ref.vae.decode(x).sample).abs().max() <= 1e-5
    img = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    assert (ours.vae.encode(img)[0] - ref.vae.encode(img).latent_dist.mean).abs().max() <= 1e-5


@torch.no_grad()
def test_ddim_samples_equal_diffusers(pipes):
    from diffusers import DDIMScheduler as DiffusersDDIM
    ours, ref = pipes
    ref.scheduler = DiffusersDDIM.from_config(ref.scheduler.config)
    prompts = PROMPTS[:3]
    x_T = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sched = DDIMScheduler(SchedulerConfig.from_dict(ours.scheduler_config), 20)
    traj = rollout(ours.unet, ours.vae, sched, ours.encode_prompts(prompts), ours.encode_prompts([""]), guidance=5.0,
                   eta=0.0, seeds=[0, 1, 2], latents=x_T)
    theirs = ref(prompts, num_inference_steps=20, guidance_scale=5.0, eta=0.0, latents=x_T.clone(),
                 output_type="pt").images
    assert theirs.shape == traj.images.shape == (3, 3, 32, 32)
    assert (traj.images - theirs).abs().max() <= 1e-4


def test_missing_model_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(weights, "SHAPES_MODEL", tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match="shapes model is missing; restore it from git or rebuild it with "
                                                "`python pretrain.py`"):
        weights.load_pipeline("shapes")
