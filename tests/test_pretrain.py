"""pretrain.py on a toy budget: both losses fall, an interrupted run resumes to exactly the uninterrupted result,
the export loads through load_pipeline, and bad flags get one line."""
import json

import pytest
import torch
from safetensors.torch import load_file

import pretrain
import weights

SMALL = ["--dataset-size", "96", "--vae-steps", "30", "--vae-batch-size", "8", "--unet-steps", "30",
         "--batch-size", "16", "--warmup", "5", "--save-every", "10", "--log-every", "5"]


def run(tmp, name, *extra):
    out, export = tmp / name, tmp / f"{name}-model"
    pretrain.main([*SMALL, "--out", str(out), "--export", str(export), *extra])
    return out, export


def logged(out, stage, key):
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if r["stage"] == stage]


def test_losses_fall_and_export_loads(tmp_path):
    out, export = run(tmp_path, "a")
    vae, unet = logged(out, "vae", "mse"), logged(out, "unet", "loss")
    assert len(vae) == len(unet) == 6
    assert vae[-1] < 0.7 * vae[0], vae
    assert sum(unet[-2:]) < 0.95 * sum(unet[:2]), unet
    pipe = weights.load_pipeline(str(export))
    assert pipe.vae.config.scaling_factor == pytest.approx(logged(out, "done", "scaling_factor")[0])
    assert pipe.unet.config.sample_size * 4 == pipe.vae.config.sample_size == 32
    assert pipe.encode_prompts(["a red circle"]).shape == (1, 77, 32)


def test_interrupted_run_resumes_exactly(tmp_path, monkeypatch):
    _, whole = run(tmp_path, "whole")
    real_save, saves = pretrain.save_state, []

    def save_then_die(path, state):   # killed right after the first UNet checkpoint (step 10 of 30)
        real_save(path, state)
        saves.append(state["stage"])
        if state["stage"] == "unet":
            raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "cut")
    monkeypatch.setattr(pretrain, "save_state", real_save)
    assert saves == ["vae"] * 3 + ["unet"]
    pretrain.main(["--out", str(tmp_path / "cut"), "--resume"])
    resumed = tmp_path / "cut-model"
    for part, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        a, b = (load_file(str(d / part / f"{name}.safetensors")) for d in (whole, resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_freeze_token_embedding_keeps_the_table_and_trains_the_rest(tmp_path):
    _, export = run(tmp_path, "frozen", "--vae-steps", "2", "--unet-steps", "4", "--freeze-token-embedding")
    _, _, init = pretrain.build_models(0)
    init = {k: v.half() for k, v in init.state_dict().items()}
    trained = load_file(str(export / "text_encoder" / "model.safetensors"))
    table = [k for k in trained if k.endswith("token_embedding.weight")]
    assert len(table) == 1 and torch.equal(trained[table[0]], init[table[0].removeprefix("text_model.")])
    moved = [k for k in trained if "position_embedding" in k or "layers.0.mlp.fc1.weight" in k]
    assert moved and all(not torch.equal(trained[k], init[k.removeprefix("text_model.")]) for k in moved)


def test_bad_flags_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--unet-steps must be >= 1"):
        pretrain.main(["--unet-steps", "0", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="--p2-gamma must be >= 0"):
        pretrain.main(["--p2-gamma", "-1", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="no .*state.pt; start without --resume"):
        pretrain.main(["--resume", "--out", str(tmp_path / "nothing")])


def test_relation_probe_tells_a_model_that_reads_relation_words_from_one_that_does_not():
    """relation_probe compares the ε-MSE with each relation caption and with its relation swapped, on the same x_t:
    a denoiser blind to the caption scores both the same, one whose output follows the caption does not."""
    vae, _, _ = pretrain.build_models(0)
    vae.eval()
    encode = lambda caps: torch.stack([torch.full((77, 4), float(" left of " in c or " above " in c)) for c in caps])
    blind = lambda x, t, c: torch.zeros_like(x)
    reads = lambda x, t, c: c[:, 0, :4, None, None].expand_as(x)   # the caption's relation moves the prediction
    own, swapped = pretrain.relation_probe(blind, encode, vae, n=16)
    assert own == swapped
    own, swapped = pretrain.relation_probe(reads, encode, vae, n=16)
    assert abs(own - swapped) > 0.1 * own
    assert pretrain.SWAPPED["left of"] == "right of" and pretrain.SWAPPED["below"] == "above"
