"""pretrain_data.py: Zhang et al.'s pretraining-loss regulariser (L = J + beta * L_pre): its sources, its
deterministic batches, and train.py with --pretrain-coef (logged, resumed exactly)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import pretrain_data
from scheduler import DDIMScheduler, SchedulerConfig, denoising_loss
from weights import load_pipeline

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--model", "tiny", "--reward", "jpeg-compressibility", "--device", "cpu", "--steps", "4", "--guidance", "3",
        "--sample-batch-size", "4", "--sample-batches-per-epoch", "1", "--train-batch-size", "8",
        "--optimizer-steps-per-epoch", "2", "--eval-every", "0", "--sample-every", "0", "--seed", "3",
        "--pretrain-data", "shapes", "--pretrain-coef", "0.5", "--pretrain-batch-size", "2"]


TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")


def train(*args: str, launcher=(sys.executable,)) -> None:
    out = subprocess.run([*launcher, str(ROOT / "train.py"), *args], cwd=ROOT, capture_output=True, text=True,
                         env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_sources_and_their_errors(tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (48, 32), colour).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {colour} picture\n")
    pairs = pretrain_data.read_pairs(str(folder))
    assert [c for _, c in pairs] == ["a red picture", "a blue picture"]
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"path": "pairs/1.png", "caption": "blue"}) + "\n\n")
    assert pretrain_data.read_pairs(str(tmp_path / "pairs.jsonl")) == [(folder / "1.png", "blue")]
    x, _ = pretrain_data.load_image(folder / "0.png", 16)   # shortest side to 16, centre crop, [-1, 1]
    assert x.shape == (3, 16, 16) and torch.allclose(x[0], torch.ones(16, 16)) and torch.allclose(x[2], -torch.ones(16, 16))
    img, caption = pretrain_data.load_image(7, 32)   # the shapes world's item 7 with its own caption
    assert caption and img.shape == (3, 32, 32)
    assert len(pretrain_data.read_pairs("shapes")) == pretrain_data.SHAPES_PRETRAIN_SIZE
    Image.new("RGB", (8, 8)).save(folder / "2.png")
    for source, words in ((folder, "without a caption file"), (tmp_path / "nope", "not 'shapes', a folder"),
                          (tmp_path / "pairs.jsonl", None)):
        if words is None:
            (tmp_path / "pairs.jsonl").write_text('{"path": "x.png"}\n')
            words = "line 1 is not"
        with pytest.raises((ValueError, FileNotFoundError), match=words) as e:
            pretrain_data.read_pairs(str(source))
        assert "\n" not in str(e.value)


def test_batches_are_a_function_of_the_step_and_the_loss_is_the_eps_mse():
    pipe = load_pipeline("shapes")
    sched = DDIMScheduler(SchedulerConfig.from_dict(pipe.scheduler_config), 20)
    loss = pretrain_data.PretrainLoss(pretrain_data.read_pairs("shapes"), pipe, sched, 0.5, 3, 32, seed=1, rank=0)
    a, b, c = loss.batch(10), loss.batch(10), loss.batch(11)
    assert all(torch.equal(u, v) for u, v in zip(a, b))          # resume-exact: no sampler state to save
    assert not torch.equal(a[0], c[0]) or not torch.equal(a[2], c[2])
    other_rank = pretrain_data.PretrainLoss(pretrain_data.read_pairs("shapes"), pipe, sched, 0.5, 3, 32, seed=1, rank=1).batch(10)
    assert not torch.equal(a[3], other_rank[3])                  # each rank its own pairs and noise
    scaled, raw = loss(pipe.unet, 10)
    want = denoising_loss(pipe.unet, sched, *a)
    assert torch.allclose(raw, want) and torch.allclose(scaled, 0.5 * want)
    print(f"L_pre of the shipped shapes model on a batch of 3: {float(raw):.4f}")
    assert 0 < float(raw) < 1   # a trained model predicts the noise far better than chance (loss ~1)


def test_train_logs_it_and_resumes_exactly_under_ddp(tmp_path):
    """--pretrain-coef with two gloo processes (each rank its own pretraining pairs, the gradients all-reduced with
    the step's last micro-batch): pretrain_loss in metrics.jsonl every epoch; a run stopped after epoch 1 and
    resumed equals the uninterrupted one (the batches follow the global optimizer step and the rank)."""
    train(*FAST, "--epochs", "2", "--save-every", "1", "--out", str(tmp_path / "full"), launcher=TORCHRUN)
    train(*FAST, "--epochs", "1", "--save-every", "1", "--out", str(tmp_path / "cut"), launcher=TORCHRUN)
    train("--resume", str(tmp_path / "cut"), "--epochs", "2", launcher=TORCHRUN)
    rows = [[{k: v for k, v in json.loads(line).items() if not k.startswith(("time_", "images_per_s"))}
             for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("full", "cut")]
    assert rows[0] == rows[1] and all(r["pretrain_loss"] > 0 for r in rows[0])
    a = load_file(tmp_path / "full" / "export" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "cut" / "export" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_flags_go_together(tmp_path):
    import train
    for argv, words in ((["--pretrain-coef", "1"], "go together"), (["--pretrain-data", "shapes"], "go together"),
                        (["--pretrain-data", str(tmp_path / "none"), "--pretrain-coef", "1"], "not 'shapes'")):
        with pytest.raises(SystemExit) as e:
            train.main([*FAST[:-6], *argv, "--out", str(tmp_path / "r")])
        assert words in str(e.value.code) and "\n" not in str(e.value.code)
