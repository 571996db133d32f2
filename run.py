"""
A training run as one object: its tasks, its run directory and everything written there, and its processes. Its
configuration (flags -> TrainConfig) is config.py's; train.py keeps only the epoch loop; this file keeps what makes
a run resumable and self-describing:

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

import copy
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import lora
from cli import load_prompts
from config import TrainConfig
from ddpo import PerPromptStatTracker
from grid import draw_reward_curve
from weights import load_pipeline

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


def export(run_dir: str, unet, cfg: TrainConfig) -> None:
    """export/unet/ (diffusers folder: config.json + diffusion_pytorch_model.safetensors) and, for LoRA,
    export/lora.safetensors (ours: rank, alpha, targets in its metadata) and export/pytorch_lora_weights.safetensors
    (diffusers': pipe.load_lora_weights("RUN/export")); written next to the old export, swapped in when complete."""
    final = os.path.join(run_dir, "export")
    tmp = final + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "unet"))
    if cfg.lora_rank > 0:
        lora_path = os.path.join(tmp, "lora.safetensors")
        lora.save_lora(lora_path, unet, metadata={"base_model": cfg.model})
        lora.save_diffusers_lora(tmp, unet)   # pytorch_lora_weights.safetensors: the same adapter, for diffusers
        if cfg.precision == "fp32":
            merged = lora.merge_and_remove(copy.deepcopy(unet).cpu())
        else:  # the training copy of the base weights was cast to low precision: merge into the fp32 originals
            merged = load_pipeline(cfg.model, "cpu", torch.float32).unet
            lora.load_lora(merged, lora_path)
            lora.merge_and_remove(merged)
    else:
        merged = unet
    sd = {k: v.detach().float().contiguous().cpu() for k, v in merged.state_dict().items()}
    save_file(sd, os.path.join(tmp, "unet", "diffusion_pytorch_model.safetensors"),
              metadata={"format": "nanoddpo-unet", "base_model": cfg.model})
    with open(os.path.join(tmp, "unet", "config.json"), "w") as f:
        json.dump(merged.config.to_dict(), f, indent=2)
    old = final + f".old-{os.getpid()}"
    if os.path.isdir(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)




# ----------------------------------------------------------------------------------------------------------------
# the run: inputs, directory, logs



def eval_sets(cfg: TrainConfig, task: dict) -> tuple[list[str], list[str], list[str]]:
    """(training prompts, evaluation prompts, held-out prompts) of a task, the two evaluation lists thinned to
    --eval-size prompts and each prompt repeated --eval-seeds (held-out: --heldout-seeds) times (image i of a set
    always has the fixed seed sample_seed(seed, -1, i), so a repeat is a new fixed seed)."""
    prompts = load_prompts(task["prompts"])
    evals = load_prompts(task["eval_prompts"]) if task["eval_prompts"] else prompts
    heldout = load_prompts(task["heldout_prompts"]) if task["heldout_prompts"] else []
    if cfg.eval_size:
        evals, heldout = ([ps[i * len(ps) // cfg.eval_size] for i in range(min(cfg.eval_size, len(ps)))]
                          for ps in (evals, heldout))
    evals = [p for p in evals for _ in range(cfg.eval_seeds)]
    heldout = [p for p in heldout for _ in range(cfg.heldout_seeds)]
    return prompts, evals, heldout


def resume_checkpoint(cfg: TrainConfig, world: int) -> str | None:
    """The checkpoint a --resume continues from (None for a new run), after the checks that it can."""
    if not cfg.resume:
        if os.path.isfile(os.path.join(cfg.out, "config.json")):
            raise ValueError(f"--out {cfg.out} already holds a run; continue it with --resume {cfg.out} or pick "
                             "another --out")
        return None
    ckpt = latest_checkpoint(cfg.out)
    if ckpt is None:
        raise FileNotFoundError(f"--resume {cfg.resume}: no checkpoint in {cfg.resume}/checkpoints (the run "
                                "stopped before its first --save-every); start it again without --resume")
    with open(os.path.join(ckpt, "state.json")) as f:
        saved_world = json.load(f)["world_size"]
    if saved_world != world:  # each process restores its own RNG streams
        raise ValueError(f"--resume: {ckpt} was written by {saved_world} process(es), this run has {world}; "
                         "resume with the same number of processes")
    return ckpt

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


class Run:
    """One training run's directory and logs. Every process holds one (each restores its own RNG streams); only
    rank 0 writes. It owns the objects a checkpoint must capture, so that saving and resuming name them once."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int, *, unet, use_lora: bool, optimizer, tasks: list[Task],
                 grad_scaler, generator: torch.Generator):
        self.cfg, self.rank, self.world, self.master = cfg, rank, world, rank == 0
        self.unet, self.use_lora, self.optimizer = unet, use_lora, optimizer
        # the per-prompt trackers are part of the checkpoint (a single task's as before joint training existed)
        self.tracker = tasks[0].tracker if len(tasks) == 1 else TaskTrackers([task.tracker for task in tasks])
        self.tasks = tasks
        self.grad_scaler, self.generator = grad_scaler, generator
        self.history: list[dict] = []
        self.wandb_run, self.wandb_id = None, None
        self.bad_epochs = 0   # epochs in a row without a usable reward
        self.t_start = time.perf_counter()

    def path(self, *parts: str) -> str:
        return os.path.join(self.cfg.out, *parts)

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
            if not self.cfg.resume:
                write_json(self.path("config.json"), {**dataclasses.asdict(self.cfg), "resume": None})
            # rewrite the log without the epochs after the checkpoint: they are computed again, identically
            atomic_write(self.path("metrics.jsonl"),
                         lambda tmp: open(tmp, "w").writelines(strict_json(r) + "\n" for r in self.history))
            tasks = ", ".join(f"{t.prefix}reward {t.name}" for t in self.tasks)
            print(f"run {self.cfg.out}: {header}, {tasks}, epochs {start_epoch}..{self.cfg.epochs - 1}", flush=True)
            if self.cfg.wandb:
                import wandb
                # wandb makes the id on a new run; it is kept in every checkpoint, so a resume continues that run
                self.wandb_run = wandb.init(project=self.cfg.wandb, name=os.path.basename(os.path.normpath(self.cfg.out)),
                                            id=self.wandb_id, resume="allow", config=dataclasses.asdict(self.cfg),
                                            dir=self.cfg.out)
                self.wandb_id = self.wandb_run.id
        return start_epoch, global_step

    def due(self, every: int, epoch: int) -> bool:
        """Every N epochs, and at the start and the end (0: never)."""
        return every > 0 and (epoch % every == 0 or epoch == self.cfg.epochs)

    def warn(self, message: str) -> None:
        if self.master:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def print_warnings(self, infos: list[dict]) -> None:
        """A reward's warnings (info["warnings"]) of one epoch or evaluation, each distinct line once."""
        for warning in dict.fromkeys(w for info in infos for w in info.get("warnings", [])):
            tqdm.write(f"rank {self.rank}: {warning}", file=sys.stderr)

    def check_first_ratio(self, stats: dict, epoch: int) -> None:
        """DDPO's sanity check: the first micro-step re-scores the rollout with the weights that sampled it, so its
        PPO ratio is 1 up to rounding; off by more than the clip range, the whole update is clipped from the start."""
        if stats["first_ratio_max_dev"] > self.cfg.clip_range:
            self.warn(f"epoch {epoch}: the PPO ratio of the first micro-step is off 1 by "
                      f"{stats['first_ratio_max_dev']:.2g} > --clip-range {self.cfg.clip_range:g}: rollout and update "
                      "scored the same steps differently (precision or batch-size-dependent kernels); the update is "
                      "clipped from the start. Check --precision, or use --precision fp32")

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
        for p in (t.prefix for t in self.tasks):
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
        cfg = self.cfg
        self.warn(f"epoch {row['epoch']}: no image got a finite reward; the update is skipped "
                  f"({self.bad_epochs} of --max-bad-epochs {cfg.max_bad_epochs})")
        self.log(row)
        if self.bad_epochs >= cfg.max_bad_epochs:
            last = latest_checkpoint(cfg.out)
            then = f"the last checkpoint ({last}) is intact: continue with --resume {cfg.out}" if last else \
                "no checkpoint was written yet: start the run again"
            raise SystemExit(f"train.py: error: {self.bad_epochs} epochs in a row without a usable reward: check the "
                             f"reward ({cfg.reward}); {then}")

    def draw_curve(self, extra: list[dict] = ()) -> None:
        what = self.cfg.reward if not self.cfg.task else ", ".join(self.cfg.task)
        image = draw_reward_curve(self.history + list(extra), f"{what} - {self.cfg.out}")
        self.save_image("reward_curve.png", image)

    def save(self, next_epoch: int, global_step: int) -> None:
        """A checkpoint every --save-every epochs and at the end (the next epoch is stored, never derived)."""
        cfg = self.cfg
        if not ((cfg.save_every and next_epoch % cfg.save_every == 0) or next_epoch == cfg.epochs):
            return
        rngs = gather_objects(rng_state(self.generator))
        if self.master:
            save_checkpoint(cfg.out, next_epoch, self.unet, self.use_lora, self.optimizer, self.tracker,
                            self.grad_scaler, rngs, {"next_epoch": next_epoch, "global_step": global_step,
                                                     "world_size": self.world, "wandb_id": self.wandb_id},
                            keep=cfg.keep_checkpoints)

    def finish(self, final: dict) -> None:
        """The final evaluation on the curve, export/ and summary.json; wandb closed."""
        if self.master:
            if final:  # the policy after the last epoch, on the curve next to the others
                self.draw_curve([{"epoch": self.cfg.epochs, **final}])
            export(self.cfg.out, self.unet, self.cfg)
            first, last = (self.history[0], self.history[-1]) if self.history else ({}, {})
            write_json(self.path("summary.json"), {
                "epochs": self.cfg.epochs, "initial_reward_mean": first.get("reward_mean"),
                "initial_reward_std": first.get("reward_std"), "final_reward_mean": last.get("reward_mean"),
                "initial_eval_reward_mean": first.get("eval_reward_mean"),
                "final_eval_reward_mean": final.get("eval_reward_mean"),
                "initial_heldout_reward_mean": first.get("heldout_reward_mean"),
                "final_heldout_reward_mean": final.get("heldout_reward_mean"),
                "initial_eval": {k: v for k, v in first.items() if re.match(r"(task\d+_)?(eval|heldout)_", k)},
                "final_eval": {k: v for k, v in final.items() if re.match(r"(task\d+_)?(eval|heldout)_", k)},
                "minutes": (time.perf_counter() - self.t_start) / 60, "export": self.path("export")})
            if final and self.wandb_run is not None:
                self.wandb_run.log(final, step=self.cfg.epochs)
            print(f"done: {self.path('export')}"
                  + "".join(f", final {t.prefix}eval_reward_mean {final[t.prefix + 'eval_reward_mean']:.4g}"
                            for t in self.tasks if t.prefix + "eval_reward_mean" in final))
        if self.wandb_run is not None:
            self.wandb_run.finish()
