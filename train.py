"""
DDPO: reinforcement learning of Stable Diffusion on a reward (Black et al. 2023, "Training Diffusion Models with
Reinforcement Learning"), with PPO clipping (DDPO_IS) and optional GRPO groups (DanceGRPO / Flow-GRPO).

The sampler is the policy. Each DDIM step x_t -> x_{t-1} is a Gaussian action N(mu_theta(x_t, t, c), sigma_t^2 I)
with an exact log-probability (scheduler.py), so the reward of the final image is optimised with

    L(theta) = E_{c, x_T..x_0} sum_t max( -A * r_t, -A * clip(r_t, 1 - eps, 1 + eps) ),
    r_t = p_theta(x_{t-1} | x_t, c) / p_old(x_{t-1} | x_t, c),   A = normalised reward (per prompt or per group)

One epoch is one straight line, top to bottom in main() (config.py keeps the flags, run.py the run directory,
checkpoints and logs, policy.py the sampler being trained, ddpo.py the advantages and the update, scheduler.py the
rollout):

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

import concurrent.futures
import os
import random
import sys
import time
import warnings

import torch
from tqdm import tqdm

from cli import fail
from config import TrainConfig, parse_args, task_specs
from ddpo import (PerPromptStatTracker, Samples, batch_advantages, ddpo_update, group_advantages,
                  permute_within_groups)
from policy import Policy, build_policy, build_update, evaluate_all, sample_seed, sync
from pretrain_data import PretrainLoss, read_pairs
from rewards import RewardWarning, build_reward, options_from_flags, parse_spec
from run import (Run, Task, category_means, cpu_warning, eval_sets, gather_cat, init_distributed, mean_over_ranks,
                 resume_checkpoint, reward_categories, reward_stats)
from weights import load_pipeline

def epoch_prompts(prompts: list[str], n: int, group_size: int, seed: int, epoch: int,
                  balanced: bool = False) -> list[str]:
    """The epoch's n prompts in global sample order: n / group_size groups, each one prompt repeated group_size
    times (a GRPO group is a run of consecutive samples). The groups' prompts are uniform draws (ddpo-pytorch), or
    with `balanced` the run's groups walk through shuffled passes over the prompt list, so every prompt gets the
    same number of groups (one per epoch when an epoch has as many groups as there are prompts). Either way a pure
    function of (seed, epoch): a resumed run draws what the uninterrupted one would have."""
    k = n // group_size
    if balanced:
        first, passes = epoch * k, {}
        for j in range(first // len(prompts), (first + k - 1) // len(prompts) + 1):
            passes[j] = list(prompts)
            random.Random(f"prompts-{seed}-pass-{j}").shuffle(passes[j])   # a string seed hashes deterministically
        groups = [passes[i // len(prompts)][i % len(prompts)] for i in range(first, first + k)]
    else:
        groups = random.Random(f"prompts-{seed}-{epoch}").choices(prompts, k=k)
    return [p for p in groups for _ in range(group_size)]


def sample_epoch(policy: Policy, task: Task, run: Run, executor, all_prompts: list[str], epoch: int):
    """This rank's block of a task's global batch of the epoch, rolled out and scored: (batches [(cond,
    trajectory)], reward results [(scores, info)], timings). With an executor the rewards of a batch are computed
    in its thread while the next batch samples."""
    cfg, device, reward_fn, seed = run.cfg, policy.uncond.device, task.reward_fn, task.seed
    n_local = cfg.sample_batch_size * task.batches
    mine = range(run.rank * n_local, (run.rank + 1) * n_local)
    policy.unet.eval()
    batches, pending, results, t_reward = [], [], [], 0.0
    t0 = time.perf_counter()
    for b in tqdm(range(task.batches), desc=f"epoch {epoch} {task.prefix}rollout", disable=not run.master,
                  leave=False):
        idx = list(mine[b * cfg.sample_batch_size:(b + 1) * cfg.sample_batch_size])
        ps = [all_prompts[i] for i in idx]
        x_T = None
        if cfg.same_noise_per_group:  # x_T from the group's first seed; step noise stays per sample
            x_T = torch.stack([torch.randn(policy.latent_shape, generator=torch.Generator().manual_seed(
                sample_seed(seed, epoch, i - i % cfg.group_size))) for i in idx])
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
    run.print_warnings([r[1] for r in results])
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


def prefixed(prefix: str, metrics: dict) -> dict:
    return {prefix + k: v for k, v in metrics.items()}


def advantages_of(cfg: TrainConfig, tracker, all_prompts: list[str], rewards: torch.Tensor, seed: int,
                  epoch: int) -> torch.Tensor:
    """(n_global,) advantages of the global batch: per prompt (DDPO's tracker), per group (GRPO) or per batch;
    with --shuffle-advantages permuted within each group (the null control), a pure function of (seed, epoch)."""
    if cfg.advantage == "per-prompt":
        adv = tracker.update(all_prompts, rewards)
    elif cfg.advantage == "group":
        adv = group_advantages(rewards, torch.arange(len(rewards)) // cfg.group_size, global_std=cfg.global_std)
    else:
        adv = batch_advantages(rewards)
    if cfg.shuffle_advantages:
        gen = torch.Generator().manual_seed(random.Random(f"shuffle-{seed}-{epoch}").getrandbits(63))
        adv = permute_within_groups(adv, cfg.group_size, gen)
    return adv


def setup(argv: list[str] | None):
    """Every bad input (flags, prompt files, model, rewards) fails here with one line, before any long work."""
    # a reward's problems reach us in info["warnings"] and are printed once per batch as one line (print_warnings);
    # the same text through warnings.warn would print again, with a source line
    warnings.simplefilter("ignore", RewardWarning)
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; the process group starts once inputs are checked
        cfg = parse_args(argv, world)
        specs = task_specs(cfg)
        prompt_sets = [eval_sets(cfg, spec) for spec in specs]
        for spec, sets in zip(specs, prompt_sets):
            if "shapes" in dict(parse_spec(spec["reward"])):   # its prompts must be in the world's grammar
                import shapes
                for p in {p for ps in sets for p in ps}:
                    shapes.parse(p)
        pretrain_pairs = read_pairs(cfg.pretrain_data) if cfg.pretrain_data else None   # a bad source fails now
        ckpt = resume_checkpoint(cfg, world)
        reward_options = options_from_flags(cfg.reward_option, hps_checkpoint=cfg.hps_checkpoint,
                                            aesthetic_checkpoint=cfg.aesthetic_checkpoint, clip_path=cfg.clip_path)
        rank, world, device = init_distributed(cfg.device)
        pipe = load_pipeline(cfg.model, device, torch.float32)
        if rank == 0 and (warning := cpu_warning(device, sum(p.numel() for p in pipe.unet.parameters()))):
            print(warning, file=sys.stderr, flush=True)
        per_prompt = cfg.advantage == "per-prompt"
        tasks = [Task(prefix=f"task{i}_" if cfg.task else "", name=cfg.task[i] if cfg.task else spec["reward"],
                      reward_fn=build_reward(spec["reward"], device=device, **reward_options), prompts=sets[0],
                      eval_prompts=sets[1], heldout_prompts=sets[2], batches=spec["batches"],
                      seed=cfg.seed + 1_000_003 * i,
                      tracker=PerPromptStatTracker(cfg.tracker_buffer, cfg.tracker_min_count) if per_prompt else None)
                 for i, (spec, sets) in enumerate(zip(specs, prompt_sets))]
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        fail("train.py", str(e))
    return cfg, tasks, ckpt, rank, world, device, pipe, pretrain_pairs


def main(argv: list[str] | None = None) -> None:
    cfg, tasks, ckpt, rank, world, device, pipe, pretrain_pairs = setup(argv)
    torch.manual_seed(cfg.seed)  # the same initial weights (LoRA A) on every rank
    policy, reference = build_policy(cfg, pipe, device, world)
    optimizer, grad_scaler, update_cfg = build_update(cfg, policy, device)
    pretrain_loss = None   # Zhang et al.'s beta * L_pre; its batch of global optimizer step g is a function of g
    if cfg.pretrain_coef > 0:
        pretrain_loss = PretrainLoss(pretrain_pairs, pipe, policy.scheduler, cfg.pretrain_coef,
                                     cfg.pretrain_batch_size, policy.size, cfg.seed, rank)
    generator = torch.Generator().manual_seed(cfg.seed)  # shuffles samples and timesteps in the update
    run = Run(cfg, rank, world, unet=policy.unet, use_lora=policy.use_lora, optimizer=optimizer, tasks=tasks,
              grad_scaler=grad_scaler, generator=generator)
    n_images = sum(task.batches for task in tasks) * cfg.sample_batch_size * world
    start_epoch, global_step = run.begin(ckpt, f"{cfg.model}, {policy.describe()}, {world} process(es), "
                                               f"{n_images} samples/epoch")
    # one worker: rewards are scored in order, in a thread while the next batch samples (if the rewards allow it)
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1) if cfg.async_reward and all(
        getattr(task.reward_fn, "async_ok", False) for task in tasks) else None

    for epoch in range(start_epoch, cfg.epochs):
        t_epoch = time.perf_counter()
        row, usable = {"epoch": epoch}, False
        if run.due(cfg.eval_every, epoch) or run.due(cfg.sample_every, epoch):
            row.update(evaluate_all(policy, run, epoch, tasks), time_eval=time.perf_counter() - t_epoch)
        for task in tasks:   # Algorithm 1: the tasks in turn, each its own rollouts, advantages and update
            n_local = task.batches * cfg.sample_batch_size

            # prompts -> text embeddings -> rollout -> images -> rewards
            all_prompts = epoch_prompts(task.prompts, n_local * world, cfg.group_size, task.seed, epoch,
                                        cfg.prompt_draw == "balanced")
            batches, results, times = sample_epoch(policy, task, run, executor, all_prompts, epoch)
            rewards = torch.cat([r[0] for r in results]).float().to(device)  # (n_local,)

            # rewards of the task's global batch -> advantages -> this rank's slice (non-finite: advantage 0, masked)
            global_rewards = gather_cat(rewards).cpu()  # (n_global,) in global sample order
            advantages = advantages_of(cfg, task.tracker, all_prompts, global_rewards, task.seed, epoch)
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
            global_step += cfg.optimizer_steps_per_epoch * cfg.inner_epochs
            stats = mean_over_ranks(stats)
            run.check_first_ratio(stats, epoch)
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

    run.finish(evaluate_all(policy, run, cfg.epochs, tasks))
    if executor is not None:
        executor.shutdown()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
