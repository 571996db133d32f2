"""
The learners' table: what each DDPO design choice does, measured on the shapes world in a few CPU minutes a row.

Every row is one `train.py --model shapes` run that changes one thing against the first (the defaults: DDPO-IS with
PPO clipping, LoRA, per-prompt advantages, no KL, 20 DDIM steps of which the last two are not trained); all rows
share the seed, the prompts and the evaluation seeds, so their differences are the design choice (and sampling
noise: one seed per row). Each row reports the exact shapes reward on the training prompts and on the held-out
prompts at the start and the end (fixed seeds), the mean reward of the training batches (fresh images every epoch)
at epoch 0, drawn by the base model, and over the last two epochs, and its wall time.

    python ablations.py                         # all rows, ~2.5 min each on 2 CPU cores -> runs/ablations/table.md
    python ablations.py --rows default sf       # some rows
    python ablations.py --epochs 6 --out /tmp/a # a shorter table
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cli import ArgumentParser

ROOT = Path(__file__).resolve().parent
# name -> (what changes, train.py flags)
ROWS = {
    "default": ("DDPO-IS (PPO clip), LoRA r=4 on attention + ResNet convs lr 3e-3, per-prompt tracker, prompts drawn "
                "in balanced passes, KL 0, 20 steps, the last 2 untrained", []),
    "sf": ("DDPO-SF: score function, one optimizer step per epoch", ["--loss", "sf", "--optimizer-steps-per-epoch", "1"]),
    "full": ("full fine-tuning of the UNet instead of LoRA (lr 3e-4)", ["--lora-rank", "0", "--lr", "3e-4"]),
    "grpo": ("GRPO groups: advantages within each epoch's 16 images of a prompt", ["--advantage", "group"]),
    "kl": ("KL to the initial policy, coefficient 0.1", ["--kl-coef", "0.1"]),
    "steps10": ("10 DDIM steps instead of 20", ["--steps", "10"]),
    "lr3e-4": ("SD's LoRA learning rate 3e-4", ["--lr", "3e-4"]),
    "attn": ("LoRA on the attention only (SD's usual targets)", ["--lora-targets", "to_q,to_k,to_v,to_out.0"]),
    "allsteps": ("every step trained, the last two (sigma 0.04, 0.02) included", ["--skip-last-steps", "0"]),
    "iid": ("prompts drawn i.i.d. (ddpo-pytorch) instead of in balanced passes", ["--prompt-draw", "random"]),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="ablations.py", description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="ROW",
                   help=f"rows to run, in this order: {', '.join(ROWS)}")
    p.add_argument("--epochs", type=int, default=8, help="epochs per row")
    p.add_argument("--out", default="runs/ablations", help="one run directory per row, table.md and table.json")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train.py flags for every row")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.exit(2, "ablations.py: error: --epochs must be >= 1\n")
    return args


def run_row(name: str, flags: list[str], args) -> dict:
    run = Path(args.out) / name
    if (run / "summary.json").exists():   # finished earlier: keep it (delete the folder to run it again)
        return json.loads((run / "row.json").read_text())
    cmd = [sys.executable, str(ROOT / "train.py"), "--model", "shapes", "--epochs", str(args.epochs),
           "--eval-every", str(args.epochs), "--sample-every", str(args.epochs), "--out", str(run), *flags, *args.extra]
    if (run / "config.json").exists():
        cmd = [sys.executable, str(ROOT / "train.py"), "--resume", str(run)]
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    summary = json.loads((run / "summary.json").read_text())
    batches = [r["reward_mean"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if "reward_mean" in r]
    row = {"row": name, "change": ROWS[name][0], "wall_s": time.perf_counter() - t0,
           "train_start": summary["initial_eval_reward_mean"], "train_end": summary["final_eval_reward_mean"],
           "heldout_start": summary["initial_heldout_reward_mean"], "heldout_end": summary["final_heldout_reward_mean"],
           # fresh images every epoch: epoch 0 is the base model, the last two epochs the trained one
           "batch_start": batches[0], "batch_end": sum(batches[-2:]) / len(batches[-2:])}
    (run / "row.json").write_text(json.dumps(row, indent=2))
    return row


def table(rows: list[dict], epochs: int) -> str:
    out = [f"| row | change | train prompts: start → end | batches: epoch 0 → last two | held-out prompts: start → end "
           f"| wall time ({epochs} epochs) |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['row']} | {r['change']} | {r['train_start']:.3f} → **{r['train_end']:.3f}** | "
                   f"{r['batch_start']:.3f} → {r['batch_end']:.3f} | "
                   f"{r['heldout_start']:.3f} → **{r['heldout_end']:.3f}** | {r['wall_s'] / 60:.1f} min |")
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows = [run_row(name, ROWS[name][1], args) for name in args.rows]
    (Path(args.out) / "table.json").write_text(json.dumps(rows, indent=2))
    text = table(rows, args.epochs)
    (Path(args.out) / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
