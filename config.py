"""
The configuration of a training run: one dataclass, TrainConfig, whose fields are train.py's flags. Each field
carries its default and its line of --help, so a default is written once; the parser is built from the fields
(type from the annotation, section from SECTIONS), and config.json is the dataclass as JSON.

    cfg = parse_args(["--model", "shapes"])   # flags -> TrainConfig: per-model defaults filled in, validated
    cfg.lr, cfg.steps                         # 0.01, 20
    dataclasses.asdict(cfg)                   # what config.json holds; sample.py --finetuned reads it back

Defaults are SD's (ddpo-pytorch's base config, sized for one 24 GB GPU: LoRA, bf16 autocast); MODEL_DEFAULTS holds
what --model tiny and --model shapes change, and a flag given on the command line always wins. A resumed run
(--resume RUN) takes RUN/config.json as its config, and only RESUME_OVERRIDABLE flags may be given again.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import re
import typing
from dataclasses import dataclass, field

import torch

from cli import PROMPT_SETS, ArgumentParser
from rewards import parse_spec, reward_help
from weights import DEFAULT_MODEL

# What the CPU models change. "tiny" (a random SD on a CPU): measured to learn jpeg-compressibility in a couple of
# minutes; its text encoder is random, so guidance only doubles the cost, and LoRA on its attention barely moves
# the policy, so it trains the whole UNet at a high learning rate.
# "shapes" (our pretrained toy, shapes.py): the SD algorithm (LoRA, CFG, PPO, per-prompt advantages) with the sizes
# scaled to a CPU: 128 images x 20 steps an epoch, a quarter of the steps trained, 16 images per prompt so the
# tracker has per-prompt stats from the first epoch, on the 8 hard prompts of shapes-hard, each drawn once an epoch
# (i.i.d. draws leave a prompt out for epochs while the others' updates move it), evaluated with 32 fixed seeds per
# prompt (256 images: a standard error of ~0.012; held-out 8 seeds of its 47 prompts). Two changes let the policy
# move where objects go: LoRA on the ResNet convolutions as well as the attention (on a 1.7M-parameter UNet the
# attention holds 13% of the weights; attention-only LoRA never moved a relation), and the last two steps left
# untrained (step 18, t = 51 -> 1, moves its mean 5.4 sigma per unit of eps, 0.6-1.1 for the others: its log-prob
# gradients are an order larger and about texture, and they drowned the layout signal). The learning rate 3e-3 (1e-2
# learned a relation faster, then collapsed) and the clip range scaled to the latent size: the PPO ratio is on the
# MEAN log-prob over D latent elements, so SD 1.5's 1e-4 at D = 64*64*4 is a +-1.6-nat trust region on the summed
# log-ratio, and 6e-3 at the shapes model's D = 8*8*4 is the same region. Each change is measured in the README.
MODEL_DEFAULTS = {
    "tiny": dict(epochs=20, steps=10, guidance=1.0, sample_batch_size=32, sample_batches_per_epoch=1,
                 train_batch_size=32, optimizer_steps_per_epoch=1, lora_rank=0, lr=5e-3, eval_every=5, sample_every=5,
                 save_every=5),
    "shapes": dict(epochs=16, steps=20, guidance=5.0, sample_batch_size=64, sample_batches_per_epoch=2,
                   train_batch_size=64, optimizer_steps_per_epoch=4, timestep_fraction=0.25, lora_rank=4, lr=3e-3,
                   lora_targets="to_q,to_k,to_v,to_out.0,conv1,conv2", skip_last_steps=2, prompt_draw="balanced",
                   eval_every=8, sample_every=8, save_every=4, prompts="shapes-hard", eval_prompts="shapes-hard",
                   heldout_prompts="shapes-heldout", eval_size=0, eval_seeds=32, heldout_seeds=8, reward="shapes",
                   group_size=16, tracker_min_count=8, grid_size=16, clip_range=6e-3),
    # SDXL base, sized for one 80 GB GPU (estimated, not measured here: no GPU). Its UNet (2.6 B parameters) at
    # 1024 px (128x128 latents) costs ~3x SD 1.5's per call, so the rollout batch is halved to 4 images (a CFG batch
    # of 8) and the update runs one (sample, step) item per call (2 with CFG) with gradient checkpointing, keeping
    # the activations of the backward small next to the ~11 GB of bf16 weights; 8 batches keep SD's 32 images per
    # epoch per GPU, and with them the per-prompt tracker's statistics.
    "stabilityai/stable-diffusion-xl-base-1.0": dict(sample_batch_size=4, sample_batches_per_epoch=8,
                                                     train_batch_size=1, grad_checkpointing=True),
}
MODEL_DEFAULTS["tiny-sdxl"] = MODEL_DEFAULTS["tiny"]   # the same toy budget for SDXL's structure

# flags that may differ when a run is resumed: they do not change what the run computes
RESUME_OVERRIDABLE = ("resume", "epochs", "save_every", "keep_checkpoints", "sample_every", "eval_every", "wandb",
                      "device", "async_reward", "compile")


def flag(default, help: str, **argparse_kw):
    """A field of TrainConfig: its default, its --help line, and what argparse needs beyond the annotation
    (choices, metavar). A help text may state a default the field cannot (e.g. "(default: bf16 on CUDA, ...)")."""
    kw = dict(default_factory=list) if isinstance(default, list) else dict(default=default)
    return field(**kw, metadata={"help": help, **argparse_kw})


@dataclass
class TrainConfig:
    # model
    model: str = flag(DEFAULT_MODEL, "SD 1.x/2.x or SDXL: hub id, local diffusers folder or .safetensors/.ckpt file; "
                      "'shapes' (our pretrained toy, CPU); 'tiny' or 'tiny-sdxl' (random, for tests)")
    size: int | None = flag(None, "image size in pixels (default: the model's native size)")
    negative_prompt: str = flag("", "the unconditional prompt of classifier-free guidance (default: empty)")
    precision: str | None = flag(None, "autocast dtype of the frozen weights and the compute; trainable weights "
                                 "always stay fp32; fp16 adds loss scaling (default: bf16 on CUDA, fp32 on CPU)",
                                 choices=("fp32", "bf16", "fp16"))
    compile: bool = flag(False, "torch.compile the UNet")
    grad_checkpointing: bool = flag(False, "recompute UNet blocks in backward to save memory")
    device: str | None = flag(None, "cuda, cuda:1, cpu; torchrun sets cuda:LOCAL_RANK (default: cuda when available)")
    # reward
    reward: str = flag("hps", "spec, e.g. 'hps', 'jpeg-compressibility', 'hps=1,aesthetic=0.05' (names below)")
    hps_checkpoint: str | None = flag(None, "local HPSv2 checkpoint (default: hub xswu/HPSv2)")
    aesthetic_checkpoint: str | None = flag(None, "local LAION aesthetic MLP .pth (default: hub)")
    clip_path: str | None = flag(None, "CLIP ViT-L/14 folder or hub id for aesthetic/diversity")
    reward_option: list = flag([], "any other reward option below, repeatable (e.g. precision=fp32)",
                               metavar="KEY=VALUE")
    task: list = flag([], "a task of joint training (Zhang et al. Algorithm 1), repeatable: REWARD@PROMPTS[@BATCHES], "
                      "e.g. 'shapes@shapes-hard' 'jpeg-compressibility@simple_animals@1'; every epoch runs the tasks "
                      "in turn, each with its own rollouts (BATCHES x --sample-batch-size, default "
                      "--sample-batches-per-epoch), advantages and update; replaces --reward/--prompts", metavar="SPEC")
    async_reward: bool = flag(True, "score a batch in a thread while the next one samples (if the reward allows it)")
    # prompts and evaluation
    prompts: str = flag("simple_animals", f"built-in set ({', '.join(PROMPT_SETS)}) or a text file, one prompt per "
                        "line")
    eval_prompts: str | None = flag(None, "set or file scored with fixed seeds (default: the training prompts)")
    heldout_prompts: str | None = flag(None, "a second evaluation set, e.g. prompts never trained on, logged as "
                                       "heldout_reward_*")
    eval_size: int = flag(16, "number of evaluation prompts used (0 = all)")
    eval_seeds: int = flag(1, "images per evaluation prompt, each with its own fixed seed (averages out the sampling "
                           "noise of a small set)")
    heldout_seeds: int | None = flag(None, "images per held-out prompt, each with its own fixed seed (default: "
                                     "--eval-seeds)")
    eval_every: int = flag(10, "evaluate every N epochs, and at the start and end (0 = never)")
    sample_every: int = flag(10, "save a sample grid every N epochs, and at the start and end (0 = never)")
    grid_size: int = flag(8, "images in a sample grid (the first evaluation prompts, in rows of up to 8 seeds)")
    # sampling
    epochs: int = flag(100, "training epochs (one rollout + one update each)")
    sample_batch_size: int = flag(8, "images per rollout batch, per process")
    sample_batches_per_epoch: int = flag(4, "rollout batches per epoch, per process")
    steps: int = flag(50, "DDIM steps")
    guidance: float = flag(5.0, "classifier-free guidance scale (the same in training)")
    eta: float = flag(1.0, "DDIM eta (1 = the stochastic policy DDPO needs)")
    vae_chunk: int | None = flag(None, "decode at most this many latents at once")
    # advantages
    advantage: str = flag("per-prompt", "per-prompt running stats (DDPO), stats of each group of --group-size images "
                          "of a prompt (GRPO), or of the whole batch", choices=("per-prompt", "group", "batch"))
    group_size: int = flag(1, "images per prompt per epoch (K of GRPO)")
    prompt_draw: str = flag("random", "each group's prompt: a uniform draw (ddpo-pytorch), or 'balanced': shuffled "
                            "passes over the prompts, every prompt equally often", choices=("random", "balanced"))
    same_noise_per_group: bool = flag(False, "one shared x_T per group (DanceGRPO)")
    global_std: bool = flag(False, "group advantages divided by the batch std, not each group's (Flow-GRPO)")
    tracker_buffer: int = flag(16, "per-prompt tracker: rewards kept per prompt")
    tracker_min_count: int = flag(16, "per-prompt tracker: below this many rewards, use batch stats")
    adv_clip_max: float = flag(5.0, "clip advantages to +-this")
    shuffle_advantages: bool = flag(False, "a control run: permute each epoch's advantages within each prompt's group "
                                    "of --group-size images before the update (the same update sizes, no information "
                                    "on which image was better); what a run learns beyond it, the reward taught")
    # update
    loss: str = flag("ppo", "PPO-clip (DDPO_IS) or score function (DDPO_SF, needs --optimizer-steps-per-epoch 1)",
                     choices=("ppo", "sf"))
    clip_range: float = flag(1e-4, "PPO ratio clip range, on the per-element mean log-prob ratio (scheduler.py)")
    kl_coef: float = flag(0.0, "weight of the KL to the initial policy (0 = off)")
    train_batch_size: int = flag(2, "(sample, timestep) items per UNet call in training (x2 with CFG), per process")
    optimizer_steps_per_epoch: int = flag(2, "optimizer steps per epoch (gradients accumulate in between)")
    inner_epochs: int = flag(1, "passes over each epoch's samples")
    timestep_fraction: float = flag(1.0, "fraction of the denoising steps trained per sample (a random subset)")
    skip_last_steps: int = flag(0, "never train the last N denoising steps: their sigma is small next to how far the "
                                "UNet moves their mean, so their log-prob gradients are large and about detail, not "
                                "layout (DanceGRPO skips 1)")
    lr: float | None = flag(None, "AdamW learning rate (default: 3e-4 with LoRA, 1e-5 for full fine-tuning)")
    adam_beta1: float = flag(0.9, "AdamW beta1")
    adam_beta2: float = flag(0.999, "AdamW beta2")
    weight_decay: float = flag(1e-4, "AdamW weight decay")
    adam_eps: float = flag(1e-8, "AdamW epsilon")
    max_grad_norm: float = flag(1.0, "clip the gradient norm to this")
    # pretraining-loss regulariser
    pretrain_data: str | None = flag(None, "image-caption pairs for L_pre: 'shapes' (the shapes world), a folder of "
                                     "images with .txt captions, or a .jsonl of {\"path\", \"caption\"}",
                                     metavar="SOURCE")
    pretrain_coef: float = flag(0.0, "beta: weight of the eps-MSE on --pretrain-data, added at every optimizer step "
                                "(0 = off)")
    pretrain_batch_size: int = flag(4, "pairs per optimizer step, per process")
    # LoRA
    lora_rank: int = flag(4, "adapter rank (0 = full fine-tuning of the UNet)")
    lora_alpha: float | None = flag(None, "adapter alpha (default: the rank, i.e. scale 1)")
    lora_targets: str = flag("to_q,to_k,to_v,to_out.0", "comma-separated module-path suffixes")
    # run
    seed: int = flag(42, "seed of prompts, noise, initialisation and shuffling")
    out: str | None = flag(None, "run directory (default: runs/<timestamp>)")
    resume: str | None = flag(None, "run directory to continue from its last checkpoint")
    save_every: int = flag(5, "checkpoint every N epochs (and at the end)")
    keep_checkpoints: int = flag(1, "keep the newest N checkpoints, delete older ones (0 = keep all)")
    max_bad_epochs: int = flag(3, "stop after this many epochs in a row without one finite reward")
    wandb: str | None = flag(None, "also log to this Weights & Biases project (needs wandb installed)",
                             metavar="PROJECT")


# the --help section that starts at each field
SECTIONS = {"model": "model", "reward": "reward", "prompts": "prompts and evaluation", "epochs": "sampling",
            "advantage": "advantages", "loss": "update",
            "pretrain_data": "pretraining-loss regulariser (Zhang et al. 2024: L = J + beta * L_pre)",
            "lora_rank": "LoRA", "seed": "run"}


def _shown(v) -> str:
    return ("on" if v else "off") if isinstance(v, bool) else f"{v:g}" if isinstance(v, float) else str(v)


def _help(f: dataclasses.Field) -> str:
    """The field's help with its default as "(default: X)", per-model ones as "(default: X; --model tiny: Y)": the
    SD value (or the text's own "(default: ...)") first, then the models that differ. None, False and empty
    defaults are described by the text itself."""
    text = f.metadata["help"]
    said = re.search(r" \(default: (.*)\)$", text)
    default = f.default if f.default is not dataclasses.MISSING else []
    unset = default is None or default is False or default == "" or default == []   # 0 and 0.0 are defaults
    models: dict[str, list[str]] = {}   # shown value -> the models that change the default to it
    for m, d in MODEL_DEFAULTS.items():
        if f.name in d and d[f.name] != default:
            models.setdefault(_shown(d[f.name]), []).append(m)
    per_model = [f"--model {', '.join(ms)}: {v}" for v, ms in models.items()]
    first = said.group(1) if said else (_shown(default) if per_model else None) if unset else _shown(default)
    shown = [s for s in (first, *per_model) if s is not None]
    return (text[:said.start()] if said else text) + (f" (default: {'; '.join(shown)})" if shown else "")


def build_parser() -> argparse.ArgumentParser:
    """TrainConfig's fields as flags. Nothing has an argparse default (SUPPRESS): the namespace holds exactly the
    flags given, so parse_args can tell a given value from a default (per-model defaults, --resume checks)."""
    p = ArgumentParser(prog="train.py", description="DDPO / GRPO fine-tuning of Stable Diffusion on a reward.",
                       epilog=reward_help(), argument_default=argparse.SUPPRESS)
    group, hints = p, typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in SECTIONS:
            group = p.add_argument_group(SECTIONS[f.name])
        kw = {k: v for k, v in f.metadata.items() if k != "help"}
        typ = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
        if typ is bool:
            # --no-FLAG where a default (SD's or a model's) is on
            on = f.default or any(d.get(f.name) for d in MODEL_DEFAULTS.values())
            kw["action"] = argparse.BooleanOptionalAction if on else "store_true"
        elif typ is list:
            kw["action"] = "append"
        else:
            kw["type"] = typ
        group.add_argument("--" + f.name.replace("_", "-"), help=_help(f), **kw)
    return p


def parse_args(argv: list[str] | None = None, world: int = 1) -> TrainConfig:
    """Flags -> a complete config, validated for `world` processes. With --resume the run's config.json is the config and only
    RESUME_OVERRIDABLE flags may be given again."""
    given = vars(build_parser().parse_args(argv))
    if given.get("resume") is not None:
        path = os.path.join(given["resume"], "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--resume {given['resume']}: no config.json there; "
                                    "pass a run directory written by train.py")
        with open(path) as f:
            saved = json.load(f)
        if "skip_last_step" in saved:   # runs started before the flag took a count
            saved.setdefault("skip_last_steps", int(saved.pop("skip_last_step")))
        # runs started before --heldout-seeds evaluated both sets at --eval-seeds (itself 1 before it existed)
        saved.setdefault("heldout_seeds", saved.get("eval_seeds", 1))
        changed = [k for k, v in given.items() if k not in RESUME_OVERRIDABLE and saved.get(k) != v]
        if changed:
            flags = ", ".join("--" + k.replace("_", "-") for k in changed)
            raise ValueError(f"--resume: {flags} cannot change in a resumed run (it would not continue the same run); "
                             "start a new run with --out instead")
        # flags added since the run started take their defaults
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        cfg = TrainConfig(**{**{k: v for k, v in saved.items() if k in known}, **given, "out": given["resume"]})
        validate(cfg, world)
        return cfg
    per_model = dict(MODEL_DEFAULTS.get(given.get("model", DEFAULT_MODEL), {}))
    if given.get("task"):   # each task brings its own prompts and is evaluated on them: no default evaluation sets
        per_model.update(eval_prompts=None, heldout_prompts=None)
    cfg = TrainConfig(**{**per_model, **given})
    if cfg.device is None:
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.precision is None:
        cfg.precision = "bf16" if cfg.device.startswith("cuda") else "fp32"
    if cfg.lr is None:
        cfg.lr = 3e-4 if cfg.lora_rank > 0 else 1e-5
    if cfg.heldout_seeds is None:
        cfg.heldout_seeds = cfg.eval_seeds
    if cfg.lora_alpha is None:
        cfg.lora_alpha = float(cfg.lora_rank)
    if cfg.out is None:
        cfg.out = os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    validate(cfg, world)
    return cfg


def validate(cfg: TrainConfig, world: int = 1) -> None:
    """One-line errors for configurations that cannot run, before anything heavy is loaded."""
    def need(ok: bool, msg: str):
        if not ok:
            raise ValueError(msg)
    for k in ("epochs", "sample_batch_size", "sample_batches_per_epoch", "train_batch_size",
              "optimizer_steps_per_epoch", "inner_epochs", "steps", "group_size", "tracker_buffer",
              "tracker_min_count", "max_bad_epochs", "eval_seeds", "heldout_seeds"):
        need(getattr(cfg, k) >= 1, f"--{k.replace('_', '-')} must be >= 1, got {getattr(cfg, k)}")
    for k in ("save_every", "eval_every", "sample_every", "eval_size", "grid_size", "lora_rank", "kl_coef",
              "keep_checkpoints"):
        need(getattr(cfg, k) >= 0, f"--{k.replace('_', '-')} must be >= 0, got {getattr(cfg, k)}")
    need(0.0 <= cfg.eta <= 1.0, f"--eta must be in [0, 1], got {cfg.eta}")
    need(cfg.eta > 0.0, "--eta 0 makes every DDIM step deterministic: there is no policy to train; use --eta 1")
    need(0.0 < cfg.timestep_fraction <= 1.0, f"--timestep-fraction must be in (0, 1], got {cfg.timestep_fraction}")
    need(0 <= cfg.skip_last_steps < cfg.steps, f"--skip-last-steps must be in [0, --steps {cfg.steps}), got "
                                               f"{cfg.skip_last_steps}")
    need(cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}")
    need(cfg.clip_range > 0 and cfg.adv_clip_max > 0 and cfg.max_grad_norm > 0,
         "--clip-range, --adv-clip-max and --max-grad-norm must be > 0")
    need(not cfg.task or not (cfg.eval_prompts or cfg.heldout_prompts),
         "--eval-prompts/--heldout-prompts apply to a run without --task (each task is evaluated on its prompts)")
    for task in task_specs(cfg) if cfg.task else []:
        n = task["batches"] * cfg.sample_batch_size * world
        need(n % cfg.group_size == 0, f"--group-size {cfg.group_size} must divide the {n} samples per epoch of "
             f"the task {task['reward']}@{task['prompts']}")
        parse_spec(task["reward"])
    for task in task_specs(cfg):   # a group reward sees one rollout batch: each prompt's group must lie inside one
        group_rewards = [n for n, _ in parse_spec(task["reward"]) if n in ("diversity", "fairness")]
        need(not group_rewards or (cfg.group_size >= 2 and cfg.sample_batch_size % cfg.group_size == 0),
             f"--reward {group_rewards[0] if group_rewards else ''} scores each prompt's group of images: set "
             f"--group-size K >= 2 with K dividing --sample-batch-size {cfg.sample_batch_size} (Zhang et al.: 16)")
    n_local = cfg.sample_batch_size * cfg.sample_batches_per_epoch
    n_trained = int((cfg.steps - cfg.skip_last_steps) * cfg.timestep_fraction)
    need(n_trained >= 1, f"--timestep-fraction {cfg.timestep_fraction} of {cfg.steps} steps trains no step; raise it")
    need(cfg.optimizer_steps_per_epoch <= n_local * n_trained,
         f"--optimizer-steps-per-epoch {cfg.optimizer_steps_per_epoch} exceeds the {n_local * n_trained} "
         "(sample, timestep) items per process per epoch")
    need(cfg.loss != "sf" or (cfg.optimizer_steps_per_epoch == 1 and cfg.inner_epochs == 1),
         "--loss sf is on-policy: use it with --optimizer-steps-per-epoch 1 (and --inner-epochs 1)")
    need(n_local * world % cfg.group_size == 0,
         f"--group-size {cfg.group_size} must divide the {n_local * world} samples per epoch "
         f"(--sample-batch-size x --sample-batches-per-epoch x processes)")
    need(cfg.advantage != "group" or cfg.group_size >= 2,
         "--advantage group needs --group-size >= 2 (images per prompt)")
    need(not cfg.global_std or cfg.advantage == "group", "--global-std applies to --advantage group only")
    need(not cfg.same_noise_per_group or cfg.group_size >= 2, "--same-noise-per-group needs --group-size >= 2")
    need(not cfg.shuffle_advantages or cfg.group_size >= 2,
         "--shuffle-advantages permutes within each prompt's group of images: it needs --group-size >= 2")
    need(cfg.pretrain_coef >= 0 and cfg.pretrain_batch_size >= 1,
         "--pretrain-coef must be >= 0 and --pretrain-batch-size >= 1")
    need((cfg.pretrain_coef > 0) == (cfg.pretrain_data is not None),
         "--pretrain-coef > 0 and --pretrain-data go together: give both (or neither)")
    need(cfg.vae_chunk is None or cfg.vae_chunk >= 1, f"--vae-chunk must be >= 1, got {cfg.vae_chunk}")
    need(cfg.size is None or (cfg.size >= 8 and cfg.size % 8 == 0),
         f"--size must be a positive multiple of 8, got {cfg.size}")
    need(not cfg.wandb or importlib.util.find_spec("wandb") is not None,
         "--wandb: the wandb package is not installed; `pip install wandb` or drop --wandb")


def task_specs(cfg: TrainConfig) -> list[dict]:
    """The run's tasks: [{reward, prompts, eval_prompts, heldout_prompts, batches}]. Without --task, one task from
    --reward and --prompts; each --task REWARD@PROMPTS[@BATCHES] is evaluated on its own prompts."""
    if not cfg.task:
        return [dict(reward=cfg.reward, prompts=cfg.prompts, eval_prompts=cfg.eval_prompts,
                     heldout_prompts=cfg.heldout_prompts, batches=cfg.sample_batches_per_epoch)]
    tasks = []
    for spec in cfg.task:
        parts = spec.split("@")
        if len(parts) not in (2, 3) or not all(parts) or (len(parts) == 3 and not parts[2].isdigit()):
            raise ValueError(f"--task {spec!r}: write REWARD@PROMPTS or REWARD@PROMPTS@BATCHES, e.g. "
                             "'shapes@shapes-hard@2'")
        batches = int(parts[2]) if len(parts) == 3 else cfg.sample_batches_per_epoch
        if batches < 1:
            raise ValueError(f"--task {spec!r}: BATCHES must be >= 1")
        tasks.append(dict(reward=parts[0], prompts=parts[1], eval_prompts=None, heldout_prompts=None, batches=batches))
    return tasks
