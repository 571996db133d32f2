"""DDPO with the real algorithm (LoRA, CFG, PPO, per-prompt advantages) and the shapes defaults raises the shipped
shapes model's exact reward: counting on two prompts, a relation on one. A file of its own so that the two runs
share no pytest worker with the model's parity tests."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def shapes_run(tmp_path, prompts: str, epochs: int, group_size: int) -> list[dict]:
    """train.py --model shapes with its defaults on `prompts` (one per line), one 64-image batch an epoch, no
    evaluation: the metrics.jsonl rows, one per epoch."""
    path, run = tmp_path / "prompts.txt", tmp_path / "run"
    path.write_text(prompts)
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", "shapes", "--prompts", str(path),
                           "--eval-prompts", str(path), "--heldout-prompts", "", "--epochs", str(epochs),
                           "--eval-every", "0", "--sample-every", "0", "--save-every", "0",
                           "--group-size", str(group_size), "--sample-batches-per-epoch", "1", "--out", str(run)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ddpo_raises_the_exact_reward_on_hard_prompts(tmp_path):
    """`train.py --model shapes` with its defaults (LoRA, CFG 5, PPO, per-prompt advantages), on two counting
    prompts the pretrained model gets partly right, one batch of 64 images per epoch, each prompt's group of 32 once
    an epoch: over epochs 6-11 the count atom (exactly n objects) and the batch reward are above their means over
    epochs 0-2 (measured on this CPU: count atom 0.793 -> 0.853, reward 0.897 -> 0.928)."""
    rows = shapes_run(tmp_path, "three red squares\nfour blue circles\n", epochs=12, group_size=32)
    mean = lambda key, lo, hi: sum(r[key] for r in rows[lo:hi]) / (hi - lo)
    print(f"shapes DDPO on counting prompts: count atom {mean('reward_count_atom', 0, 3):.3f} -> "
          f"{mean('reward_count_atom', 6, 12):.3f}, batch reward {mean('reward_mean', 0, 3):.3f} -> "
          f"{mean('reward_mean', 6, 12):.3f}")
    assert mean("reward_count_atom", 6, 12) >= mean("reward_count_atom", 0, 3) + 0.04
    assert mean("reward_mean", 6, 12) >= mean("reward_mean", 0, 3) + 0.02
    assert all(r["first_ratio_max_dev"] < 6e-3 for r in rows)   # every update starts on-policy


@pytest.mark.slow
def test_ddpo_teaches_a_relation(tmp_path):
    """`train.py --model shapes` with its defaults on one relation prompt, 64 images an epoch for 20 epochs: the
    relation atom (the centroids point the asked way) over epochs 14-19 is above its mean over epochs 0-2, and so is
    the batch reward (measured on this CPU: relation atom 0.32 -> 0.54, reward 0.83 -> 0.88). The pretrained model
    puts the two objects anywhere (atom ~0.25); what makes DDPO move them is LoRA on the ResNet convolutions as well
    as the attention, and leaving out the last two steps, whose log-prob gradients drown the layout signal (with
    attention-only LoRA and every step trained the atom stayed at 0.27 -> 0.29 over 30 epochs: README). This pins
    the run's default seed 42, the best of four measured: with --seed 1, 2, 3 the atom rises less (0.23 -> 0.29,
    0.27 -> 0.32, 0.32 -> 0.28 over the same epochs), so the test guards the path that moved a layout once, as a
    regression check, not a claim that every seed learns it (README)."""
    rows = shapes_run(tmp_path, "a blue circle left of a yellow triangle\n", epochs=20, group_size=64)
    mean = lambda key, lo, hi: sum(r[key] for r in rows[lo:hi]) / (hi - lo)
    start, end = mean("reward_relation_atom", 0, 3), mean("reward_relation_atom", 14, 20)
    print(f"shapes DDPO on a relation prompt: relation atom {start:.3f} -> {end:.3f}, batch reward "
          f"{mean('reward_mean', 0, 3):.3f} -> {mean('reward_mean', 14, 20):.3f}")
    assert end >= start + 0.12
    assert mean("reward_mean", 14, 20) >= mean("reward_mean", 0, 3) + 0.03
