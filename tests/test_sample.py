"""sample.py: the grid (grid.py), prompt files, seeds independent of batch size, --finetuned/--compare, and the CLI
offline."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import cli
import lora
import sample
import weights
from grid import make_grid
from rewards import build_reward
from scheduler import DDIMScheduler, SchedulerConfig
from weights import load_pipeline

ROOT = Path(__file__).resolve().parents[1]


def test_make_grid_layout_and_labels():
    colours = torch.linspace(0, 1, 5)
    images = torch.stack([torch.full((3, 16, 16), float(c)) for c in colours])  # 5 flat grey images
    grid = make_grid(images, ncols=3, captions=[f"img {i}" for i in range(5)], row_labels=["row a", "row b"],
                            col_labels=["base", "base", "tuned"], min_cell=64)
    assert grid.mode == "RGB"
    # 16 px cells upscaled x4 to 64 px; 3 columns with pad 6 plus a 3*pad gap between the two column groups
    assert grid.width == 6 + 3 * (64 + 6) + 18
    px = grid.load()
    # the middle of each pasted cell carries its image's grey level (row-major), text never overlaps an image
    lines = (13 + 4)
    for i, c in enumerate(colours.tolist()):
        r, col = divmod(i, 3)
        x = 6 + col * 70 + (18 if col == 2 else 0) + 32
        y = (lines + 6) + r * (lines + 64 + lines + 12) + 6 + lines + 32
        assert px[x, y] == (round(c * 255),) * 3, (i, px[x, y])
    with pytest.raises(ValueError, match="captions"):
        make_grid(images, ncols=3, captions=["one"])
    with pytest.raises(ValueError, match="no images"):
        make_grid([], ncols=3)
    # PIL inputs, a long caption is wrapped and cut to max_caption_lines
    pil = [Image.new("RGB", (200, 200), "red")]
    long = make_grid(pil, ncols=1, captions=["word " * 200], max_caption_lines=2)
    short = make_grid(pil, ncols=1, captions=["word"], max_caption_lines=2)
    assert long.size[0] == short.size[0] == 212 and long.size[1] == short.size[1] + 17


def test_read_prompts(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a cat\n\n# a comment\n  a dog  \n")
    assert sample.read_prompts(["first"], str(f)) == ["first", "a cat", "a dog"]
    assert sample.read_prompts(None, None) == sample.DEFAULT_PROMPTS
    # --prompts NAME means what it means in train.py: a built-in set, or a file read by the same reader
    assert sample.read_prompts(None, "shapes-hard") == cli.load_prompts("shapes-hard")[:] and \
        len(sample.read_prompts(None, "simple_animals")) == 45
    assert sample.read_prompts(None, str(f)) == cli.load_prompts(str(f))
    with pytest.raises(FileNotFoundError, match="neither a built-in set .* nor a file"):
        sample.read_prompts(None, str(tmp_path / "missing.txt"))


def test_same_seed_same_image_at_any_batch_size():
    pipe = load_pipeline("tiny")
    sched = DDIMScheduler(SchedulerConfig.from_dict(pipe.scheduler_config), 5)
    prompts, seeds = ["a cat", "a dog", "a cat"], [3, 4, 5]
    together = weights.sample_images(pipe, sched, prompts, seeds, batch_size=3)
    alone = weights.sample_images(pipe, sched, prompts[1:2], seeds[1:2], batch_size=1)
    assert together.shape == (3, 3, 64, 64) and together.dtype == torch.float32
    assert (together[1] - alone[0]).abs().max().item() <= 1e-5
    assert (together[0] - together[2]).abs().max().item() > 1e-3  # same prompt, other seed: another image


def _finetuned_checkpoints(tmp_path):
    """A LoRA file and a full-UNet run dir in the trainer's export formats (CONTRACTS.md), both != the base."""
    pipe = load_pipeline("tiny")
    lora.add_lora(pipe.unet, rank=2)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    lora_file = tmp_path / "lora.safetensors"
    lora.save_lora(lora_file, pipe.unet, {"base_model": "tiny"})
    run = tmp_path / "run"
    (run / "export" / "unet").mkdir(parents=True)
    full = lora.merge_and_remove(pipe.unet)
    save_file({k: v.contiguous() for k, v in full.state_dict().items()},
              str(run / "export" / "unet" / "diffusion_pytorch_model.safetensors"),
              metadata={"format": "nanoddpo-unet", "base_model": "tiny"})
    (run / "export" / "unet" / "config.json").write_text(json.dumps(full.config.to_dict()))
    return lora_file, run


def test_finetuned_and_compare(tmp_path):
    lora_file, run = _finetuned_checkpoints(tmp_path)
    common = ["--model", "tiny", "--prompt", "a cat", "--prompt", "a dog", "--n", "2", "--steps", "4",
              "--device", "cpu", "--seed", "7"]
    res = sample.main(common + ["--finetuned", str(lora_file), "--compare", "--out", str(tmp_path / "cmp.png")])
    base, tuned = res["base"][0], res["fine-tuned"][0]
    assert base.shape == tuned.shape == (4, 3, 64, 64)
    assert (base - tuned).abs().max().item() > 1e-3  # the adapters change the images
    # identical seeds: the base half equals a base-only run, the fine-tuned half equals the full-UNet export
    only_base = sample.main(common + ["--batch-size", "1", "--out", str(tmp_path / "base.png")])
    assert (only_base["base"][0] - base).abs().max().item() <= 1e-5
    full = sample.main(common + ["--finetuned", str(run), "--out", str(tmp_path / "full.png")])
    assert (full["fine-tuned"][0] - tuned).abs().max().item() <= 1e-4
    wide, narrow = Image.open(tmp_path / "cmp.png"), Image.open(tmp_path / "base.png")
    assert wide.width > 2 * narrow.width - 20 and wide.height > narrow.height  # two column groups + their labels


def test_cli_writes_a_grid_offline_with_scores(tmp_path):
    out = tmp_path / "grid.png"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "sample.py", "--model", "tiny", "--prompt", "a red apple", "--n", "3", "--steps", "10",
           "--reward", "jpeg-compressibility", "--reward-option", "quantize=false", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Image.open(out).size[0] >= 3 * 64
    scores = [ln for ln in proc.stdout.splitlines() if ln.startswith("base\tseed")]
    assert len(scores) == 3 and all("jpeg-compressibility=-" in ln for ln in scores)


def test_cli_help_and_bad_flags(capsys):
    with pytest.raises(SystemExit):
        sample.parse_args(["--help"])
    help_text = capsys.readouterr().out
    for flag in ("--model", "--prompt ", "--prompts", "--n ", "--seed", "--steps", "--guidance", "--eta", "--size",
                 "--negative-prompt", "--dtype", "--device", "--batch-size", "--finetuned", "--compare", "--reward",
                 "--out"):
        assert flag in help_text, flag
    assert "--reward-option" in help_text and "--hps-checkpoint" in help_text and "--clip-path" in help_text
    # the reward table is the epilog, line by line, not squeezed into the --reward help
    assert "\n  jpeg-compressibility     minus the JPEG" in help_text and "\n  quantize " in help_text
    for argv, message in ((["--compare"], "--compare needs --finetuned"), (["--n", "0"], "--n must be >= 1"),
                          (["--eta", "2"], "--eta must be in [0, 1]")):
        with pytest.raises(SystemExit):
            sample.parse_args(argv)
        assert message in capsys.readouterr().err


def test_reward_options_reach_build_reward_and_bad_ones_fail_in_one_line(tmp_path, monkeypatch):
    seen = []

    def spy(spec, device="cpu", **options):
        seen.append(options)
        return build_reward(spec, device, **options)
    monkeypatch.setattr(sample, "build_reward", spy)
    argv = ["--model", "tiny", "--prompt", "a cat", "--n", "1", "--steps", "2", "--device", "cpu",
            "--reward", "jpeg-compressibility", "--out", str(tmp_path / "g.png")]
    res = sample.main(argv + ["--reward-option", "quantize=false", "--reward-option", "chunk_size=2",
                              "--hps-checkpoint", "hps.pt", "--clip-path", "clip-folder"])
    assert seen == [{"quantize": "false", "chunk_size": "2", "hps_checkpoint": "hps.pt", "clip_path": "clip-folder"}]
    assert res["base"][1][0] < 0  # scored: minus the JPEG size
    for option, message in (("quantize=maybe", "option quantize='maybe' is not a valid bool"),
                            ("colour=red", "unknown reward option(s) ['colour']"),
                            ("quantize", "--reward-option wants KEY=VALUE, got 'quantize'")):
        with pytest.raises(SystemExit) as e:
            sample.main(argv + ["--reward-option", option])
        msg = str(e.value.code)
        assert msg.startswith("sample.py: error: rewards.py: ") and "\n" not in msg and message in msg, msg
    with pytest.raises(SystemExit) as e:
        sample.main(argv + ["--reward", "jpeg"])  # the last --reward wins
    assert str(e.value.code).startswith("sample.py: error: rewards.py: unknown reward 'jpeg'")
    assert len(seen) == 1  # every bad input failed before build_reward


def test_bad_finetuned_checkpoint_fails_in_one_line_before_sampling(tmp_path, monkeypatch):
    loads = []
    monkeypatch.setattr(sample, "load_pipeline", lambda *a, **k: loads.append(a) or pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as e:
        sample.main(["--model", "tiny", "--finetuned", str(tmp_path / "missing"), "--compare"])
    msg = str(e.value.code)
    assert msg.startswith("sample.py: error: --finetuned ") and "no such file or folder" in msg and "\n" not in msg
    assert not loads  # refused before the model loads
    monkeypatch.undo()
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(SystemExit) as e:
        sample.main(["--model", "tiny", "--prompt", "a cat", "--n", "1", "--steps", "2", "--device", "cpu",
                     "--finetuned", str(junk), "--out", str(tmp_path / "g.png")])
    msg = str(e.value.code)
    assert msg.startswith("sample.py: error: ") and "not a readable safetensors file" in msg and "\n" not in msg


def test_finetuned_run_supplies_its_own_sampling_settings(tmp_path, capsys):
    """A run directory's config.json is the default for model, steps, guidance, eta, size and negative prompt;
    a flag given on the command line wins. A bad flag is one line, not argparse's usage block."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "tiny", "steps": 7, "guidance": 1.5, "eta": 0.5,
                                                 "size": 48, "negative_prompt": "blurry", "lr": 1e-3}))
    args = sample.parse_args(["--finetuned", str(run)])
    assert (args.model, args.steps, args.guidance, args.eta, args.size, args.negative_prompt) == \
        ("tiny", 7, 1.5, 0.5, 48, "blurry")
    args = sample.parse_args(["--finetuned", str(run), "--steps", "3", "--guidance", "5", "--negative-prompt", ""])
    assert (args.steps, args.guidance, args.eta, args.negative_prompt) == (3, 5.0, 0.5, "")
    args = sample.parse_args([])   # no run: the documented defaults
    assert (args.model, args.steps, args.guidance, args.eta, args.size) == (sample.DEFAULT_MODEL, 50, 5.0, 1.0, None)
    with pytest.raises(SystemExit):
        sample.parse_args(["--batch-size", "0"])
    err = capsys.readouterr().err
    assert err == "sample.py: error: --batch-size must be >= 1, got 0 (see --help)\n"
