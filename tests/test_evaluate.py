"""evaluate.py: the table of Zhang et al.'s Tables 1 and 5 (mean ± standard error per model and reward, fixed
seeds, the same sampling settings for every model)."""
import json
import math
import statistics

import pytest
import torch

import evaluate
import lora
from pretrain_data import PretrainLoss, read_pairs
from rewards import build_reward
from scheduler import DDIMScheduler, SchedulerConfig
from weights import load_finetuned, load_pipeline, sample_images

PROMPTS = ["three red squares", "a blue circle left of a yellow triangle", "a red circle"]


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    """A train.py-shaped run directory on the shapes model: config.json (6 steps, guidance 3) and a LoRA with
    random B in export/, so that its images differ from the base model's."""
    run = tmp_path_factory.mktemp("evaluate") / "run"
    (run / "export").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": "shapes", "steps": 6, "guidance": 3.0, "eta": 1.0,
                                                 "size": None, "negative_prompt": ""}))
    unet = load_pipeline("shapes").unet.requires_grad_(False)
    lora.add_lora(unet, rank=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora.lora_parameters(unet):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    lora.save_lora(run / "export" / "lora.safetensors", unet, metadata={"base_model": "shapes"})
    return run


def test_table_equals_a_direct_computation(fake_run, tmp_path):
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("# three prompts of the shapes world\n" + "\n".join(PROMPTS) + "\n")
    table = evaluate.main(["--models", "shapes", str(fake_run), "--prompts", str(prompt_file), "--reward", "shapes",
                           "--reward", "jpeg-compressibility", "--seeds", "2", "--seed", "5", "--batch-size", "2",
                           "--pretrain-data", "shapes", "--pretrain-batches", "2", "--out", str(tmp_path / "t")])
    assert table["settings"]["steps"] == 6 and table["settings"]["guidance"] == 3.0   # the run's, for both models
    saved = json.loads((tmp_path / "t.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert saved["models"] == ["shapes", str(fake_run)] and saved["images"] == 6
    md = (tmp_path / "t.md").read_text()
    assert md.count("\n| shapes |") == 1 and f"| {fake_run} |" in md and "shapes: relation" in md

    # the run's row, recomputed: prompt-major order, seeds 5 and 6, one batch of all six images
    pipe = load_finetuned(load_pipeline("shapes"), fake_run)
    sched = DDIMScheduler(SchedulerConfig.from_dict(pipe.scheduler_config), 6)
    prompts = [p for p in PROMPTS for _ in range(2)]
    images = sample_images(pipe, sched, prompts, [5, 6] * 3, guidance=3.0, batch_size=6)
    want = build_reward("shapes")(images, prompts)[0].tolist()
    got = table["results"][str(fake_run)]["shapes"]
    assert got["scores"] == pytest.approx(want, abs=1e-6)
    assert got["mean"] == pytest.approx(statistics.mean(want))
    assert got["se"] == pytest.approx(statistics.stdev(want) / math.sqrt(6))
    # L_pre: the regulariser's eps-MSE on the same fixed batches (seed 0, steps 0 and 1) for every model
    pre = PretrainLoss(read_pairs("shapes"), pipe, sched, 1.0, 16, 32, seed=0, rank=0)
    with torch.no_grad():
        want_pre = [float(pre(pipe.unet, i)[1]) for i in range(2)]
    assert table["results"][str(fake_run)]["L_pre"]["scores"] == pytest.approx(want_pre, rel=1e-5)
    assert md.splitlines()[2].startswith("| model | shapes | jpeg-compressibility | L_pre |")
    base = table["results"]["shapes"]["jpeg-compressibility"]["scores"]
    tuned = table["results"][str(fake_run)]["jpeg-compressibility"]["scores"]
    assert base != tuned, "the fine-tuned weights were not applied"
    print(md)


def test_bad_input_is_one_line(tmp_path, capsys):
    for argv, words in ((["--models", "shapes", "--prompts", "shapes-hard", "--reward", "nope"], "unknown reward"),
                        (["--models", str(tmp_path), "--prompts", "shapes-hard", "--reward", "shapes"],
                         "neither config.json"),
                        (["--models", "shapes", "--prompts", "missing.txt", "--reward", "shapes"], "neither a built-in")):
        with pytest.raises(SystemExit) as e:
            evaluate.main(argv + ["--out", str(tmp_path / "x")])
        msg = str(e.value.code)
        assert msg.startswith("evaluate.py: error: ") and "\n" not in msg and words in msg, msg
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--models", "shapes", "--prompts", "shapes", "--reward", "shapes", "--seeds", "0"])
    assert capsys.readouterr().err == "evaluate.py: error: --seeds must be >= 1, got 0 (see --help)\n"
