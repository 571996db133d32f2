"""
Sample images from Stable Diffusion, base or DDPO fine-tuned, and write a captioned grid.

Each image is one rollout of the DDIM policy of scheduler.py: x_T ~ N(0, I), then N guided steps
    x_{t'} = μ_θ(x_t, c) + σ_t·z,   ε̂ = ε(x_t, ∅) + w·(ε(x_t, c) − ε(x_t, ∅))   (Ho & Salimans 2022)
with all noise drawn from the image's own seed: column j of the grid uses seed --seed + j for every prompt, at any
--batch-size, so base and fine-tuned (--compare) start from identical noise and differ only by the weights.

    python sample.py --model tiny --prompt "a photo of a cat" --n 4 --out cat.png          # offline, seconds
    python sample.py --prompt "a photo of a cat" --finetuned runs/hps --compare --reward hps --out compare.png

Grid: rows = prompts, columns = samples (two labelled column groups with --compare); each image is captioned with
its seed and, with --reward, its score (grid.py draws it).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from cli import DTYPES, PROMPT_SETS, ArgumentParser, fail, load_prompts
from grid import make_grid, score_label
from rewards import build_reward, options_from_flags, parse_spec, reward_help
from scheduler import DDIMScheduler, SchedulerConfig
from weights import DEFAULT_MODEL, RUN_SETTINGS, load_finetuned, load_pipeline, run_settings, sample_images

DEFAULT_PROMPTS = ["a photo of a cat", "a watercolor painting of a lighthouse at dawn"]

# -----------------------------------------------------------------------------------------------------------
# sampling


def read_prompts(prompts: list[str] | None, prompt_set: str | None) -> list[str]:
    """The --prompt ones, then --prompts NAME (a built-in set or a file, read as train.py reads it)."""
    out = list(prompts or []) + (load_prompts(prompt_set) if prompt_set else [])
    return out or list(DEFAULT_PROMPTS)


def apply_run_settings(args: argparse.Namespace) -> None:
    """Fill the sampling flags left unset from the --finetuned run directory's config.json (the run's model,
    steps, guidance, eta, size and negative prompt), then from RUN_SETTINGS."""
    for name, value in run_settings(args.finetuned).items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="sample.py", description="Sample a captioned image grid from SD (base or DDPO fine-tuned).",
                       epilog=reward_help())
    g = p.add_argument_group("model")
    g.add_argument("--model", help="SD 1.x/2.x or SDXL: hub id, diffusers folder or .safetensors/.ckpt file; 'shapes' "
                   "(our pretrained toy); 'tiny' or 'tiny-sdxl' (random) (default: the --finetuned run's model, else "
                   f"{DEFAULT_MODEL})")
    g.add_argument("--finetuned", metavar="CKPT",
                   help="trainer output to apply: run dir, LoRA .safetensors, or full UNet folder/file")
    g.add_argument("--compare", action="store_true",
                   help="with --finetuned: base and fine-tuned side by side, identical seeds")
    g.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="model dtype; auto = fp16 on CUDA, fp32 on CPU")
    g.add_argument("--device", default="auto", help="torch device; auto = cuda if available, else cpu")
    g.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                   help="override the model's (single-file SD 2.1-768 needs v_prediction)")
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt", action="append",
                   help="a prompt (repeat the flag for several) (default: two built-in prompts)")
    g.add_argument("--prompts", metavar="NAME",
                   help=f"a built-in set ({', '.join(PROMPT_SETS)}) or a text file, one prompt per line ('#' lines "
                   "skipped), added after the --prompt ones")
    # the sampling settings default to the --finetuned run's own (its config.json): its policy is what is sampled
    g = p.add_argument_group("sampling (defaults: the --finetuned run's settings)")
    g.add_argument("--n", type=int, default=4, help="images per prompt (grid columns)")
    g.add_argument("--seed", type=int, default=0, help="column j uses seed SEED+j, for every prompt and model")
    g.add_argument("--steps", type=int, help=f"DDIM steps (default: the run's, else {RUN_SETTINGS['steps']})")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale, 1 = none (default: the run's, "
                   f"else {RUN_SETTINGS['guidance']})")
    g.add_argument("--eta", type=float, help="DDIM eta: 1 = DDPO's stochastic policy, 0 = deterministic DDIM "
                   f"(default: the run's, else {RUN_SETTINGS['eta']})")
    g.add_argument("--size", type=int, help="image size in pixels (default: the run's, else the model's native size)")
    g.add_argument("--negative-prompt", help="negative prompt, the unconditional branch of CFG (default: the run's, "
                   "else empty)")
    g.add_argument("--batch-size", type=int, default=8, help="images per sampling batch (no effect on the images)")
    g = p.add_argument_group("reward")
    g.add_argument("--reward", metavar="SPEC", help="score every image, print and caption the scores: a reward spec, "
                   "e.g. 'hps', 'jpeg-compressibility', 'hps=1,aesthetic=0.05' (names below)")
    g.add_argument("--reward-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a reward option below, repeatable (e.g. precision=fp32)")
    g.add_argument("--hps-checkpoint", help="local HPSv2 checkpoint (default: hub xswu/HPSv2)")
    g.add_argument("--aesthetic-checkpoint", help="local LAION aesthetic MLP .pth (default: hub)")
    g.add_argument("--clip-path", help="CLIP ViT-L/14 folder or hub id for aesthetic/diversity")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="samples.png", help="output PNG path for the grid")
    args = p.parse_args(argv)
    try:
        apply_run_settings(args)
    except ValueError as e:
        p.error(str(e))
    for name in ("n", "steps", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0.0 <= args.eta <= 1.0:
        p.error(f"--eta must be in [0, 1], got {args.eta}")
    if args.compare and not args.finetuned:
        p.error("--compare needs --finetuned CKPT (the model to compare the base with)")
    return args


def main(argv=None) -> dict:
    """Run the script; returns {variant label: (images (B,3,H,W) CPU, scores list or None)}, prompt-major."""
    args = parse_args(argv)
    t_start = time.time()
    try:  # bad input (prompts, reward, model) fails here with one line, the cheap checks before the model loads
        prompts = read_prompts(args.prompt, args.prompts)
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(auto if args.device == "auto" else args.device)
        dtype = DTYPES.get(args.dtype, torch.float16 if device.type == "cuda" else torch.float32)  # "auto"
        reward_options = options_from_flags(args.reward_option, hps_checkpoint=args.hps_checkpoint,
                                            aesthetic_checkpoint=args.aesthetic_checkpoint, clip_path=args.clip_path)
        if args.reward:
            parse_spec(args.reward)
        if args.finetuned and not os.path.exists(os.path.expanduser(args.finetuned)):
            raise FileNotFoundError(f"--finetuned {args.finetuned}: no such file or folder; pass a run directory, "
                                    "its export/lora.safetensors or its export/unet/")
        pipe = load_pipeline(args.model, device, dtype, prediction_type=args.prediction_type)
        reward = build_reward(args.reward, device=device, **reward_options) if args.reward else None
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        fail("sample.py", str(e))
    scheduler = DDIMScheduler(SchedulerConfig.from_dict(pipe.scheduler_config), args.steps, device)

    variants = [("base", None), ("fine-tuned", args.finetuned)] if args.compare else \
               [("fine-tuned" if args.finetuned else "base", args.finetuned)]
    jobs = [(p, args.seed + j) for p in prompts for j in range(args.n)]  # prompt-major: the grid's row order
    results = {}
    for label, ckpt in variants:
        if ckpt:
            try:
                load_finetuned(pipe, ckpt)
            except (ValueError, FileNotFoundError, RuntimeError) as e:
                fail("sample.py", str(e))
        images = sample_images(pipe, scheduler, [p for p, _ in jobs], [s for _, s in jobs],
                          negative_prompt=args.negative_prompt, guidance=args.guidance, eta=args.eta,
                          size=args.size, batch_size=args.batch_size, desc=label)
        scores = reward(images.to(device), [p for p, _ in jobs])[0].tolist() if reward else None
        results[label] = (images, scores)

    # rows = prompts; per row, each variant's n columns
    cells, captions = [], []
    for i, prompt in enumerate(prompts):
        for label, _ in variants:
            images, scores = results[label]
            for j in range(args.n):
                k = i * args.n + j
                cells.append(images[k])
                caption = f"seed {jobs[k][1]}" + (f" · {args.reward} {score_label(scores[k])}" if reward else "")
                captions.append(caption)
                if reward:
                    print(f"{label}\tseed {jobs[k][1]}\t{args.reward}={scores[k]:.6g}\t{prompt}")
    if reward:
        for label, _ in variants:
            print(f"{label}: mean {args.reward} = {sum(results[label][1]) / len(jobs):.6g} over {len(jobs)} images")
    col_labels = [label for label, _ in variants for _ in range(args.n)] if args.compare else None
    grid = make_grid(cells, ncols=len(variants) * args.n, captions=captions, row_labels=prompts, col_labels=col_labels)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    print(f"wrote {out} ({len(prompts)} prompts x {len(variants) * args.n} images, {grid.width}x{grid.height} px) "
          f"in {time.time() - t_start:.1f} s")
    return results


if __name__ == "__main__":
    main()
