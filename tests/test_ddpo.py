"""ddpo.py: advantages (vs independent numpy references), PPO/SF/KL losses, the fused update (ratio 1 on the first
micro-step, KL 0 at init, accumulation == big batch, item selection, DDP no_sync, loss scaling) and a short learning
check."""
import copy
import json
import math
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn as nn

import ddpo
import lora
from scheduler import DDIMScheduler, SchedulerConfig, guided_eps, rollout
from unet import UNet2DConditionModel, UNetConfig

CTX = 32  # text-embedding width of the tiny UNet


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    cfg = UNetConfig(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                     num_attention_heads=(2, 4), cross_attention_dim=CTX, norm_num_groups=8, sample_size=8)
    return UNet2DConditionModel(cfg)


def make_rollout(unet, sched, b=4, seed=0, guidance=3.0):
    g = torch.Generator().manual_seed(seed)
    cond, uncond = torch.randn(b, 8, CTX, generator=g), torch.randn(1, 8, CTX, generator=g)
    x_t = torch.randn(b, 4, 8, 8, generator=g)
    traj = rollout(unet, None, sched, cond, uncond, guidance=guidance, eta=1.0,
                   seeds=list(range(seed * 100, seed * 100 + b)), latents=x_t, decode=False)
    return traj, cond, uncond


def samples_of(traj, adv, valid=None):
    return ddpo.Samples(traj.latents, traj.log_probs, traj.timesteps, adv, valid)


# ----------------------------------------------------------------------------- advantages


class NumpyTracker:
    """Independent reference for ddpo-pytorch's per-prompt tracker: plain lists, last `size` values kept."""

    def __init__(self, size, min_count):
        self.size, self.min_count, self.buf = size, min_count, defaultdict(list)

    def update(self, prompts, rewards):
        prompts, rewards = np.array(prompts), np.asarray(rewards, dtype=np.float64)
        out = np.empty_like(rewards)
        for p in np.unique(prompts):
            r = rewards[prompts == p]
            self.buf[p] = (self.buf[p] + list(r))[-self.size:]
            ref = self.buf[p] if len(self.buf[p]) >= self.min_count else rewards
            out[prompts == p] = (r - np.mean(ref)) / (np.std(ref) + 1e-6)
        return out


def test_per_prompt_tracker_matches_reference_and_resumes():
    rng = np.random.default_rng(0)
    ours, ref = ddpo.PerPromptStatTracker(buffer_size=6, min_count=4), NumpyTracker(6, 4)
    names = ["cat", "dog", "horse", "fish"]
    saw_fallback = saw_buffer = False
    for epoch in range(6):
        prompts = list(rng.choice(names[: 2 + epoch % 3], size=5))
        rewards = rng.normal(epoch, 1 + epoch, size=5)
        got = ours.update(prompts, torch.tensor(rewards, dtype=torch.float32))
        want = ref.update(prompts, rewards.astype(np.float32))
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
        counts = {p: len(ref.buf[p]) for p in set(prompts)}
        saw_fallback |= min(counts.values()) < 4
        saw_buffer |= max(counts.values()) >= 4
        if epoch == 2:
            state = json.loads(json.dumps(ours.state_dict()))  # JSON-serialisable
    assert saw_fallback and saw_buffer  # both branches exercised
    assert ours.get_stats()["cat"]["count"] <= 6

    # resume from the epoch-2 state: the next epochs give identical advantages
    rng = np.random.default_rng(0)
    a, b = ddpo.PerPromptStatTracker(6, 4), ddpo.PerPromptStatTracker(6, 4)
    for epoch in range(6):
        prompts = list(rng.choice(names[: 2 + epoch % 3], size=5))
        rewards = torch.tensor(rng.normal(epoch, 1 + epoch, size=5), dtype=torch.float32)
        if epoch == 3:
            b.load_state_dict(state)
        ra = a.update(prompts, rewards)
        if epoch >= 3:
            assert torch.equal(ra, b.update(prompts, rewards))
        else:
            a_state = a.state_dict()
    assert a_state == state


def test_tracker_drops_non_finite_rewards():
    t = ddpo.PerPromptStatTracker(buffer_size=8, min_count=1)
    adv = t.update(["a", "a", "b", "b"], torch.tensor([1.0, float("nan"), 2.0, float("inf")]))
    assert torch.isfinite(adv).all() and adv[1] == 0 and adv[3] == 0
    assert t.get_stats()["a"]["count"] == 1 and t.get_stats()["b"]["count"] == 1


def test_group_advantages():
    rewards = torch.tensor([1.0, 2.0, 4.0, 10.0, 10.5, 9.0, float("nan"), 3.0])
    groups = ["p", "p", "p", "q", "q", "q", "q", "p"]
    got = ddpo.group_advantages(rewards, groups, eps=1e-6)
    r = rewards.double().numpy()
    want = np.zeros(8)
    for g in "pq":
        sel = np.array([x == g for x in groups]) & np.isfinite(r)
        want[sel] = (r[sel] - r[sel].mean()) / (r[sel].std() + 1e-6)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)
    assert got[6] == 0
    # integer ids give the same; global std uses the std of all finite rewards
    ids = torch.tensor([0, 0, 0, 7, 7, 7, 7, 0])
    torch.testing.assert_close(ddpo.group_advantages(rewards, ids, eps=1e-6), got)
    glob = ddpo.group_advantages(rewards, ids, global_std=True, eps=1e-4)
    fin = np.isfinite(r)
    want_g = np.zeros(8)
    for g in "pq":
        sel = np.array([x == g for x in groups]) & fin
        want_g[sel] = (r[sel] - r[sel].mean()) / (r[fin].std() + 1e-4)
    np.testing.assert_allclose(glob.numpy(), want_g, rtol=1e-6, atol=1e-6)
    b = ddpo.batch_advantages(rewards)
    np.testing.assert_allclose(b.numpy()[fin], (r[fin] - r[fin].mean()) / (r[fin].std() + 1e-8), rtol=1e-6)


def test_permute_within_groups_keeps_each_group_and_forgets_the_order():
    """The null control: every group of 16 keeps its own advantages (the same values, in the same positions' group),
    their order changes, and a generator seed fixes the permutation (the same on every rank and after a resume)."""
    adv = torch.arange(48, dtype=torch.float32)
    got = ddpo.permute_within_groups(adv, 16, torch.Generator().manual_seed(0))
    for g in range(3):
        block = got[16 * g:16 * (g + 1)]
        assert sorted(block.tolist()) == list(range(16 * g, 16 * (g + 1)))   # only within its own group
        assert not torch.equal(block, adv[16 * g:16 * (g + 1)])              # and shuffled there
    torch.testing.assert_close(ddpo.permute_within_groups(adv, 16, torch.Generator().manual_seed(0)), got)
    assert not torch.equal(ddpo.permute_within_groups(adv, 16, torch.Generator().manual_seed(1)), got)
    with pytest.raises(AssertionError, match="not groups of 16"):
        ddpo.permute_within_groups(adv[:40], 16, torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- losses


def test_ppo_loss_by_hand():
    ratio = torch.tensor([0.5, 0.95, 1.0, 1.05, 1.5])
    logp = torch.log(ratio).requires_grad_()
    old = torch.zeros(5)
    for a, want, grad_zero in [
        (2.0, [-1.0, -1.9, -2.0, -2.1, -2.2], [False, False, False, False, True]),   # A>0: capped above 1+eps
        (-2.0, [1.8, 1.9, 2.0, 2.1, 3.0], [True, False, False, False, False]),      # A<0: capped below 1-eps
    ]:
        loss, r = ddpo.ppo_loss(logp, old, torch.full((5,), a), clip_range=0.1)
        torch.testing.assert_close(loss, torch.tensor(want), atol=1e-6, rtol=0)
        torch.testing.assert_close(r.detach(), ratio)
        (g,) = torch.autograd.grad(loss.sum(), logp)
        assert [bool(v == 0) for v in g] == grad_zero
        # where not clipped, d/dlogp (-A r) = -A r
        torch.testing.assert_close(g[~torch.tensor(grad_zero)], (-a * ratio)[~torch.tensor(grad_zero)])


def test_sf_loss_and_kl_formula():
    logp = torch.tensor([0.3, -1.2], requires_grad=True)
    adv = torch.tensor([1.5, -0.5])
    (g,) = torch.autograd.grad(ddpo.sf_loss(logp, adv).sum(), logp)
    torch.testing.assert_close(g, -adv)
    mean, ref = torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    ref[0] += 0.1
    std = torch.tensor([0.5, 0.2]).view(2, 1, 1, 1)
    torch.testing.assert_close(ddpo.gaussian_kl(mean, ref, std), torch.tensor([0.01 / (2 * 0.25), 0.0]))


def test_sf_update_is_minus_a_grad_logp():
    """The SF update with SGD(lr=1) moves the parameters by -mean_items(-A grad logp): checked against autograd on
    each item separately."""
    sched = DDIMScheduler(SchedulerConfig(), num_steps=4)
    unet = tiny_unet()
    unet.requires_grad_(False)
    params = lora.add_lora(unet, rank=2)
    with torch.no_grad():
        for p in params[1::2]:
            p.normal_(0, 0.05)  # nonzero B so that A gets gradients too
    traj, cond, uncond = make_rollout(unet, sched, b=2)
    adv = torch.tensor([1.0, -2.0])
    b, n = traj.log_probs.shape
    want = [torch.zeros_like(p) for p in params]
    for s in range(b):
        for j in range(n):
            x, t = traj.latents[s:s + 1, j], traj.timesteps[s:s + 1, j]
            eps = guided_eps(unet, x, t, cond[s:s + 1], uncond, 3.0)
            logp = sched.step(eps, t, x, 1.0, prev_sample=traj.latents[s:s + 1, j + 1]).log_prob.sum()
            for w, g in zip(want, torch.autograd.grad(logp, params)):
                w -= adv[s] * g / (b * n)
    before = [p.detach().clone() for p in params]
    cfg = ddpo.UpdateConfig(loss="sf", guidance=3.0, micro_batch=3, optimizer_steps_per_epoch=1, max_grad_norm=None)
    ddpo.ddpo_update(unet, params, sched, samples_of(traj, adv), torch.optim.SGD(params, lr=1.0), cfg,
                     cond_embeds=cond, uncond_embeds=uncond, generator=torch.Generator().manual_seed(0))
    for p, p0, w in zip(params, before, want):
        torch.testing.assert_close(p0 - p.detach(), w, atol=1e-6, rtol=1e-4)
    with pytest.raises(AssertionError, match="on-policy"):
        ddpo.ddpo_update(unet, params, sched, samples_of(traj, adv), torch.optim.SGD(params, lr=1.0),
                         ddpo.UpdateConfig(loss="sf", optimizer_steps_per_epoch=2), cond_embeds=cond,
                         uncond_embeds=uncond, generator=torch.Generator())


# ----------------------------------------------------------------------------- the fused update


def test_first_ratio_is_one_and_kl_zero_at_init():
    sched = DDIMScheduler(SchedulerConfig(), num_steps=5)
    for use_lora in (True, False):
        unet = tiny_unet()
        if use_lora:
            unet.requires_grad_(False)
            params = lora.add_lora(unet, rank=4)
        else:
            params = list(unet.parameters())
        reference = ddpo.reference_policy(unet)
        assert isinstance(reference, nn.Module) != use_lora  # LoRA: adapters off; full: a frozen copy
        traj, cond, uncond = make_rollout(unet, sched, b=3)
        adv = torch.tensor([1.0, -1.0, 0.5])
        cfg = ddpo.UpdateConfig(guidance=3.0, micro_batch=4, optimizer_steps_per_epoch=3, kl_coef=0.1)
        # lr = 0: the weights never change, so every ratio is 1 and the KL stays exactly 0
        frozen = torch.optim.SGD(params, lr=0.0)
        m = ddpo.ddpo_update(unet, params, sched, samples_of(traj, adv), frozen, cfg, cond_embeds=cond,
                             uncond_embeds=uncond, generator=torch.Generator().manual_seed(0), reference=reference)
        assert m["first_ratio_max_dev"] <= 1e-6 and m["clipfrac"] == 0 and m["kl"] == 0 and m["items"] == 15
        assert abs(m["ratio_mean"] - 1) <= 1e-6 and m["approx_kl"] <= 1e-12 and m["grad_norm"] > 0
        # a real step: the first micro-step still sees ratio 1, later ones see the moved policy and a KL > 0
        opt = torch.optim.AdamW(params, lr=1e-2)
        m = ddpo.ddpo_update(unet, params, sched, samples_of(traj, adv), opt, cfg, cond_embeds=cond,
                             uncond_embeds=uncond, generator=torch.Generator().manual_seed(0), reference=reference)
        assert m["first_ratio_max_dev"] <= 1e-6
        assert m["kl"] > 0 and m["approx_kl"] > 0


def test_accumulation_equals_one_big_micro_batch():
    sched = DDIMScheduler(SchedulerConfig(), num_steps=4)
    base = tiny_unet()
    traj, cond, uncond = make_rollout(base, sched, b=2)
    adv = torch.tensor([1.0, -0.7])
    after = []
    for micro, clip in [(1, None), (4, None), (1, 0.05), (4, 0.05)]:
        unet = copy.deepcopy(base)
        params = list(unet.parameters())
        cfg = ddpo.UpdateConfig(guidance=3.0, micro_batch=micro, optimizer_steps_per_epoch=2,
                                timestep_fraction=0.5, max_grad_norm=clip, clip_range=1e-2)
        m = ddpo.ddpo_update(unet, params, sched, samples_of(traj, adv), torch.optim.SGD(params, lr=0.05), cfg,
                             cond_embeds=cond, uncond_embeds=uncond, generator=torch.Generator().manual_seed(3))
        assert m["items"] == 4 and m["optimizer_steps"] == 2
        after.append((torch.nn.utils.parameters_to_vector(params).detach(), m))
    start = torch.nn.utils.parameters_to_vector(base.parameters()).detach()
    for (p1, m1), (p4, m4) in [(after[0], after[1]), (after[2], after[3])]:
        assert (p1 - start).abs().max() > 1e-4  # the step did something
        torch.testing.assert_close(p1, p4, atol=2e-6, rtol=1e-5)
        for k in ("loss", "approx_kl", "grad_norm", "ratio_mean"):
            assert m1[k] == pytest.approx(m4[k], rel=1e-4, abs=1e-9), k
    assert after[2][1]["grad_norm"] > 0.05  # clipping really was active in the second pair
    assert not torch.allclose(after[0][0], after[2][0])


class Recorder(nn.Module):
    """A stand-in UNet: eps = w * x; records the (sample id, t) of every item it sees (sample id in the context)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.1))
        self.seen, self.sync_calls, self.sync_off = [], 0, 0

    def forward(self, x, t, c):
        self.seen += list(zip(c[:, 0, 0].long().tolist(), t.tolist()))
        return self.w * x

    def no_sync(self):  # DDP's interface: count how often gradient sync is switched off
        outer = self

        class Ctx:
            def __enter__(self):
                outer.sync_off += 1

            def __exit__(self, *exc):
                return False
        return Ctx()


@pytest.mark.parametrize("fraction,skip_last", [(1.0, 0), (0.5, 0), (1.0, 1), (0.6, 1), (1.0, 2)])
def test_item_selection_and_no_sync(fraction, skip_last):
    sched = DDIMScheduler(SchedulerConfig(), num_steps=6)
    b, n = 5, 6
    net = Recorder()
    cond = torch.arange(b).float().view(b, 1, 1).expand(b, 3, 4).contiguous()
    traj = rollout(net, None, sched, cond, None, guidance=1.0, seeds=list(range(b)),
                   latents=torch.randn(b, 4, 2, 2), decode=False)
    net.seen.clear()
    cfg = ddpo.UpdateConfig(train_cfg=False, micro_batch=3, optimizer_steps_per_epoch=2, timestep_fraction=fraction,
                            skip_last_steps=skip_last, num_inner_epochs=2)
    m = ddpo.ddpo_update(net, [net.w], sched, samples_of(traj, torch.randn(b)), torch.optim.SGD([net.w], lr=1e-3),
                         cfg, cond_embeds=cond, uncond_embeds=cond[:1], generator=torch.Generator().manual_seed(1))
    t_per = int((n - skip_last) * fraction)
    assert m["items"] == 2 * b * t_per and m["optimizer_steps"] == 4
    for epoch in (net.seen[: b * t_per], net.seen[b * t_per:]):
        assert len(set(epoch)) == len(epoch) == b * t_per  # each item once per inner epoch
        per_sample = defaultdict(set)
        for s, t in epoch:
            per_sample[s].add(t)
        assert all(len(v) == t_per for v in per_sample.values()) and len(per_sample) == b
        trained = {t for _, t in epoch}
        assert not trained & set(sched.timesteps.tolist()[n - skip_last:])   # the last steps (t = 1 last) never
        assert fraction < 1 or trained == set(sched.timesteps.tolist()[:n - skip_last])
    if fraction < 1:  # random, per-sample subsets: not all samples train the same steps
        assert len({frozenset(v) for v in per_sample.values()}) > 1
    # items per optimizer step split as evenly as possible, micro-batches of 3 within each
    micro_steps = 2 * sum(-(-c // 3) for c in (b * t_per // 2, b * t_per - b * t_per // 2))
    assert net.sync_off == micro_steps - 4  # no_sync on all but the last micro-step of each optimizer step


def test_invalid_samples_are_masked():
    sched = DDIMScheduler(SchedulerConfig(), num_steps=3)
    net = Recorder()
    cond = torch.zeros(3, 2, 4)
    traj = rollout(net, None, sched, cond, None, guidance=1.0, seeds=[0, 1, 2], latents=torch.randn(3, 4, 2, 2),
                   decode=False)
    cfg = ddpo.UpdateConfig(train_cfg=False, micro_batch=9, optimizer_steps_per_epoch=1, max_grad_norm=None)
    grads = []
    for adv, valid in [(torch.tensor([1.0, float("nan"), -1.0]), None),
                       (torch.tensor([1.0, 5.0, -1.0]), torch.tensor([True, False, True])),
                       (torch.tensor([1.0, 0.0, -1.0]), None)]:
        net.w.data.fill_(0.1)
        m = ddpo.ddpo_update(net, [net.w], sched, samples_of(traj, adv, valid), torch.optim.SGD([net.w], lr=1.0),
                             cfg, cond_embeds=cond, uncond_embeds=cond[:1], generator=torch.Generator())
        assert all(np.isfinite(v) for v in m.values())
        grads.append(0.1 - net.w.item())
    assert m["items"] == 9
    assert grads[0] == pytest.approx(grads[2], abs=1e-7) and grads[1] == pytest.approx(grads[2], abs=1e-7)


def test_bad_inputs_give_clear_errors():
    sched = DDIMScheduler(SchedulerConfig(), num_steps=3)
    net = Recorder()
    cond = torch.zeros(2, 2, 4)
    traj = rollout(net, None, sched, cond, None, guidance=1.0, seeds=[0, 1], latents=torch.randn(2, 4, 2, 2),
                   decode=False)
    opt = torch.optim.SGD([net.w], lr=0.0)
    kw = dict(cond_embeds=cond, uncond_embeds=cond[:1], generator=torch.Generator())
    with pytest.raises(AssertionError, match="reference"):
        ddpo.ddpo_update(net, [net.w], sched, samples_of(traj, torch.zeros(2)), opt, ddpo.UpdateConfig(kl_coef=1), **kw)
    with pytest.raises(AssertionError, match="optimizer steps"):
        ddpo.ddpo_update(net, [net.w], sched, samples_of(traj, torch.zeros(2)), opt,
                         ddpo.UpdateConfig(optimizer_steps_per_epoch=7), **kw)
    with pytest.raises(AssertionError, match="float32"):
        ddpo.ddpo_update(net, [net.w], sched, ddpo.Samples(traj.latents.half(), traj.log_probs, traj.timesteps,
                                                           torch.zeros(2)), opt, ddpo.UpdateConfig(), **kw)
    with pytest.raises(AssertionError, match="advantages"):
        ddpo.ddpo_update(net, [net.w], sched, samples_of(traj, torch.zeros(3)), opt, ddpo.UpdateConfig(), **kw)


def test_bf16_autocast_update_with_fp32_master_weights():
    """Under bf16 autocast the ratio is still exactly 1 on the first micro-step when the rollout ran under the same
    autocast (the precision path, not the batch composition, is what matters on CPU)."""
    sched = DDIMScheduler(SchedulerConfig(), num_steps=3)
    unet = tiny_unet()
    params = list(unet.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        traj, cond, uncond = make_rollout(unet, sched, b=2)
    m = ddpo.ddpo_update(unet, params, sched, samples_of(traj, torch.tensor([1.0, -1.0])),
                         torch.optim.AdamW(params, lr=1e-4), ddpo.UpdateConfig(guidance=3.0, micro_batch=3),
                         cond_embeds=cond, uncond_embeds=uncond, generator=torch.Generator(),
                         autocast_dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in params) and np.isfinite(m["loss"]) and m["grad_norm"] > 0
    assert m["first_ratio_max_dev"] <= 1e-6


def _scaled_update(scaler, *, steps=2, autocast_dtype=None, hook=None):
    """One ddpo_update of a fresh tiny UNet with SGD (the step is the gradient, so a wrongly scaled gradient shows)
    and active clipping; returns (parameters before, after, metrics)."""
    sched = DDIMScheduler(SchedulerConfig(), num_steps=3)
    unet = tiny_unet()
    with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
        traj, cond, uncond = make_rollout(unet, sched, b=2)
    params = list(unet.parameters())
    if hook is not None:
        params[0].register_hook(hook)
    before = torch.nn.utils.parameters_to_vector(params).detach().clone()
    cfg = ddpo.UpdateConfig(guidance=3.0, micro_batch=2, optimizer_steps_per_epoch=steps, max_grad_norm=0.05,
                            clip_range=1e-2)
    m = ddpo.ddpo_update(unet, params, sched, samples_of(traj, torch.tensor([1.0, -0.6])),
                         torch.optim.SGD(params, lr=0.05), cfg, cond_embeds=cond, uncond_embeds=uncond,
                         generator=torch.Generator().manual_seed(2), autocast_dtype=autocast_dtype, grad_scaler=scaler)
    return before, torch.nn.utils.parameters_to_vector(params).detach(), m


def test_grad_scaler_fp32_equals_no_scaler_and_skips_inf_steps():
    """Loss scaling is invisible in fp32 (scale 2^10, a power of two: exact), gradients are unscaled before the
    clip and the logged norm; an inf gradient skips the step (weights untouched) and halves the scale."""
    start, plain, m_plain = _scaled_update(None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    _, scaled, m_scaled = _scaled_update(scaler)
    assert (plain - start).abs().max() > 1e-4 and m_plain["grad_norm"] > 0.05  # moved, with clipping active
    torch.testing.assert_close(scaled, plain, rtol=1e-6, atol=1e-9)
    assert m_scaled["grad_norm"] == pytest.approx(m_plain["grad_norm"], rel=1e-6)
    assert m_scaled["skipped_steps"] == 0 and "skipped_steps" not in m_plain and scaler.get_scale() == 2.0**10

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    start, after, m = _scaled_update(scaler, steps=1, hook=lambda g: torch.full_like(g, float("inf")))
    assert torch.equal(after, start)
    assert m["skipped_steps"] == 1 and math.isnan(m["grad_norm"]) and scaler.get_scale() == 2.0**9


def test_fp16_autocast_update_with_grad_scaler():
    """fp16 compute on fp32 master weights with loss scaling (CPU autocast supports fp16): the first micro-step is
    on-policy, the weights move, and the logged norm is the unscaled one (that of the same update without a scaler,
    to fp16 rounding). GradScaler's default 2^16 overflows on this UNet's first step: skipped, scale halved."""
    _, _, m_plain = _scaled_update(None, autocast_dtype=torch.float16)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    start, after, m = _scaled_update(scaler, autocast_dtype=torch.float16)
    assert m["skipped_steps"] == 0 and np.isfinite(m["loss"]) and m["first_ratio_max_dev"] <= 1e-6
    assert m["grad_norm"] == pytest.approx(m_plain["grad_norm"], rel=1e-2) and (after - start).abs().max() > 1e-4
    scaler = torch.amp.GradScaler("cpu")
    _, _, m = _scaled_update(scaler, autocast_dtype=torch.float16)
    # whether 2^16 overflows depends on the CPU's fp16 kernels: an overflow skips the step and halves the scale
    skipped = m["skipped_steps"]
    assert np.isfinite(m["grad_norm"]) and scaler.get_scale() == (2.0**15 if skipped == 1 else 2.0**16)


def test_learning_raises_a_toy_reward():
    """reward = mean brightness of x_0: a few epochs of rollout -> advantages -> update raise it on held-out seeds."""
    torch.manual_seed(0)
    sched = DDIMScheduler(SchedulerConfig(), num_steps=10)
    unet = tiny_unet()
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    b = 8
    cond, uncond = torch.randn(b, 8, CTX, generator=g), torch.zeros(1, 8, CTX)
    eval_x = torch.randn(b, 4, 8, 8, generator=g)

    def reward(traj):
        return traj.latents[:, -1].mean(dim=(1, 2, 3))

    def evaluate():
        return reward(rollout(unet, None, sched, cond, uncond, guidance=3.0, seeds=list(range(1000, 1000 + b)),
                              latents=eval_x, decode=False)).mean().item()

    cfg = ddpo.UpdateConfig(guidance=3.0, micro_batch=8, optimizer_steps_per_epoch=2)
    gen = torch.Generator().manual_seed(0)
    before = evaluate()
    for epoch in range(10):
        traj = rollout(unet, None, sched, cond, uncond, guidance=3.0, seeds=list(range(epoch * b, epoch * b + b)),
                       latents=torch.randn(b, 4, 8, 8, generator=g), decode=False)
        m = ddpo.ddpo_update(unet, params, sched, samples_of(traj, ddpo.batch_advantages(reward(traj))), opt, cfg,
                             cond_embeds=cond, uncond_embeds=uncond, generator=gen)
        assert m["first_ratio_max_dev"] <= 1e-6
    after = evaluate()
    assert after > before + 0.3, (before, after)


def _ddp_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        params, _ = _one_update(rank, world, DistributedDataParallel)
        if rank == 0:
            torch.save(torch.nn.utils.parameters_to_vector(params).detach(), out_file)
    finally:
        dist.destroy_process_group()


def _one_update(rank: int, world: int, wrap=None):
    """One optimizer step on this rank's share of a fixed 4-sample rollout (the whole rollout when world == 1)."""
    sched = DDIMScheduler(SchedulerConfig(), num_steps=3)
    unet = tiny_unet()
    traj, cond, uncond = make_rollout(unet, sched, b=4)
    adv = torch.tensor([1.0, -0.5, 0.3, -1.2])
    share = slice(rank * 4 // world, (rank + 1) * 4 // world)
    local = ddpo.Samples(traj.latents[share], traj.log_probs[share], traj.timesteps[share], adv[share])
    params = list(unet.parameters())
    cfg = ddpo.UpdateConfig(guidance=3.0, micro_batch=2, optimizer_steps_per_epoch=1, max_grad_norm=0.05,
                            clip_range=1e-2)
    m = ddpo.ddpo_update(unet if wrap is None else wrap(unet), params, sched, local,
                         torch.optim.SGD(params, lr=0.05), cfg, cond_embeds=cond[share], uncond_embeds=uncond,
                         generator=torch.Generator().manual_seed(rank))
    return params, m


def test_ddp_two_ranks_equal_one_process(tmp_path):
    """2 gloo ranks x 2 samples (DDP averages the gradients; no_sync between micro-steps) make the same optimizer
    step as one process on all 4 samples, grad-norm clipping included."""
    import torch.multiprocessing as mp
    out = tmp_path / "params.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    params, m = _one_update(0, 1)
    assert m["grad_norm"] > 0.05  # clipping is active
    start = torch.nn.utils.parameters_to_vector(tiny_unet().parameters()).detach()
    single = torch.nn.utils.parameters_to_vector(params).detach()
    assert (single - start).abs().max() > 1e-4
    torch.testing.assert_close(torch.load(out), single, atol=2e-6, rtol=1e-5)
