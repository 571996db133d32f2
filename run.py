"""
A training run as one object: its config (flags -> one resolved, validated namespace), its run directory and
everything written there, and its processes. train.py keeps only the epoch loop; this file keeps what makes a
run resumable and self-describing:

    --out RUN/
        config.json         every flag, resolved (the per-model defaults filled in): what sample.py --finetuned reads
        metrics.jsonl       one strict-JSON line per epoch (NaN -> null)
        reward_curve.png    train batch, evaluation and held-out rewards (per component and category when reported)
        samples/            evaluation grids, epoch_NNNN.png
        checkpoints/epoch_NNNN/   written to a temporary name and renamed: a crash never leaves half a checkpoint
        export/             unet/ (diffusers folder), lora.safetensors and pytorch_lora_weights.safetensors (LoRA)
        summary.json        first and last rewards, minutes

A resumed run (--resume RUN) takes config.json as its config; only RESUME_OVERRIDABLE flags may be given again, and
it continues bit for bit: weights, optimizer, per-prompt tracker, loss scale and every random stream are restored.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import re
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

import lora
from cli import PROMPT_SETS, ArgumentParser, load_prompts
from grid import draw_reward_curve
from rewards import parse_spec, reward_help
from weights import DEFAULT_MODEL, load_pipeline

# Defaults that depend on the model. SD: ddpo-pytorch's base config, sized for one 24 GB GPU (LoRA, bf16 autocast).
# "tiny" (a random SD on a CPU): measured to learn jpeg-compressibility in a couple of minutes; its text encoder is
# random, so guidance only doubles the cost, and LoRA on its attention barely moves the policy, so it trains the
# whole UNet at a high learning rate. An explicit flag always wins.
MODEL_DEFAULTS = {
    "sd": dict(epochs=100, steps=50, guidance=5.0, sample_batch_size=8, sample_batches_per_epoch=4, train_batch_size=2,
               optimizer_steps_per_epoch=2, lora_rank=4, eval_every=10, sample_every=10, save_every=5, reward="hps",
               prompts="simple_animals", eval_prompts=None, heldout_prompts=None, eval_size=16, eval_seeds=1, group_size=1,
               tracker_min_count=16, grid_size=8, clip_range=1e-4, timestep_fraction=1.0),
    "tiny": dict(epochs=20, steps=10, guidance=1.0, sample_batch_size=32, sample_batches_per_epoch=1,
                 train_batch_size=32, optimizer_steps_per_epoch=1, lora_rank=0, lr=5e-3, eval_every=5, sample_every=5,
                 save_every=5),
    # "shapes" (our pretrained toy, shapes.py): the SD algorithm (LoRA, CFG, PPO, per-prompt advantages) with the
    # sizes scaled to a CPU: 128 images x 20 steps an epoch, a quarter of the steps trained, 16 images per prompt so
    # the tracker has per-prompt stats from the first epoch, on the 8 hard prompts of shapes-hard (on all 58 of
    # "shapes" 40 epochs left the reward where it was: too few images per prompt), evaluated with 8 fixed seeds per
    # prompt. The learning rate is raised (3e-4 and 1e-3 left the reward where it was in 10 epochs; 3e-2 made it
    # fall) and the clip range scaled to the latent size: the PPO ratio is on the MEAN log-prob over D latent
    # elements, so SD 1.5's 1e-4 at D = 64*64*4 is a +-1.6-nat trust region on the summed log-ratio, and 6e-3 at
    # the shapes model's D = 8*8*4 is the same region. 16 epochs: at 30 the evaluation reward fell back to its
    # start. Each change is measured in the README's learners' table.
    "shapes": dict(epochs=16, steps=20, guidance=5.0, sample_batch_size=64, sample_batches_per_epoch=2,
                   train_batch_size=64, optimizer_steps_per_epoch=4, timestep_fraction=0.25, lora_rank=4, lr=1e-2,
                   eval_every=8, sample_every=8, save_every=4, prompts="shapes-hard", eval_prompts="shapes-hard",
                   heldout_prompts="shapes-heldout", eval_size=0, eval_seeds=8, reward="shapes", group_size=16,
                   tracker_min_count=8, grid_size=16, clip_range=6e-3),
}

# flags that may differ when a run is resumed: they do not change what the run computes
RESUME_OVERRIDABLE = ("resume", "epochs", "save_every", "keep_checkpoints", "sample_every", "eval_every", "wandb", "device",
                      "async_reward", "compile")



# ----------------------------------------------------------------------------------------------------------------
# command line -> config

def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The flags. suppress_defaults: only flags actually given end up in the namespace (to check a --resume)."""
    p = ArgumentParser(prog="train.py", description="DDPO / GRPO fine-tuning of Stable Diffusion on a reward.",
                       epilog=reward_help())
    group = p

    def section(title: str) -> None:
        nonlocal group
        group = p.add_argument_group(title)

    def add(flag: str, help: str, **kw) -> None:
        """One flag. Every default reads "(default: X)", per-model ones "(default: X; --model tiny: Y; ...)": the
        SD value (or the text's own "(default: ...)") first, then the models that differ, from MODEL_DEFAULTS."""
        name = flag[2:].replace("-", "_")
        per_model = [f"--model {m}: {MODEL_DEFAULTS[m][name]:g}" if isinstance(MODEL_DEFAULTS[m][name], float) else
                     f"--model {m}: {MODEL_DEFAULTS[m][name]}" for m in ("tiny", "shapes")
                     if name in MODEL_DEFAULTS[m] and MODEL_DEFAULTS[m][name] != MODEL_DEFAULTS["sd"].get(name)]
        if name in MODEL_DEFAULTS["sd"] or per_model:
            kw["default"] = None
            said = re.search(r" \(default: (.*)\)$", help)
            sd = MODEL_DEFAULTS["sd"].get(name)
            first = said.group(1) if said else (f"{sd:g}" if isinstance(sd, float) else str(sd))
            help = (help[:said.start()] if said else help) + f" (default: {'; '.join([first, *per_model])})"
        if suppress_defaults:
            kw["default"] = argparse.SUPPRESS
        group.add_argument(flag, help=help, **kw)

    section("model")
    add("--model", "hub id, local diffusers folder, .safetensors/.ckpt file, 'shapes' (our pretrained toy, CPU) or "
        "'tiny' (random, for tests)",
        default=DEFAULT_MODEL)
    add("--size", "image size in pixels (default: the model's native size)", type=int, default=None)
    add("--negative-prompt", "the unconditional prompt of classifier-free guidance (default: empty)", default="")
    add("--precision", "autocast dtype of the frozen weights and the compute; trainable weights always stay fp32; fp16 "
        "adds loss scaling (default: bf16 on CUDA, fp32 on CPU)", choices=("fp32", "bf16", "fp16"), default=None)
    add("--compile", "torch.compile the UNet", action="store_true", default=False)
    add("--grad-checkpointing", "recompute UNet blocks in backward to save memory", action="store_true", default=False)
    add("--device", "cuda, cuda:1, cpu; torchrun sets cuda:LOCAL_RANK (default: cuda when available)", default=None)

    section("reward")
    add("--reward", "spec, e.g. 'hps', 'jpeg-compressibility', 'hps=1,aesthetic=0.05' (names below)", default="hps")
    add("--hps-checkpoint", "local HPSv2 checkpoint (default: hub xswu/HPSv2)", default=None)
    add("--aesthetic-checkpoint", "local LAION aesthetic MLP .pth (default: hub)", default=None)
    add("--clip-path", "CLIP ViT-L/14 folder or hub id for aesthetic/diversity", default=None)
    add("--reward-option", "any other reward option below, repeatable (e.g. precision=fp32)", action="append",
        default=[], metavar="KEY=VALUE")
    add("--task", "a task of joint training (Zhang et al. Algorithm 1), repeatable: REWARD@PROMPTS[@BATCHES], e.g. "
        "'shapes@shapes-hard' 'jpeg-compressibility@simple_animals@1'; every epoch runs the tasks in turn, each with "
        "its own rollouts (BATCHES x --sample-batch-size, default --sample-batches-per-epoch), advantages and "
        "update; replaces --reward/--prompts", action="append", default=[], metavar="SPEC")
    add("--async-reward", "score a batch in a thread while the next one samples (if the reward allows it)",
        action=argparse.BooleanOptionalAction, default=True)

    section("prompts and evaluation")
    add("--prompts", f"built-in set ({', '.join(PROMPT_SETS)}) or a text file, one prompt per line",
        default="simple_animals")
    add("--eval-prompts", "set or file scored with fixed seeds (default: the training prompts)", default=None)
    add("--heldout-prompts", "a second evaluation set, e.g. prompts never trained on, logged as heldout_reward_*",
        default=None)
    add("--eval-size", "number of evaluation prompts used (0 = all)", type=int, default=16)
    add("--eval-seeds", "images per evaluation prompt, each with its own fixed seed (averages out the sampling "
        "noise of a small set)", type=int)
    add("--eval-every", "evaluate every N epochs, and at the start and end (0 = never)", type=int)
    add("--sample-every", "save a sample grid every N epochs, and at the start and end (0 = never)", type=int)
    add("--grid-size", "images in a sample grid (the first evaluation prompts)", type=int, default=8)

    section("sampling")
    add("--epochs", "training epochs (one rollout + one update each)", type=int)
    add("--sample-batch-size", "images per rollout batch, per process", type=int)
    add("--sample-batches-per-epoch", "rollout batches per epoch, per process", type=int)
    add("--steps", "DDIM steps", type=int)
    add("--guidance", "classifier-free guidance scale (the same in training)", type=float)
    add("--eta", "DDIM eta (1 = the stochastic policy DDPO needs)", type=float, default=1.0)
    add("--vae-chunk", "decode at most this many latents at once", type=int, default=None)

    section("advantages")
    add("--advantage", "per-prompt running stats (DDPO), stats of each group of --group-size images of a prompt "
        "(GRPO), or of the whole batch", choices=("per-prompt", "group", "batch"), default="per-prompt")
    add("--group-size", "images per prompt per epoch (K of GRPO)", type=int, default=1)
    add("--same-noise-per-group", "one shared x_T per group (DanceGRPO)", action="store_true", default=False)
    add("--global-std", "group advantages divided by the batch std, not each group's (Flow-GRPO)",
        action="store_true", default=False)
    add("--tracker-buffer", "per-prompt tracker: rewards kept per prompt", type=int, default=16)
    add("--tracker-min-count", "per-prompt tracker: below this many rewards, use batch stats", type=int, default=16)
    add("--adv-clip-max", "clip advantages to +-this", type=float, default=5.0)

    section("update")
    add("--loss", "PPO-clip (DDPO_IS) or score function (DDPO_SF, needs --optimizer-steps-per-epoch 1)",
        choices=("ppo", "sf"), default="ppo")
    add("--clip-range", "PPO ratio clip range, on the per-element mean log-prob ratio (scheduler.py)", type=float)
    add("--kl-coef", "weight of the KL to the initial policy (0 = off)", type=float, default=0.0)
    add("--train-batch-size", "(sample, timestep) items per UNet call in training (x2 with CFG), per process",
        type=int)
    add("--optimizer-steps-per-epoch", "optimizer steps per epoch (gradients accumulate in between)", type=int)
    add("--inner-epochs", "passes over each epoch's samples", type=int, default=1)
    add("--timestep-fraction", "fraction of the denoising steps trained per sample (a random subset)", type=float)
    add("--skip-last-step", "never train on the last (sigma ~ 0.02) step (DanceGRPO)", action="store_true",
        default=False)
    add("--lr", "AdamW learning rate (default: 3e-4 with LoRA, 1e-5 for full fine-tuning)",
        type=float, default=None)
    add("--adam-beta1", "AdamW beta1", type=float, default=0.9)
    add("--adam-beta2", "AdamW beta2", type=float, default=0.999)
    add("--weight-decay", "AdamW weight decay", type=float, default=1e-4)
    add("--adam-eps", "AdamW epsilon", type=float, default=1e-8)
    add("--max-grad-norm", "clip the gradient norm to this", type=float, default=1.0)

    section("pretraining-loss regulariser (Zhang et al. 2024: L = J + beta * L_pre)")
    add("--pretrain-data", "image-caption pairs for L_pre: 'shapes' (the shapes world), a folder of images with .txt "
        "captions, or a .jsonl of {\"path\", \"caption\"}", default=None, metavar="SOURCE")
    add("--pretrain-coef", "beta: weight of the eps-MSE on --pretrain-data, added at every optimizer step (0 = off)",
        type=float, default=0.0)
    add("--pretrain-batch-size", "pairs per optimizer step, per process", type=int, default=4)

    section("LoRA")
    add("--lora-rank", "adapter rank (0 = full fine-tuning of the UNet)", type=int)
    add("--lora-alpha", "adapter alpha (default: the rank, i.e. scale 1)", type=float, default=None)
    add("--lora-targets", "comma-separated module-path suffixes", default="to_q,to_k,to_v,to_out.0")

    section("run")
    add("--seed", "seed of prompts, noise, initialisation and shuffling", type=int, default=42)
    add("--out", "run directory (default: runs/<timestamp>)", default=None)
    add("--resume", "run directory to continue from its last checkpoint", default=None)
    add("--save-every", "checkpoint every N epochs (and at the end)", type=int)
    add("--keep-checkpoints", "keep the newest N checkpoints, delete older ones (0 = keep all)", type=int, default=1)
    add("--max-bad-epochs", "stop after this many epochs in a row without one finite reward", type=int, default=3)
    add("--wandb", "also log to this Weights & Biases project (needs wandb installed)", default=None,
        metavar="PROJECT")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags -> a complete, validated config. With --resume the run's config.json is the config and only
    RESUME_OVERRIDABLE flags may be given again."""
    args = build_parser().parse_args(argv)
    if args.resume is not None:
        path = os.path.join(args.resume, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--resume {args.resume}: no config.json there; "
                                    "pass a run directory written by train.py")
        with open(path) as f:
            saved = json.load(f)
        given = vars(build_parser(suppress_defaults=True).parse_args(argv))
        changed = [k for k, v in given.items() if k not in RESUME_OVERRIDABLE and saved.get(k) != v]
        if changed:
            flags = ", ".join("--" + k.replace("_", "-") for k in changed)
            raise ValueError(f"--resume: {flags} cannot change in a resumed run (it would not continue the same run); "
                             "start a new run with --out instead")
        # flags added since the run started take their defaults
        args = argparse.Namespace(**{**vars(build_parser().parse_args([])), **saved, **given, "out": args.resume})
        validate(args)
        return args
    for k, v in {**MODEL_DEFAULTS["sd"], **MODEL_DEFAULTS.get(args.model, {})}.items():
        if getattr(args, k) is None:
            # with --task each task brings its own prompts and is evaluated on them: no default evaluation sets
            setattr(args, k, None if args.task and k in ("eval_prompts", "heldout_prompts") else v)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.precision is None:
        args.precision = "bf16" if args.device.startswith("cuda") else "fp32"
    if args.lr is None:
        args.lr = 3e-4 if args.lora_rank > 0 else 1e-5
    if args.lora_alpha is None:
        args.lora_alpha = float(args.lora_rank)
    if args.out is None:
        args.out = os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    validate(args)
    return args


def validate(args: argparse.Namespace, world: int = 1) -> None:
    """One-line errors for configurations that cannot run, before anything heavy is loaded."""
    def need(ok: bool, msg: str):
        if not ok:
            raise ValueError(msg)
    for k in ("epochs", "sample_batch_size", "sample_batches_per_epoch", "train_batch_size",
              "optimizer_steps_per_epoch", "inner_epochs", "steps", "group_size", "tracker_buffer",
              "tracker_min_count", "max_bad_epochs", "eval_seeds"):
        need(getattr(args, k) >= 1, f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    for k in ("save_every", "eval_every", "sample_every", "eval_size", "grid_size", "lora_rank", "kl_coef",
              "keep_checkpoints"):
        need(getattr(args, k) >= 0, f"--{k.replace('_', '-')} must be >= 0, got {getattr(args, k)}")
    need(0.0 <= args.eta <= 1.0, f"--eta must be in [0, 1], got {args.eta}")
    need(args.eta > 0.0, "--eta 0 makes every DDIM step deterministic: there is no policy to train; use --eta 1")
    need(0.0 < args.timestep_fraction <= 1.0, f"--timestep-fraction must be in (0, 1], got {args.timestep_fraction}")
    need(not args.skip_last_step or args.steps >= 2, "--skip-last-step needs --steps >= 2")
    need(args.lr > 0, f"--lr must be > 0, got {args.lr}")
    need(args.clip_range > 0 and args.adv_clip_max > 0 and args.max_grad_norm > 0,
         "--clip-range, --adv-clip-max and --max-grad-norm must be > 0")
    need(not args.task or not (args.eval_prompts or args.heldout_prompts),
         "--eval-prompts/--heldout-prompts apply to a run without --task (each task is evaluated on its prompts)")
    for task in task_specs(args) if args.task else []:
        n = task["batches"] * args.sample_batch_size * world
        need(n % args.group_size == 0, f"--group-size {args.group_size} must divide the {n} samples per epoch of "
             f"the task {task['reward']}@{task['prompts']}")
        parse_spec(task["reward"])
    for task in task_specs(args):   # a group reward sees one rollout batch: each prompt's group must lie inside one
        group_rewards = [n for n, _ in parse_spec(task["reward"]) if n in ("diversity", "fairness")]
        need(not group_rewards or (args.group_size >= 2 and args.sample_batch_size % args.group_size == 0),
             f"--reward {group_rewards[0] if group_rewards else ''} scores each prompt's group of images: set "
             f"--group-size K >= 2 with K dividing --sample-batch-size {args.sample_batch_size} (Zhang et al.: 16)")
    n_local = args.sample_batch_size * args.sample_batches_per_epoch
    n_trained = int(((args.steps - 1) if args.skip_last_step else args.steps) * args.timestep_fraction)
    need(n_trained >= 1, f"--timestep-fraction {args.timestep_fraction} of {args.steps} steps trains no step; raise it")
    need(args.optimizer_steps_per_epoch <= n_local * n_trained,
         f"--optimizer-steps-per-epoch {args.optimizer_steps_per_epoch} exceeds the {n_local * n_trained} "
         "(sample, timestep) items per process per epoch")
    need(args.loss != "sf" or (args.optimizer_steps_per_epoch == 1 and args.inner_epochs == 1),
         "--loss sf is on-policy: use it with --optimizer-steps-per-epoch 1 (and --inner-epochs 1)")
    need(n_local * world % args.group_size == 0,
         f"--group-size {args.group_size} must divide the {n_local * world} samples per epoch "
         f"(--sample-batch-size x --sample-batches-per-epoch x processes)")
    need(args.advantage != "group" or args.group_size >= 2,
         "--advantage group needs --group-size >= 2 (images per prompt)")
    need(not args.global_std or args.advantage == "group", "--global-std applies to --advantage group only")
    need(not args.same_noise_per_group or args.group_size >= 2, "--same-noise-per-group needs --group-size >= 2")
    need(args.pretrain_coef >= 0 and args.pretrain_batch_size >= 1,
         "--pretrain-coef must be >= 0 and --pretrain-batch-size >= 1")
    need((args.pretrain_coef > 0) == (args.pretrain_data is not None),
         "--pretrain-coef > 0 and --pretrain-data go together: give both (or neither)")
    need(args.vae_chunk is None or args.vae_chunk >= 1, f"--vae-chunk must be >= 1, got {args.vae_chunk}")
    need(args.size is None or (args.size >= 8 and args.size % 8 == 0),
         f"--size must be a positive multiple of 8, got {args.size}")
    if args.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("--wandb: the wandb package is not installed; `pip install wandb` or drop --wandb") \
                from None


# ----------------------------------------------------------------------------------------------------------------
# distributed: each rank owns a contiguous block of the global batch; gathers concatenate in rank order

def init_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's RANK/WORLD_SIZE/LOCAL_RANK; NCCL on GPUs, gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, torch.device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device(device)


def gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate equally sized tensors of all ranks along dim 0, in rank order."""
    if not dist.is_initialized():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def gather_objects(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    if not dist.is_initialized():
        return metrics
    rows = gather_objects(metrics)
    reduce = {"first_ratio_max_dev": max, "items": sum}  # a max and a count; the rest are per-rank means
    return {k: float(reduce.get(k, np.mean)([r[k] for r in rows])) for k in metrics}


# ----------------------------------------------------------------------------------------------------------------
# run directory: atomic writes, checkpoints, metrics, export

def atomic_write(path: str, write) -> None:
    """write(tmp_path), then rename over path: a reader (or a crash) never sees half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    atomic_write(path, w)


def read_metrics(path: str, before_epoch: int) -> list[dict]:
    """The metrics of the epochs before `before_epoch` (a killed run may have logged epochs after its last
    checkpoint, or half a line)."""
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("epoch", math.inf) < before_epoch:
                rows.append(row)
    return rows


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint: checkpoints are renamed into place only once written."""
    root = os.path.join(run_dir, "checkpoints")
    names = [n for n in os.listdir(root) if re.fullmatch(r"epoch_\d+", n)] if os.path.isdir(root) else []
    return os.path.join(root, max(names, key=lambda n: int(n[6:]))) if names else None


def rng_state(generator: torch.Generator) -> dict:
    """The random streams a resumed run needs, all tensors (state.pt loads with weights_only=True): the update's
    shuffles (`generator`) and torch's global RNGs. Nothing else draws at random: noise and prompts come from
    per-sample seeds, and Python's and numpy's global RNGs are never used."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "update": generator.get_state()}


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["update"])


def trainable_state_dict(unet: torch.nn.Module, use_lora: bool) -> dict[str, torch.Tensor]:
    """LoRA: the adapters only (PEFT naming); full fine-tuning: the UNet in diffusers key layout."""
    sd = lora.lora_state_dict(unet) if use_lora else unet.state_dict()
    return {k: v.detach().float().contiguous().cpu() for k, v in sd.items()}


def save_checkpoint(run_dir: str, epoch: int, unet, use_lora: bool, optimizer, tracker, grad_scaler,
                    rng_states: list, state: dict, keep: int = 1) -> str:
    """checkpoints/epoch_{epoch}/: written to a temporary directory, renamed into place when complete; older
    checkpoints are removed only after that."""
    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"epoch_{epoch:04d}")
    tmp = final + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(trainable_state_dict(unet, use_lora), os.path.join(tmp, "model.safetensors"),
              metadata={"format": "nanoddpo-lora" if use_lora else "nanoddpo-unet", "epoch": str(epoch)})
    torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    torch.save({"tracker": tracker.state_dict() if tracker is not None else None, "rng": rng_states,
                "grad_scaler": grad_scaler.state_dict() if grad_scaler is not None else None},
               os.path.join(tmp, "state.pt"))
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(state, f, indent=2)
    for name in os.listdir(tmp):  # make the bytes durable before the rename makes them visible
        with open(os.path.join(tmp, name), "rb") as f:
            os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fd = os.open(root, os.O_RDONLY)  # make the rename itself durable before older checkpoints go
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    names = sorted((n for n in os.listdir(root) if re.fullmatch(r"epoch_\d+", n)), key=lambda n: int(n[6:]))
    for name in names[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    for name in os.listdir(root):  # temporary directories of runs killed while saving
        if ".tmp-" in name:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return final


def load_checkpoint(path: str, unet, use_lora: bool, optimizer, tracker, grad_scaler, generator: torch.Generator,
                    rank: int, world: int) -> dict:
    sd = load_file(os.path.join(path, "model.safetensors"))
    if use_lora:
        lora_params = dict(lora.lora_state_dict(unet))
        with torch.no_grad():
            for k, v in sd.items():
                lora_params[k].copy_(v)
    else:
        unet.load_state_dict(sd, strict=True)
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=True))
    extra = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
    if tracker is not None:
        tracker.load_state_dict(extra["tracker"])
    if grad_scaler is not None:  # its scale and growth counter: the next steps skip and grow exactly as before
        grad_scaler.load_state_dict(extra["grad_scaler"])
    set_rng_state(extra["rng"][rank], generator)
    with open(os.path.join(path, "state.json")) as f:
        return json.load(f)


def reward_stats(prefix: str, r: torch.Tensor) -> dict[str, float]:
    """mean/std/min/max over the finite rewards, and how many were not finite (if any)."""
    ok = r[torch.isfinite(r)].double()
    out = {f"{prefix}_mean": float(ok.mean()) if len(ok) else math.nan,
           f"{prefix}_std": float(ok.std(correction=0)) if len(ok) else math.nan,
           f"{prefix}_min": float(ok.min()) if len(ok) else math.nan,
           f"{prefix}_max": float(ok.max()) if len(ok) else math.nan}
    if len(ok) < len(r):
        out[f"{prefix}_nonfinite"] = len(r) - len(ok)
    return out


def cpu_warning(device: torch.device, n_params: int) -> str | None:
    """The one warning for an SD-sized UNet on a CPU (CUDA absent or not chosen), or None."""
    if device.type != "cpu" or n_params < 100_000_000:
        return None
    reason = "CUDA is not available" if not torch.cuda.is_available() else "--device cpu was chosen"
    return (f"warning: training a {n_params / 1e6:.0f}M-parameter UNet on the CPU ({reason}): one epoch takes hours; "
            "use a GPU, or --model shapes / --model tiny for a CPU run")


def strict_json(row: dict) -> str:
    """One metrics.jsonl line: NaN/inf (an epoch without usable rewards) become null, so the file stays JSON."""
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()})


def reward_categories(info: dict) -> dict[str, torch.Tensor]:
    """The per-category (B,) scores a reward reports in its info (the shapes reward's "categories": its prompt
    categories and atoms, NaN where a prompt has none), across the parts of a weighted sum."""
    return {k: v for detail in info.get("details", {}).values() for k, v in detail.get("categories", {}).items()}


def category_means(prefix: str, cats: dict[str, torch.Tensor]) -> dict[str, float]:
    """{prefix_cat: mean over the finite entries}, leaving out categories with none."""
    out = {}
    for k, v in cats.items():
        ok = v[torch.isfinite(v)].double()
        if len(ok):
            out[f"{prefix}_{k}"] = float(ok.mean())
    return out


def export(run_dir: str, unet, args: argparse.Namespace) -> None:
    """export/unet/ (diffusers folder: config.json + diffusion_pytorch_model.safetensors) and, for LoRA,
    export/lora.safetensors (ours: rank, alpha, targets in its metadata) and export/pytorch_lora_weights.safetensors
    (diffusers': pipe.load_lora_weights("RUN/export")); written next to the old export, swapped in when complete."""
    final = os.path.join(run_dir, "export")
    tmp = final + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "unet"))
    if args.lora_rank > 0:
        lora_path = os.path.join(tmp, "lora.safetensors")
        lora.save_lora(lora_path, unet, metadata={"base_model": args.model})
        lora.save_diffusers_lora(tmp, unet)   # pytorch_lora_weights.safetensors: the same adapter, for diffusers
        if args.precision == "fp32":
            merged = lora.merge_and_remove(copy.deepcopy(unet).cpu())
        else:  # the training copy of the base weights was cast to low precision: merge into the fp32 originals
            merged = load_pipeline(args.model, "cpu", torch.float32).unet
            lora.load_lora(merged, lora_path)
            lora.merge_and_remove(merged)
    else:
        merged = unet
    sd = {k: v.detach().float().contiguous().cpu() for k, v in merged.state_dict().items()}
    save_file(sd, os.path.join(tmp, "unet", "diffusion_pytorch_model.safetensors"),
              metadata={"format": "nanoddpo-unet", "base_model": args.model})
    with open(os.path.join(tmp, "unet", "config.json"), "w") as f:
        json.dump(merged.config.to_dict(), f, indent=2)
    old = final + f".old-{os.getpid()}"
    if os.path.isdir(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)




# ----------------------------------------------------------------------------------------------------------------
# the run: inputs, directory, logs

def task_specs(args: argparse.Namespace) -> list[dict]:
    """The run's tasks: [{reward, prompts, eval_prompts, heldout_prompts, batches}]. Without --task, one task from
    --reward and --prompts; each --task REWARD@PROMPTS[@BATCHES] is evaluated on its own prompts."""
    if not args.task:
        return [dict(reward=args.reward, prompts=args.prompts, eval_prompts=args.eval_prompts,
                     heldout_prompts=args.heldout_prompts, batches=args.sample_batches_per_epoch)]
    tasks = []
    for spec in args.task:
        parts = spec.split("@")
        if len(parts) not in (2, 3) or not all(parts) or (len(parts) == 3 and not parts[2].isdigit()):
            raise ValueError(f"--task {spec!r}: write REWARD@PROMPTS or REWARD@PROMPTS@BATCHES, e.g. "
                             "'shapes@shapes-hard@2'")
        batches = int(parts[2]) if len(parts) == 3 else args.sample_batches_per_epoch
        if batches < 1:
            raise ValueError(f"--task {spec!r}: BATCHES must be >= 1")
        tasks.append(dict(reward=parts[0], prompts=parts[1], eval_prompts=None, heldout_prompts=None, batches=batches))
    return tasks


def eval_sets(args: argparse.Namespace, task: dict) -> tuple[list[str], list[str], list[str]]:
    """(training prompts, evaluation prompts, held-out prompts) of a task, the two evaluation lists thinned to
    --eval-size prompts and each prompt repeated --eval-seeds times (image i of a set always has the fixed seed
    sample_seed(seed, -1, i), so a repeat is a new fixed seed)."""
    prompts = load_prompts(task["prompts"])
    evals = load_prompts(task["eval_prompts"]) if task["eval_prompts"] else prompts
    heldout = load_prompts(task["heldout_prompts"]) if task["heldout_prompts"] else []
    if args.eval_size:
        evals, heldout = ([ps[i * len(ps) // args.eval_size] for i in range(min(args.eval_size, len(ps)))]
                          for ps in (evals, heldout))
    evals, heldout = ([p for p in ps for _ in range(args.eval_seeds)] for ps in (evals, heldout))
    return prompts, evals, heldout


def resume_checkpoint(args: argparse.Namespace, world: int) -> str | None:
    """The checkpoint a --resume continues from (None for a new run), after the checks that it can."""
    if not args.resume:
        if os.path.isfile(os.path.join(args.out, "config.json")):
            raise ValueError(f"--out {args.out} already holds a run; continue it with --resume {args.out} or pick "
                             "another --out")
        return None
    ckpt = latest_checkpoint(args.out)
    if ckpt is None:
        raise FileNotFoundError(f"--resume {args.resume}: no checkpoint in {args.resume}/checkpoints (the run "
                                "stopped before its first --save-every); start it again without --resume")
    with open(os.path.join(ckpt, "state.json")) as f:
        saved_world = json.load(f)["world_size"]
    if saved_world != world:  # each process restores its own RNG streams
        raise ValueError(f"--resume: {ckpt} was written by {saved_world} process(es), this run has {world}; "
                         "resume with the same number of processes")
    return ckpt


class Run:
    """One training run's directory and logs. Every process holds one (each restores its own RNG streams); only
    rank 0 writes. It owns the objects a checkpoint must capture, so that saving and resuming name them once."""

    def __init__(self, args: argparse.Namespace, rank: int, world: int, *, unet, use_lora: bool, optimizer,
                 tracker, grad_scaler, generator: torch.Generator, prefixes: list[str] = ("",)):
        self.args, self.rank, self.world, self.master = args, rank, world, rank == 0
        self.unet, self.use_lora, self.optimizer, self.tracker = unet, use_lora, optimizer, tracker
        self.grad_scaler, self.generator = grad_scaler, generator
        self.history: list[dict] = []
        self.prefixes = list(prefixes)   # the tasks' metric prefixes ("" for a single task)
        self.wandb_run, self.wandb_id = None, None
        self.bad_epochs = 0   # epochs in a row without a usable reward
        self.t_start = time.perf_counter()

    def path(self, *parts: str) -> str:
        return os.path.join(self.args.out, *parts)

    def begin(self, ckpt: str | None, header: str) -> tuple[int, int]:
        """Restore `ckpt` (if resuming), write config.json and the log so far, start wandb: (first epoch, global
        optimizer step)."""
        start_epoch, global_step = 0, 0
        if ckpt is not None:
            state = load_checkpoint(ckpt, self.unet, self.use_lora, self.optimizer, self.tracker, self.grad_scaler,
                                    self.generator, self.rank, self.world)
            start_epoch, global_step, self.wandb_id = state["next_epoch"], state["global_step"], state.get("wandb_id")
            self.history = read_metrics(self.path("metrics.jsonl"), start_epoch)
        if self.master:
            os.makedirs(self.path("samples"), exist_ok=True)
            if not self.args.resume:
                write_json(self.path("config.json"), {**vars(self.args), "resume": None})
            # rewrite the log without the epochs after the checkpoint: they are computed again, identically
            atomic_write(self.path("metrics.jsonl"),
                         lambda tmp: open(tmp, "w").writelines(strict_json(r) + "\n" for r in self.history))
            print(f"run {self.args.out}: {header}, epochs {start_epoch}..{self.args.epochs - 1}", flush=True)
            if self.args.wandb:
                import wandb
                # wandb makes the id on a new run; it is kept in every checkpoint, so a resume continues that run
                self.wandb_run = wandb.init(project=self.args.wandb, name=os.path.basename(os.path.normpath(
                    self.args.out)), id=self.wandb_id, resume="allow", config=vars(self.args), dir=self.args.out)
                self.wandb_id = self.wandb_run.id
        return start_epoch, global_step

    def due(self, every: int, epoch: int) -> bool:
        """Every N epochs, and at the start and the end (0: never)."""
        return every > 0 and (epoch % every == 0 or epoch == self.args.epochs)

    def warn(self, message: str) -> None:
        if self.master:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def save_image(self, name: str, image) -> None:
        atomic_write(self.path(name), lambda tmp: image.save(tmp, format="PNG"))

    def log(self, row: dict) -> None:
        """Append an epoch's metrics (metrics.jsonl, wandb), redraw the curve and print the console line: the
        fields as metrics.jsonl names them, only those measured."""
        self.history.append(row)
        if "images_per_s" in row:
            self.bad_epochs = 0
        if not self.master:
            return
        with open(self.path("metrics.jsonl"), "a") as f:
            f.write(strict_json(row) + "\n")
        self.draw_curve()
        if self.wandb_run is not None:
            self.wandb_run.log(row, step=row["epoch"])
        if "images_per_s" not in row:
            return  # an epoch without a usable reward: skip_epoch() has said so
        # approx_kl and clipfrac are exactly 0 when the epoch takes one optimizer step (the ratio is 1 throughout):
        # not measured, not printed
        parts = []
        for p in self.prefixes:
            if not math.isfinite(row.get(f"{p}reward_mean", math.nan)):
                continue
            keys = [p + k for k in ("eval_reward_mean", "heldout_reward_mean") if p + k in row]
            keys += [p + k for k in ("approx_kl", "clipfrac", "kl", "pretrain_loss") if row.get(p + k)]
            parts.append(f"{p}reward_mean {row[p + 'reward_mean']:.4g} +- {row[p + 'reward_std']:.3g}"
                         + "".join(f", {k} {row[k]:.3g}" for k in keys))
        print(f"epoch {row['epoch']}: " + "; ".join(parts)
              + f", {row['time_total']:.1f}s ({row['images_per_s']:.2f} img/s)", flush=True)

    def skip_epoch(self, row: dict) -> None:
        """An epoch in which no image got a finite reward (a remote scorer down, ...): logged, no update; after
        --max-bad-epochs of them in a row the run stops with one line, its last checkpoint intact."""
        self.bad_epochs += 1
        args = self.args
        self.warn(f"epoch {row['epoch']}: no image got a finite reward; the update is skipped "
                  f"({self.bad_epochs} of --max-bad-epochs {args.max_bad_epochs})")
        self.log(row)
        if self.bad_epochs >= args.max_bad_epochs:
            last = latest_checkpoint(args.out)
            then = f"the last checkpoint ({last}) is intact: continue with --resume {args.out}" if last else \
                "no checkpoint was written yet: start the run again"
            raise SystemExit(f"train.py: error: {self.bad_epochs} epochs in a row without a usable reward: check the "
                             f"reward ({args.reward}); {then}")

    def draw_curve(self, extra: list[dict] = ()) -> None:
        what = self.args.reward if not self.args.task else ", ".join(self.args.task)
        image = draw_reward_curve(self.history + list(extra), f"{what} - {self.args.out}")
        self.save_image("reward_curve.png", image)

    def save(self, next_epoch: int, global_step: int) -> None:
        """A checkpoint every --save-every epochs and at the end (the next epoch is stored, never derived)."""
        args = self.args
        if not ((args.save_every and next_epoch % args.save_every == 0) or next_epoch == args.epochs):
            return
        rngs = gather_objects(rng_state(self.generator))
        if self.master:
            save_checkpoint(args.out, next_epoch, self.unet, self.use_lora, self.optimizer, self.tracker,
                            self.grad_scaler, rngs, {"next_epoch": next_epoch, "global_step": global_step,
                                                     "world_size": self.world, "wandb_id": self.wandb_id},
                            keep=args.keep_checkpoints)

    def finish(self, final: dict) -> None:
        """The final evaluation on the curve, export/ and summary.json; wandb closed."""
        if self.master:
            if final:  # the policy after the last epoch, on the curve next to the others
                self.draw_curve([{"epoch": self.args.epochs, **final}])
            export(self.args.out, self.unet, self.args)
            first, last = (self.history[0], self.history[-1]) if self.history else ({}, {})
            write_json(self.path("summary.json"), {
                "epochs": self.args.epochs, "initial_reward_mean": first.get("reward_mean"),
                "initial_reward_std": first.get("reward_std"), "final_reward_mean": last.get("reward_mean"),
                "initial_eval_reward_mean": first.get("eval_reward_mean"),
                "final_eval_reward_mean": final.get("eval_reward_mean"),
                "initial_heldout_reward_mean": first.get("heldout_reward_mean"),
                "final_heldout_reward_mean": final.get("heldout_reward_mean"),
                "initial_eval": {k: v for k, v in first.items() if re.match(r"(task\d+_)?(eval|heldout)_", k)},
                "final_eval": {k: v for k, v in final.items() if re.match(r"(task\d+_)?(eval|heldout)_", k)},
                "minutes": (time.perf_counter() - self.t_start) / 60, "export": self.path("export")})
            if final and self.wandb_run is not None:
                self.wandb_run.log(final, step=self.args.epochs)
            print(f"done: {self.path('export')}"
                  + "".join(f", final {p}eval_reward_mean {final[p + 'eval_reward_mean']:.4g}" for p in self.prefixes
                            if p + "eval_reward_mean" in final))
        if self.wandb_run is not None:
            self.wandb_run.finish()
