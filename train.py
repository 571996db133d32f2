"""
DDPO: reinforcement learning of Stable Diffusion on a reward (Black et al. 2023, "Training Diffusion Models with
Reinforcement Learning"), with PPO clipping (DDPO_IS) and optional GRPO groups (DanceGRPO / Flow-GRPO).

The sampler is the policy. Each DDIM step x_t -> x_{t-1} is a Gaussian action N(mu_theta(x_t, t, c), sigma_t^2 I)
with an exact log-probability (scheduler.py), so the reward of the final image is optimised with

    L(theta) = E_{c, x_T..x_0} sum_t max( -A * r_t, -A * clip(r_t, 1 - eps, 1 + eps) ),
    r_t = p_theta(x_{t-1} | x_t, c) / p_old(x_{t-1} | x_t, c),   A = normalised reward (per prompt or per group)

One epoch is one straight line, top to bottom in main():

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
import copy
import datetime
import json
import math
import os
import random
import re
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import lora
from ddpo import (PerPromptStatTracker, Samples, UpdateConfig, batch_advantages, ddpo_update, group_advantages,
                  reference_policy)
from grid import make_grid
from rewards import build_reward, options_from_flags, parse_spec, reward_help
from scheduler import DDIMScheduler, SchedulerConfig, rollout
from weights import DEFAULT_MODEL, load_pipeline

# the 45 prompts of ddpo-pytorch's simple_animals.txt (its aesthetic-score experiment)
SIMPLE_ANIMALS = [
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat", "lion",
    "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle", "ant", "butterfly", "fish", "shark", "whale",
    "dolphin", "squirrel", "mouse", "rat", "snake", "turtle", "frog", "chicken", "duck", "goose", "bee", "pig",
    "turkey", "fly", "llama", "camel", "bat", "gorilla", "hedgehog", "kangaroo",
]
SHAPES_SETS = ("shapes", "shapes-hard", "shapes-train", "shapes-heldout")   # shapes.prompt_sets()
PROMPT_SETS = ("simple_animals", "imagenet_animals", *SHAPES_SETS)

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
# command line

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows the defaults (None ones are described in the text) and keeps the reward table's line breaks."""

    def _get_help_string(self, action):
        unset = action.default is None or action.default is False or action.default in ([], "")  # 0 is a default
        return action.help if unset else super()._get_help_string(action)


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The flags. suppress_defaults: only flags actually given end up in the namespace (to check a --resume)."""
    p = argparse.ArgumentParser(prog="train.py", description="DDPO / GRPO fine-tuning of Stable Diffusion on a reward.",
                                epilog=reward_help(), formatter_class=HelpFormatter)
    group = p

    def section(title: str) -> None:
        nonlocal group
        group = p.add_argument_group(title)

    def add(flag: str, help: str, **kw) -> None:
        name = flag[2:].replace("-", "_")
        if name in MODEL_DEFAULTS["sd"]:
            kw["default"] = None
            given = [f"{MODEL_DEFAULTS[m][name]} with --model {m}" for m in ("tiny", "shapes") if name in MODEL_DEFAULTS[m]]
            if MODEL_DEFAULTS["sd"][name] is not None:
                given.insert(0, f"default {MODEL_DEFAULTS['sd'][name]}")
            help += f" ({'; '.join(given)})"
        if suppress_defaults:
            kw["default"] = argparse.SUPPRESS
        group.add_argument(flag, help=help, **kw)

    section("model")
    add("--model", "hub id, local diffusers folder, .safetensors/.ckpt file, 'shapes' (our pretrained toy, CPU) or "
        "'tiny' (random, for tests)",
        default=DEFAULT_MODEL)
    add("--size", "image size in pixels (default: the model's native size)", type=int, default=None)
    add("--negative-prompt", "the unconditional prompt of classifier-free guidance (default: empty)", default="")
    add("--precision", "autocast dtype of the frozen weights and the compute (default bf16 on CUDA, fp32 on CPU); "
        "trainable weights always stay fp32; fp16 adds loss scaling", choices=("fp32", "bf16", "fp16"), default=None)
    add("--compile", "torch.compile the UNet", action="store_true", default=False)
    add("--grad-checkpointing", "recompute UNet blocks in backward to save memory", action="store_true", default=False)
    add("--device", "cuda, cuda:1, cpu (default cuda when available); torchrun sets cuda:LOCAL_RANK", default=None)

    section("reward")
    add("--reward", "spec, e.g. 'hps', 'jpeg-compressibility', 'hps=1,aesthetic=0.05' (names below)", default="hps")
    add("--hps-checkpoint", "local HPSv2 checkpoint (default: hub xswu/HPSv2)", default=None)
    add("--aesthetic-checkpoint", "local LAION aesthetic MLP .pth (default: hub)", default=None)
    add("--clip-path", "CLIP ViT-L/14 folder or hub id for aesthetic/diversity", default=None)
    add("--reward-option", "any other reward option below, repeatable (e.g. precision=fp32)", action="append",
        default=[], metavar="KEY=VALUE")
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
    add("--lr", "learning rate (default 3e-4 with LoRA, 1e-5 for full fine-tuning; 5e-3 with --model tiny)",
        type=float, default=None)
    add("--adam-beta1", "AdamW beta1", type=float, default=0.9)
    add("--adam-beta2", "AdamW beta2", type=float, default=0.999)
    add("--weight-decay", "AdamW weight decay", type=float, default=1e-4)
    add("--adam-eps", "AdamW epsilon", type=float, default=1e-8)
    add("--max-grad-norm", "clip the gradient norm to this", type=float, default=1.0)

    section("LoRA")
    add("--lora-rank", "adapter rank (0 = full fine-tuning of the UNet)", type=int)
    add("--lora-alpha", "adapter alpha (default: the rank, i.e. scale 1)", type=float, default=None)
    add("--lora-targets", "comma-separated module-path suffixes", default="to_q,to_k,to_v,to_out.0")

    section("run")
    add("--seed", "seed of prompts, noise, initialisation and shuffling", type=int, default=42)
    add("--out", "run directory (default runs/<timestamp>)", default=None)
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
            setattr(args, k, v)
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
    need(args.size is None or (args.size >= 8 and args.size % 8 == 0),
         f"--size must be a positive multiple of 8, got {args.size}")
    if args.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("--wandb: the wandb package is not installed; `pip install wandb` or drop --wandb") \
                from None


# ----------------------------------------------------------------------------------------------------------------
# prompts and seeds

def load_prompts(spec: str) -> list[str]:
    """A built-in prompt set or a text file with one prompt per line (blank lines ignored)."""
    if spec == "simple_animals":
        return list(SIMPLE_ANIMALS)
    if spec in SHAPES_SETS:
        import shapes
        return shapes.prompt_sets()[spec]
    if spec == "imagenet_animals":
        # ImageNet-1k classes 0..397 are the animals (tench .. puffer), as in ddpo-pytorch. torchvision ships the
        # class names offline; they are its short names ("tench"), not ddpo-pytorch's raw lines ("tench, Tinca tinca").
        from torchvision.models import ResNet50_Weights
        return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"][:398])
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"prompts: '{spec}' is neither a built-in set ({', '.join(PROMPT_SETS)}) nor a file; "
                                "pass one of those or a text file with one prompt per line")
    with open(spec, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"prompts: file {spec} has no prompts; write one prompt per line")
    return lines


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The noise seed of global sample `index` of `epoch`: the same on any rank, batch size or after a resume."""
    return ((seed * 1_000_003 + epoch) * 1_000_003 + index) % 2**63


def epoch_prompts(prompts: list[str], n: int, group_size: int, seed: int, epoch: int) -> list[str]:
    """The epoch's n prompts in global sample order: n / group_size uniform draws, each repeated group_size times
    (a GRPO group is a run of consecutive samples)."""
    rng = random.Random(f"prompts-{seed}-{epoch}")  # a string seed hashes deterministically (sha512)
    return [p for p in rng.choices(prompts, k=n // group_size) for _ in range(group_size)]


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
# run directory: atomic writes, checkpoints, curve

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


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    raw = (hi - lo) / n or abs(hi) or 1.0
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first, last = math.floor(lo / step), math.ceil(hi / step)
    if first == last:   # a flat curve: one step either side
        first, last = first - 1, last + 1
    return [k * step for k in range(first, last + 1)]


def _panel(d: ImageDraw.ImageDraw, box: tuple, series: list, title: str, font) -> None:
    """One plot in box (x0, y0, x1, y1): series of (label, rgb, [(epoch, value)], [(epoch, lo, hi)] or None)."""
    L, T, R, B = box[0] + 60, box[1] + 24, box[2] - 10, box[3] - 36
    pts = [(e, v) for _, _, line, band in series for e, v in line + [(e, x) for e, lo, hi in band or [] for x in (lo, hi)]
           if math.isfinite(v)]
    d.text((L, box[1] + 6), title, fill="black", font=font)
    if not pts:
        return
    ticks = nice_ticks(min(v for _, v in pts), max(v for _, v in pts))
    x0, x1 = min(e for e, _ in pts), max(max(e for e, _ in pts), min(e for e, _ in pts) + 1)
    y0, y1 = ticks[0], ticks[-1]

    def px(e, v):
        return L + (e - x0) / (x1 - x0) * (R - L), T + (y1 - v) / (y1 - y0) * (B - T)

    digits = max(0, -math.floor(math.log10(ticks[1] - ticks[0]))) if len(ticks) > 1 else 2
    for v in ticks:
        y = px(x0, v)[1]
        d.line([(L, y), (R, y)], fill=(225, 225, 225))
        d.text((box[0] + 4, y - 6), f"{v:.{digits}f}", fill="black", font=font)
    for e in nice_ticks(x0, x1, 8):
        if x0 <= e <= x1 and e == int(e):
            x = px(e, y0)[0]
            d.line([(x, B), (x, B + 4)], fill="black")
            d.text((x - 4, B + 8), str(int(e)), fill="black", font=font)
    d.text(((L + R) // 2 - 15, B + 20), "epoch", fill="black", font=font)
    legend_x = L + 8
    for label, rgb, line, band in series:
        line = [(e, v) for e, v in line if math.isfinite(v)]
        band = [(e, lo, hi) for e, lo, hi in band or [] if math.isfinite(lo) and math.isfinite(hi)]
        if len(band) > 1:
            pale = tuple(int(c + (255 - c) * 0.75) for c in rgb)
            d.polygon([px(e, hi) for e, _, hi in band] + [px(e, lo) for e, lo, _ in reversed(band)], fill=pale)
        if len(line) > 1:
            d.line([px(e, v) for e, v in line], fill=rgb, width=2)
        for e, v in line:
            x, y = px(e, v)
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=rgb)
        if line:
            d.rectangle([legend_x, T + 6, legend_x + 10, T + 14], fill=rgb)
            d.text((legend_x + 14, T + 4), label, fill="black", font=font)
            legend_x += 20 + int(d.textlength(label, font=font))
    d.rectangle([L, T, R, B], outline="black")


CATEGORY_COLOURS = [(30, 90, 200), (230, 120, 20), (40, 150, 60), (200, 40, 40), (130, 80, 180), (120, 120, 120)]


def draw_reward_curve(history: list[dict], path: str, title: str) -> None:
    """The run's reward curves, drawn with PIL: training reward mean +- std, the evaluation sets' means and, when
    the reward reports categories (the shapes reward), one panel per evaluation set with a line per category."""
    def line(key):
        return [(r["epoch"], r[key]) for r in history if r.get(key) is not None]

    train = [(r["epoch"], r["reward_mean"] - r["reward_std"], r["reward_mean"] + r["reward_std"])
             for r in history if r.get("reward_mean") is not None and r.get("reward_std") is not None]
    main = [("train batch (mean +- std)", CATEGORY_COLOURS[0], line("reward_mean"), train),
            ("eval prompts, fixed seeds", CATEGORY_COLOURS[1], line("eval_reward_mean"), None),
            ("held-out prompts, fixed seeds", CATEGORY_COLOURS[2], line("heldout_reward_mean"), None)]
    components = sorted({k[len("reward_"):-len("_mean")] for r in history for k in r
                         if k.startswith("reward_") and k.endswith("_mean") and k != "reward_mean"})
    main += [(f"component {c}", CATEGORY_COLOURS[3 + i % 3], line(f"reward_{c}_mean"), None)
             for i, c in enumerate(components)]
    panels = [(title, main)]
    for prefix, name in (("eval_reward", "eval prompts"), ("heldout_reward", "held-out prompts")):
        cats = [c for c in ("single", "count", "two", "relation") if line(f"{prefix}_{c}")]
        if cats:
            panels.append((f"{name} by category", [(c, CATEGORY_COLOURS[i], line(f"{prefix}_{c}"), None)
                                                   for i, c in enumerate(cats)]))
    W, H = 900, 420
    img = Image.new("RGB", (W, H * len(panels)), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for i, (t, series) in enumerate(panels):
        _panel(d, (0, i * H, W, (i + 1) * H), series, t, font)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def export(run_dir: str, unet, args: argparse.Namespace) -> None:
    """export/unet/ (diffusers folder: config.json + diffusion_pytorch_model.safetensors) and, for LoRA,
    export/lora.safetensors; written next to the old export and swapped in when complete."""
    final = os.path.join(run_dir, "export")
    tmp = final + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "unet"))
    if args.lora_rank > 0:
        lora_path = os.path.join(tmp, "lora.safetensors")
        lora.save_lora(lora_path, unet, metadata={"base_model": args.model})
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

def main(argv: list[str] | None = None) -> None:
    # ---- setup: every bad input (flags, files, model, reward) fails here with one line, before any long work
    try:
        args = parse_args(argv)
        world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; the process group starts once inputs are checked
        validate(args, world)
        prompts = load_prompts(args.prompts)
        eval_prompts = load_prompts(args.eval_prompts) if args.eval_prompts else prompts
        heldout_prompts = load_prompts(args.heldout_prompts) if args.heldout_prompts else []
        if args.eval_size:
            eval_prompts, heldout_prompts = ([ps[i * len(ps) // args.eval_size] for i in range(min(args.eval_size, len(ps)))]
                                             for ps in (eval_prompts, heldout_prompts))
        # image i of an evaluation set always has seed sample_seed(seed, -1, i): repeats are new fixed seeds
        eval_prompts, heldout_prompts = ([p for p in ps for _ in range(args.eval_seeds)]
                                         for ps in (eval_prompts, heldout_prompts))
        if "shapes" in dict(parse_spec(args.reward)):   # its prompts must be in the world's grammar
            import shapes
            for p in {*prompts, *eval_prompts, *heldout_prompts}:
                shapes.parse(p)
        ckpt = latest_checkpoint(args.out) if args.resume else None
        if args.resume and ckpt is None:
            raise FileNotFoundError(f"--resume {args.resume}: no checkpoint in {args.resume}/checkpoints (the run "
                                    "stopped before its first --save-every); start it again without --resume")
        if ckpt is not None:
            with open(os.path.join(ckpt, "state.json")) as f:
                saved_world = json.load(f)["world_size"]
            if saved_world != world:  # each process restores its own RNG streams
                raise ValueError(f"--resume: {ckpt} was written by {saved_world} process(es), this run has {world}; "
                                 "resume with the same number of processes")
        if not args.resume and os.path.isfile(os.path.join(args.out, "config.json")):
            raise ValueError(f"--out {args.out} already holds a run; continue it with --resume {args.out} or pick "
                             "another --out")
        reward_options = options_from_flags(args.reward_option, hps_checkpoint=args.hps_checkpoint,
                                            aesthetic_checkpoint=args.aesthetic_checkpoint, clip_path=args.clip_path)
        rank, world, device = init_distributed(args.device)
        master = rank == 0
        parse_spec(args.reward)  # a typo in the reward fails now, not after the model has loaded
        pipe = load_pipeline(args.model, device, torch.float32)
        reward_fn = build_reward(args.reward, device=device, **reward_options)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"train.py: error: {e}") from None

    warning = cpu_warning(device, sum(p.numel() for p in pipe.unet.parameters()))
    if warning and master:
        print(warning, file=sys.stderr, flush=True)
    torch.manual_seed(args.seed)  # the same initial weights (LoRA A) on every rank
    low = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    autocast = (lambda: torch.autocast(device.type, dtype=low)) if low else contextlib.nullcontext
    use_lora = args.lora_rank > 0

    # ---- model: the frozen parts in the compute dtype, trainable weights in fp32 (ddpo-pytorch #8, trl #1330)
    unet = pipe.unet
    for m in (pipe.vae, pipe.text_encoder):
        m.requires_grad_(False).eval().to(low or torch.float32)
    if use_lora:
        unet.requires_grad_(False).to(low or torch.float32)
        params = lora.add_lora(unet, args.lora_rank, args.lora_alpha, tuple(args.lora_targets.split(",")))
    else:
        unet.requires_grad_(True)
        params = list(unet.parameters())
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
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.weight_decay, eps=args.adam_eps)
    # fp16 gradients underflow below ~6e-8: scale the loss up (and skip the steps that overflow); bf16 needs none
    grad_scaler = torch.amp.GradScaler(device.type) if low == torch.float16 else None
    scheduler = DDIMScheduler(SchedulerConfig.from_dict(pipe.scheduler_config), args.steps, device)
    tracker = None
    if args.advantage == "per-prompt":
        tracker = PerPromptStatTracker(args.tracker_buffer, args.tracker_min_count)
    update_cfg = UpdateConfig(clip_range=args.clip_range, adv_clip_max=args.adv_clip_max, loss=args.loss,
                              kl_coef=args.kl_coef, guidance=args.guidance, eta=args.eta,
                              micro_batch=args.train_batch_size,
                              optimizer_steps_per_epoch=args.optimizer_steps_per_epoch,
                              timestep_fraction=args.timestep_fraction, skip_last_step=args.skip_last_step,
                              max_grad_norm=args.max_grad_norm, num_inner_epochs=args.inner_epochs)
    generator = torch.Generator().manual_seed(args.seed)  # shuffles samples and timesteps in the update
    with torch.no_grad():
        uncond = pipe.encode_prompts([args.negative_prompt])  # (1,77,D)
    latent_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    size = args.size or unet.config.sample_size * latent_factor
    latent_shape = (pipe.vae.config.latent_channels, size // latent_factor, size // latent_factor)
    n_local = args.sample_batch_size * args.sample_batches_per_epoch
    n_global = n_local * world

    # ---- run directory
    start_epoch, global_step, history, wandb_id = 0, 0, [], None
    if ckpt is not None:
        state = load_checkpoint(ckpt, unet, use_lora, optimizer, tracker, grad_scaler, generator, rank, world)
        start_epoch, global_step, wandb_id = state["next_epoch"], state["global_step"], state.get("wandb_id")
        history = read_metrics(os.path.join(args.out, "metrics.jsonl"), start_epoch)
    if master:
        os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
        if not args.resume:
            write_json(os.path.join(args.out, "config.json"), {**vars(args), "resume": None})
        # rewrite the log without the epochs after the checkpoint: they are computed again, identically
        atomic_write(os.path.join(args.out, "metrics.jsonl"),
                     lambda tmp: open(tmp, "w").writelines(strict_json(r) + "\n" for r in history))
        what = f"LoRA r={args.lora_rank}" if use_lora else "full UNet"
        print(f"run {args.out}: {args.model}, reward {args.reward}, {what}, "
              f"{sum(p.numel() for p in params):,} trainable parameters, {args.precision}, {world} process(es), "
              f"{n_global} samples/epoch, epochs {start_epoch}..{args.epochs - 1}", flush=True)
    wandb_run = None
    if args.wandb and master:
        import wandb
        wandb_id = wandb_id or wandb.util.generate_id()
        wandb_run = wandb.init(project=args.wandb, name=os.path.basename(os.path.normpath(args.out)), id=wandb_id,
                               resume="allow", config=vars(args), dir=args.out)
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # one worker: rewards are scored in order
    use_async = args.async_reward and getattr(reward_fn, "async_ok", False)

    def sync():  # phase timings must include queued GPU work
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def generate(prompt_list: list[str], seeds: list[int], x_T: torch.Tensor | None):
        """One rollout batch with the current policy: (trajectory, prompt embeddings)."""
        with torch.no_grad():
            cond = pipe.encode_prompts(prompt_list)
            # folding LoRA into the weights is exact only in fp32: a bf16 base weight would round the update away
            fold = lora.merged(unet) if use_lora and low is None else contextlib.nullcontext()
            with fold, autocast():
                traj = rollout(unet, pipe.vae, scheduler, cond, uncond, guidance=args.guidance, eta=args.eta,
                               seeds=seeds, latents=x_T, vae_chunk=args.vae_chunk, height=size, width=size)
        return traj, cond

    def evaluate(epoch: int, name: str, prompt_list: list[str], score: bool, grid: bool) -> dict:
        """A prompt set with fixed seeds (prompt i always gets the same noise): `name`_reward_* metrics (and per
        category, if the reward reports categories) and a grid samples/[name_]epoch_NNNN.png."""
        unet.eval()
        mine = list(range(rank, len(prompt_list), world))
        rows = []
        for b in range(0, len(mine), args.sample_batch_size):
            idx = mine[b:b + args.sample_batch_size]
            ps = [prompt_list[i] for i in idx]
            traj, _ = generate(ps, [sample_seed(args.seed, -1, i) for i in idx], None)
            scores, info = reward_fn(traj.images, ps) if score else (torch.zeros(len(idx)), {})
            cats = reward_categories(info)
            for j, i in enumerate(idx):
                image = (traj.images[j] * 255).round().byte().cpu() if i < args.grid_size else None
                rows.append((i, float(scores[j]), {k: float(v[j]) for k, v in cats.items()}, image))
        rows = sorted((r for part in gather_objects(rows) for r in part), key=lambda r: r[0])
        out = {}
        if score:
            out = reward_stats(f"{name}_reward", torch.tensor([r[1] for r in rows], dtype=torch.float64))
            out.update(category_means(f"{name}_reward", {k: torch.tensor([r[2][k] for r in rows], dtype=torch.float64)
                                                         for k in rows[0][2]}))
        if grid and master and args.grid_size > 0:
            pics = [r[3].float() / 255 for r in rows if r[3] is not None]
            caps = [f"{prompt_list[r[0]][:40]}" + (f" {r[1]:.2f}" if score else "") for r in rows if r[3] is not None]
            ncols = args.eval_seeds if 1 < args.eval_seeds <= 8 else 8   # a row per prompt when seeds repeat
            grid_img = make_grid(torch.stack(pics), ncols=min(ncols, len(pics)), captions=caps)
            stem = f"epoch_{epoch:04d}.png" if name == "eval" else f"{name}_epoch_{epoch:04d}.png"
            atomic_write(os.path.join(args.out, "samples", stem), lambda tmp: grid_img.save(tmp, format="PNG"))
        return out

    def evaluate_all(epoch: int, score: bool, grid: bool) -> dict:
        out = evaluate(epoch, "eval", eval_prompts, score, grid)
        if heldout_prompts:
            out.update(evaluate(epoch, "heldout", heldout_prompts, score, grid))
        return out

    def due(every: int, epoch: int) -> bool:
        return every > 0 and (epoch % every == 0 or epoch == args.epochs)

    # ---- the training loop
    t_run, bad_epochs = time.perf_counter(), 0
    for epoch in range(start_epoch, args.epochs):
        t_epoch = time.perf_counter()
        row = {"epoch": epoch}
        if due(args.eval_every, epoch) or due(args.sample_every, epoch):
            t0 = time.perf_counter()
            row.update(evaluate_all(epoch, due(args.eval_every, epoch), due(args.sample_every, epoch)))
            row["time_eval"] = time.perf_counter() - t0

        # prompts -> text embeddings -> rollout -> images -> rewards (scored in a thread while the next batch samples)
        unet.eval()
        all_prompts = epoch_prompts(prompts, n_global, args.group_size, args.seed, epoch)
        mine = range(rank * n_local, (rank + 1) * n_local)  # this rank's block of the global batch
        batches, pending, results, t_reward = [], [], [], 0.0
        t0 = time.perf_counter()
        for b in tqdm(range(args.sample_batches_per_epoch), desc=f"epoch {epoch} rollout", disable=not master,
                      leave=False):
            idx = list(mine[b * args.sample_batch_size:(b + 1) * args.sample_batch_size])
            ps = [all_prompts[i] for i in idx]
            x_T = None
            if args.same_noise_per_group:  # x_T from the group's first seed; step noise stays per sample
                x_T = torch.stack([torch.randn(latent_shape, generator=torch.Generator().manual_seed(
                    sample_seed(args.seed, epoch, i - i % args.group_size))) for i in idx])
            traj, cond = generate(ps, [sample_seed(args.seed, epoch, i) for i in idx], x_T)
            if use_async:
                pending.append(executor.submit(reward_fn, traj.images, ps))
            else:
                sync()
                t1 = time.perf_counter()
                results.append(reward_fn(traj.images, ps))
                t_reward += time.perf_counter() - t1
            batches.append({"cond": cond, "latents": traj.latents, "log_probs": traj.log_probs,
                            "timesteps": traj.timesteps})
        sync()
        t1 = time.perf_counter()
        results += [f.result() for f in tqdm(pending, desc=f"epoch {epoch} reward", disable=not master, leave=False)]
        t_reward += time.perf_counter() - t1
        t_rollout = t1 - t0 - (0.0 if use_async else t_reward)
        rewards = torch.cat([r[0] for r in results]).float().to(device)  # (n_local,)
        names = list(results[0][1].get("components", {}))  # a weighted sum's parts, logged when there are several
        components = {k: torch.cat([r[1]["components"][k] for r in results]).float().to(device)
                      for k in names} if len(names) > 1 else {}
        per_category = [reward_categories(r[1]) for r in results]
        categories = {k: torch.cat([c[k] for c in per_category]).float().to(device) for k in per_category[0]}
        for warning in (w for r in results for w in r[1].get("warnings", [])):
            tqdm.write(f"rank {rank}: {warning}", file=sys.stderr)

        # rewards of the global batch -> advantages -> this rank's slice (non-finite rewards: advantage 0, masked)
        global_rewards = gather_cat(rewards).cpu()  # (n_global,) in global sample order
        if args.advantage == "per-prompt":
            advantages = tracker.update(all_prompts, global_rewards)
        elif args.advantage == "group":
            advantages = group_advantages(global_rewards, torch.arange(n_global) // args.group_size,
                                          global_std=args.global_std)
        else:
            advantages = batch_advantages(global_rewards)
        samples = Samples(latents=torch.cat([b["latents"] for b in batches]),
                          log_probs=torch.cat([b["log_probs"] for b in batches]),
                          timesteps=torch.cat([b["timesteps"] for b in batches]),
                          advantages=advantages[rank * n_local:(rank + 1) * n_local].to(device),
                          valid=torch.isfinite(rewards))

        # no usable reward this epoch (a remote scorer down, ...): no update; --max-bad-epochs in a row end the run
        if not torch.isfinite(global_rewards).any():
            bad_epochs += 1
            if master:
                tqdm.write(f"warning: epoch {epoch}: no image got a finite reward; the update is skipped "
                           f"({bad_epochs} of --max-bad-epochs {args.max_bad_epochs})", file=sys.stderr)
            row.update(reward_stats("reward", global_rewards), time_total=time.perf_counter() - t_epoch)
            history.append(row)
            if master:
                with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
                    f.write(strict_json(row) + "\n")
            if bad_epochs >= args.max_bad_epochs:
                last = latest_checkpoint(args.out)
                raise SystemExit(f"train.py: error: {bad_epochs} epochs in a row without a usable reward: check the "
                                 f"reward ({args.reward}); the last checkpoint ({last or 'none yet'}) is intact, "
                                 f"continue with --resume {args.out}")
            continue
        bad_epochs = 0

        # PPO update on the stored trajectories
        sync()
        t0 = time.perf_counter()
        stats = ddpo_update(model, params, scheduler, samples, optimizer, update_cfg,
                            cond_embeds=torch.cat([b["cond"] for b in batches]), uncond_embeds=uncond,
                            generator=generator, reference=reference, autocast_dtype=low, grad_scaler=grad_scaler,
                            progress=master)
        sync()
        t_update = time.perf_counter() - t0
        global_step += args.optimizer_steps_per_epoch * args.inner_epochs
        stats = mean_over_ranks(stats)
        if master and stats["first_ratio_max_dev"] > args.clip_range:  # ratio 1 is DDPO's sanity check
            tqdm.write(f"warning: epoch {epoch}: the PPO ratio of the first micro-step is off 1 by "
                       f"{stats['first_ratio_max_dev']:.2g} > --clip-range {args.clip_range:g}: rollout and update "
                       "scored the same steps differently (precision or batch-size-dependent kernels); the update is "
                       "clipped from the start. Check --precision, or use --precision fp32", file=sys.stderr)

        # log
        row.update(reward_stats("reward", global_rewards))
        for name, v in components.items():
            row.update(reward_stats(f"reward_{name}", gather_cat(v).cpu()))
        row.update(category_means("reward", {k: gather_cat(v).cpu() for k, v in categories.items()}))
        row.update(stats)
        row["lr"] = optimizer.param_groups[0]["lr"]
        row["global_step"] = global_step
        row.update({"time_rollout": t_rollout, "time_reward": t_reward, "time_update": t_update,
                    "time_total": time.perf_counter() - t_epoch})
        row["images_per_s"] = n_global / row["time_total"]
        history.append(row)
        if master:
            with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
                f.write(strict_json(row) + "\n")
            draw_reward_curve(history, os.path.join(args.out, "reward_curve.png"), f"{args.reward} - {args.out}")
            if wandb_run is not None:
                wandb_run.log(row, step=epoch)
            print(f"epoch {epoch}: reward {row['reward_mean']:.4g} +- {row['reward_std']:.3g}"
                  + (f", eval {row['eval_reward_mean']:.4g}" if "eval_reward_mean" in row else "")
                  + (f", held-out {row['heldout_reward_mean']:.4g}" if "heldout_reward_mean" in row else "")
                  + "".join(f", {k} {row[k]:.3g}" for k in ("approx_kl", "clipfrac", "kl") if row.get(k))
                  + f", {row['time_total']:.1f}s ({row['images_per_s']:.2f} img/s)", flush=True)

        # checkpoint (the next epoch to run is stored, never derived from a directory name)
        if (args.save_every and (epoch + 1) % args.save_every == 0) or epoch + 1 == args.epochs:
            rngs = gather_objects(rng_state(generator))
            if master:
                save_checkpoint(args.out, epoch + 1, unet, use_lora, optimizer, tracker, grad_scaler, rngs,
                                {"next_epoch": epoch + 1, "global_step": global_step, "world_size": world,
                                 "wandb_id": wandb_id}, keep=args.keep_checkpoints)

    # ---- final evaluation and export
    final = {}
    if due(args.eval_every, args.epochs) or due(args.sample_every, args.epochs):
        final = evaluate_all(args.epochs, due(args.eval_every, args.epochs), due(args.sample_every, args.epochs))
    if master:
        if "eval_reward_mean" in final:  # the policy after the last epoch, on the curve next to the others
            draw_reward_curve(history + [{"epoch": args.epochs, **final}], os.path.join(args.out, "reward_curve.png"),
                              f"{args.reward} - {args.out}")
        export(args.out, unet, args)
        first = history[0] if history else {}
        write_json(os.path.join(args.out, "summary.json"), {
            "epochs": args.epochs, "initial_reward_mean": first.get("reward_mean"),
            "initial_reward_std": first.get("reward_std"),
            "final_reward_mean": history[-1]["reward_mean"] if history else None,
            "initial_eval_reward_mean": first.get("eval_reward_mean"),
            "final_eval_reward_mean": final.get("eval_reward_mean"),
            "initial_heldout_reward_mean": first.get("heldout_reward_mean"),
            "final_heldout_reward_mean": final.get("heldout_reward_mean"),
            "initial_eval": {k: v for k, v in first.items() if k.startswith(("eval_", "heldout_"))},
            "final_eval": {k: v for k, v in final.items() if k.startswith(("eval_", "heldout_"))},
            "minutes": (time.perf_counter() - t_run) / 60, "export": os.path.join(args.out, "export")})
        if final and wandb_run is not None:
            wandb_run.log(final, step=args.epochs)
        print(f"done: {args.out}/export"
              + (f", final eval reward {final['eval_reward_mean']:.4g}" if "eval_reward_mean" in final else ""))
    if wandb_run is not None:
        wandb_run.finish()
    executor.shutdown()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
