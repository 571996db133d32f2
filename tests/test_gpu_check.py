"""gpu_check.py, the one-command GPU session script: its CPU dry run runs every phase at toy sizes through the same
code as on the GPU (phase subprocesses, bench.py with and without torch.compile, train.py + --resume, train.main's
memory runs, pretrain.py), and its report keeps what a cut-short phase measured."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import gpu_check

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow   # 80-90 s on 2 cores: eleven Python processes, each importing torch (and most, transformers)
def test_dry_run_runs_every_phase(tmp_path):
    out = tmp_path / "out"
    t0 = time.time()
    proc = subprocess.run([sys.executable, "gpu_check.py", "--dry-run", "--out-dir", str(out),
                           "--work", str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True, timeout=400,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1"))
    wall = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    md = (out / "gpu_check.md").read_text()
    print(f"gpu_check --dry-run: {wall:.0f} s; " + ", ".join(f"{k} {v['seconds']:.0f} s"
                                                          for k, v in report["phases"].items()))
    assert report["order"] == list(gpu_check.PHASES)
    has_pretrain = (ROOT / "pretrain.py").is_file()
    for name, rec in report["phases"].items():
        want = "ok" if has_pretrain or name != "pretrain" else "skipped"
        assert rec["status"] == want, f"{name}: {rec['status']}\n{rec.get('error', '')}"
        assert re.search(rf"^\| {name} \| {want} \| \d+ \| .+ \|$", md, re.M), f"no table row for {name}"

    # train.py: one epoch, its checkpoint, a resumed second epoch; the first PPO ratio within the clip range
    train = report["phases"]["train"]["result"]
    assert [e["epoch"] for e in train["epochs"]] == [0, 1] and train["resumed"]
    assert train["checkpoints_first_run"] == ["epoch_0001"] and train["checkpoints"] == ["epoch_0002"]
    assert train["export"]
    assert train["first_ratio_max_dev"] is not None and train["first_ratio_below_clip"]
    assert all(0 <= e["first_ratio_max_dev"] <= train["clip_range"] for e in train["epochs"])
    assert "first_ratio_max_dev" in md and "below clip range" in md

    # bench.py: ours and the diffusers loop in one process, ratios in the table; compiled: one graph per shape
    rows = report["phases"]["bench"]["result"]["rows"]
    assert {r["impl"] for r in rows} == {"ours", "ours+ckpt", "diffusers"}
    assert {"unet forward", "rollout", "vae decode", "update lora", "update full", "epoch (lora)"} <= {
        r["name"] for r in rows}
    assert all(r["seconds"] > 0 and r["flops"] > 0 for r in rows)
    ratios = [r["ref_over_ours"] for r in gpu_check.bench_rows(report["phases"]["bench"]["result"])
              if r["ref_over_ours"] is not None]
    assert len(ratios) == 6 and all(x > 0 for x in ratios)
    compiled = report["phases"]["bench_compile"]["result"]
    assert compiled["compile"]["unique_graphs"] >= 1 and not compiled["compile"]["recompiles"]
    assert "epoch (lora)" in {r["name"] for r in compiled["rows"]}

    # memory: train.main four times (no CUDA here, so no numbers, but every configuration ran)
    mem = report["phases"]["memory"]["result"]["rows"]
    assert [r["config"] for r in mem] == ["lora", "lora + ckpt", "full", "full + ckpt"]
    assert [r["lora_rank"] for r in mem] == [4, 4, 0, 0] and [r["grad_checkpointing"] for r in mem] == [0, 1, 0, 1]
    if has_pretrain:
        assert report["phases"]["pretrain"]["result"]["finished"]
        assert (out / "pretrain_model" / "model_index.json").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run without a GPU")
def test_without_a_gpu_the_run_stops_after_env(tmp_path):
    """Not a dry run and no CUDA: the env phase (which imports every package for real) fails in seconds, says
    why, and no later phase starts."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "gpu_check.py", "--out-dir", str(out), "--work", str(tmp_path / "w"),
                           "--phases", "env,bench"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    env, bench = report["phases"]["env"], report["phases"]["bench"]
    assert env["status"] == "error" and "no CUDA device" in env["error"]
    assert env["result"]["rows"][0]["missing"] == []     # what it found is kept: every package imported
    assert bench["status"] == "skipped" and bench["error"] == "the env phase failed"
    md = (out / "gpu_check.md").read_text()
    assert re.search(r"^\| env \| error \| \d+ \| cpu, torch .*no CUDA device", md, re.M), md


def test_report_keeps_partial_and_failed_phases():
    """A bench phase killed at its limit still shows its rows; failed and skipped phases get a row each."""
    row = {"name": "rollout", "impl": "ours", "seconds": 2.0, "units": 8, "unit": "img", "flops": 4e14,
           "peak_mem_gb": 9.5}
    report = {"started": "now", "dry_run": False, "budget_s": 480, "elapsed_s": 300,
              "order": ["env", "bench", "train", "memory"],
              "phases": {"env": {"status": "ok", "seconds": 3, "result": {"gpu": "NVIDIA H200", "torch": "2.9",
                                                                        "cuda": "12.8", "matmul": {}}},
                         "bench": {"status": "timeout", "seconds": 200, "error": "killed after 200 s\n...",
                                   "result": {"rows": [row], "partial": True, "peak_tflops": 790.0, "argv": []}},
                         "train": {"status": "error", "seconds": 12, "error": "exit 1\nRuntimeError: CUDA OOM"},
                         "memory": {"status": "skipped", "error": "budget: 10 s left"}}}
    md = gpu_check.markdown(report)
    assert "| bench | timeout | 200 | rollout 4 img/s, MFU 25.3%, ref/ours -; killed after 200 s |" in md
    assert "| train | error | 12 | RuntimeError: CUDA OOM |" in md
    assert "| memory | skipped | 0 | budget: 10 s left |" in md
    assert "(partial)" in md and "| rollout | ours | 2.000 | 4 img | 200 | 25.3% | 9.50 | - |" in md
