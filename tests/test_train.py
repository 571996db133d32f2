"""train.py end to end on the tiny model: the first update is exactly on-policy, DDP equals one process, a kill -9 +
--resume equals an uninterrupted run, the export loads in diffusers, bad input gets one line, and the policy learns.

The runs are subprocesses (the real CLI), one CPU thread each; independent runs are started together.
"""
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cli
import grid
import lora
import train
import weights
from lora import load_lora
from config import parse_args
from run import cpu_warning, latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# small and fast, yet every part of an epoch runs: 4 samples x 4 steps, per-prompt advantages, one optimizer step
FAST = ["--model", "tiny", "--reward", "jpeg-compressibility", "--device", "cpu", "--steps", "4", "--guidance", "3",
        "--sample-batch-size", "4", "--sample-batches-per-epoch", "1", "--train-batch-size", "8",
        "--optimizer-steps-per-epoch", "1", "--eval-every", "0", "--sample-every", "0", "--seed", "3"]
TIMING = ("time_", "images_per_s")


def env(threads: int = 1) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
                PYTHONUNBUFFERED="1", GLOO_SOCKET_IFNAME="lo")


def start(*args: str, launcher=(), threads: int = 1) -> subprocess.Popen:
    return subprocess.Popen([*launcher, str(ROOT / "train.py"), *args], cwd=ROOT, env=env(threads),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"train.py failed ({proc.returncode}):\n{err[-4000:]}"
    return out


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.split("_", 1)[-1].startswith(TIMING) and not k.startswith(TIMING)}
            for r in rows]


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """One epoch with LoRA and a KL term, as one process (4 samples) and as two gloo processes (2 samples each),
    started together. Rollout and training both call the UNet on one sample (a CFG batch of 2): the same kernels,
    so re-scoring reproduces the rollout's log-probs bit for bit (DanceGRPO's advice for checking the ratio)."""
    root = tmp_path_factory.mktemp("lora")
    flags = [*FAST, "--lora-rank", "4", "--lr", "1e-3", "--kl-coef", "0.1", "--epochs", "1",
             "--sample-batch-size", "1", "--train-batch-size", "1",
             "--eval-every", "1", "--sample-every", "1", "--eval-size", "3", "--grid-size", "2"]
    one = start(*flags, "--sample-batches-per-epoch", "4", "--out", str(root / "one"), launcher=(sys.executable,))
    two = start(*flags, "--sample-batches-per-epoch", "2", "--out", str(root / "two"),
                launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"))
    finish(one)
    finish(two)
    return root / "one", root / "two"


def test_run_directory(lora_runs):
    run = lora_runs[0]
    config = json.loads((run / "config.json").read_text())
    assert config["lora_rank"] == 4 and config["kl_coef"] == 0.1 and config["steps"] == 4
    (row,) = metrics(run)
    for key in ("epoch", "reward_mean", "reward_std", "reward_min", "reward_max", "time_rollout", "time_reward",
                "time_update", "time_total", "images_per_s", "approx_kl", "clipfrac", "loss", "lr", "grad_norm",
                "first_ratio_max_dev", "kl"):
        assert key in row, key
    assert row["reward_min"] <= row["reward_mean"] <= row["reward_max"] < 0  # minus the JPEG size in kB
    ckpt = run / "checkpoints" / "epoch_0001"
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "optimizer.pt", "state.pt", "state.json"}
    assert json.loads((ckpt / "state.json").read_text())["next_epoch"] == 1
    for name in ("optimizer.pt", "state.pt"):  # tensors and plain containers only: no pickled code to run
        torch.load(ckpt / name, map_location="cpu", weights_only=True)
    assert "written by 1 process(es), this run has 2" in cli_error(["--resume", str(run)], env={"WORLD_SIZE": "2"})
    assert (run / "reward_curve.png").stat().st_size > 1000
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["epoch_0000.png", "epoch_0001.png"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["initial_eval_reward_mean"] == row["eval_reward_mean"] and summary["final_eval_reward_mean"] < 0
    assert (run / "export" / "lora.safetensors").is_file()
    # diffusers' copy: the same adapter, the scale alpha / rank folded into B (tests/test_lora.py loads it)
    ours, theirs = load_file(run / "export" / "lora.safetensors"), load_file(run / "export" / lora.DIFFUSERS_LORA_NAME)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)  # alpha = rank here
    assert not list(run.rglob("*.tmp-*")), "temporary files left behind"


def test_first_step_is_on_policy_and_kl_is_zero_at_init(lora_runs):
    """fp32: the update re-scores the rollout with the weights that sampled it, so the first micro-step's ratio is 1,
    and LoRA starts at the base model (B = 0), so the KL to the reference is 0."""
    (row,) = metrics(lora_runs[0])
    assert row["first_ratio_max_dev"] <= 1e-6
    assert row["kl"] == 0.0
    assert row["grad_norm"] > 0 and row["clipfrac"] == 0.0


def test_two_gloo_processes_equal_one_process(lora_runs):
    one, two = lora_runs
    r1, r2 = metrics(one)[0], metrics(two)[0]
    # the same global batch and noise, and the same gradient (DDP averages the two halves' means)
    for k in ("reward_mean", "reward_std", "grad_norm", "eval_reward_mean"):  # (the loss is -mean(A) = 0 +- rounding)
        assert r1[k] == pytest.approx(r2[k], rel=1e-5, abs=1e-9), k
    base = load_file(one / "export" / "lora.safetensors")
    ddp = load_file(two / "export" / "lora.safetensors")
    assert base.keys() == ddp.keys()
    moved = max((v.abs().max().item() for k, v in base.items() if "lora_B" in k))
    assert moved > 1e-4, "the update did not move the adapters, the comparison would be empty"
    # Adam's first step is ~lr * sign(g): gradient entries as small as its eps (1e-8) may round either way, so the
    # weights agree to 1% of lr (1e-3), far below the step itself
    for k in base:
        torch.testing.assert_close(ddp[k], base[k], rtol=0, atol=1e-5, msg=k)


def test_export_loads_in_diffusers_and_matches(lora_runs):
    from diffusers import UNet2DConditionModel as DiffusersUNet
    run = lora_runs[0]
    ref = DiffusersUNet.from_pretrained(run / "export" / "unet").eval()
    pipe = weights.load_pipeline("tiny")
    base = pipe.unet.state_dict()
    load_lora(pipe.unet, run / "export" / "lora.safetensors")
    merged = load_file(run / "export" / "unet" / "diffusion_pytorch_model.safetensors")
    assert max((merged[k] - base[k]).abs().max().item() for k in base) > 1e-5, "export equals the base model"
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([981, 261])
    with torch.no_grad():
        ours, theirs = pipe.unet(x, t, c), ref(x, t, encoder_hidden_states=c).sample
    assert ((ours - theirs).norm() / theirs.norm()).item() <= 1e-5


def test_kill_and_resume_equals_uninterrupted_run(tmp_path):
    """kill -9 during epoch 3 (after the epoch-2 checkpoint, with epoch 2 already logged), then --resume: the
    metrics and the final weights equal an uninterrupted run's. Two prompts and a per-prompt tracker that is in use
    from the second epoch on, so its restored state matters. The uninterrupted run scores rewards in a thread, the
    killed one synchronously: the async path gives the same numbers."""
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    flags = [*FAST, "--steps", "6", "--epochs", "4", "--save-every", "2", "--prompts", str(tmp_path / "prompts.txt"),
             "--tracker-min-count", "2", "--tracker-buffer", "6", "--eval-every", "1", "--eval-size", "2"]
    full = start(*flags, "--out", str(tmp_path / "full"), launcher=(sys.executable,))
    run = tmp_path / "killed"
    killed = start(*flags, "--no-async-reward", "--out", str(run), launcher=(sys.executable,))
    log = run / "metrics.jsonl"
    deadline = time.time() + 240
    while not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        assert killed.poll() is None and time.time() < deadline, "the run to kill ended or hung before epoch 3"
        time.sleep(0.02)
    killed.kill()  # SIGKILL: no cleanup, no final checkpoint
    killed.communicate()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["epoch_0002"]
    assert not (run / "export").exists()
    finish(start("--resume", str(run), "--no-async-reward", launcher=(sys.executable,)))
    finish(full)
    assert [r["epoch"] for r in metrics(run)] == [0, 1, 2, 3]
    assert without_timing(metrics(run)) == without_timing(metrics(tmp_path / "full"))
    assert all("eval_reward_mean" in r for r in metrics(run))
    a = load_file(run / "export" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "full" / "export" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_wandb_offline_run_killed_and_resumed_continues_the_same_wandb_run(tmp_path):
    """--wandb with WANDB_MODE=offline (no account, no network): a run is killed after its first checkpoint, and its
    --resume logs to the same wandb run (the id wandb made is kept in every checkpoint). wandb 0.31 removed
    wandb.util.generate_id, which train.py used to call: the id now comes from wandb.init itself."""
    pytest.importorskip("wandb")
    run = tmp_path / "w"
    flags = [*FAST, "--epochs", "3", "--save-every", "1", "--wandb", "nanoddpo-test", "--out", str(run)]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *flags], cwd=ROOT, text=True,
                            env={**env(), "WANDB_MODE": "offline", "WANDB_SILENT": "true"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (run / "checkpoints" / "epoch_0001").is_dir():
        assert proc.poll() is None, f"the run ended before its first checkpoint:\n{proc.communicate()[1][-3000:]}"
        assert time.time() < deadline, "no checkpoint within 240 s"
        time.sleep(0.05)
    proc.kill()
    proc.communicate()
    first_id = json.loads((run / "checkpoints" / "epoch_0001" / "state.json").read_text())["wandb_id"]
    assert isinstance(first_id, str) and first_id
    resumed = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", str(run)], cwd=ROOT, text=True,
                             env={**env(), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}, capture_output=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run / "checkpoints" / "epoch_0003" / "state.json").read_text())["wandb_id"] == first_id
    offline = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(name.endswith(f"-{first_id}") for name in offline), offline


def test_fp16_loss_scaling_resumes_exactly(tmp_path):
    """--precision fp16 trains with a GradScaler (CPU autocast has fp16): its state is in state.pt (weights_only
    loadable) and restored by --resume, so 1 epoch + resume to 2 equals 2 epochs (the growth counter counts both)."""
    flags = [*FAST, "--precision", "fp16", "--save-every", "1"]
    full = start(*flags, "--epochs", "2", "--out", str(tmp_path / "full"), launcher=(sys.executable,))
    half = start(*flags, "--epochs", "1", "--out", str(tmp_path / "half"), launcher=(sys.executable,))
    finish(half)
    finish(start("--resume", str(tmp_path / "half"), "--epochs", "2", launcher=(sys.executable,)))
    finish(full)
    rows = metrics(tmp_path / "half")
    assert without_timing(rows) == without_timing(metrics(tmp_path / "full"))
    assert [r["skipped_steps"] for r in rows] == [0, 0] and all(r["grad_norm"] > 0 for r in rows)
    for run in ("half", "full"):
        state = torch.load(tmp_path / run / "checkpoints" / "epoch_0002" / "state.pt", weights_only=True)
        assert state["grad_scaler"]["_growth_tracker"] == 2 and state["grad_scaler"]["scale"] == 2.0**16


# ---------------------------------------------------------------------------------------------------------------
# bad input: one line, naming the problem


def cli_error(argv: list[str], env: dict | None = None) -> str:
    with pytest.raises(SystemExit) as e, pytest.MonkeyPatch.context() as mp:
        for k, v in (env or {}).items():
            mp.setenv(k, v)
        train.main(argv)
    msg = str(e.value.code)
    assert msg.startswith("train.py: error: ") and "\n" not in msg, msg
    return msg


def test_cli_errors(tmp_path):
    out = ["--out", str(tmp_path / "run")]
    assert "unknown reward 'nope'" in cli_error([*FAST, *out, "--reward", "nope"])
    assert "no such file or folder" in cli_error([*FAST, *out, "--model", str(tmp_path / "no-model")])
    assert "neither a built-in set" in cli_error([*FAST, *out, "--prompts", str(tmp_path / "missing.txt")])
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert "has no prompts" in cli_error([*FAST, *out, "--prompts", str(tmp_path / "empty.txt")])
    assert "--group-size 3 must divide the 4 samples" in cli_error([*FAST, *out, "--group-size", "3"])
    assert "--advantage group needs --group-size >= 2" in cli_error([*FAST, *out, "--advantage", "group"])
    assert "--shuffle-advantages permutes within each prompt's group" in cli_error([*FAST, *out,
                                                                                    "--shuffle-advantages"])
    assert "exceeds the 16" in cli_error([*FAST, *out, "--optimizer-steps-per-epoch", "17"])
    assert "on-policy" in cli_error([*FAST, *out, "--loss", "sf", "--optimizer-steps-per-epoch", "2"])
    assert "trains no step" in cli_error([*FAST, *out, "--timestep-fraction", "0.1"])
    assert "KEY=VALUE" in cli_error([*FAST, *out, "--reward-option", "precision"])
    assert "scores each prompt's group of images" in cli_error([*FAST, *out, "--reward", "fairness"])
    assert "scores each prompt's group of images" in cli_error([*FAST, *out, "--reward", "diversity", "--group-size",
                                                                  "4", "--sample-batch-size", "2",
                                                                  "--sample-batches-per-epoch", "2"])
    if importlib.util.find_spec("wandb") is None:
        assert "wandb package is not installed" in cli_error([*FAST, *out, "--wandb", "proj"])
    assert "no config.json" in cli_error(["--resume", str(tmp_path)])
    # a run directory stopped before its first checkpoint
    run = tmp_path / "early"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(parse_args([*FAST, "--out", str(run)]))))
    assert "no checkpoint" in cli_error(["--resume", str(run)])
    assert "--lr cannot change in a resumed run" in cli_error(["--resume", str(run), "--lr", "1"])
    assert "already holds a run" in cli_error([*FAST, "--out", str(run)])


def test_cli_error_is_one_line_on_stderr(tmp_path):
    proc = start(*FAST, "--prompts", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "r"),
                 launcher=(sys.executable,))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert err.strip().splitlines() == [f"train.py: error: prompts: '{tmp_path / 'nope.txt'}' is neither a built-in "
                                        "set (simple_animals, imagenet_animals, shapes, shapes-hard, shapes-train, shapes-heldout) nor a file; pass one of those or a "
                                        "text file with one prompt per line"]


# ---------------------------------------------------------------------------------------------------------------
# helpers


def test_prompt_sets_and_epoch_plan():
    animals = cli.load_prompts("imagenet_animals")
    assert len(animals) == 398 and animals[0] == "tench" and animals[-1] == "puffer"
    assert len(cli.load_prompts("simple_animals")) == 45
    plan = train.epoch_prompts(animals, 12, 4, seed=1, epoch=5)
    assert len(plan) == 12 and all(len(set(plan[i:i + 4])) == 1 for i in range(0, 12, 4))  # groups are contiguous
    assert plan == train.epoch_prompts(animals, 12, 4, seed=1, epoch=5) != train.epoch_prompts(animals, 12, 4, 1, 6)
    # balanced: shuffled passes, so every prompt equally often; with as many groups as prompts, each once an epoch
    for e in range(3):
        plan = train.epoch_prompts(animals[:6], 12, 2, seed=1, epoch=e, balanced=True)
        assert sorted(plan[::2]) == sorted(animals[:6]) and plan == train.epoch_prompts(animals[:6], 12, 2, 1, e, True)
    runs = [p for e in range(5) for p in train.epoch_prompts(animals[:6], 8, 2, seed=1, epoch=e, balanced=True)[::2]]
    assert runs[:6] != runs[6:12] and all(runs[i:i + 6].count(p) == 1 for i in (0, 6, 12) for p in animals[:6])
    seeds = {train.sample_seed(s, e, i) for s in (0, 1) for e in (-1, 0, 1) for i in range(100)}
    assert len(seeds) == 600


def test_reward_curve(tmp_path):
    history = [{"epoch": e, "reward_mean": -3 + 0.1 * e, "reward_std": 0.05} for e in range(5)]
    history[0]["eval_reward_mean"] = -3.1
    history[4]["eval_reward_mean"] = -2.5
    grid.draw_reward_curve(history, "test").save(tmp_path / "c.png")
    from PIL import Image
    img = Image.open(tmp_path / "c.png")
    assert img.size == (900, 420)   # one panel: no categories
    # the mean line is drawn in blue and the evaluation points in orange
    colors = {c for _, c in img.getcolors(1 << 20)}
    assert (30, 90, 200) in colors and (230, 120, 20) in colors
    # a reward with categories (shapes) adds a panel per evaluation set; held-out points are green
    for r in history:
        r.update(eval_reward_single=0.9, eval_reward_count=0.3, heldout_reward_mean=0.4, heldout_reward_two=0.5)
    grid.draw_reward_curve(history, "test").save(tmp_path / "c.png")
    img = Image.open(tmp_path / "c.png")
    assert img.size == (900, 3 * 420) and (40, 150, 60) in {c for _, c in img.getcolors(1 << 20)}
    for lo, hi in ((0.13, 0.87), (-3.62, -2.89), (0.0, 1e-3), (5.0, 5.0)):
        ticks = grid.nice_ticks(lo, hi)
        steps = {round(b - a, 12) for a, b in zip(ticks, ticks[1:])}
        assert ticks[0] <= lo and ticks[-1] >= hi and len(steps) == 1 and 3 <= len(ticks) <= 12, (lo, hi, ticks)
        assert f"{steps.pop():.0e}"[0] in "125"   # a round step: 1, 2 or 5 times a power of ten


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_model_learns_jpeg_compressibility(tmp_path):
    """The CPU quickstart, `train.py --model tiny --reward jpeg-compressibility` with the tiny defaults (full UNet,
    lr 5e-3, 10 DDIM steps, no guidance, 32 samples an epoch), for 10 of its 20 epochs: the mean reward rises by more
    than 3 initial standard deviations (its time is in the README, not asserted: the machines are shared)."""
    finish(start("--model", "tiny", "--reward", "jpeg-compressibility", "--device", "cpu", "--epochs", "10",
                 "--out", str(tmp_path / "run"), launcher=(sys.executable,), threads=2), timeout=600)
    rows = metrics(tmp_path / "run")
    assert len(rows) == 10
    start_mean, start_std = rows[0]["reward_mean"], rows[0]["reward_std"]
    end_mean = sum(r["reward_mean"] for r in rows[-2:]) / 2
    print(f"reward {start_mean:.3f} +- {start_std:.3f} -> {end_mean:.3f} ({(end_mean - start_mean) / start_std:.1f} std)")
    assert end_mean - start_mean >= 3 * start_std


def test_latest_checkpoint_is_by_epoch_number_and_grid_size_zero_runs(tmp_path):
    for name in ("epoch_9999", "epoch_10000", "epoch_0005.tmp-123"):  # :04d names stop sorting as strings at 10000
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert latest_checkpoint(str(tmp_path)).endswith("epoch_10000")
    run = tmp_path / "nogrid"  # evaluation with no grid images: scores only, no sample grid
    finish(start(*FAST, "--epochs", "3", "--eval-every", "1", "--sample-every", "1", "--eval-size", "2",
                 "--grid-size", "0", "--save-every", "1", "--keep-checkpoints", "2", "--out", str(run),
                 launcher=(sys.executable,)))
    assert "eval_reward_mean" in metrics(run)[0] and not list((run / "samples").glob("*.png"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_0002", "epoch_0003"]  # --keep 2


def test_unreachable_reward_stops_in_one_line_with_strict_json(tmp_path):
    """A remote scorer that is down from the first epoch: every epoch is logged (reward null, never NaN: the file
    stays strict JSON), no update runs, and after --max-bad-epochs the run ends with one line, no traceback."""
    import socket
    with socket.socket() as s:   # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "down"
    flags = [a for a in FAST if a not in ("--reward", "jpeg-compressibility")]
    proc = start(*flags, "--reward", "remote", "--reward-option", f"remote_url=http://127.0.0.1:{port}/score",
                 "--reward-option", "http_retries=0", "--reward-option", "http_timeout=2", "--epochs", "6",
                 "--max-bad-epochs", "2", "--no-async-reward", "--eval-every", "1", "--eval-size", "2",
                 "--out", str(run), launcher=(sys.executable,))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("train.py: error: 2 epochs in a row without a usable reward") and "start the run again" in last
    # every message is one line of ours (no warnings.warn source lines), each distinct one once per batch
    said = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    assert all(line.startswith(("rank 0: remote: ", "warning: epoch ", "train.py: error: ")) for line in said), said
    assert sum("failed: URLError" in line for line in said) == 4   # 2 epochs x (evaluation + rollout)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl")) for line in lines]
    assert [r["epoch"] for r in rows] == [0, 1] and all(r["reward_mean"] is None for r in rows)
    assert all("loss" not in r for r in rows)   # no update ran


def test_cpu_warning_for_sd_sized_models_only():
    msg = cpu_warning(torch.device("cpu"), 859_520_964)   # SD 1.5's UNet
    assert msg.startswith("warning: training a 860M-parameter UNet on the CPU (") and "--model shapes" in msg
    assert "\n" not in msg
    assert cpu_warning(torch.device("cpu"), 1_700_000) is None      # the shapes model
    assert cpu_warning(torch.device("cuda"), 859_520_964) is None


def test_joint_training_runs_tasks_in_turn_and_resumes_exactly(tmp_path):
    """--task twice (Zhang et al. Algorithm 1): each epoch, each task its own rollouts (its own batch count), its own
    per-prompt tracker and update; metrics prefixed task0_/task1_. Task 0 starts from the same weights and seeds as
    a single-task run, so its first rollout scores the same; a run cut after epoch 1 and resumed equals the
    uninterrupted one (both trackers restored)."""
    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    base = [a for a in FAST if a not in ("--reward", "jpeg-compressibility")]
    tasks = ["--task", f"jpeg-compressibility@{tmp_path / 'p.txt'}", "--task", "jpeg-incompressibility@simple_animals@2",
             "--tracker-min-count", "2", "--tracker-buffer", "8"]
    finish(start(*base, *tasks, "--epochs", "2", "--save-every", "1", "--out", str(tmp_path / "full"),
                 launcher=(sys.executable,)))
    finish(start(*base, *tasks, "--epochs", "1", "--save-every", "1", "--out", str(tmp_path / "cut"),
                 launcher=(sys.executable,)))
    finish(start("--resume", str(tmp_path / "cut"), "--epochs", "2", launcher=(sys.executable,)))
    single = tmp_path / "single"
    finish(start(*FAST, "--prompts", str(tmp_path / "p.txt"), "--tracker-min-count", "2", "--tracker-buffer", "8",
                 "--epochs", "1", "--out", str(single), launcher=(sys.executable,)))
    full, cut = metrics(tmp_path / "full"), metrics(tmp_path / "cut")
    assert without_timing(full) == without_timing(cut)
    r0, s0 = full[0], metrics(single)[0]
    assert r0["task0_reward_mean"] == s0["reward_mean"] and r0["task0_reward_std"] == s0["reward_std"]
    assert r0["task1_reward_mean"] > 0 > r0["task0_reward_mean"]    # -kB and +kB: each task its own reward
    assert r0["task0_items"] == 16 and r0["task1_items"] == 32      # 4 and 8 samples x 4 steps
    assert r0["global_step"] == 2                                   # one optimizer step per task
    from PIL import Image
    assert Image.open(tmp_path / "full" / "reward_curve.png").size == (900, 2 * 420)   # a panel per task


def test_task_flag_errors(tmp_path):
    out = ["--out", str(tmp_path / "r")]
    base = [a for a in FAST if a not in ("--reward", "jpeg-compressibility")]
    assert "write REWARD@PROMPTS" in cli_error([*base, *out, "--task", "jpeg-compressibility"])
    assert "unknown reward 'nope'" in cli_error([*base, *out, "--task", "nope@simple_animals"])
    assert "apply to a run without --task" in cli_error([*base, *out, "--task", "jpeg-compressibility@simple_animals",
                                                          "--eval-prompts", "simple_animals"])
    assert "--group-size 3 must divide the 8 samples" in cli_error(
        [*base, *out, "--task", "jpeg-compressibility@simple_animals@2", "--group-size", "3"])


def test_eval_seeds_repeat_each_prompt_with_new_fixed_seeds(tmp_path):
    """--eval-seeds 3 on 2 evaluation prompts: 6 images, a grid row per prompt (3 columns), the same images in every
    run (fixed seeds)."""
    flags = [*FAST, "--epochs", "1", "--eval-every", "1", "--sample-every", "1", "--eval-size", "2", "--eval-seeds",
             "3", "--grid-size", "6"]
    for name in ("a", "b"):
        finish(start(*flags, "--out", str(tmp_path / name), launcher=(sys.executable,)))
    from PIL import Image
    grid_a = Image.open(tmp_path / "a" / "samples" / "epoch_0000.png")
    probe = grid.make_grid(torch.zeros(6, 3, 64, 64), ncols=3)
    assert grid_a.size[0] == probe.size[0]   # 3 columns of the tiny model's 64 px images
    assert grid_a.tobytes() == Image.open(tmp_path / "b" / "samples" / "epoch_0000.png").tobytes()
    row = metrics(tmp_path / "a")[0]
    assert row["eval_reward_std"] > 0 and row["eval_reward_min"] < row["eval_reward_max"]


def test_heldout_seeds_and_grid_rows():
    """--heldout-seeds repeats the held-out prompts on their own (default: --eval-seeds; the shapes model: 32 and 8),
    and a grid of repeated seeds shows rows of up to 8 seeds, an equal share of rows per prompt."""
    from policy import grid_slots
    from run import eval_sets
    from config import task_specs
    from cli import load_prompts
    flags = [*FAST, "--eval-prompts", "simple_animals", "--heldout-prompts", "simple_animals", "--eval-size", "2"]
    for extra, (e, h) in (([], (1, 1)), (["--eval-seeds", "3"], (3, 3)),
                          (["--eval-seeds", "3", "--heldout-seeds", "5"], (3, 5))):
        cfg = parse_args([*flags, *extra])
        _, evals, held = eval_sets(cfg, task_specs(cfg)[0])
        two = load_prompts("simple_animals")
        two = [two[0], two[len(two) // 2]]   # --eval-size 2 thins evenly
        assert evals == [p for p in two for _ in range(e)] and held == [p for p in two for _ in range(h)]
    shapes = parse_args(["--model", "shapes"])
    assert (shapes.eval_seeds, shapes.heldout_seeds) == (32, 8)
    assert grid_slots(256, 32, 16) == ([*range(8), *range(32, 40)], 8)    # two prompts, 8 seeds each
    assert grid_slots(376, 8, 16) == (list(range(16)), 8)
    assert grid_slots(64, 64, 16) == (list(range(16)), 8)                 # one prompt: two rows of it
    assert grid_slots(6, 3, 6) == (list(range(6)), 3)
    assert grid_slots(20, 1, 8) == (list(range(8)), 8)                   # one seed: 8 prompts a row
    assert "--heldout-seeds must be >= 1" in cli_error([*flags, "--heldout-seeds", "0"])


def test_tiny_sdxl_learns_and_its_export_loads_in_diffusers(tmp_path):
    """DDPO on SDXL's structure (two text encoders, pooled embedding + time ids through CFG, rollout and update):
    `train.py --model tiny-sdxl` with the tiny defaults raises JPEG compressibility by more than 3 initial standard
    deviations in 6 epochs, and the exported UNet folder loads in diffusers with our eps under the added
    conditioning."""
    from diffusers import UNet2DConditionModel as DiffusersUNet
    run = tmp_path / "run"
    finish(start("--model", "tiny-sdxl", "--reward", "jpeg-compressibility", "--epochs", "6", "--eval-every", "0",
                 "--sample-every", "0", "--out", str(run), launcher=(sys.executable,), threads=2), timeout=600)
    rows = metrics(run)
    start_mean, start_std = rows[0]["reward_mean"], rows[0]["reward_std"]
    end_mean = sum(r["reward_mean"] for r in rows[-2:]) / 2
    print(f"tiny-sdxl reward {start_mean:.3f} +- {start_std:.3f} -> {end_mean:.3f}")
    assert end_mean - start_mean >= 3 * start_std

    pipe = weights.load_finetuned(weights.load_pipeline("tiny-sdxl"), run)
    ref = DiffusersUNet.from_pretrained(run / "export" / "unet").eval()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([981, 261])
    cond = pipe.encode_prompts(["a cat", "a dog"], size=64)
    with torch.no_grad():
        ours = pipe.unet(x, t, cond)
        theirs = ref(x, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=cond.added_cond_kwargs).sample
    assert ((ours - theirs).norm() / theirs.norm()).item() <= 1e-5


def test_resume_reads_a_config_written_before_skip_last_steps(tmp_path):
    """A run started when the flag was the boolean --skip-last-step resumes with that choice as a count (1), not
    silently with the new flag's default."""
    cfg = dataclasses.asdict(parse_args(["--model", "tiny", "--out", str(tmp_path)]))
    del cfg["skip_last_steps"]
    for old, want in ((True, 1), (False, 0)):
        (tmp_path / "config.json").write_text(json.dumps({**cfg, "skip_last_step": old}))
        assert parse_args(["--resume", str(tmp_path)]).skip_last_steps == want


def test_resume_reads_a_config_written_before_heldout_seeds(tmp_path):
    """A run started before --heldout-seeds evaluated its held-out prompts at --eval-seeds, and resumes so."""
    cfg = dataclasses.asdict(parse_args(["--model", "shapes", "--eval-seeds", "5", "--out", str(tmp_path)]))
    del cfg["heldout_seeds"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert parse_args(["--resume", str(tmp_path)]).heldout_seeds == 5
