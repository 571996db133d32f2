"""
DDPO: reinforcement learning of Stable Diffusion on a reward (Black et al. 2023, "Training Diffusion Models with
Reinforcement Learning"), with PPO clipping (DDPO_IS) and optional GRPO groups (DanceGRPO / Flow-GRPO).

The sampler is the policy. Each DDIM step x_t -> x_{t-1} is a Gaussian action N(mu_theta(x_t, t, c), sigma_t^2 I)
with an exact log-probability (scheduler.py), so the reward of the final image is optimised with

    L(theta) = E_{c, x_T..x_0} sum_t max( -A * r_t, -A * clip(r_t, 1 - eps, 1 + eps) ),
    r_t = p_theta(x_{t-1} | x_t, c) / p_old(x_{t-1} | x_t, c),   A = normalised reward (per prompt or per group)

One epoch is one straight line, top to bottom in main() (run.py keeps the flags, the run directory, checkpoints
and logs; ddpo.py the advantages and the update; scheduler.py the rollout):

    prompts -> text embeddings -> rollout (x_T..x_0, log-probs) -> images -> rewards -> advantages -> PPO update

    python train.py --reward hps                                  # SD 1.5 (hub), LoRA r=4, bf16 autocast, 24 GB GPU
    python train.py --model tiny --reward jpeg-compressibility    # a random tiny SD on a CPU, in minutes
    torchrun --nproc_per_node 8 train.py --reward hps             # DDP; batch flags are per process
    python train.py --resume runs/<name>                          # continue exactly where it stopped

Run directory (--out): config.json, metrics.jsonl, reward_curve.png, samples/epoch_NNNN.png,
checkpoints/epoch_NNNN/ (weights, optimizer, tracker, fp16 loss scale, RNG and epoch state), export/ (diffusers UNet
folder, LoRA).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass

import torch
from tqdm import tqdm

import lora
from cli import DTYPES, fail
from ddpo import (PerPromptStatTracker, Samples, UpdateConfig, batch_advantages, ddpo_update, group_advantages,
                  reference_policy)
from grid import make_grid, score_label
from pretrain_data import PretrainLoss, read_pairs
from rewards import RewardWarning, build_reward, options_from_flags, parse_spec
from run import (Run, category_means, cpu_warning, eval_sets, gather_cat, gather_objects, init_distributed,
                 mean_over_ranks, parse_args, resume_checkpoint, reward_categories, reward_stats, task_specs, validate)
from scheduler import DDIMScheduler, SchedulerConfig, rollout
from weights import load_pipeline


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The noise seed of global sample `index` of `epoch`: the same on any rank, batch size or after a resume."""
    return ((seed * 1_000_003 + epoch) * 1_000_003 + index) % 2**63


def epoch_prompts(prompts: list[str], n: int, group_size: int, seed: int, epoch: int) -> list[str]:
    """The epoch's n prompts in global sample order: n / group_size uniform draws, each repeated group_size times
    (a GRPO group is a run of consecutive samples)."""
    rng = random.Random(f"prompts-{seed}-{epoch}")  # a string seed hashes deterministically (sha512)
    return [p for p in rng.choices(prompts, k=n // group_size) for _ in range(group_size)]


@dataclass
class Policy:
    """The sampler as a policy: the UNet (LoRA-wrapped or whole) and what every rollout of it needs."""
    pipe: object                # weights.Pipeline: text encoder, VAE, the UNet
    model: torch.nn.Module      # the UNet as trained (DDP-wrapped with several processes)
    params: list                # the trainable fp32 parameters
    use_lora: bool
    low: torch.dtype | None     # autocast dtype of the frozen weights and the compute (None: fp32)
    scheduler: DDIMScheduler
    uncond: torch.Tensor        # (1,77,D) the negative prompt's embedding
    size: int                   # image size in pixels
    latent_shape: tuple         # (C, h, w)
    guidance: float
    eta: float
    vae_chunk: int | None

    @property
    def unet(self):
        return self.pipe.unet

    def autocast(self):
        return torch.autocast(self.uncond.device.type, dtype=self.low) if self.low else contextlib.nullcontext()

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], x_T: torch.Tensor | None = None):
        """One rollout batch with the current policy: (trajectory, prompt embeddings (B,77,D))."""
        cond = self.pipe.encode_prompts(prompts)
        # folding LoRA into the weights is exact only in fp32: a bf16 base weight would round the update away
        fold = lora.merged(self.unet) if self.use_lora and self.low is None else contextlib.nullcontext()
        with fold, self.autocast():
            traj = rollout(self.unet, self.pipe.vae, self.scheduler, cond, self.uncond, guidance=self.guidance,
                           eta=self.eta, seeds=seeds, latents=x_T, vae_chunk=self.vae_chunk, height=self.size,
                           width=self.size)
        return traj, cond


def build_policy(args: argparse.Namespace, pipe, device: torch.device, world: int) -> tuple[Policy, object]:
    """(policy, KL reference or None). The frozen parts in the compute dtype, trainable weights in fp32
    (ddpo-pytorch #8, trl #1330); the caller has seeded torch, so LoRA's A starts the same on every rank."""
    low = DTYPES[args.precision] if args.precision != "fp32" else None
    use_lora, unet = args.lora_rank > 0, pipe.unet
    for m in (pipe.vae, pipe.text_encoder):
        m.requires_grad_(False).eval().to(low or torch.float32)
    if use_lora:
        unet.requires_grad_(False).to(low or torch.float32)
        params = lora.add_lora(unet, args.lora_rank, args.lora_alpha, tuple(args.lora_targets.split(",")))
    else:
        params = list(unet.requires_grad_(True).parameters())
    # the KL reference: the initial policy (LoRA: the same UNet with adapters off; full: a frozen low-precision copy)
    reference = None
    if args.kl_coef > 0:
        reference = reference_policy(unet) if use_lora else reference_policy(unet).to(low or torch.float32)
    unet.gradient_checkpointing = args.grad_checkpointing
    if args.compile:
        unet.compile()
    model = unet
    if world > 1:  # DDP sees exactly the trainable parameters (LoRA: A and B), all used in every forward
        model = torch.nn.parallel.DistributedDataParallel(
            unet, device_ids=[device.index] if device.type == "cuda" else None)
    scheduler = DDIMScheduler(SchedulerConfig.from_dict(pipe.scheduler_config), args.steps, device)
    uncond = pipe.encode_prompts([args.negative_prompt])
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    size = args.size or unet.config.sample_size * factor
    policy = Policy(pipe, model, params, use_lora, low, scheduler, uncond, size,
                    (pipe.vae.config.latent_channels, size // factor, size // factor), args.guidance, args.eta,
                    args.vae_chunk)
    return policy, reference


@dataclass
class Task:
    """One reward with its prompt distribution: Zhang et al.'s Algorithm 1 runs several in turn every epoch, each
    with its own rollouts, advantages (normalised within the task) and update. A run without --task has one task,
    whose metrics carry no prefix; with --task they are logged as task0_reward_mean, task1_..."""
    prefix: str
    name: str                       # the --task spec (or the --reward spec)
    reward_fn: object
    prompts: list[str]
    eval_prompts: list[str]
    heldout_prompts: list[str]
    batches: int                    # rollout batches per epoch, per process
    seed: int                       # task 0: --seed; task i: another stream of noise and prompts
    tracker: PerPromptStatTracker | None = None


class TaskTrackers:
    """The per-prompt trackers of several tasks, saved and restored as one checkpoint entry."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    def state_dict(self) -> list:
        return [t.state_dict() if t is not None else None for t in self.trackers]

    def load_state_dict(self, states: list) -> None:
        for t, s in zip(self.trackers, states):
            if t is not None:
                t.load_state_dict(s)


def evaluate(policy: Policy, reward_fn, run: Run, epoch: int, name: str, prompts: list[str], score: bool,
             grid: bool) -> dict:
    """A prompt set with fixed seeds (image i always gets the same noise): `name`_reward_* metrics (and per category,
    if the reward reports categories) and a grid samples/[name_]epoch_NNNN.png of its first --grid-size images."""
    args = run.args
    policy.unet.eval()
    mine, rows, infos = list(range(run.rank, len(prompts), run.world)), [], []
    for b in range(0, len(mine), args.sample_batch_size):
        idx = mine[b:b + args.sample_batch_size]
        ps = [prompts[i] for i in idx]
        traj, _ = policy.generate(ps, [sample_seed(args.seed, -1, i) for i in idx])
        scores, info = reward_fn(traj.images, ps) if score else (torch.zeros(len(idx)), {})
        cats = reward_categories(info)
        infos.append(info)
        for j, i in enumerate(idx):
            image = (traj.images[j] * 255).round().byte().cpu() if i < args.grid_size else None
            rows.append((i, float(scores[j]), {k: float(v[j]) for k, v in cats.items()}, image))
    print_warnings(run, infos)
    rows = sorted((r for part in gather_objects(rows) for r in part), key=lambda r: r[0])
    out = {}
    if score:
        out = reward_stats(f"{name}_reward", torch.tensor([r[1] for r in rows], dtype=torch.float64))
        out.update(category_means(f"{name}_reward", {k: torch.tensor([r[2][k] for r in rows], dtype=torch.float64)
                                                     for k in rows[0][2]}))
    if grid and run.master and args.grid_size > 0:
        shown = [r for r in rows if r[3] is not None]
        caps = [prompts[r[0]][:40] + (f" {score_label(r[1])}" if score else "") for r in shown]
        ncols = args.eval_seeds if 1 < args.eval_seeds <= 8 else 8   # a row per prompt when seeds repeat
        image = make_grid(torch.stack([r[3].float() / 255 for r in shown]), ncols=min(ncols, len(shown)),
                          captions=caps)
        run.save_image(os.path.join("samples", f"{'' if name == 'eval' else name + '_'}epoch_{epoch:04d}.png"), image)
    return out


def evaluate_all(policy: Policy, run: Run, epoch: int, tasks: list[Task]) -> dict:
    """Each task's evaluation sets due at this epoch: scored every --eval-every epochs, a grid every --sample-every."""
    score, grid = run.due(run.args.eval_every, epoch), run.due(run.args.sample_every, epoch)
    out = {}
    for task in tasks:
        for kind, prompts in (("eval", task.eval_prompts), ("heldout", task.heldout_prompts)):
            if prompts and (score or grid):
                out.update(evaluate(policy, task.reward_fn, run, epoch, task.prefix + kind, prompts, score, grid))
    return out


def print_warnings(run: Run, infos: list[dict]) -> None:
    """A reward's warnings (info["warnings"]) of one epoch or evaluation, each distinct line once."""
    for warning in dict.fromkeys(w for info in infos for w in info.get("warnings", [])):
        tqdm.write(f"rank {run.rank}: {warning}", file=sys.stderr)


def check_first_ratio(run: Run, stats: dict, epoch: int) -> None:
    """DDPO's sanity check: the first micro-step re-scores the rollout with the weights that sampled it, so its PPO
    ratio is 1 up to rounding; off by more than the clip range, the whole update is clipped from the start."""
    if stats["first_ratio_max_dev"] > run.args.clip_range:
        run.warn(f"epoch {epoch}: the PPO ratio of the first micro-step is off 1 by {stats['first_ratio_max_dev']:.2g} "
                 f"> --clip-range {run.args.clip_range:g}: rollout and update scored the same steps differently "
                 "(precision or batch-size-dependent kernels); the update is clipped from the start. Check "
                 "--precision, or use --precision fp32")


def sync(device: torch.device) -> None:
    """Wait for queued GPU work: the phase timings must include it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample_epoch(policy: Policy, task: Task, run: Run, executor, all_prompts: list[str], epoch: int):
    """This rank's block of a task's global batch of the epoch, rolled out and scored: (batches [(cond,
    trajectory)], reward results [(scores, info)], timings). With an executor the rewards of a batch are computed
    in its thread while the next batch samples."""
    args, device, reward_fn, seed = run.args, policy.uncond.device, task.reward_fn, task.seed
    n_local = args.sample_batch_size * task.batches
    mine = range(run.rank * n_local, (run.rank + 1) * n_local)
    policy.unet.eval()
    batches, pending, results, t_reward = [], [], [], 0.0
    t0 = time.perf_counter()
    for b in tqdm(range(task.batches), desc=f"epoch {epoch} {task.prefix}rollout", disable=not run.master,
                  leave=False):
        idx = list(mine[b * args.sample_batch_size:(b + 1) * args.sample_batch_size])
        ps = [all_prompts[i] for i in idx]
        x_T = None
        if args.same_noise_per_group:  # x_T from the group's first seed; step noise stays per sample
            x_T = torch.stack([torch.randn(policy.latent_shape, generator=torch.Generator().manual_seed(
                sample_seed(seed, epoch, i - i % args.group_size))) for i in idx])
        traj, cond = policy.generate(ps, [sample_seed(seed, epoch, i) for i in idx], x_T)
        if executor is not None:
            pending.append(executor.submit(reward_fn, traj.images, ps))
        else:
            sync(device)
            t1 = time.perf_counter()
            results.append(reward_fn(traj.images, ps))
            t_reward += time.perf_counter() - t1
        batches.append((cond, traj))
    sync(device)
    t1 = time.perf_counter()
    results += [f.result() for f in tqdm(pending, desc=f"epoch {epoch} reward", disable=not (run.master and pending),
                                                 leave=False)]
    t_reward += time.perf_counter() - t1
    print_warnings(run, [r[1] for r in results])
    return batches, results, {"time_rollout": t1 - t0 - (0.0 if executor else t_reward), "time_reward": t_reward}


def reward_metrics(results: list, device: torch.device) -> dict[str, float]:
    """Over the global batch: the parts of a weighted sum (when there are several) and the reward's categories."""
    out, parts = {}, list(results[0][1].get("components", {}))
    for name in parts if len(parts) > 1 else []:
        v = torch.cat([r[1]["components"][name] for r in results]).float().to(device)
        out.update(reward_stats(f"reward_{name}", gather_cat(v).cpu()))
    cats = [reward_categories(r[1]) for r in results]
    out.update(category_means("reward", {k: gather_cat(torch.cat([c[k] for c in cats]).float().to(device)).cpu()
                                         for k in cats[0]}))
    return out


def build_update(args: argparse.Namespace, policy: Policy, device: torch.device):
    """(AdamW on the trainable parameters, fp16 loss scaler or None, UpdateConfig)."""
    optimizer = torch.optim.AdamW(policy.params, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.weight_decay, eps=args.adam_eps)
    # fp16 gradients underflow below ~6e-8: scale the loss up (and skip the steps that overflow); bf16 needs none
    grad_scaler = torch.amp.GradScaler(device.type) if policy.low == torch.float16 else None
    update_cfg = UpdateConfig(clip_range=args.clip_range, adv_clip_max=args.adv_clip_max, loss=args.loss,
                              kl_coef=args.kl_coef, guidance=args.guidance, eta=args.eta,
                              micro_batch=args.train_batch_size,
                              optimizer_steps_per_epoch=args.optimizer_steps_per_epoch,
                              timestep_fraction=args.timestep_fraction, skip_last_step=args.skip_last_step,
                              max_grad_norm=args.max_grad_norm, num_inner_epochs=args.inner_epochs)
    return optimizer, grad_scaler, update_cfg


def prefixed(prefix: str, metrics: dict) -> dict:
    return {prefix + k: v for k, v in metrics.items()}


def advantages_of(args: argparse.Namespace, tracker, all_prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
    """(n_global,) advantages of the global batch: per prompt (DDPO's tracker), per group (GRPO) or per batch."""
    if args.advantage == "per-prompt":
        return tracker.update(all_prompts, rewards)
    if args.advantage == "group":
        return group_advantages(rewards, torch.arange(len(rewards)) // args.group_size, global_std=args.global_std)
    return batch_advantages(rewards)


def setup(argv: list[str] | None):
    """Every bad input (flags, prompt files, model, rewards) fails here with one line, before any long work."""
    # a reward's problems reach us in info["warnings"] and are printed once per batch as one line (print_warnings);
    # the same text through warnings.warn would print again, with a source line
    warnings.simplefilter("ignore", RewardWarning)
    try:
        args = parse_args(argv)
        world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; the process group starts once inputs are checked
        validate(args, world)
        specs = task_specs(args)
        prompt_sets = [eval_sets(args, spec) for spec in specs]
        for spec, sets in zip(specs, prompt_sets):
            if "shapes" in dict(parse_spec(spec["reward"])):   # its prompts must be in the world's grammar
                import shapes
                for p in {p for ps in sets for p in ps}:
                    shapes.parse(p)
        pretrain_pairs = read_pairs(args.pretrain_data) if args.pretrain_data else None   # a bad source fails now
        ckpt = resume_checkpoint(args, world)
        reward_options = options_from_flags(args.reward_option, hps_checkpoint=args.hps_checkpoint,
                                            aesthetic_checkpoint=args.aesthetic_checkpoint, clip_path=args.clip_path)
        rank, world, device = init_distributed(args.device)
        pipe = load_pipeline(args.model, device, torch.float32)
        tasks = [Task(prefix=f"task{i}_" if args.task else "", name=args.task[i] if args.task else spec["reward"],
                      reward_fn=build_reward(spec["reward"], device=device, **reward_options), prompts=sets[0],
                      eval_prompts=sets[1], heldout_prompts=sets[2], batches=spec["batches"],
                      seed=args.seed + 1_000_003 * i)
                 for i, (spec, sets) in enumerate(zip(specs, prompt_sets))]
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        fail("train.py", str(e))
    return args, tasks, ckpt, rank, world, device, pipe, pretrain_pairs


def main(argv: list[str] | None = None) -> None:
    args, tasks, ckpt, rank, world, device, pipe, pretrain_pairs = setup(argv)
    if rank == 0 and (warning := cpu_warning(device, sum(p.numel() for p in pipe.unet.parameters()))):
        print(warning, file=sys.stderr, flush=True)
    torch.manual_seed(args.seed)  # the same initial weights (LoRA A) on every rank
    policy, reference = build_policy(args, pipe, device, world)
    optimizer, grad_scaler, update_cfg = build_update(args, policy, device)
    for task in tasks:
        if args.advantage == "per-prompt":
            task.tracker = PerPromptStatTracker(args.tracker_buffer, args.tracker_min_count)
    trackers = tasks[0].tracker if len(tasks) == 1 else TaskTrackers([task.tracker for task in tasks])
    pretrain_loss = None   # Zhang et al.'s beta * L_pre; its batch of global optimizer step g is a function of g
    if args.pretrain_coef > 0:
        pretrain_loss = PretrainLoss(pretrain_pairs, pipe, policy.scheduler, args.pretrain_coef,
                                     args.pretrain_batch_size, policy.size, args.seed, rank)
    generator = torch.Generator().manual_seed(args.seed)  # shuffles samples and timesteps in the update
    run = Run(args, rank, world, unet=policy.unet, use_lora=policy.use_lora, optimizer=optimizer, tracker=trackers,
              grad_scaler=grad_scaler, generator=generator, prefixes=[task.prefix for task in tasks])
    what = f"LoRA r={args.lora_rank}" if policy.use_lora else "full UNet"
    n_images = sum(task.batches for task in tasks) * args.sample_batch_size * world
    start_epoch, global_step = run.begin(ckpt, f"{args.model}, {what}, {sum(p.numel() for p in policy.params):,} "
                                         f"trainable parameters, {args.precision}, {world} process(es), {n_images} "
                                         "samples/epoch, " + ", ".join(f"{t.prefix}reward {t.name}" for t in tasks))
    # one worker: rewards are scored in order, in a thread while the next batch samples (if the rewards allow it)
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1) if args.async_reward and all(
        getattr(task.reward_fn, "async_ok", False) for task in tasks) else None

    for epoch in range(start_epoch, args.epochs):
        t_epoch = time.perf_counter()
        row, usable = {"epoch": epoch}, False
        if run.due(args.eval_every, epoch) or run.due(args.sample_every, epoch):
            row.update(evaluate_all(policy, run, epoch, tasks), time_eval=time.perf_counter() - t_epoch)
        for task in tasks:   # Algorithm 1: the tasks in turn, each its own rollouts, advantages and update
            n_local = task.batches * args.sample_batch_size

            # prompts -> text embeddings -> rollout -> images -> rewards
            all_prompts = epoch_prompts(task.prompts, n_local * world, args.group_size, task.seed, epoch)
            batches, results, times = sample_epoch(policy, task, run, executor, all_prompts, epoch)
            rewards = torch.cat([r[0] for r in results]).float().to(device)  # (n_local,)

            # rewards of the task's global batch -> advantages -> this rank's slice (non-finite: advantage 0, masked)
            global_rewards = gather_cat(rewards).cpu()  # (n_global,) in global sample order
            advantages = advantages_of(args, task.tracker, all_prompts, global_rewards)
            samples = Samples(latents=torch.cat([t.latents for _, t in batches]),
                              log_probs=torch.cat([t.log_probs for _, t in batches]),
                              timesteps=torch.cat([t.timesteps for _, t in batches]),
                              advantages=advantages[rank * n_local:(rank + 1) * n_local].to(device),
                              valid=torch.isfinite(rewards))
            row.update(prefixed(task.prefix, reward_stats("reward", global_rewards)))
            if not torch.isfinite(global_rewards).any():   # no usable reward for this task: no update
                continue
            usable = True

            # PPO update on the stored trajectories (+ beta * L_pre at every optimizer step)
            sync(device)
            t0 = time.perf_counter()
            stats = ddpo_update(policy.model, policy.params, policy.scheduler, samples, optimizer, update_cfg,
                                cond_embeds=torch.cat([c for c, _ in batches]), uncond_embeds=policy.uncond,
                                generator=generator, reference=reference, autocast_dtype=policy.low,
                                grad_scaler=grad_scaler, progress=run.master,
                                aux_loss=(lambda m, i: pretrain_loss(m, global_step + i)) if pretrain_loss else None)
            sync(device)
            global_step += args.optimizer_steps_per_epoch * args.inner_epochs
            stats = mean_over_ranks(stats)
            check_first_ratio(run, stats, epoch)
            row.update(prefixed(task.prefix, {**reward_metrics(results, device), **stats, **times,
                                              "time_update": time.perf_counter() - t0}))

        # log, checkpoint; an epoch without any usable reward: logged, and --max-bad-epochs of them in a row stop
        row["time_total"] = time.perf_counter() - t_epoch
        if not usable:
            run.skip_epoch(row)
            continue
        row.update(lr=optimizer.param_groups[0]["lr"], global_step=global_step,
                   images_per_s=n_images / row["time_total"])
        run.log(row)
        run.save(epoch + 1, global_step)

    run.finish(evaluate_all(policy, run, args.epochs, tasks))
    if executor is not None:
        executor.shutdown()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
