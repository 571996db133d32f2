"""
gpu_check.py — everything a short GPU session should measure, in one command that leaves results behind.

A phase runner. Each phase runs in its own subprocess (a fresh CUDA context, so peak-memory numbers are its own,
and a crash, an OOM or a hang costs only that phase) under its own time limit; the total is capped by --budget.
After every phase the results so far are rewritten to OUT/gpu_check.json and OUT/gpu_check.md, so whatever ends
the command early (its own timeout, the device's) still leaves every finished phase's numbers.

  env            GPU, torch/CUDA versions, the Python packages the phases need (missing ones stop the run at once,
                 before any device time is spent), and a bf16 matmul's TFLOP/s as a sanity bound for MFU
  sd15_folder    a random-weight SD 1.5 (UNet 860M, VAE 84M, CLIP-L text encoder 123M) written as a diffusers
                 folder by weights.save_pipeline (fp16 tensors), for the two train.py phases
  bench          bench.py at 512 px, bf16 autocast, batch 8 (x2 CFG), 50 steps: our loop and the diffusers loop
                 in one process; seconds, images/s, TFLOP/s, MFU, peak memory, ref/ours per phase of an epoch
  train          one real train.py epoch on the random SD 1.5 folder (CUDA, bf16, LoRA, train.py's default batch
                 sizes 8 / 2, 50 steps, one rollout batch, JPEG reward), its checkpoint, then `--resume --epochs 2`;
                 first_ratio_max_dev of both epochs against --clip-range (must stay below it)
  memory         CUDA peak memory of train.py itself (train.main in this process, its checkpoint/export writes
                 stubbed out) at the default batch sizes: LoRA, full fine-tuning, each with and without
                 --grad-checkpointing (one rollout batch of 8 x 50 steps, 5 of the 50 steps trained per sample)
  bench_compile  bench.py --compile (our loop only, LoRA update without checkpointing; ratios against the eager
                 diffusers rows above)
  pretrain       optional: pretrain.py (the shapes world) with whatever time is left, `--device cuda` if
                 pretrain.py has that flag; its exported model is copied to OUT/pretrain_model when it finishes

Device command (the session's `run` tool: one H200, <= 10 min per command, 15 min of device time in all, the
repository copied over; wheels of what the device lacks travel in the ignored .whl/ folder):

    run(carry=[".whl"], timeout_s=560, command="python3 -m pip install -q --no-index --no-deps --no-compile
        --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
        python3 gpu_check.py --out-dir $OUT --budget 480")

(one line in the real call). Fill .whl/ first, on this machine, with the versions the tests use (wcwidth is the
one binary wheel, hence the platform flags):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl diffusers==0.42.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4

(8.7 MB of the 64 MiB that carry allows). open_clip is only read for its BPE vocabulary file (weights.py), never
imported, so its own dependencies (timm, torchvision) are not needed; diffusers is the bench reference only. The env
phase imports every module the phases need and stops the run within seconds if one is missing, listing it: add its
wheel (scipy, for the pretrain phase only, is about 35 MB) and run again. --phases picks a subset (env always
runs), e.g. `--phases pretrain --budget 420` for a second call.

CPU dry run (tests/test_gpu_check.py runs it): every phase at toy sizes (the tiny SD, 2 steps, torch.compile
with the "eager" backend; no peak memory without CUDA), 80-90 s on a 2-core CPU, most of it Python start-up:

    HF_HUB_OFFLINE=1 python gpu_check.py --dry-run --out-dir /tmp/gpu_check
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent

# name -> (time limit on the GPU, time limit in the dry run), in seconds; the total is also capped by --budget.
# Expected on an H200: env 5, sd15_folder 30, bench ~120, train ~90, memory ~80, bench_compile ~150.
PHASES = {
    "env": (60, 120),
    "sd15_folder": (120, 120),
    "bench": (200, 120),
    "train": (200, 180),
    "memory": (150, 120),
    "bench_compile": (240, 120),
    "pretrain": (420, 120),
}
MIN_PHASE_S = 30          # a phase is skipped when less than this is left of the budget
# the modules the phases import (open_clip: only its BPE file is read; scipy: shapes.py, the pretrain phase)
MODULES = {"torch": "torch", "transformers": "transformers", "safetensors": "safetensors",
           "huggingface_hub": "huggingface_hub", "ftfy": "ftfy", "numpy": "numpy", "PIL": "pillow", "tqdm": "tqdm",
           "open_clip": "open_clip_torch", "diffusers": "diffusers", "scipy": "scipy"}
OPTIONAL_MODULES = {"scipy"}   # only the pretrain phase needs it


def parse_args(argv=None):
    from cli import ArgumentParser   # one-line errors, the project's help style
    p = ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0].strip(), epilog=__doc__)
    p.add_argument("--out-dir", required=True, help="where gpu_check.json, gpu_check.md and logs/ are written ($OUT)")
    p.add_argument("--work", default=None, help="scratch space for the SD folder, runs and checkpoints "
                   "(several GB on the GPU; default: a gpu_check folder in the system temp directory)")
    p.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: every phase's code path in ~1.5 minutes")
    p.add_argument("--budget", type=float, default=480, help="seconds for all phases together")
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset to run (env always runs)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: bench.py's table)")
    p.add_argument("--pretrain-args", default=None, help="pretrain.py size flags (default: its own defaults with "
                   "--device cuda, else a reduced run sized for the device's CPUs)")
    p.add_argument("--phase", default=None, help=argparse.SUPPRESS)  # internal: run one phase in this process
    return p.parse_args(argv)


# -----------------------------------------------------------------------------------------------------------
# small helpers


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def append_jsonl(path: Path, obj) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj, default=str) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def child_env(dry_run: bool) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               PYTHONUNBUFFERED="1", TQDM_MININTERVAL="10")
    if dry_run:  # tiny models: more intra-op threads only spin-wait (see tests/conftest.py)
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


class Ctx:
    """What a phase gets: where to write, the device, the dry-run switch, its time limit."""

    def __init__(self, args, name: str, deadline: float):
        self.args, self.name, self.dry = args, name, args.dry_run
        self.out = Path(args.out_dir)
        self.work = Path(args.work)
        self.partial = self.out / "phases" / f"{name}.rows.jsonl"   # rows streamed as they complete
        self.deadline = deadline
        self.device = "cpu" if self.dry else "cuda"
        self.sd_folder = self.work / ("tiny_sd" if self.dry else "sd15")

    def left(self) -> float:
        return self.deadline - time.time()

    def row(self, obj: dict) -> None:
        append_jsonl(self.partial, obj)

    def run(self, cmd: list[str], log_name: str, timeout: float | None = None) -> tuple[int, str]:
        """A child process (train.py, pretrain.py) with its output in logs/<log_name>.log; (rc, output tail)."""
        log = self.out / "logs" / f"{log_name}.log"
        timeout = max(5.0, self.left() - 3) if timeout is None else timeout
        with open(log, "w") as f:
            f.write("$ " + shlex.join(cmd) + "\n")
            f.flush()
            # in this phase's process group: when the parent stops the phase, this child stops with it
            proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(self.dry), stdout=f, stderr=subprocess.STDOUT)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                rc = -9
        return rc, tail(log)


def stop(proc: subprocess.Popen) -> None:
    """End a phase process we started (a session of its own) and everything it started: TERM, then KILL."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# -----------------------------------------------------------------------------------------------------------
# the phases (each runs in its own process; returns a JSON-able dict, raises on failure)


def phase_env(ctx: Ctx) -> dict:
    import torch
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "pythonpath": os.environ.get("PYTHONPATH", "")}
    versions, missing, errors = {}, [], {}
    for mod, dist in MODULES.items():
        try:
            if importlib.util.find_spec(mod) is None:
                raise ImportError(f"no module named {mod}")
            if mod == "open_clip":   # only its BPE vocabulary file is read (weights.py), the package is not imported
                bpe = Path(importlib.util.find_spec(mod).origin).parent / "bpe_simple_vocab_16e6.txt.gz"
                if not bpe.is_file():
                    raise ImportError(f"{bpe} is missing")
            elif not ctx.dry:
                # a real import, so that a missing dependency shows now, not minutes later (the dry run's
                # environment is the test suite's, where the spec check suffices)
                m = importlib.import_module(mod)
                if mod == "diffusers":
                    m.UNet2DConditionModel, m.AutoencoderKL, m.DDIMScheduler  # noqa: B018 (lazy submodules)
        except Exception as e:  # noqa: BLE001 (any import failure is a missing package to report)
            missing.append(dist)
            errors[dist] = f"{type(e).__name__}: {e}"[:300]
            continue
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "?"
    info.update(versions=versions, missing=missing, import_errors=errors)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported())
    else:
        info["gpu"] = None
    required = [m for m in missing if m not in {MODULES[o] for o in OPTIONAL_MODULES}]
    problems = ([f"missing Python packages: {', '.join(required)} ({'; '.join(errors.values())}); add their wheels "
                 "to .whl/ (see the docstring of gpu_check.py)"] if required else [])
    if not ctx.dry and not torch.cuda.is_available():
        problems.append("no CUDA device (use --dry-run on a CPU)")
    if problems:
        ctx.row(info)   # what was found stays in the report
        raise RuntimeError("; ".join(problems))
    # the ceiling MFU is measured against, seen from here: a large bf16 matmul (a small fp32 one on the dry run)
    device = torch.device(ctx.device)
    n, dtype = (256, torch.float32) if ctx.dry else (8192, torch.bfloat16)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    reps = 5 if ctx.dry else 50
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    info["matmul"] = {"n": n, "dtype": str(dtype).replace("torch.", ""),
                      "tflops": 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12}
    return info


def phase_sd15_folder(ctx: Ctx) -> dict:
    """A random SD 1.5 in the diffusers layout (dry run: the tiny SD's architecture), built by our own classes:
    UNet and VAE filled as bench.py fills them (N(0, 0.02) weights, unit norm scales), transformers' own init for
    the text encoder; fp16 on disk (train.py loads it in fp32 and casts as each recipe needs)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel
    import bench
    import weights
    t0 = time.perf_counter()
    unet, vae, ctx_dim = bench.build_models("tiny" if ctx.dry else "sd15", torch.device(ctx.device), torch.float32)
    if ctx.dry:
        text_cfg = CLIPTextConfig(**weights.TINY["text_encoder"])
    else:  # openai/clip-vit-large-patch14's text tower, SD 1.x's text encoder
        text_cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                  projection_dim=768)
    if text_cfg.hidden_size != ctx_dim:
        raise RuntimeError(f"text encoder width {text_cfg.hidden_size} != UNet cross-attention width {ctx_dim}")
    torch.manual_seed(0)
    text = CLIPTextModel(text_cfg)
    t_build = time.perf_counter() - t0
    weights.save_pipeline(ctx.sd_folder, unet, vae, text, dtype=torch.float16)
    size = sum(f.stat().st_size for f in ctx.sd_folder.rglob("*") if f.is_file())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"folder": str(ctx.sd_folder), "arch": "tiny" if ctx.dry else "sd15", "unet_params": count(unet),
            "vae_params": count(vae), "text_encoder_params": count(text), "bytes_on_disk": size,
            "seconds_build": t_build, "seconds_save": time.perf_counter() - t0 - t_build}


def _bench(ctx: Ctx, compiled: bool) -> dict:
    import torch
    import bench
    measure = bench.measure

    def streaming_measure(*a, **k):  # every row reaches disk as soon as it is measured
        row = measure(*a, **k)
        ctx.row(dataclasses.asdict(row))
        return row
    bench.measure = streaming_measure
    if ctx.dry:
        argv = ["--device", "cpu", "--model", "tiny", "--size", "64", "--batch", "2", "--steps", "2",
                "--micro-batch", "2"]
    else:
        argv = ["--device", "cuda", "--dtype", "bf16", "--model", "sd15", "--size", "512", "--batch", "8",
                "--steps", "50"]
    if ctx.args.peak_tflops:
        argv += ["--peak-tflops", str(ctx.args.peak_tflops)]
    if compiled:
        # our loop only (the eager reference rows come from the bench phase), the LoRA update only, without
        # gradient checkpointing: each further variant is one more graph to compile, which the budget cannot hold
        argv += ["--compile", "--no-reference", "--no-full", "--no-ckpt"]
        if ctx.dry:  # the dry run checks the dynamo path, not inductor's C++ build (minutes on a small CPU)
            torch.compile = functools.partial(torch.compile, backend="eager")
    dname = torch.cuda.get_device_name(0) if ctx.device == "cuda" else "cpu"
    peak = ctx.args.peak_tflops or next((v for k, v in bench.PEAK_TFLOPS.items() if k in dname), None)
    meta = {"argv": argv, "device": dname, "peak_tflops": peak}
    write_json(ctx.out / "phases" / f"{ctx.name}.meta.json", meta)  # for the report if the phase is cut short
    t0 = time.perf_counter()
    bench.main(argv)
    out = {**meta, "rows": read_jsonl(ctx.partial), "seconds": time.perf_counter() - t0}
    if compiled:
        from torch._dynamo.utils import counters
        out["compile"] = {"unique_graphs": counters["stats"]["unique_graphs"],
                          "recompiles": dict(counters["recompiles"])}
    return out


def phase_bench(ctx: Ctx) -> dict:
    return _bench(ctx, compiled=False)


def phase_bench_compile(ctx: Ctx) -> dict:
    return _bench(ctx, compiled=True)


def _need_folder(ctx: Ctx) -> None:
    if not (ctx.sd_folder / "model_index.json").is_file():
        raise RuntimeError(f"{ctx.sd_folder}: no SD folder (the sd15_folder phase did not finish)")


def _train_size_flags(ctx: Ctx) -> list[str]:
    # GPU: train.py's defaults (50 steps, sample batch 8, train batch 2, LoRA rank 4, bf16), one rollout batch.
    # Dry run: 2 steps, a rollout batch of 4 trained 2 at a time (the batch sizes differ, as on the GPU).
    base = ["--reward", "jpeg-compressibility", "--sample-batches-per-epoch", "1", "--eval-every", "0",
            "--sample-every", "0"]
    if ctx.dry:
        base += ["--device", "cpu", "--steps", "2", "--sample-batch-size", "4", "--train-batch-size", "2"]
    return base


def phase_train(ctx: Ctx) -> dict:
    _need_folder(ctx)
    run = ctx.work / "train_run"
    shutil.rmtree(run, ignore_errors=True)
    flags = ["--model", str(ctx.sd_folder), *_train_size_flags(ctx), "--epochs", "1", "--save-every", "1",
             "--out", str(run)]
    walls, saved = [], []

    def ckpts():  # train.py keeps the newest checkpoint only
        return sorted(p.name for p in (run / "checkpoints").iterdir()) if (run / "checkpoints").is_dir() else []
    for i, cmd in enumerate(([sys.executable, "train.py", *flags],
                             [sys.executable, "train.py", "--resume", str(run), "--epochs", "2"])):
        t0 = time.perf_counter()
        rc, out = ctx.run(cmd, f"train_{i}")
        walls.append(time.perf_counter() - t0)
        if rc != 0:
            raise RuntimeError(f"{shlex.join(cmd[1:])} exited {rc}:\n{out[-1500:]}")
        saved.append(ckpts())
    config = json.loads((run / "config.json").read_text())
    keep = ("epoch", "first_ratio_max_dev", "reward_mean", "reward_std", "approx_kl", "clipfrac", "loss",
            "grad_norm", "time_rollout", "time_reward", "time_update", "time_total", "images_per_s")
    epochs = [{k: r.get(k) for k in keep} for r in read_jsonl(run / "metrics.jsonl")]
    for r in epochs:
        ctx.row(r)
    checkpoints = saved[-1]
    logs = "".join(tail(ctx.out / "logs" / f"train_{i}.log", 10**6) for i in range(2))
    devs = [r["first_ratio_max_dev"] for r in epochs]
    result = {"run": str(run), "clip_range": config["clip_range"], "precision": config["precision"],
              "device": config["device"], "steps": config["steps"], "sample_batch_size": config["sample_batch_size"],
              "train_batch_size": config["train_batch_size"], "lora_rank": config["lora_rank"], "epochs": epochs,
              "first_ratio_max_dev": devs[0] if devs else None,
              "first_ratio_below_clip": bool(devs) and all(d is not None and d <= config["clip_range"] for d in devs),
              "checkpoints_first_run": saved[0], "checkpoints": checkpoints,
              "export": (run / "export" / "unet").is_dir(),
              "resumed": saved[0] == ["epoch_0001"] and [r["epoch"] for r in epochs] == [0, 1]
              and checkpoints == ["epoch_0002"],
              "warnings": [line for line in logs.splitlines() if "warning" in line.lower()][:10],
              "process_seconds": walls}
    if not result["resumed"]:
        raise RuntimeError(f"the resumed run did not continue: epochs {[r['epoch'] for r in epochs]}, "
                           f"checkpoints {checkpoints}")
    return result


def phase_memory(ctx: Ctx) -> dict:
    """train.main four times in this process, the CUDA peak of each. Checkpoint and export writes are stubbed out
    (disk, not memory: the full fine-tuning checkpoint alone is 14 GB)."""
    import gc
    import torch
    import run as trainrun
    import train
    _need_folder(ctx)
    trainrun.save_checkpoint = lambda *a, **k: None
    trainrun.export = lambda *a, **k: None
    cuda = ctx.device == "cuda"
    # 5 of 50 steps trained per sample: the peak is one micro-step's, the rollout store is the full 50 steps'
    fraction = [] if ctx.dry else ["--timestep-fraction", "0.1"]
    configs = [("lora", []), ("lora + ckpt", ["--grad-checkpointing"]), ("full", ["--lora-rank", "0"]),
               ("full + ckpt", ["--lora-rank", "0", "--grad-checkpointing"])]
    rows = []
    for name, extra in configs:
        run = ctx.work / f"memory_{name.replace(' + ', '_')}"
        shutil.rmtree(run, ignore_errors=True)
        argv = ["--model", str(ctx.sd_folder), *_train_size_flags(ctx), *fraction, "--epochs", "1", *extra,
                "--out", str(run)]
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**30 if cuda else None
        t0 = time.perf_counter()
        train.main(argv)
        config = json.loads((run / "config.json").read_text())
        (metrics,) = read_jsonl(run / "metrics.jsonl")
        row = {"config": name, "lora_rank": config["lora_rank"], "grad_checkpointing": config["grad_checkpointing"],
               "sample_batch_size": config["sample_batch_size"], "train_batch_size": config["train_batch_size"],
               "steps": config["steps"], "precision": config["precision"], "allocated_before_gb": before,
               "peak_allocated_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
               "peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
               "first_ratio_max_dev": metrics["first_ratio_max_dev"], "time_update": metrics["time_update"],
               "seconds": time.perf_counter() - t0}
        ctx.row(row)
        rows.append(row)
    return {"rows": rows}


def phase_pretrain(ctx: Ctx) -> dict:
    script = ROOT / "pretrain.py"
    if not script.is_file():
        return {"skipped": "pretrain.py does not exist"}
    if importlib.util.find_spec("scipy") is None:
        raise RuntimeError("scipy is missing (shapes.py needs it); add its wheel to .whl/")
    on_gpu = not ctx.dry and '"--device"' in script.read_text()   # a flag pretrain.py may gain
    if ctx.args.pretrain_args:
        sizes = shlex.split(ctx.args.pretrain_args)
    elif ctx.dry:
        sizes = ["--vae-steps", "2", "--unet-steps", "2", "--dataset-size", "16", "--batch-size", "4",
                 "--vae-batch-size", "4", "--warmup", "1"]
    elif on_gpu:
        sizes = []   # the real run
    else:            # pretrain.py is CPU-only: measure its throughput on the device's cores with a shorter run
        sizes = ["--vae-steps", "300", "--unet-steps", "600", "--dataset-size", "4000"]
    out, export = ctx.work / "pretrain", ctx.work / "pretrain_model"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(export, ignore_errors=True)
    cmd = [sys.executable, str(script), "--out", str(out), "--export", str(export), *sizes]
    if on_gpu:
        cmd += ["--device", "cuda"]
    t0 = time.perf_counter()
    rc, log = ctx.run(cmd, "pretrain")
    wall = time.perf_counter() - t0
    rows = read_jsonl(out / "log.jsonl")
    result = {"cmd": shlex.join(cmd[1:]), "on_gpu": on_gpu, "rc": rc, "seconds": wall, "finished": export.is_dir(),
              "log_rows": len(rows), "last_log": rows[-3:]}
    ctx.row(result)
    if export.is_dir():   # the toy model is small: bring it back
        size = sum(f.stat().st_size for f in export.rglob("*") if f.is_file())
        result["export_bytes"] = size
        if size < 50 * 2**20:
            shutil.copytree(export, ctx.out / "pretrain_model", dirs_exist_ok=True)
            result["copied_to"] = "pretrain_model"
    if rc != 0:
        raise RuntimeError(f"pretrain.py exited {rc} after {wall:.0f} s (steps logged: {rows[-1:] or 'none'}):\n"
                           f"{log[-1000:]}")
    return result


PHASE_FUNCS = {"env": phase_env, "sd15_folder": phase_sd15_folder, "bench": phase_bench, "train": phase_train,
               "memory": phase_memory, "bench_compile": phase_bench_compile, "pretrain": phase_pretrain}


def run_phase(args) -> None:
    """The child side: one phase, its result in OUT/phases/<name>.json."""
    if args.dry_run and args.phase not in ("train", "pretrain"):  # (those two only start processes: no torch here)
        import torch
        torch.set_num_threads(1)
    ctx = Ctx(args, args.phase, float(os.environ.get("GPU_CHECK_DEADLINE", time.time() + 3600)))
    result = PHASE_FUNCS[args.phase](ctx)
    write_json(ctx.out / "phases" / f"{args.phase}.json", result)


# -----------------------------------------------------------------------------------------------------------
# the report


def fmt(x, spec=".3g", none="-"):
    return none if x is None else format(x, spec)


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def bench_rows(result: dict, eager: dict | None = None) -> list[dict]:
    """bench rows with per-second rates, TFLOP/s, MFU and ref/ours (the diffusers row of the same phase: from this
    run, or from the eager run for the compiled one)."""
    peak = result.get("peak_tflops")
    rows = result.get("rows", [])
    ref = {r["name"]: r for r in (eager or result).get("rows", []) if r["impl"] == "diffusers"}
    ours_eager = {r["name"]: r for r in (eager or {}).get("rows", []) if r["impl"] == "ours"}
    out = []
    for r in rows:
        tflops = r["flops"] / r["seconds"] / 1e12
        d = {**r, "per_s": r["units"] / r["seconds"], "tflops": tflops, "mfu": tflops / peak if peak else None,
             "ref_over_ours": ref[r["name"]]["seconds"] / r["seconds"] if r["impl"] == "ours" and r["name"] in ref
             else None}
        if eager is not None and r["name"] in ours_eager and r["impl"] == "ours":
            d["eager_over_compiled"] = ours_eager[r["name"]]["seconds"] / r["seconds"]
        out.append(d)
    return out


def why(rec: dict) -> str:
    """One line on why a phase did not pass: the limit it hit, or the last line of its traceback."""
    lines = (rec.get("error") or "").strip().splitlines()
    if not lines:
        return ""
    return (lines[0] if rec["status"] in ("timeout", "interrupted", "check-failed") else lines[-1])[:200]


def summary_line(name: str, rec: dict, results: dict) -> str:
    line = _summary(name, rec, results)
    if rec["status"] not in ("ok", "pending") and rec.get("error"):
        line = f"{line}; {why(rec)}" if line else why(rec)
    return line


def _summary(name: str, rec: dict, results: dict) -> str:
    res = rec.get("result") or {}
    if not res:
        return ""
    try:
        if name == "env":
            res = res["rows"][0] if res.get("partial") else res   # the env phase stopped the run: its findings
            m = res.get("matmul", {})
            return (f"{res.get('gpu') or 'cpu'}, torch {res.get('torch')}, CUDA {res.get('cuda')}; "
                    f"{m.get('dtype')} matmul {fmt(m.get('tflops'), '.3g')} TFLOP/s"
                    + (f"; MISSING: {', '.join(res['missing'])}" if res.get("missing") else ""))
        if name == "sd15_folder":
            n = res["unet_params"] + res["vae_params"] + res["text_encoder_params"]
            return f"{res['arch']}: {n / 1e6:,.0f}M parameters, {res['bytes_on_disk'] / 2**30:.2f} GiB on disk"
        if name in ("bench", "bench_compile"):
            rows = {(r["name"], r["impl"]): r for r in bench_rows(res, results.get("bench") if name ==
                                                                   "bench_compile" else None)}
            parts = []
            for key in ("rollout", "epoch (lora)"):
                r = rows.get((key, "ours"))
                if r:
                    parts.append(f"{key} {r['per_s']:.3g} img/s, MFU {pct(r['mfu'])}, "
                                 f"ref/ours {fmt(r['ref_over_ours'], '.2f')}")
            if name == "bench_compile" and "compile" in res:
                parts.append(f"{res['compile']['unique_graphs']} graphs, recompiles {res['compile']['recompiles'] or 0}")
            return "; ".join(parts) or f"{len(rows)} rows"
        if name == "train":
            devs = ", ".join(fmt(r["first_ratio_max_dev"], ".2g") for r in res["epochs"])
            verdict = "below" if res["first_ratio_below_clip"] else "ABOVE"
            e0 = res["epochs"][0]
            return (f"first_ratio_max_dev {devs} ({verdict} clip range {res['clip_range']:g}); epoch "
                    f"{e0['time_total']:.1f} s, {e0['images_per_s']:.3g} img/s; checkpoint "
                    f"{', '.join(res['checkpoints_first_run'])} then --resume to {', '.join(res['checkpoints'])}"
                    f"{'' if res['resumed'] else ' (FAILED)'}")
        if name == "memory":
            return "; ".join(f"{r['config']} {fmt(r['peak_allocated_gb'], '.1f', 'n/a (CPU)')}"
                             + (" GiB" if r["peak_allocated_gb"] is not None else "") for r in res["rows"])
        if name == "pretrain":
            res = res["rows"][-1] if res.get("partial") else res
            if "skipped" in res:
                return res["skipped"]
            last = (res.get("last_log") or [{}])[-1]
            return (f"{'GPU' if res['on_gpu'] else 'CPU'}, {res['seconds']:.0f} s, finished {res['finished']}; "
                    f"last log: " + ", ".join(f"{k} {fmt(v, '.4g') if isinstance(v, float) else v}"
                                              for k, v in last.items()))
    except (KeyError, TypeError, IndexError, ZeroDivisionError) as e:
        return f"(no summary: {type(e).__name__} {e})"
    return ""


def _bench_section(name: str, res: dict, eager: dict | None) -> list[str]:
    title = ("bench.py, eager (ours and diffusers in one process)" if name == "bench" else
             "bench.py --compile (ours; ref/ours against the eager run's diffusers rows)")
    compiled = name == "bench_compile"
    lines = ["", f"## {title}" + (" (partial)" if res.get("partial") else ""), "",
             f"`bench.py {' '.join(res.get('argv', []))}`, peak {res.get('peak_tflops') or '-'} TFLOP/s", "",
             "| phase | impl | s | per s | TFLOP/s | MFU | peak GiB | ref/ours |" + (" eager/compiled |" if compiled
                                                                                 else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if compiled else "")]
    for r in bench_rows(res, eager if compiled else None):
        lines.append(f"| {r['name']} | {r['impl']} | {r['seconds']:.3f} | {r['per_s']:.3g} {r['unit']} | "
                     f"{r['tflops']:.3g} | {pct(r['mfu'])} | {fmt(r['peak_mem_gb'], '.2f')} | "
                     f"{fmt(r['ref_over_ours'], '.2f')} |" + (f" {fmt(r.get('eager_over_compiled'), '.2f')} |"
                                                            if compiled else ""))
    if compiled:
        lines += ["", "(bench.py's `epoch (lora)` row calls the eager UNet even with --compile.)"]
    return lines


def _memory_section(res: dict) -> list[str]:
    lines = ["", "## CUDA peak memory of train.py (one epoch, default batch sizes)", "",
             "| config | sample / train batch | steps | peak allocated GiB | peak reserved GiB | before GiB | "
             "first_ratio_max_dev |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['config']} | {r['sample_batch_size']} / {r['train_batch_size']} | {r['steps']} | "
                     f"{fmt(r['peak_allocated_gb'], '.2f')} | {fmt(r['peak_reserved_gb'], '.2f')} | "
                     f"{fmt(r['allocated_before_gb'], '.2f')} | {fmt(r['first_ratio_max_dev'], '.2g')} |")
    return lines


def _train_section(t: dict) -> list[str]:
    epochs = t.get("epochs") or t.get("rows", [])
    head = (f"## train.py: {t['device']}, {t['precision']}, LoRA rank {t['lora_rank']}, {t['steps']} steps, batch "
            f"{t['sample_batch_size']} / {t['train_batch_size']}, clip range {t['clip_range']:g}" if "device" in t
            else "## train.py (partial)")
    lines = ["", head, "", "| epoch | first_ratio_max_dev | reward | rollout s | update s | total s | img/s |",
             "|---|---|---|---|---|---|---|"]
    for r in epochs:
        lines.append(f"| {r['epoch']} | {fmt(r['first_ratio_max_dev'], '.2g')} | {fmt(r['reward_mean'], '.4g')} | "
                     f"{fmt(r['time_rollout'], '.1f')} | {fmt(r['time_update'], '.1f')} | "
                     f"{fmt(r['time_total'], '.1f')} | {fmt(r['images_per_s'], '.3g')} |")
    for w in t.get("warnings", []):
        lines.append(f"\n> {w.strip()[:300]}")
    return lines


def markdown(report: dict) -> str:
    """The summary table (one row per phase), then a table per measuring phase."""
    phases = report["phases"]
    results = {k: v.get("result") for k, v in phases.items() if v.get("result")}
    env = results.get("env") or {}
    env = env["rows"][0] if env.get("partial") else env
    lines = [f"# gpu_check: {env.get('gpu') or 'cpu'}{' (dry run)' if report['dry_run'] else ''}", "",
             f"{report['started']}, budget {report['budget_s']:.0f} s, {report.get('elapsed_s', 0):.0f} s used; "
             f"torch {env.get('torch')}, CUDA {env.get('cuda')}", "",
             "| phase | status | seconds | result |", "|---|---|---|---|"]
    for name in report["order"]:
        rec = phases[name]
        lines.append(f"| {name} | {rec['status']} | {rec.get('seconds', 0):.0f} | "
                     f"{summary_line(name, rec, results).replace('|', '/')} |")
    sections = [("bench", lambda r: _bench_section("bench", r, None)),
                ("bench_compile", lambda r: _bench_section("bench_compile", r, results.get("bench"))),
                ("memory", _memory_section), ("train", _train_section)]
    for name, section in sections:
        if results.get(name):
            try:
                lines += section(results[name])
            except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:  # a cut-short phase's odd result
                lines += ["", f"## {name}: no table ({type(e).__name__}: {e}); see gpu_check.json"]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------------------------------------
# the parent: phases in order, each in a subprocess, results rewritten after every phase


def launch_phase(args, name: str, limit: float, out: Path, work: Path, rec: dict, save) -> None:
    """Run one phase in its own process group for at most `limit` seconds; its result (or its partial rows and
    log tail) into rec."""
    for f in (out / "phases" / f"{name}.json", out / "phases" / f"{name}.rows.jsonl",
              out / "phases" / f"{name}.meta.json"):
        f.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", name, "--out-dir", str(out),
           "--work", str(work), "--budget", str(args.budget)]
    cmd += ["--dry-run"] if args.dry_run else []
    cmd += ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
    cmd += ["--pretrain-args", args.pretrain_args] if args.pretrain_args else []
    env = child_env(args.dry_run)
    env["GPU_CHECK_DEADLINE"] = str(time.time() + limit)
    log = out / "logs" / f"{name}.log"
    print(f"[gpu_check] {name}: up to {limit:.0f} s", flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            stop(proc)
            rc = None
        except BaseException as e:  # SIGTERM or Ctrl-C: record the phase as interrupted, then stop
            stop(proc)
            rec.update(status="interrupted", seconds=time.time() - t0, error=str(e))
            save()
            raise
    rec["seconds"] = time.time() - t0
    result_file = out / "phases" / f"{name}.json"
    if rc == 0 and result_file.is_file():
        rec["result"] = json.loads(result_file.read_text())
        rec["status"] = "ok"
        if name == "train" and not rec["result"]["first_ratio_below_clip"]:
            rec["status"] = "check-failed"
            rec["error"] = "first_ratio_max_dev above the clip range"
        if rec["result"].get("skipped"):
            rec["status"] = "skipped"
    else:
        rec["status"] = "timeout" if rc is None else "error"
        rec["error"] = (f"killed after {limit:.0f} s\n" if rc is None else f"exit {rc}\n") + tail(log, 2500)
        partial = read_jsonl(out / "phases" / f"{name}.rows.jsonl")
        meta = out / "phases" / f"{name}.meta.json"
        if partial:  # what the phase measured before it stopped
            rec["result"] = {**(json.loads(meta.read_text()) if meta.is_file() else {}), "rows": partial,
                             "partial": True}


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.work is None:
        import tempfile
        args.work = os.path.join(tempfile.gettempdir(), "gpu_check")
    if args.phase:
        run_phase(args)
        return None
    out, work = Path(args.out_dir), Path(args.work)
    for d in (out / "logs", out / "phases", work):
        d.mkdir(parents=True, exist_ok=True)
    wanted = ["env"] + [p.strip() for p in args.phases.split(",") if p.strip() and p.strip() != "env"]
    unknown = [p for p in wanted if p not in PHASES]
    if unknown:
        raise SystemExit(f"gpu_check.py: error: unknown phase(s) {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    t_start = time.time()
    deadline = t_start + args.budget
    report = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "dry_run": args.dry_run,
              "argv": sys.argv[1:] if argv is None else argv, "budget_s": args.budget, "order": wanted,
              "phases": {p: {"status": "pending"} for p in wanted}}

    def save():
        report["elapsed_s"] = time.time() - t_start
        write_json(out / "gpu_check.json", report)
        (out / "gpu_check.md").write_text(markdown(report))

    save()

    def on_term(signum, frame):  # the command's own timeout: stop the running phase, keep what is done
        raise SystemExit(f"gpu_check.py: signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    for name in wanted:
        rec = report["phases"][name]
        left = deadline - time.time()
        if report["phases"]["env"]["status"] not in ("ok", "pending"):
            rec.update(status="skipped", error="the env phase failed")
            save()
            continue
        if left < MIN_PHASE_S:
            rec.update(status="skipped", error=f"budget: {left:.0f} s left")
            save()
            continue
        limit = min(PHASES[name][1 if args.dry_run else 0], left)
        launch_phase(args, name, limit, out, work, rec, save)
        print(f"[gpu_check] {name}: {rec['status']} in {rec['seconds']:.0f} s", flush=True)
        save()
    print((out / "gpu_check.md").read_text(), flush=True)
    return report


if __name__ == "__main__":
    report = main()
    # exit status 1 when a phase failed or hit its limit (skipped phases and the dry run's missing numbers are fine)
    sys.exit(int(report is not None and any(r["status"] in ("error", "timeout", "check-failed")
                                            for r in report["phases"].values())))
