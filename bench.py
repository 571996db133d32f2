"""
bench.py — how fast is one DDPO epoch, and how close to the hardware is it?

One DDPO epoch at SD 1.5 size (256 samples x 50 DDIM steps with CFG, trained on every step) is ~83 PFLOP: the
rollout runs 50 UNet forwards on a doubled (CFG) batch, the update re-runs each (sample, step) pair forward and
backward. This script measures each phase at one model size, for our implementation and for a reference loop built
the way ddpo-pytorch builds it on diffusers (diffusers' UNet, a per-timestep Python loop, a DDIM log-prob step that
gathers the schedule on the host every step), with the same weights and shapes, in the same process:

  (a) unet      one UNet forward on the CFG batch (2B)
  (b) rollout   N DDIM steps with CFG and log-probs, no decode
  (c) decode    VAE decode of B latents
  (d) update    the PPO update of B samples x N steps, LoRA and full fine-tuning
  (e) epoch     rollout + decode + reward + advantages + update (LoRA)

For each: seconds, images (or items) per second, achieved TFLOP/s and MFU (FLOPs counted by torch's FLOP counter on
one eager call, times the number of calls), peak memory (CUDA only), and ref/ours = the reference's time divided by
ours (> 1 means we are faster).

    python bench.py --quick                       # CPU: tiny model + SD 1.5 architecture at a small latent, < 5 min
    python bench.py                               # GPU: SD 1.5 architecture, random weights, 512 px, bf16
    python bench.py --batch 16 --steps 50 --compile --peak-tflops 989
Weights are random: speed does not depend on their values, and no hub is needed.
"""
import contextlib
import gc
import importlib.util
import math
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

import ddpo
import lora
from cli import DTYPES, ArgumentParser
from rewards import build_reward
from scheduler import DDIMScheduler, SchedulerConfig, guided_eps, rollout
from unet import UNet2DConditionModel, UNetConfig
from vae import AutoencoderKL, VAEConfig

# dense bf16 tensor-core peaks in TFLOP/s. For Hopper we use the 790 TFLOP/s that large bf16 matmuls reach in
# practice (the accounting: 83 PFLOP / 790 TFLOP/s = 105 s per epoch); the spec sheet says 989.
PEAK_TFLOPS = {"H100": 790.0, "H200": 790.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def parse_args(argv=None):
    p = ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--quick", action="store_true", help="CPU run: the tiny model, then the SD 1.5 architecture at a small latent")
    p.add_argument("--model", default="sd15", choices=["sd15", "sd21-base", "tiny"], help="architecture (random weights)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="compute dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--size", type=int, default=512, help="image size in pixels (latent = size/8)")
    p.add_argument("--batch", type=int, default=8, help="samples per rollout batch (the UNet sees 2x with CFG)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--micro-batch", type=int, default=4, help="(sample, step) items per training micro-step")
    p.add_argument("--lora-rank", type=int, default=4, help="LoRA rank for the LoRA update and the epoch")
    p.add_argument("--repeat", type=int, default=1, help="timed repetitions per measurement (after one warm-up)")
    p.add_argument("--compile", action="store_true", help="torch.compile our UNet (GPU; static shapes, no recompiles across steps)")
    p.add_argument("--channels-last", action="store_true", help="run our UNet in channels_last memory format")
    p.add_argument("--no-reference", action="store_true", help="skip the diffusers reference loop (no ratios)")
    p.add_argument("--no-full", action="store_true", help="skip the full fine-tuning update (saves 4x the UNet's memory)")
    p.add_argument("--no-ckpt", action="store_true", help="skip the gradient-checkpointing update rows (with --compile: "
                   "one graph fewer to compile)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by GPU name; none on CPU)")
    p.add_argument("--reward", default="jpeg-compressibility", help="reward used in the whole-epoch measurement")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# measuring


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(fn) -> float:
    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


@dataclass
class Row:
    name: str
    impl: str
    seconds: float
    units: float          # images (or items) processed per call
    unit: str
    flops: float          # per call
    peak_mem_gb: float | None


def measure(name, impl, fn, *, units, unit, flops, device, repeat, autocast) -> Row:
    """Time fn() under autocast (a fresh context per call), as train.py runs every phase."""
    with autocast():
        fn()  # warm-up (also compiles, fills caches)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        with autocast():
            fn()
    sync(device)
    sec = (time.perf_counter() - t0) / repeat
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return Row(name, impl, sec, units, unit, flops, mem)


def print_table(rows: list[Row], peak_tflops: float | None):
    ref = {r.name: r for r in rows if r.impl == "diffusers"}
    head = f"{'phase':<16}{'impl':<11}{'time s':>9}{'per s':>10}{'':<7}{'TFLOP/s':>9}{'MFU':>7}{'peak GB':>9}{'ref/ours':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        tflops = r.flops / r.seconds / 1e12
        mfu = f"{100 * tflops / peak_tflops:5.1f}%" if peak_tflops else "    -"
        mem = f"{r.peak_mem_gb:8.2f}" if r.peak_mem_gb is not None else "       -"
        ratio = f"{ref[r.name].seconds / r.seconds:9.2f}x" if r.impl == "ours" and r.name in ref else ""
        print(f"{r.name:<16}{r.impl:<11}{r.seconds:9.3f}{r.units / r.seconds:10.2f} {r.unit:<6}{tflops:9.3f}{mfu:>7}"
              f"{mem}{ratio:>10}")


# -----------------------------------------------------------------------------
# the reference: diffusers' modules driven the way ddpo-pytorch drives them


def ref_ddim_step(sched, eps, t, x, eta, prev_sample=None, noise=None):
    """ddpo-pytorch's ddim_step_with_logprob semantics on a diffusers DDIMScheduler: schedule gathered on the host
    every step (a device->host copy of t), broadcast, moved back; math in the model's dtype promoted by the fp32
    schedule; log-prob = mean over C,H,W."""
    T, N = sched.config.num_train_timesteps, sched.num_inference_steps
    prev_t = (t - T // N).clamp(0, T - 1)
    a_t = sched.alphas_cumprod.gather(0, t.cpu()).to(x.device).view(-1, 1, 1, 1)
    a_prev = sched.alphas_cumprod.gather(0, prev_t.cpu()).to(x.device).view(-1, 1, 1, 1)
    x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
    std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    mean = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * eps
    if prev_sample is None:
        prev_sample = mean + std * noise
    logp = -((prev_sample.detach() - mean) ** 2) / (2 * std ** 2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return prev_sample.to(x.dtype), logp.mean(dim=(1, 2, 3))


def ref_rollout(dunet, sched, cond, uncond, x, noise, guidance, eta):
    latents, logps = [x], []
    embeds = torch.cat([uncond.expand(cond.shape[0], -1, -1), cond])
    for i, t in enumerate(sched.timesteps):
        out = dunet(torch.cat([x, x]), t, encoder_hidden_states=embeds).sample
        u, c = out.chunk(2)
        eps = u + guidance * (c - u)
        x, logp = ref_ddim_step(sched, eps, t.to(x.device).expand(x.shape[0]), x, eta, noise=noise[:, i])
        latents.append(x)
        logps.append(logp)
    return torch.stack(latents, 1), torch.stack(logps, 1)


def ref_update(dunet, params, sched, samples, optimizer, cond, uncond, guidance, eta, micro_batch, clip_range, autocast):
    """ddpo-pytorch's inner loop: per-sample time shuffle, then for each train batch, for each timestep column j, one
    CFG forward+backward; gradients accumulate over all columns and batches of an optimizer step."""
    B, N = samples.log_probs.shape
    perm = torch.stack([torch.randperm(N) for _ in range(B)]).to(samples.latents.device)
    rows = torch.arange(B, device=perm.device)[:, None]
    lat, nxt = samples.latents[rows, perm], samples.latents[rows, perm + 1]
    ts, old = samples.timesteps[rows, perm], samples.log_probs[rows, perm]
    adv = samples.advantages.clamp(-5, 5)
    n_micro = math.ceil(B / micro_batch) * N
    for b0 in range(0, B, micro_batch):
        s = slice(b0, b0 + micro_batch)
        embeds = torch.cat([uncond.expand(len(adv[s]), -1, -1), cond[s]])
        for j in range(N):
            x = lat[s, j]
            with autocast:
                out = dunet(torch.cat([x, x]), torch.cat([ts[s, j], ts[s, j]]), encoder_hidden_states=embeds).sample
                u, c = out.chunk(2)
                eps = u + guidance * (c - u)
            _, logp = ref_ddim_step(sched, eps.float(), ts[s, j], x, eta, prev_sample=nxt[s, j])
            ratio = torch.exp(logp - old[s, j])
            loss = torch.max(-adv[s] * ratio, -adv[s] * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
            (loss / n_micro).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# -----------------------------------------------------------------------------
# one benchmark configuration


def build_models(arch: str, device, dtype):
    if arch == "tiny":
        from weights import load_pipeline  # the tiny SD's configs live with its builder
        pipe = load_pipeline("tiny", device="cpu")
        ucfg, vcfg, ctx = pipe.unet.config, pipe.vae.config, pipe.text_encoder.config.hidden_size
    else:
        ucfg, vcfg = UNetConfig.preset(arch), VAEConfig.preset("sd")
        ctx = ucfg.cross_attention_dim
    with torch.device("meta"):  # no second random init: weights are filled below
        unet, vae = UNet2DConditionModel(ucfg), AutoencoderKL(vcfg)
    g = torch.Generator().manual_seed(0)

    def fill(m):
        sd = {k: (torch.randn(v.shape, generator=g) * 0.02 if v.dim() > 1 else torch.zeros(v.shape))
              for k, v in m.state_dict().items()}
        for k, v in sd.items():  # 1-D weights are norm scales: start them at 1, as trained nets have them
            if v.dim() == 1 and k.endswith("weight"):
                sd[k] = torch.ones_like(v)
        m.load_state_dict(sd, assign=True)
        return m.to(device)
    return fill(unet), fill(vae).to(dtype), ctx


@dataclass
class Bench:
    """One configuration's models and inputs, shared by its phases: ours and (unless --no-reference) the diffusers
    reference with the same weights, the DDIM schedule, the conditioning, and how to time (R: measure's keywords)."""
    args: object
    unet: torch.nn.Module
    net: object                    # our UNet as called in the rollout (compiled with --compile)
    vae: torch.nn.Module
    dunet: torch.nn.Module | None
    dvae: torch.nn.Module | None
    dsched: object
    sched: DDIMScheduler
    cond: torch.Tensor             # (B, 77, D)
    uncond: torch.Tensor           # (1, 77, D)
    size: int
    batch: int
    steps: int
    dtype: torch.dtype
    device: torch.device
    R: dict
    rows: list

    @property
    def h(self) -> int:
        return self.size // 8

    @property
    def low(self):   # the update's autocast dtype argument (None: fp32)
        return self.dtype if self.dtype != torch.float32 else None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)


def setup_bench(args, arch: str, size: int, batch: int, steps: int, device, dtype) -> Bench:
    torch.manual_seed(0)
    unet, vae, ctx_dim = build_models(arch, device, dtype)
    cond = torch.randn(batch, 77, ctx_dim, device=device, dtype=dtype)
    uncond = torch.randn(1, 77, ctx_dim, device=device, dtype=dtype)
    sched = DDIMScheduler(SchedulerConfig(), num_steps=steps, device=device)
    dunet = dvae = dsched = None
    if not args.no_reference:
        import diffusers  # test-time reference only, never imported by the package
        dunet = diffusers.UNet2DConditionModel.from_config(unet.config.to_dict())
        dunet.load_state_dict(unet.state_dict())
        dvae = diffusers.AutoencoderKL.from_config(vae.config.to_dict())
        dvae.load_state_dict(vae.state_dict())
        dunet, dvae = dunet.to(device, dtype).eval(), dvae.to(device, dtype).eval()
        dsched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                         steps_offset=1, set_alpha_to_one=False, clip_sample=False)
        dsched.set_timesteps(steps, device=device)
    # LoRA base weights may be low precision; full fine-tuning keeps fp32 master weights (bench_update)
    unet = unet.to(dtype).eval()
    if args.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    net = torch.compile(unet, dynamic=False) if args.compile else unet
    b = Bench(args, unet, net, vae, dunet, dvae, dsched, sched, cond, uncond, size, batch, steps, dtype, device,
              R={}, rows=[])
    b.R = dict(device=device, repeat=args.repeat, autocast=b.autocast)
    return b


def bench_forward(b: Bench) -> float:
    """(a) one UNet forward on the CFG batch; its FLOPs."""
    x2 = torch.randn(2 * b.batch, 4, b.h, b.h, device=b.device, dtype=b.dtype)
    t2 = torch.full((2 * b.batch,), 501, device=b.device)
    c2 = torch.cat([b.uncond.expand(b.batch, -1, -1), b.cond])
    f_fwd = count_flops(lambda: b.unet(x2, t2, c2))
    with torch.no_grad():
        b.rows.append(measure("unet forward", "ours", lambda: b.net(x2, t2, c2), units=2 * b.batch, unit="img",
                              flops=f_fwd, **b.R))
        if b.dunet is not None:
            b.rows.append(measure("unet forward", "diffusers", lambda: b.dunet(x2, t2, encoder_hidden_states=c2).sample,
                                  units=2 * b.batch, unit="img", flops=f_fwd, **b.R))
    return f_fwd


def our_rollout(b: Bench, model, decode: bool = False):
    return rollout(model, b.vae, b.sched, b.cond, b.uncond, guidance=5.0, eta=1.0, seeds=list(range(b.batch)),
                   decode=decode, height=b.size, width=b.size, vae_chunk=8)


def bench_rollout(b: Bench, f_roll: float, x0, nz) -> None:
    """(b) N CFG steps with log-probs, no decode."""
    b.rows.append(measure("rollout", "ours", lambda: our_rollout(b, b.net), units=b.batch, unit="img", flops=f_roll,
                          **b.R))
    if b.dunet is not None:
        with torch.no_grad():
            b.rows.append(measure("rollout", "diffusers", lambda: ref_rollout(b.dunet, b.dsched, b.cond, b.uncond, x0,
                                                                              nz, 5.0, 1.0),
                                  units=b.batch, unit="img", flops=f_roll, **b.R))


def bench_decode(b: Bench) -> float:
    """(c) VAE decode of B latents; its FLOPs."""
    lat = torch.randn(b.batch, 4, b.h, b.h, device=b.device)
    f_dec = count_flops(lambda: b.vae.decode_latents(lat.to(b.dtype)))
    with torch.no_grad():
        b.rows.append(measure("vae decode", "ours", lambda: b.vae.decode_latents(lat.to(b.dtype), chunk_size=8),
                              units=b.batch, unit="img", flops=f_dec, **b.R))
        if b.dvae is not None:
            b.rows.append(measure("vae decode", "diffusers",
                                  lambda: (b.dvae.decode(lat.to(b.dtype) / 0.18215).sample / 2 + 0.5).clamp(0, 1).float(),
                                  units=b.batch, unit="img", flops=f_dec, **b.R))
    return f_dec


def micro_flops(b: Bench, model, traj) -> float:
    """FLOPs of one training micro-step, forward + backward."""
    m = b.args.micro_batch
    def go():
        with b.autocast():
            eps = guided_eps(model, traj.latents[:m, 0], traj.timesteps[:m, 0], b.cond[:m], b.uncond, 5.0)
        b.sched.step(eps.float(), traj.timesteps[:m, 0], traj.latents[:m, 0], 1.0,
                     prev_sample=traj.latents[:m, 1]).log_prob.sum().backward()
    f = count_flops(go)
    model.zero_grad(set_to_none=True)
    return f


def bench_update(b: Bench, ucfg) -> None:
    """(d) the PPO update over B samples x N steps, LoRA and full fine-tuning: ours, ours with gradient
    checkpointing (memory for ~1/3 more compute), the reference. One optimizer step keeps the loops comparable."""
    args = b.args
    with b.autocast():  # as train.py: the stored log-probs come from the same autocast as the update's
        traj = our_rollout(b, b.net)
    samples = ddpo.Samples(traj.latents, traj.log_probs, traj.timesteps, torch.randn(b.batch, device=b.device))
    items = b.batch * b.steps
    n_micro = math.ceil(items / args.micro_batch)
    impls = ([("ours", b.unet, False)] + ([] if args.no_ckpt else [("ours+ckpt", b.unet, True)])
             + ([("diffusers", b.dunet, False)] if b.dunet is not None else []))
    ref_autocast = b.autocast()   # ref_update enters it per micro-step
    for mode, rank in [("lora", args.lora_rank)] + ([] if args.no_full else [("full", 0)]):
        for impl, m, ckpt in impls:
            if rank:
                m.requires_grad_(False)
                params = lora.add_lora(m, rank=rank)
            else:
                m.float().requires_grad_(True)  # fp32 master weights; compute under autocast
                params = list(m.parameters())
            opt = torch.optim.AdamW(params, lr=1e-6)
            if impl == "ours":  # the same FLOPs for every loop: count ours (checkpointing's recompute is overhead)
                f_upd = n_micro * micro_flops(b, m, traj)
            gen = torch.Generator(device=b.device).manual_seed(0)
            if impl.startswith("ours"):
                m.gradient_checkpointing = ckpt
                net_m = torch.compile(m, dynamic=False) if args.compile else m
                fn = lambda: ddpo.ddpo_update(net_m, params, b.sched, samples, opt, ucfg, cond_embeds=b.cond,
                                              uncond_embeds=b.uncond, generator=gen, autocast_dtype=b.low)
            else:
                fn = lambda: ref_update(m, params, b.dsched, samples, opt, b.cond, b.uncond, 5.0, 1.0,
                                        args.micro_batch, 1e-4, ref_autocast)
            b.rows.append(measure(f"update {mode}", impl, fn, units=items, unit="item", flops=f_upd, **b.R))
            m.gradient_checkpointing = False
            opt = params = fn = None  # free the optimizer state before the next variant
            if rank:
                lora.merge_and_remove(m)  # back to the plain model for the next mode (weights change: fine for speed)
            else:
                m.requires_grad_(False).to(b.dtype)
            m.zero_grad(set_to_none=True)
            gc.collect()
            if b.device.type == "cuda":
                torch.cuda.empty_cache()


def bench_epoch(b: Bench, ucfg, f_roll: float, f_dec: float, x0, nz) -> None:
    """(e) one whole epoch with LoRA: rollout (adapters merged) -> decode -> reward -> advantages -> update."""
    reward = build_reward(b.args.reward, device=b.device)
    prompts = [f"prompt {i % 4}" for i in range(b.batch)]
    for impl, model in [("ours", b.unet)] + ([("diffusers", b.dunet)] if b.dunet is not None else []):
        model.requires_grad_(False)
        params = lora.add_lora(model, rank=b.args.lora_rank)
        opt = torch.optim.AdamW(params, lr=1e-6)
        gen = torch.Generator(device=b.device).manual_seed(0)
        if impl == "ours":
            def epoch():
                # as train.py: fold LoRA into the weights only where that is exact (an fp32 base)
                with lora.merged(model) if b.low is None else contextlib.nullcontext():
                    tr = our_rollout(b, model, decode=True)
                r, _ = reward(tr.images, prompts)
                ddpo.ddpo_update(model, params, b.sched, ddpo.Samples(tr.latents, tr.log_probs, tr.timesteps,
                                                                      ddpo.batch_advantages(r)),
                                 opt, ucfg, cond_embeds=b.cond, uncond_embeds=b.uncond, generator=gen,
                                 autocast_dtype=b.low)
        else:
            ref_autocast = b.autocast()
            def epoch():
                with torch.no_grad():
                    lats, logps = ref_rollout(model, b.dsched, b.cond, b.uncond, x0, nz, 5.0, 1.0)
                    imgs = (b.dvae.decode(lats[:, -1] / 0.18215).sample / 2 + 0.5).clamp(0, 1).float()
                r, _ = reward(imgs, prompts)
                adv = (r - r.mean()) / (r.std(correction=0) + 1e-8)
                tsteps = b.dsched.timesteps.expand(b.batch, -1)
                ref_update(model, params, b.dsched, ddpo.Samples(lats.float(), logps.float(), tsteps, adv), opt,
                           b.cond, b.uncond, 5.0, 1.0, b.args.micro_batch, 1e-4, ref_autocast)
        f_epoch = f_roll + f_dec + next(r.flops for r in b.rows if r.name == "update lora" and r.impl == impl)
        b.rows.append(measure("epoch (lora)", impl, epoch, units=b.batch, unit="img", flops=f_epoch, **b.R))
        lora.merge_and_remove(model)
        opt = params = None  # free the optimizer state before the next variant


def bench_config(args, arch: str, size: int, batch: int, steps: int, device, dtype, peak) -> list[Row]:
    """Phases (a)-(e) at one configuration, then their table."""
    b = setup_bench(args, arch, size, batch, steps, device, dtype)
    print(f"\n== {arch} UNet, {size}x{size} px (latent {b.h}x{b.h}), batch {batch} (x2 CFG), {steps} steps, "
          f"{str(dtype).replace('torch.', '')}, {device.type} ==")
    f_fwd = bench_forward(b)
    f_roll = steps * f_fwd
    x0 = torch.randn(batch, 4, b.h, b.h, device=device, dtype=dtype)        # the reference's x_T and step noise
    nz = torch.randn(batch, steps, 4, b.h, b.h, device=device, dtype=dtype)
    bench_rollout(b, f_roll, x0, nz)
    f_dec = bench_decode(b)
    ucfg = ddpo.UpdateConfig(micro_batch=args.micro_batch, optimizer_steps_per_epoch=1)
    bench_update(b, ucfg)
    bench_epoch(b, ucfg, f_roll, f_dec, x0, nz)
    print_table(b.rows, peak)
    if args.compile:  # the step loops must reuse one graph per shape: a recompile per timestep would be fatal
        from torch._dynamo.utils import counters
        print(f"torch.compile: {counters['stats']['unique_graphs']} graphs, recompiles {dict(counters['recompiles']) or 0}")
    return b.rows


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        device = torch.device("cpu")
    dname = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in dname), None)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if not args.no_reference and importlib.util.find_spec("diffusers") is None:
        print("bench.py: diffusers is not installed, so ours is measured alone (no ref/ours ratios); "
              "`pip install diffusers` for the reference loop", flush=True)
        args.no_reference = True
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    print(f"device: {dname}  torch {torch.__version__}  threads {torch.get_num_threads()}  "
          f"peak {peak or '-'} TFLOP/s")
    t0 = time.time()
    if args.quick:
        # the full loop on the tiny model, then the real SD 1.5 architecture at a small latent (LoRA only: full
        # fine-tuning would hold weights, grads and two Adam moments of two 860M-parameter UNets in CPU memory)
        bench_config(args, "tiny", 64, 4, 10, device, dtype, peak)
        args.no_full = True
        bench_config(args, "sd15", 128, 1, 2, device, dtype, peak)
    else:
        bench_config(args, args.model, args.size, args.batch, args.steps, device, dtype, peak)
    print(f"\ntotal {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
