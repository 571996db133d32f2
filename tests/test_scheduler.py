"""DDIM schedule, step, log-prob, CFG and rollout: parity with diffusers and with an independent float64 DDPO formula."""
import math

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as DAutoencoderKL
from diffusers import DDIMScheduler as DDDIMScheduler
from diffusers import StableDiffusionPipeline
from diffusers import UNet2DConditionModel as DUNet

import scheduler as S
from unet import UNet2DConditionModel, UNetConfig
from vae import AutoencoderKL, VAEConfig

SD_SCHED = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                steps_offset=1, set_alpha_to_one=False, clip_sample=False, prediction_type="epsilon")


@pytest.fixture(scope="module")
def tiny():
    """A tiny diffusers UNet and VAE (the reference) and ours with the same weights."""
    torch.manual_seed(0)
    dunet = DUNet(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4).eval()
    dvae = DAutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, sample_size=16).eval()
    unet = UNet2DConditionModel(UNetConfig.from_dict(dict(dunet.config))).eval()
    unet.load_state_dict(dunet.state_dict(), strict=True)
    vae = AutoencoderKL(VAEConfig.from_dict(dict(dvae.config))).eval()
    vae.load_state_dict(dvae.state_dict(), strict=True)
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(3, 77, 32, generator=g)
    uncond = torch.randn(1, 77, 32, generator=g)
    return dunet, dvae, unet, vae, cond, uncond


def sched(num_steps=50, **over):
    return S.DDIMScheduler(S.SchedulerConfig.from_dict({**SD_SCHED, **over}), num_steps)


# ---------------------------------------------------------------------------------------------------- schedule

def test_sd_schedule_matches_reference_table():
    s = sched()
    assert s.timesteps.tolist() == list(range(981, 0, -20))
    sigma = s.sigma(s.timesteps, 1.0)
    ac = s.alphas_cumprod
    # SD 1.x at 50 steps, eta 1 (the values ddpo-pytorch's DDIM step computes): step -> (t, ᾱ_t, ᾱ_prev, σ_t), rounded
    table = {0: (981, "0.005776", "0.007282", "0.4545"), 1: (961, "0.007282", "0.009117", "0.4483"),
             24: (501, "0.2750", "0.3023", "0.2948"), 47: (41, "0.96087", "0.98038", "0.0999"),
             48: (21, "0.98038", "0.99830", "0.0395"), 49: (1, "0.99830", "0.99915", "0.02065")}
    for i, (t, a_t, a_prev, sig) in table.items():
        assert s.timesteps[i].item() == t
        prev = s.prev_timestep(t)
        got_prev = ac[prev].item() if prev >= 0 else s.final_alpha_cumprod.item()
        for got, want in ((ac[t].item(), a_t), (got_prev, a_prev), (sigma[i].item(), sig)):
            decimals = len(want.split(".")[1])
            # half a unit of the printed digit, plus the fp32 schedule's deviation from float64 (< 5e-7)
            assert abs(got - float(want)) <= 0.5 * 10 ** -decimals + 5e-7, (i, got, want)
    assert abs(ac[0].item() - 0.99915) < 5e-6 and abs(ac[999].item() - 0.004660) < 5e-7
    # the last step lands on ᾱ_0 (set_alpha_to_one=False); with True it lands on 1 and σ = 0 there
    assert s.final_alpha_cumprod.item() == ac[0].item()
    s1 = sched(set_alpha_to_one=True)
    assert s1.final_alpha_cumprod.item() == 1.0 and s1.sigma(torch.tensor([1]), 1.0).item() == 0.0


def test_schedule_matches_float64_and_diffusers():
    b = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    assert np.abs(sched().alphas_cumprod.double().numpy() - np.cumprod(1 - b)).max() < 1e-6
    for spacing, n, over in (("leading", 50, {}), ("leading", 30, {}), ("trailing", 50, {}), ("trailing", 30, {}),
                             ("leading", 20, {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02})):
        cfg = {**SD_SCHED, **over, "timestep_spacing": spacing}
        ours = S.DDIMScheduler(S.SchedulerConfig.from_dict(cfg), n)
        ref = DDDIMScheduler(**cfg)
        ref.set_timesteps(n)
        assert ours.timesteps.tolist() == ref.timesteps.tolist(), (spacing, n)
        assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
        assert ours.final_alpha_cumprod.item() == ref.final_alpha_cumprod.item()


def test_config_errors_and_unknown_keys():
    cfg = S.SchedulerConfig.from_dict({"_class_name": "PNDMScheduler", "skip_prk_steps": True, "trained_betas": None,
                                       **SD_SCHED})
    assert cfg == S.SchedulerConfig()
    for bad, word in (({"clip_sample": True}, "clip_sample"), ({"timestep_spacing": "linspace"}, "linspace"),
                      ({"prediction_type": "sample"}, "prediction_type"),
                      ({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule")):
        with pytest.raises(ValueError, match=word):
            S.SchedulerConfig.from_dict({**SD_SCHED, **bad})
    with pytest.raises(ValueError, match="outside"):
        S.DDIMScheduler(S.SchedulerConfig(), 1000)  # leading + offset 1 would reach t = 1000
    with pytest.raises(AssertionError, match="eta"):
        sched().step(torch.zeros(1, 4, 2, 2), 1, torch.zeros(1, 4, 2, 2), eta=1.5)
    with pytest.raises(AssertionError, match="not both"):
        sched().step(torch.zeros(1, 4, 2, 2), 1, torch.zeros(1, 4, 2, 2), 1.0, prev_sample=torch.zeros(1, 4, 2, 2),
                     noise=torch.zeros(1, 4, 2, 2))


# ---------------------------------------------------------------------------------------------------- one step

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_step_matches_diffusers_per_timestep(prediction_type, set_alpha_to_one):
    cfg = {**SD_SCHED, "prediction_type": prediction_type, "set_alpha_to_one": set_alpha_to_one}
    ours = S.DDIMScheduler(S.SchedulerConfig.from_dict(cfg), 50)
    ref = DDDIMScheduler(**cfg)
    ref.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([981, 1, 501, 21, 1, 41])  # a batch that mixes timesteps, the last step twice
    x, out, noise = (torch.randn(6, 4, 8, 8, generator=g) for _ in range(3))
    for eta in (0.0, 1.0):
        got = ours.step(out, t, x, eta, noise=noise)
        for b in range(6):
            want = ref.step(out[b:b + 1], t[b].item(), x[b:b + 1], eta=eta, variance_noise=noise[b:b + 1]).prev_sample
            assert (got.prev_sample[b:b + 1] - want).abs().max().item() <= 1e-6, (eta, t[b])


def ddpo_log_prob_f64(ac, final_ac, step_ratio, eta, prediction_type, model_output, t, x, x_prev):
    """The DDPO step log-prob written out independently, in float64 numpy (Black et al. 2023, ddpo-pytorch's ddim_step_with_logprob)."""
    out, x, x_prev, ac = (np.asarray(a, dtype=np.float64) for a in (model_output, x, x_prev, ac))
    res = []
    for b, tb in enumerate(t.tolist()):
        a_t = ac[tb]
        a_p = ac[tb - step_ratio] if tb - step_ratio >= 0 else final_ac
        if prediction_type == "epsilon":
            eps = out[b]
            x0 = (x[b] - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        else:
            x0 = math.sqrt(a_t) * x[b] - math.sqrt(1 - a_t) * out[b]
            eps = math.sqrt(a_t) * out[b] + math.sqrt(1 - a_t) * x[b]
        sigma = eta * math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
        mu = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - sigma ** 2) * eps
        lp = -((x_prev[b] - mu) ** 2) / (2 * sigma ** 2) - math.log(sigma) - 0.5 * math.log(2 * math.pi)
        res.append(lp.mean())
    return np.array(res)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_log_prob_equals_independent_float64_formula(prediction_type):
    s = sched(prediction_type=prediction_type)
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([981, 1, 501, 21, 961, 1, 41, 481])
    x, out = torch.randn(8, 4, 16, 16, generator=g), torch.randn(8, 4, 16, 16, generator=g)
    args = (s.alphas_cumprod.double().numpy(), s.final_alpha_cumprod.item(), s.step_ratio, 1.0, prediction_type)
    drawn = s.step(out, t, x, 1.0, noise=torch.randn(8, 4, 16, 16, generator=g))
    other = drawn.prev_sample + 0.01 * torch.randn(8, 4, 16, 16, generator=g)  # an x' the policy did not draw
    scored = s.step(out, t, x, 1.0, prev_sample=other)
    for res, x_prev in ((drawn, drawn.prev_sample), (scored, other)):
        want = ddpo_log_prob_f64(*args, out.numpy(), t, x.numpy(), x_prev.numpy())
        assert res.log_prob.dtype == torch.float32 and res.log_prob.shape == (8,)
        err = np.abs(res.log_prob.double().numpy() - want).max()
        print(f"\n[measured] {prediction_type} log-prob vs float64 DDPO formula: max abs diff {err:.2e}")
        assert err <= 1e-6
    # at sampling, E[log π] = −½ − log σ − ½ log 2π: the t = 1 step (σ = 0.02065) is about 2.461 (table §1a)
    assert abs(drawn.log_prob[1].item() - 2.461) < 0.1 and abs(drawn.std[1].item() - 0.02065) < 1e-5


def test_fp16_model_output_is_stepped_in_fp32():
    s = sched()
    g = torch.Generator().manual_seed(2)
    x, out, noise = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([1, 501])
    half = s.step(out.half(), t, x.half(), 1.0, noise=noise.half())
    full = s.step(out.half().float(), t, x.half().float(), 1.0, noise=noise.half().float())
    assert all(v.dtype == torch.float32 for v in half)
    assert torch.equal(half.log_prob, full.log_prob) and torch.equal(half.prev_sample, full.prev_sample)


def test_sigma_floor_keeps_deterministic_log_prob_finite():
    s = sched()
    x = torch.randn(2, 4, 8, 8)
    res = s.step(torch.randn(2, 4, 8, 8), torch.tensor([981, 1]), x, 0.0)
    assert torch.equal(res.std.flatten(), torch.full((2,), S.SIGMA_MIN))
    want = -math.log(S.SIGMA_MIN) - 0.5 * math.log(2 * math.pi)  # x' = μ exactly
    assert torch.allclose(res.log_prob, torch.full((2,), want))


# ---------------------------------------------------------------------------------------------------- CFG

def test_guided_eps_is_one_batched_call(tiny):
    _, _, unet, _, cond, uncond = tiny
    calls = []

    def counting(x, t, c):
        calls.append(x.shape[0])
        return unet(x, t, c)

    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([981, 501, 1])
    with torch.no_grad():
        got = S.guided_eps(counting, x, t, cond, uncond, 5.0)
        u, c = unet(x, t, uncond.expand(3, -1, -1)), unet(x, t, cond)
        assert calls == [6]
        assert (got - (u + 5.0 * (c - u))).abs().max().item() < 1e-5
        assert torch.equal(S.guided_eps(counting, x, t, cond, uncond, 1.0), c)
        assert torch.equal(S.guided_eps(counting, x, t, cond, None, 5.0), c)
    assert calls == [6, 3, 3]


# ---------------------------------------------------------------------------------------------------- rollout

def diffusers_pipe(dunet, dvae, prediction_type):
    pipe = StableDiffusionPipeline(vae=dvae, text_encoder=None, tokenizer=None, unet=dunet,
                                   scheduler=DDDIMScheduler(**{**SD_SCHED, "prediction_type": prediction_type}),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_rollout_matches_diffusers_pipeline(tiny, prediction_type):
    """Our UNet/VAE + rollout vs diffusers' StableDiffusionPipeline + DDIMScheduler, same embeddings and x_T."""
    dunet, dvae, unet, vae, cond, uncond = tiny
    pipe = diffusers_pipe(dunet, dvae, prediction_type)
    s = sched(prediction_type=prediction_type)
    seeds = [11, 12, 13]
    neg = uncond.expand(3, -1, -1)
    final = {}

    def keep_final_latents(pipe, i, t, kw):
        final["x0"] = kw["latents"]
        return kw

    def close(a, ref, what, tol=1e-4):  # absolute, although random-weight latents reach |x| ~ 50
        err = (a - ref).abs().max().item()
        print(f"\n[measured] {prediction_type} {what}: max|ours - diffusers| = {err:.2e} (max|x| {ref.abs().max():.3g})")
        return err <= tol

    # deterministic DDIM (η = 0), given x_T
    x_T = S.draw_noise(seeds, (4, 8, 8), 0)[:, 0]
    want = pipe(prompt_embeds=cond, negative_prompt_embeds=neg, latents=x_T, num_inference_steps=50,
                guidance_scale=5.0, eta=0.0, output_type="pt", callback_on_step_end=keep_final_latents).images
    traj = S.rollout(unet, vae, s, cond, uncond, guidance=5.0, eta=0.0, seeds=seeds)
    assert torch.equal(traj.latents[:, 0], x_T)
    assert close(traj.latents[:, -1], final["x0"], "eta=0 x_0") and close(traj.images, want, "eta=0 images")
    # η = 1: diffusers with one generator per sample draws the same per-sample noise stream (x_T, then a draw per step)
    gens = [torch.Generator().manual_seed(sd) for sd in seeds]
    x_T = torch.stack([torch.randn(4, 8, 8, generator=g) for g in gens])
    want = pipe(prompt_embeds=cond, negative_prompt_embeds=neg, latents=x_T, generator=gens, num_inference_steps=50,
                guidance_scale=5.0, eta=1.0, output_type="latent").images
    traj = S.rollout(unet, vae, s, cond, uncond, guidance=5.0, eta=1.0, seeds=seeds, decode=False)
    assert traj.images is None and close(traj.latents[:, -1], want, "eta=1 x_0")


def test_rescoring_a_stored_trajectory_reproduces_its_log_probs(tiny):
    _, _, unet, vae, cond, uncond = tiny
    s = sched(num_steps=10)
    traj = S.rollout(unet, vae, s, cond, uncond, guidance=5.0, eta=1.0, seeds=[0, 1, 2], decode=False)
    N = len(s.timesteps)
    assert traj.latents.shape == (3, N + 1, 4, 8, 8) and traj.log_probs.shape == (3, N)
    assert traj.latents.dtype == traj.log_probs.dtype == torch.float32 and traj.timesteps.dtype == torch.long
    assert torch.equal(traj.timesteps, s.timesteps.expand(3, N))
    x, x_next = traj.latents[:, :-1], traj.latents[:, 1:]
    # the trainer's way: the same batch, step by step (with grad: the ratio must be exactly 1 before any update)
    errs = []
    for j in range(N):
        eps = S.guided_eps(unet, x[:, j], traj.timesteps[:, j], cond, uncond, 5.0)
        lp = s.step(eps, traj.timesteps[:, j], x[:, j], 1.0, prev_sample=x_next[:, j]).log_prob
        assert lp.requires_grad
        errs.append((lp.detach() - traj.log_probs[:, j]).abs().max().item())
    print(f"\n[measured] re-scored trajectory: max|log-prob - stored| = {max(errs):.2e}")
    assert max(errs) <= 1e-6
    # and with timesteps shuffled independently per sample, as DDPO's training loop does
    perm = torch.stack([torch.randperm(N, generator=torch.Generator().manual_seed(b)) for b in range(3)])
    rows = torch.arange(3)[:, None]
    xs, xn, ts, old = x[rows, perm], x_next[rows, perm], traj.timesteps[rows, perm], traj.log_probs[rows, perm]
    with torch.no_grad():
        for j in range(N):
            eps = S.guided_eps(unet, xs[:, j], ts[:, j], cond, uncond, 5.0)
            lp = s.step(eps, ts[:, j], xs[:, j], 1.0, prev_sample=xn[:, j]).log_prob
            assert (lp - old[:, j]).abs().max().item() <= 1e-6


def test_rollout_same_seed_same_sample_at_any_batch_size(tiny):
    _, _, unet, vae, cond, uncond = tiny
    s = sched(num_steps=8)
    three = S.rollout(unet, vae, s, cond, uncond, guidance=5.0, eta=1.0, seeds=[5, 7, 9])
    one = S.rollout(unet, vae, s, cond[1:2], uncond, guidance=5.0, eta=1.0, seeds=[7])
    again = S.rollout(unet, vae, s, cond, uncond, guidance=5.0, eta=1.0, seeds=[5, 7, 9])
    assert torch.equal(three.latents, again.latents) and torch.equal(three.images, again.images)
    assert (three.latents[1] - one.latents[0]).abs().max().item() <= 1e-5 * max(1.0, one.latents.abs().max().item())
    assert (three.images[1] - one.images[0]).abs().max().item() <= 1e-5
    assert (three.log_probs[1] - one.log_probs[0]).abs().max().item() <= 1e-5
    assert not torch.allclose(three.latents[0], three.latents[2])


def test_rollout_shared_initial_latents(tiny):
    _, _, unet, vae, cond, uncond = tiny
    s = sched(num_steps=4)
    x_T = torch.randn(1, 4, 8, 8)
    shared = S.rollout(unet, vae, s, cond, uncond, seeds=[1, 2, 3], latents=x_T, decode=False)
    assert torch.equal(shared.latents[:, 0], x_T.expand(3, -1, -1, -1))
    own = S.rollout(unet, vae, s, cond, uncond, seeds=[1, 2, 3], decode=False)
    assert not torch.equal(own.latents[:, 0], shared.latents[:, 0])
    # the step noise is still each seed's own: with η = 1 the groups' samples differ
    assert not torch.allclose(shared.latents[0, -1], shared.latents[1, -1])


def test_rollout_has_no_host_sync_in_the_step_loop():
    # On the meta device every .item(), bool(tensor) or data-dependent branch raises: the whole rollout must run there.
    s = S.DDIMScheduler(S.SchedulerConfig(), 50, device="meta")
    cond, uncond = torch.empty(2, 77, 8, device="meta"), torch.empty(1, 77, 8, device="meta")

    def unet(x, t, c):
        return x * 0.5 + c.mean(dim=(1, 2))[:, None, None, None] + t[:, None, None, None]

    traj = S.rollout(unet, None, s, cond, uncond, seeds=[0, 1], latents=torch.empty(2, 4, 8, 8), decode=False)
    assert traj.latents.shape == (2, 51, 4, 8, 8) and traj.log_probs.shape == (2, 50)


def test_rollout_bad_seeds(tiny):
    _, _, unet, vae, cond, uncond = tiny
    with pytest.raises(AssertionError, match="one seed per sample"):
        S.rollout(unet, vae, sched(num_steps=2), cond, uncond, seeds=[1, 2])


def test_denoising_loss_p2_weighting_is_one_over_root_one_plus_snr():
    """p2_gamma=0 is the plain ε-MSE; p2_gamma=γ weights each sample by (1 + ᾱ/(1−ᾱ))^-γ = (1 − ᾱ)^γ, computed
    independently here from the float64 schedule, so nearly clean timesteps count far less than noisy ones."""
    sched = S.DDIMScheduler(S.SchedulerConfig.from_dict(SD_SCHED), num_steps=50)
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([1, 250, 600, 999])
    zero = lambda x, t, c: torch.zeros_like(x)   # the loss is then mean(ε²) per sample, weighted
    per_sample = noise.pow(2).flatten(1).mean(1).double()
    assert S.denoising_loss(zero, sched, x0, torch.zeros(4, 77, 8), t, noise).item() == pytest.approx(
        per_sample.mean().item(), rel=1e-6)
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    a = np.cumprod(1 - betas)[t.numpy()]
    w = (1 - a) ** 0.5
    assert w[0] < 0.05 and w[-1] > 0.99
    got = S.denoising_loss(zero, sched, x0, torch.zeros(4, 77, 8), t, noise, p2_gamma=0.5).item()
    assert got == pytest.approx(float((per_sample.numpy() * w).mean()), rel=1e-5)
