"""rewards.py / rewards_http.py: parity with the published recipes on tiny random models in the real layouts,
HTTP rewards against real local servers (good, garbage, slow, failing), JPEG sizes, diversity, fairness,
weighted sums, NaN."""
import base64
import contextlib
import functools
import gzip
import io
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

import rewards
from rewards import RewardWarning, build_reward, drop_nonfinite, finite_mask

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
TINY_OPEN_CLIP = {"embed_dim": 32,
                  "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
PROMPTS = ["a cat", "a dog on a skateboard", "a cat", "an astronaut riding a horse", "a bowl of fruit",
           "a dog on a skateboard"]


def make_images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Smooth random scenes with some grain and saturated regions, (n,3,h,w) in [0,1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 6, 6, generator=g) * 1.4 - 0.2
    x = F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)
    return (x + 0.04 * torch.randn(n, 3, h, w, generator=g)).clamp(0, 1)


def uint8_pils(images: torch.Tensor) -> list[Image.Image]:
    u8 = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in u8]


@functools.cache
def open_clip_tokenizer():
    return open_clip.get_tokenizer("ViT-H-14")


def report(label: str, value: float) -> None:
    print(f"\n[measured] {label}: {value:.3g}")


# -----------------------------------------------------------------------------
# HPS on a tiny open_clip CLIP saved as an HPS checkpoint

@pytest.fixture(scope="module")
def hps_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hps")
    (d / "tiny_clip.json").write_text(json.dumps(TINY_OPEN_CLIP))
    torch.manual_seed(0)
    sd = {k: v.half() for k, v in open_clip.model.CLIP(**TINY_OPEN_CLIP, output_dict=True).state_dict().items()}
    torch.save({"state_dict": sd, "iterations": 4000, "name": "tiny"}, d / "hps.pt")
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, d / "hps_module.pt")
    ref = open_clip.model.CLIP(**TINY_OPEN_CLIP, output_dict=True)
    ref.load_state_dict(sd)  # fp16 tensors into the fp32 model, as hpsv2 does
    return SimpleNamespace(cfg=str(d / "tiny_clip.json"), ckpt=str(d / "hps.pt"), ckpt_module=str(d / "hps_module.pt"),
                           ref=ref.eval(), dir=d)


@pytest.fixture(scope="module")
def hps(hps_files):
    return build_reward("hps", hps_checkpoint=hps_files.ckpt, hps_arch=hps_files.cfg)


def hps_preprocess_val(pil: Image.Image) -> torch.Tensor:
    """hpsv2 preprocess_val with light_augmentation: ToTensor -> ResizeMaxSize(224, BICUBIC, fill 0) -> normalize."""
    x = TF.to_tensor(pil.convert("RGB"))
    h, w = x.shape[1:]
    scale = 224 / float(max(h, w))
    if scale != 1.0:
        new = [round(h * scale), round(w * scale)]
        x = TF.resize(x, new, InterpolationMode.BICUBIC, antialias=True)  # torchvision >= 0.17 tensor default
        ph, pw = 224 - new[0], 224 - new[1]
        x = TF.pad(x, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=0)
    return TF.normalize(x, MEAN, STD)


def hps_reference(model, pils, prompts) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.stack([hps_preprocess_val(p) for p in pils]), open_clip_tokenizer()(prompts))
    return (out["image_features"] @ out["text_features"].T).diag()


@pytest.mark.parametrize("hw", [(256, 256), (200, 320), (300, 180), (224, 224)])
def test_hps_matches_hpsv2_recipe(hps, hps_files, hw):
    images = make_images(len(PROMPTS), *hw, seed=hw[0])
    ref = hps_reference(hps_files.ref, uint8_pils(images), PROMPTS)
    scores, info = hps(images, PROMPTS)
    assert scores.dtype == torch.float32 and scores.shape == (len(PROMPTS),)
    diff = (scores - ref).abs().max().item()
    report(f"HPS tensor path vs hpsv2 preprocess_val on the PNG, {hw} (score spread {ref.std():.3g})", diff)
    assert diff <= 1e-5 and diff <= 1e-3 * ref.std()
    assert torch.equal(scores.argsort(), ref.argsort())
    assert torch.equal(info["components"]["hps"], scores)


def test_hps_checkpoint_variants(hps, hps_files):
    images = make_images(3, 192, 256, seed=3)
    prompts = PROMPTS[:3]
    prefixed = build_reward("hps-v2.0", hps_checkpoint=hps_files.ckpt_module, hps_arch=hps_files.cfg)
    assert prefixed.parts[0][2].name == "hps-v2.0"
    assert torch.equal(prefixed(images, prompts)[0], hps(images, prompts)[0])
    # quantize=False scores the float image: the 8-bit rounding of a saved PNG changes scores by this much
    raw = build_reward("hps", hps_checkpoint=hps_files.ckpt, hps_arch=hps_files.cfg, quantize="false")
    diff = (raw(images, prompts)[0] - hps_reference(hps_files.ref, uint8_pils(images), prompts)).abs().max().item()
    report("HPS float images (quantize=False) vs hpsv2 on the uint8 PNG", diff)
    assert 0 < diff < 1e-3


def test_hps_tensor_path_vs_open_clip_pil_path(hps_files):
    """open_clip 3.3's own 'longest' transform resizes the PIL image (PIL bicubic) instead of the tensor."""
    images = make_images(len(PROMPTS), 200, 320, seed=7)
    pils = uint8_pils(images)
    pil_tf = open_clip.image_transform(224, is_train=False, mean=MEAN, std=STD, resize_mode="longest",
                                       interpolation="bicubic", fill_color=0)
    ours_px = torch.stack([hps_preprocess_val(p) for p in pils])
    pil_px = torch.stack([pil_tf(p) for p in pils])
    report("HPS pixels: tensor resize vs open_clip PIL resize, mean |d| (normalised units)",
           (ours_px - pil_px).abs().mean().item())
    with torch.no_grad():
        out = hps_files.ref(pil_px, open_clip_tokenizer()(PROMPTS))
    pil_scores = (out["image_features"] @ out["text_features"].T).diag()
    diff = (pil_scores - hps_reference(hps_files.ref, pils, PROMPTS)).abs().max().item()
    report("HPS score: tensor path vs open_clip PIL path (tiny random model)", diff)
    assert (ours_px - pil_px).abs().mean() < 0.05 and diff < 0.05


def test_hps_bad_checkpoints(hps_files):
    with pytest.raises(FileNotFoundError, match="hps_checkpoint"):
        build_reward("hps", hps_checkpoint=str(hps_files.dir / "missing.pt"), hps_arch=hps_files.cfg)
    torch.save([1, 2, 3], hps_files.dir / "junk.pt")
    with pytest.raises(ValueError, match="not an HPS checkpoint"):
        build_reward("hps", hps_checkpoint=str(hps_files.dir / "junk.pt"), hps_arch=hps_files.cfg)
    other = dict(TINY_OPEN_CLIP, embed_dim=16)
    (hps_files.dir / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="does not fit the model.*hps_arch"):
        build_reward("hps", hps_checkpoint=hps_files.ckpt, hps_arch=str(hps_files.dir / "other.json"))
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        build_reward("hps", hps_checkpoint=hps_files.ckpt, hps_arch="ViT-Q-99")
    with pytest.raises(FileNotFoundError, match="hps_checkpoint=PATH") as e:  # hub default, offline in tests
        build_reward("hps")
    assert "(command line: --hps-checkpoint PATH or --reward-option hps_checkpoint=PATH)" in str(e.value)


# -----------------------------------------------------------------------------
# transformers CLIP: aesthetic, diversity, PickScore

def tiny_clip(projection_dim: int, seed: int) -> CLIPModel:
    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      vocab_size=49408, max_position_embeddings=77),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=224, patch_size=32),
                     projection_dim=projection_dim)
    return CLIPModel(cfg).eval()


def clip_tokenizer(d) -> CLIPTokenizer:
    """The real CLIP BPE tokenizer (49408 tokens), built offline from open_clip's bundled merges."""
    merges = gzip.open(open_clip.tokenizer.default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    byte_chars = list(open_clip.tokenizer.bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(vocab=str(d / "vocab.json"), merges=str(d / "merges.txt"))


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    tiny_clip(768, seed=1).save_pretrained(d / "clip-l")  # 768-d projection: the aesthetic MLP's real shapes
    g = torch.Generator().manual_seed(2)
    shapes = [(1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]
    mlp = {}
    for i, (o, n) in zip([0, 2, 4, 6, 7], shapes):
        mlp[f"layers.{i}.weight"] = torch.randn(o, n, generator=g) / math.sqrt(n)
        mlp[f"layers.{i}.bias"] = torch.randn(o, generator=g) * 0.1
    torch.save(mlp, d / "aesthetic.pth")
    pick = tiny_clip(16, seed=3)
    pick.logit_scale.data.fill_(math.log(60.0))  # not the init value, so the test sees the scale is read
    pick.save_pretrained(d / "pick")
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=clip_tokenizer(d)).save_pretrained(d / "proc")
    return SimpleNamespace(clip=str(d / "clip-l"), mlp=mlp, mlp_path=str(d / "aesthetic.pth"), pick=str(d / "pick"),
                           proc=str(d / "proc"))


def test_clip_rewards_without_weights_say_which_option(clip_files):
    with pytest.raises(FileNotFoundError, match="pass clip_path=") as e:  # hub default, offline in tests
        build_reward("aesthetic")
    assert "--clip-path PATH or --reward-option clip_path=PATH" in str(e.value)
    with pytest.raises(FileNotFoundError, match="aesthetic_checkpoint=PATH") as e:
        build_reward("aesthetic", clip_path=clip_files.clip)
    assert "--aesthetic-checkpoint PATH or --reward-option aesthetic_checkpoint=PATH" in str(e.value)
    with pytest.raises(ValueError, match="aesthetic MLP .* does not fit"):
        build_reward("aesthetic", clip_path=clip_files.pick, aesthetic_checkpoint=clip_files.mlp_path)  # 16-d CLIP
    with pytest.raises(FileNotFoundError, match="pass pickscore_processor=") as e:
        build_reward("pickscore", pickscore_path=clip_files.pick)
    assert "(command line: --reward-option pickscore_processor=PATH)" in str(e.value)  # no flag of its own


def processor_pixels(processor, images: torch.Tensor) -> torch.Tensor:
    """CLIPImageProcessor on the float images, pixel values clipped to [0,1] as the uint8 processors clip."""
    px = processor(images=list(images), do_rescale=False, return_tensors="pt")["pixel_values"]
    lo = torch.tensor([(0 - m) / s for m, s in zip(MEAN, STD)]).view(1, 3, 1, 1)
    hi = torch.tensor([(1 - m) / s for m, s in zip(MEAN, STD)]).view(1, 3, 1, 1)
    return torch.maximum(torch.minimum(px, hi), lo)


def features(out) -> torch.Tensor:
    return out if torch.is_tensor(out) else out.pooler_output


def aesthetic_reference(clip, mlp, pixel_values) -> torch.Tensor:
    """DDPO: e = get_image_features / |.|, then the linear MLP (dropouts only, no nonlinearity)."""
    with torch.no_grad():
        e = features(clip.get_image_features(pixel_values=pixel_values))
    h = e / e.norm(dim=-1, keepdim=True)
    for i in (0, 2, 4, 6, 7):
        h = h @ mlp[f"layers.{i}.weight"].T + mlp[f"layers.{i}.bias"]
    return h.squeeze(-1)


@pytest.mark.parametrize("hw", [(256, 256), (200, 321)])
def test_aesthetic_matches_ddpo_recipe(clip_files, hw):
    reward = build_reward("aesthetic", clip_path=clip_files.clip, aesthetic_checkpoint=clip_files.mlp_path)
    images = make_images(5, *hw, seed=11)
    q = rewards.quantize(images)
    clip = CLIPModel.from_pretrained(clip_files.clip).eval()
    ref = aesthetic_reference(clip, clip_files.mlp, processor_pixels(CLIPImageProcessor(), q))
    scores, _ = reward(images, PROMPTS[:5])
    diff = (scores - ref).abs().max().item()
    report(f"aesthetic vs CLIPImageProcessor on the same tensor, {hw}", diff)
    assert diff < 1e-3 * ref.std() and torch.equal(scores.argsort(), ref.argsort())
    # the literal DDPO call: processor(images=uint8) (torchvision uint8 kernel in transformers 5, PIL in 4)
    u8 = (q * 255).round().to(torch.uint8)
    for label, px in [("torchvision uint8", CLIPImageProcessor()(images=list(u8), return_tensors="pt")),
                      ("PIL", CLIPImageProcessorPil()(images=uint8_pils(q), return_tensors="pt"))]:
        d = (aesthetic_reference(clip, clip_files.mlp, px["pixel_values"]) - scores).abs()
        report(f"aesthetic: ours vs {label} processor path, max |d| (score spread {ref.std():.3g})", d.max().item())
        assert d.max() < 0.1 * ref.std()


def test_aesthetic_and_diversity_share_one_clip_forward(clip_files):
    reward = build_reward("aesthetic=1,diversity=0.5", clip_path=clip_files.clip,
                          aesthetic_checkpoint=clip_files.mlp_path)
    aesthetic, diversity = reward.parts[0][2], reward.parts[1][2]
    assert aesthetic.encoder is diversity.encoder and not reward.async_ok
    calls = []
    aesthetic.encoder.vision.register_forward_hook(lambda *a: calls.append(1))
    images = make_images(4, 128, 128, seed=5)
    reward(images, ["a", "a", "b", "b"])
    assert len(calls) == 1
    images[0] += 0  # in-place change bumps the version: recomputed
    reward(images, ["a", "a", "b", "b"])
    assert len(calls) == 2


def test_diversity(clip_files):
    reward = build_reward("diversity", clip_path=clip_files.clip)
    base = make_images(4, 96, 96, seed=21)
    same = torch.cat([base[:1].repeat(3, 1, 1, 1), base[1:4]])  # group "a": one image thrice; group "b": three
    scores, info = reward(same, ["a"] * 3 + ["b"] * 3)
    assert scores[:3].abs().max() < 1e-5
    assert scores[3] > 1e-3 and torch.equal(scores[3:], scores[3].expand(3))
    # the value is the mean pairwise cosine distance of the CLIP embeddings
    enc = reward.parts[0][2].encoder
    e = F.normalize(enc(base[1:4]), dim=-1)
    expect = torch.stack([1 - e[i] @ e[j] for i in range(3) for j in range(3) if i != j]).mean()
    assert torch.allclose(scores[3], expect, atol=1e-6)
    scores, info = reward(base[:3], ["a", "a", "solo"])
    assert scores[2] == 0 and info["details"]["diversity"]["single_image_groups"] == 1
    assert "single image" in info["details"]["diversity"]["notes"][0]


def test_pickscore_matches_readme_recipe(clip_files):
    reward = build_reward("pickscore", pickscore_path=clip_files.pick, pickscore_processor=clip_files.proc)
    images = make_images(len(PROMPTS), 200, 280, seed=31)
    q = rewards.quantize(images)
    model, proc = CLIPModel.from_pretrained(clip_files.pick).eval(), CLIPProcessor.from_pretrained(clip_files.proc)

    def reference(pixel_values):  # README: exp(logit_scale) * text_embs @ image_embs.T, one prompt at a time
        out = torch.empty(len(PROMPTS))
        with torch.no_grad():
            img = features(model.get_image_features(pixel_values=pixel_values))
            img = img / img.norm(dim=-1, keepdim=True)
            for i, p in enumerate(PROMPTS):
                t = proc(text=[p], padding=True, truncation=True, max_length=77, return_tensors="pt")
                txt = features(model.get_text_features(**t))
                txt = txt / txt.norm(dim=-1, keepdim=True)
                out[i] = model.logit_scale.exp() * (txt @ img[i:i + 1].T)[0, 0]
        return out

    ref = reference(processor_pixels(proc.image_processor, q))
    scores, _ = reward(images, PROMPTS)
    diff = (scores - ref).abs().max().item()
    report(f"pickscore vs README recipe on the same tensor (score spread {ref.std():.3g})", diff)
    assert diff < 1e-3 * ref.std() and torch.equal(scores.argsort(), ref.argsort())
    pil = reference(proc(images=uint8_pils(q), return_tensors="pt")["pixel_values"])
    report("pickscore: ours vs processor on the uint8 images", (pil - scores).abs().max().item())
    assert (pil - scores).abs().max() < 0.1 * ref.std()


# -----------------------------------------------------------------------------
# JPEG

def test_jpeg_sizes():
    flat = torch.full((1, 3, 128, 128), 0.5)
    noise = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, noise])
    inc, _ = build_reward("jpeg-incompressibility")(images, ["x", "x"])
    comp, _ = build_reward("jpeg-compressibility")(images, ["x", "x"])
    for i, img in enumerate(uint8_pils(images)):
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=95)
        assert inc[i].item() == pytest.approx(len(buf.getvalue()) / 1000)
    assert inc[1] > 10 * inc[0] and torch.equal(comp, -inc)
    report("JPEG q95 kB: flat 128^2 / noise 128^2", inc[0].item())
    report("JPEG q95 kB: noise 128^2", inc[1].item())


# -----------------------------------------------------------------------------
# HTTP rewards against local servers

@contextlib.contextmanager
def serve(behaviour):
    """HTTP server on 127.0.0.1:<free port>; behaviour(path, body) -> (status, reply str|dict) or None to hang."""
    state = SimpleNamespace(requests=0, bodies=[], paths=[], headers=[])
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                state.requests += 1
                state.bodies.append(body)
                state.paths.append(self.path)
                state.headers.append(dict(self.headers))
            answer = behaviour(self.path, body)
            if answer is None:
                time.sleep(1.0)
                answer = (200, {"scores": []})
            status, reply = answer
            data = (reply if isinstance(reply, str) else json.dumps(reply)).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:  # the client gave up (timeout test)
                pass

    class Server(ThreadingHTTPServer):
        daemon_threads, block_on_close = True, False

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()


def decode_images(parts) -> list[np.ndarray]:
    out = []
    for p in parts:
        url = p["image_url"]["url"] if isinstance(p, dict) else p
        data = base64.b64decode(url.removeprefix("data:image/png;base64,"))
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        out.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    return out


def chat_reply(text: str) -> dict:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}


def brightness_ranker(path, body):
    """A 'judge' that prefers brighter images, answering in 1-based numbers with some chatter around the list."""
    parts = body["messages"][0]["content"]
    means = [im.mean() for im in decode_images([p for p in parts if p["type"] == "image_url"])]
    order = sorted(range(len(means)), key=lambda i: -means[i])
    return 200, chat_reply(f"<think>compare [1] and [2]</think>Ranking: {json.dumps([i + 1 for i in order])}. Done.")


def ranker(url, **kw):
    opts = dict(ranker_url=url + "/v1", ranker_model="judge-vl", http_retries=2, http_backoff=0.01,
                http_timeout=5.0, ranker_concurrency=2)
    return build_reward("ranker", **{**opts, **kw})


def graded(n: int) -> torch.Tensor:
    """n flat images of distinct brightness, in shuffled order."""
    levels = torch.tensor([0.3, 0.9, 0.1, 0.6, 0.5, 0.2][:n])
    return levels.view(n, 1, 1, 1).expand(n, 3, 24, 24).clone()


def test_ranker_good_server(monkeypatch):
    monkeypatch.setenv("RANKER_TEST_KEY", "sk-test")
    with serve(brightness_ranker) as (url, state):
        reward = ranker(url, ranker_api_key_env="RANKER_TEST_KEY")
        assert reward.async_ok
        images = graded(6)  # brightness 0.3 0.9 0.1 | 0.6 0.5 | 0.2
        scores, info = reward(images, ["p", "p", "p", "q", "q", "solo"])
    assert scores.tolist() == [0.5, 1.0, 0.0, 1.0, 0.0, 0.5]  # solo prompt: neutral, no request
    assert state.requests == 2 and set(state.paths) == {"/v1/chat/completions"}
    assert all(h["Authorization"] == "Bearer sk-test" for h in state.headers)
    body = next(b for b in state.bodies if len(b["messages"][0]["content"]) == 7)
    assert body["model"] == "judge-vl"
    instruction = body["messages"][0]["content"][0]["text"]
    assert '"p"' in instruction and "JSON list" in instruction and "[2, 1, 3]" in instruction
    assert info["details"]["ranker"]["rankings"]["p"] == [1, 0, 2] and info["warnings"] == []


@pytest.mark.parametrize("reply,problem", [("I like them all equally.", "no JSON list"),
                                           ("[1, 1, 2]", "not a permutation")])
def test_ranker_garbage_replies_are_retried_then_neutral(reply, problem):
    with serve(lambda path, body: (200, chat_reply(reply))) as (url, state):
        with pytest.warns(RewardWarning, match=f"could not rank the 3 images.*{problem}.*after 3 attempts"):
            scores, info = ranker(url)(graded(3), ["p"] * 3)
    assert scores.tolist() == [0.5] * 3 and state.requests == 3
    assert info["details"]["ranker"]["failed_groups"] == 1 and len(info["warnings"]) == 1


def test_ranker_timeout_and_http_errors():
    with serve(lambda path, body: None) as (url, state):
        t0 = time.perf_counter()
        with pytest.warns(RewardWarning, match="timed out"):
            scores, _ = ranker(url, http_timeout=0.3)(graded(2), ["p", "p"])
        assert time.perf_counter() - t0 < 2.5
    assert scores.tolist() == [0.5, 0.5] and state.requests == 3
    with serve(lambda path, body: (500, {"error": "overloaded"})) as (url, state):
        t0 = time.perf_counter()
        with pytest.warns(RewardWarning, match="HTTP 500.*after 3 attempts"):
            scores, _ = ranker(url, http_backoff=0.1)(graded(2), ["p", "p"])
        assert time.perf_counter() - t0 >= 0.1 + 0.2  # exponential backoff between the 3 attempts
    assert scores.tolist() == [0.5, 0.5] and state.requests == 3
    with serve(lambda path, body: (400, {"error": "temperature not supported"})) as (url, state):
        with pytest.warns(RewardWarning, match="HTTP 400.*temperature not supported.*not retried"):
            scores, _ = ranker(url)(graded(2), ["p", "p"])
    assert scores.tolist() == [0.5, 0.5] and state.requests == 1


def test_ranker_parsing():
    from rewards_http import parse_ranking, ranks_to_rewards
    assert parse_ranking("Best to worst: [3, 1, 2]", 3) == [2, 0, 1]
    assert parse_ranking("[2, 0, 1]", 3) == [2, 0, 1]  # 0-based permutations are unambiguous too
    for bad in ["[1, 2]", "[1, 2, 4]", "[1.0, 2, 3]", '["1", "2", "3"]', "nothing"]:
        with pytest.raises(ValueError):
            parse_ranking(bad, 3)
    assert ranks_to_rewards([2, 0, 1, 3]) == pytest.approx([2 / 3, 1 / 3, 1.0, 0.0])


def brightness_scorer(path, body):
    assert set(body) == {"prompts", "images"}
    scores = [None if p == "skip" else float(im.mean()) / 255 + len(p)
              for im, p in zip(decode_images(body["images"]), body["prompts"])]
    return 200, {"scores": scores}


def remote(url, **kw):
    return build_reward("remote", **{**dict(remote_url=url + "/score", http_retries=2, http_backoff=0.01), **kw})


def test_remote_good_server_and_null_scores():
    images = graded(4)
    with serve(brightness_scorer) as (url, state):
        scores, info = remote(url)(images, ["a", "bb", "skip", "ccc"])
    expect = [round(v * 255) / 255 + n for v, n in zip([0.3, 0.9], [1, 2])]
    assert scores[:2].tolist() == pytest.approx(expect) and scores[3] == pytest.approx(round(0.6 * 255) / 255 + 3)
    assert math.isnan(scores[2]) and info["dropped"] == [2] and state.requests == 1 and state.paths == ["/score"]
    assert "indices [2]" in info["warnings"][-1]


@pytest.mark.parametrize("status,reply,problem", [(200, "not json", "JSONDecodeError"),
                                                  (200, {"scores": [1.0]}, "got 1 scores"),
                                                  (200, {"scores": ["x", 1, 2]}, "numbers or null"),
                                                  (500, {"error": "boom"}, "HTTP 500")])
def test_remote_failures_give_nan_and_warning(status, reply, problem):
    with serve(lambda path, body: (status, reply)) as (url, state):
        with pytest.warns(RewardWarning, match=f"remote: scoring 3 images.*{problem}.*after 3 attempts"):
            scores, info = remote(url)(graded(3), ["a", "b", "c"])
    assert torch.isnan(scores).all() and state.requests == 3 and info["dropped"] == [0, 1, 2]


def test_remote_timeout():
    with serve(lambda path, body: None) as (url, state):
        with pytest.warns(RewardWarning, match="timed out"):
            scores, _ = remote(url, http_timeout=0.3, http_retries=1)(graded(2), ["a", "b"])
    assert torch.isnan(scores).all() and state.requests == 2


# -----------------------------------------------------------------------------
# fairness: -statistical parity of each prompt's group (Zhang et al. 2024, Table 3)

# chosen so that the tiny random CLIP of clip_files spreads the test images over all four buckets
ATTRIBUTES = ["dark skin", "medium skin", "tan skin", "a portrait of a dark-skinned person"]


class FixedBuckets(rewards.Reward):
    """A stand-in for the remote classifier: answers the given numbers as its scores."""
    name = "fixed"

    def __init__(self, values):
        super().__init__()
        self.values = values

    def score(self, images, prompts):
        return torch.tensor(self.values, dtype=torch.float32), {}


def fairness_on(values, prompts, n_buckets):
    reward = rewards.Fairness(n_buckets, remote=FixedBuckets(values))
    return reward(torch.zeros(len(values), 3, 8, 8), prompts)


def test_fairness_statistical_parity_formula():
    cases = [  # (buckets of one group, |A|, SP by hand)
        ([0, 1, 2, 3], 4, 0.0),                    # uniform
        ([0, 1, 2, 3, 3, 2, 1, 0], 4, 0.0),        # uniform, twice
        ([2, 2, 2, 2], 4, 0.75),                   # one bucket: 3 * (1/4)^2 + (3/4)^2 = 1 - 1/4
        ([0, 0, 1, 2], 4, 0.125),                  # P = (1/2, 1/4, 1/4, 0): (1/4)^2 + 0 + 0 + (1/4)^2
        ([0, 0, 0, 1, 1, 2], 3, 1 / 18),           # P = (1/2, 1/3, 1/6): (1/6)^2 + 0 + (1/6)^2
        ([1], 4, 0.75),                            # a group of one image is one bucket
        ([0, 1], 2, 0.0), ([1, 1], 2, 0.5),        # two buckets: 1 - 1/2
    ]
    for buckets, n, sp in cases:
        direct = rewards.statistical_parity(torch.tensor(buckets), n)
        scores, info = fairness_on(buckets, ["p"] * len(buckets), n)
        print(f"\n[measured] SP of {buckets} over {n} buckets: {direct:.6g} (by hand {sp:.6g}), reward "
              f"{scores[0].item():.6g}")
        assert direct == pytest.approx(sp, abs=1e-12)
        assert torch.allclose(scores, torch.full((len(buckets),), -sp), atol=1e-7)
        assert info["buckets"] == buckets and info["statistical_parity"]["p"] == pytest.approx(sp, abs=1e-12)


def test_fairness_groups_by_prompt():
    # three prompts interleaved: a -> 0 1 2 3 (uniform), b -> 1 1 1 1 (one bucket), c -> 0 0 1 2 (in between)
    prompts = ["a", "b", "c"] * 4
    buckets = [0, 1, 0, 1, 1, 0, 2, 1, 1, 3, 1, 2]
    scores, info = fairness_on(buckets, prompts, 4)
    sp = info["statistical_parity"]
    print(f"\n[measured] per-prompt SP {sp}, scores {scores.tolist()}")
    assert list(sp) == ["a", "b", "c"] and sp == pytest.approx({"a": 0.0, "b": 0.75, "c": 0.125})
    for i, p in enumerate(prompts):
        assert scores[i].item() == pytest.approx(-sp[p])
    # two prompts, one of them a single image: valid, SP as usual
    scores, info = fairness_on([3, 0, 1], ["x", "solo", "x"], 4)
    print(f"\n[measured] two prompts with a single-image group: SP {info['statistical_parity']}")
    assert info["statistical_parity"] == pytest.approx({"x": 0.25, "solo": 0.75})
    assert scores.tolist() == pytest.approx([-0.25, -0.75, -0.25])


@pytest.fixture(scope="module")
def fairness_files(clip_files, tmp_path_factory):
    """clip_files' 768-d tiny CLIP in a folder with its tokenizer (as openai/clip-vit-large-patch14 ships), and
    attribute files."""
    d = tmp_path_factory.mktemp("fairness")
    CLIPModel.from_pretrained(clip_files.clip).save_pretrained(d / "clip")
    CLIPProcessor.from_pretrained(clip_files.proc).save_pretrained(d / "clip")
    (d / "attributes.txt").write_text("# skin tones, one CLIP text per line\n\n" + "\n".join(ATTRIBUTES) + "\n")
    return SimpleNamespace(clip=str(d / "clip"), attributes=str(d / "attributes.txt"), dir=d)


def test_fairness_clip_zero_shot_matches_transformers(fairness_files):
    reward = build_reward("fairness", clip_path=fairness_files.clip, fairness_attributes=fairness_files.attributes)
    fair = reward.parts[0][2]
    assert fair.attributes == ATTRIBUTES and fair.n_buckets == 4 and not reward.async_ok
    # flat grey levels, the three primaries and smooth scenes: the tiny random CLIP puts them in all 4 buckets
    images = torch.cat([torch.linspace(0, 1, 6).view(6, 1, 1, 1).expand(6, 3, 200, 280),
                        torch.eye(3).view(3, 3, 1, 1).expand(3, 3, 200, 280), make_images(6, 200, 280, seed=61)])
    prompts = ["a portrait of a dentist", "a portrait of a nurse", "a portrait of a judge"] * 5
    scores, info = reward(images, prompts)
    # independently: transformers' CLIPModel on CLIPImageProcessor's pixels of the 8-bit images, CLIPProcessor text
    clip = CLIPModel.from_pretrained(fairness_files.clip).eval()
    proc = CLIPProcessor.from_pretrained(fairness_files.clip)
    with torch.no_grad():
        img = features(clip.get_image_features(pixel_values=processor_pixels(proc.image_processor,
                                                                             rewards.quantize(images))))
        txt = features(clip.get_text_features(**proc(text=ATTRIBUTES, padding=True, return_tensors="pt")))
    cos = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    ref, top2 = cos.argmax(-1), cos.topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]).min().item()
    ours = fair.encoder(images) @ fair.text.T
    buckets = info["details"]["fairness"]["buckets"]
    print(f"\n[measured] fairness CLIP buckets {buckets}, transformers argmax {ref.tolist()}")
    report("fairness: max |cos ours - cos transformers|", (ours - cos).abs().max().item())
    report("fairness: smallest top-1 - top-2 cosine margin of the reference", margin)
    assert buckets == ref.tolist() and len(set(buckets)) == 4
    assert (ours - cos).abs().max() < 0.01 * margin  # the argmax agreement is not a near tie
    sp = {p: rewards.statistical_parity(ref[i::3], 4) for i, p in enumerate(prompts[:3])}
    print(f"[measured] fairness per-prompt SP {info['details']['fairness']['statistical_parity']}")
    assert info["details"]["fairness"]["statistical_parity"] == pytest.approx(sp)
    assert torch.allclose(scores, torch.tensor([-sp[p] for p in prompts]), atol=1e-7)
    # with aesthetic/diversity in the same spec: one shared CLIP, one vision forward
    both = build_reward("diversity,fairness", clip_path=fairness_files.clip,
                        fairness_attributes=fairness_files.attributes)
    assert both.parts[0][2].encoder is both.parts[1][2].encoder
    calls = []
    both.parts[0][2].encoder.vision.register_forward_hook(lambda *a: calls.append(1))
    _, info2 = both(images, prompts)
    assert len(calls) == 1 and info2["details"]["fairness"]["buckets"] == ref.tolist()


def test_fairness_bad_options(fairness_files, clip_files):
    d = fairness_files.dir
    clip = dict(clip_path=fairness_files.clip)
    cases = [(dict(), ValueError, "fairness reward needs fairness_attributes=FILE .* or fairness_remote_url=URL"),
             (dict(fairness_attributes=str(d / "missing.txt")), FileNotFoundError,
              "fairness_attributes=.*missing.txt' is not a file; pass a text file with one attribute text per line")]
    (d / "one.txt").write_text("# a comment\na photo of a person with dark skin\n\n")
    cases.append((dict(fairness_attributes=str(d / "one.txt")), ValueError, "has 1 attribute text.*at least 2"))
    (d / "twice.txt").write_text("a photo of a cat\na photo of a cat\n")
    cases.append((dict(fairness_attributes=str(d / "twice.txt")), ValueError, "lists 'a photo of a cat' twice"))
    cases += [(dict(fairness_remote_url="http://127.0.0.1:9/x"), ValueError,
               "fairness_remote_url needs the number of buckets.*fairness_buckets=N"),
              (dict(fairness_remote_url="http://127.0.0.1:9/x", fairness_buckets=3,
                    fairness_attributes=fairness_files.attributes), ValueError,
               "fairness_buckets=3 but fairness_attributes lists 4"),
              (dict(fairness_remote_url="http://127.0.0.1:9/x", fairness_buckets=1), ValueError,
               "fairness_buckets=1 must be >= 2"),
              (dict(fairness_attributes=fairness_files.attributes, clip_path=clip_files.clip), FileNotFoundError,
               "clip_path=.* has no CLIP tokenizer"),       # a model folder without tokenizer files
              (dict(fairness_attributes=fairness_files.attributes, clip_path=None), FileNotFoundError,
               "pass clip_path=PATH")]                       # the hub default, offline in tests
    for options, error, message in cases:
        with pytest.raises(error, match=message) as e:
            build_reward("fairness", **{**clip, **options})
        print(f"\n[measured] {options}: {e.value}")
        assert "\n" not in str(e.value)
    assert "fairness" in rewards.reward_help() and "fairness_attributes" in rewards.reward_help()


def bucket_scorer(path, body):
    """A 'classifier' with 3 buckets by brightness (dark 0, mid 1, bright 2); prompt 'odd' gets null / out of range."""
    out = []
    for im, p in zip(decode_images(body["images"]), body["prompts"]):
        b = im.mean() / 255
        out.append(None if p == "unknown" else 7 if p == "odd" else (0 if b < 0.35 else 1 if b < 0.65 else 2) + 0.2)
    return 200, {"scores": out}


def test_fairness_remote_classifier():
    images = graded(6)  # brightness 0.3 0.9 0.1 0.6 0.5 0.2 -> buckets 0 2 0 1 1 0
    with serve(bucket_scorer) as (url, state):
        reward = build_reward("fairness", fairness_remote_url=url + "/classify", fairness_buckets=3,
                              http_retries=0)
        assert reward.async_ok
        scores, info = reward(images, ["p", "p", "p", "q", "q", "q"])
        fi = info["details"]["fairness"]
        print(f"\n[measured] remote buckets {fi['buckets']}, SP {fi['statistical_parity']}")
        assert fi["buckets"] == [0, 2, 0, 1, 1, 0] and state.paths == ["/classify"]
        # p: P = (2/3, 0, 1/3) -> (1/3)^2 + (1/3)^2 + 0 = 2/9; q: P = (1/3, 2/3, 0) -> 0 + (1/3)^2 + (1/3)^2 = 2/9
        assert fi["statistical_parity"] == pytest.approx({"p": 2 / 9, "q": 2 / 9})
        assert scores.tolist() == pytest.approx([-2 / 9] * 6)
        # null and out-of-range answers: left out of the group's statistics, NaN, dropped by the trainer
        with pytest.warns(RewardWarning, match=r"bucket indices \[7.0\] outside 0..2 for images \[2\]"):
            scores, info = reward(images, ["p", "unknown", "odd", "p", "solo", "unknown"])
        fi = info["details"]["fairness"]
        print(f"[measured] remote buckets with null/out-of-range {fi['buckets']}, SP {fi['statistical_parity']}, "
              f"scores {scores.tolist()}")
        assert fi["buckets"] == [0, -1, -1, 1, 1, -1] and info["dropped"] == [1, 2, 5]
        # p keeps images 0 and 3, buckets 0 and 1: P = (1/2, 1/2, 0) -> (1/6)^2 + (1/6)^2 + (1/3)^2 = 1/6
        assert fi["statistical_parity"]["p"] == pytest.approx(1 / 6)
        assert math.isnan(fi["statistical_parity"]["unknown"]) and math.isnan(fi["statistical_parity"]["odd"])
        assert scores[[0, 3]].tolist() == pytest.approx([-fi["statistical_parity"]["p"]] * 2)
        # solo: one image in bucket 1 -> (1/3)^2 + (2/3)^2 + (1/3)^2 = 2/3
        assert scores[4].item() == pytest.approx(-2 / 3) and torch.isnan(scores[[1, 2, 5]]).all()
    with serve(lambda path, body: (500, {"error": "down"})) as (url, state):
        reward = build_reward("fairness", fairness_remote_url=url, fairness_attributes=None, fairness_buckets=2,
                              http_retries=0)
        with pytest.warns(RewardWarning, match="remote: scoring 2 images.*HTTP 500"):
            scores, info = reward(graded(2), ["p", "p"])
    assert torch.isnan(scores).all() and info["details"]["fairness"]["buckets"] == [-1, -1]
    assert any("HTTP 500" in w for w in info["warnings"])


# -----------------------------------------------------------------------------
# weighted sums, specs, options, NaN

def test_weighted_sum_equals_sum_of_components(hps_files, clip_files):
    reward = build_reward("hps=1, aesthetic=0.05,jpeg-compressibility=-0.01", hps_checkpoint=hps_files.ckpt,
                          hps_arch=hps_files.cfg, clip_path=clip_files.clip, aesthetic_checkpoint=clip_files.mlp_path)
    images = make_images(4, 128, 160, seed=41)
    total, info = reward(images, PROMPTS[:4])
    c = info["components"]
    assert set(c) == {"hps", "aesthetic", "jpeg-compressibility"}
    assert info["weights"] == {"hps": 1.0, "aesthetic": 0.05, "jpeg-compressibility": -0.01}
    assert torch.allclose(total, c["hps"] + 0.05 * c["aesthetic"] - 0.01 * c["jpeg-compressibility"], atol=1e-6)
    solo_hps, _ = build_reward("hps", hps_checkpoint=hps_files.ckpt, hps_arch=hps_files.cfg)(images, PROMPTS[:4])
    assert torch.equal(c["hps"], solo_hps) and not reward.async_ok
    assert build_reward("jpeg-compressibility=2,jpeg-incompressibility").async_ok
    # precision "auto": each recipe's own (HPSv2 scores under fp16 amp, DDPO's aesthetic scorer in fp32)
    parts = {n: r for n, _, r in reward.parts}
    assert parts["hps"].precision == "fp16" and parts["aesthetic"].encoder.precision == "fp32"


def test_bad_specs_and_options():
    with pytest.raises(ValueError, match=r"unknown reward 'hpsv3'.*valid names: hps, hps-v2.1, hps-v2.0, aesthetic"):
        build_reward("hpsv3")
    with pytest.raises(ValueError, match=r"weight 'lots' of 'hps' .* not a finite number"):
        build_reward("hps=lots")
    with pytest.raises(ValueError, match="not a finite number"):
        build_reward("jpeg-compressibility=nan")
    with pytest.raises(ValueError, match="empty entry"):
        build_reward("hps,,aesthetic")
    with pytest.raises(ValueError, match="appears twice"):
        build_reward("hps,hps-v2.1=2")
    with pytest.raises(ValueError, match=r"unknown reward option\(s\) \['hps_ckpt'\].*hps_checkpoint"):
        build_reward("jpeg-compressibility", hps_ckpt="x.pt")
    with pytest.raises(ValueError, match="http_timeout='soon' is not a valid float"):
        build_reward("jpeg-compressibility", http_timeout="soon")
    with pytest.raises(ValueError, match="precision='fp8' must be one of"):
        build_reward("jpeg-compressibility", precision="fp8")
    with pytest.raises(ValueError, match="needs ranker_url"):
        build_reward("ranker")
    with pytest.raises(ValueError, match="needs remote_url"):
        build_reward("remote")
    reward = build_reward("jpeg-compressibility")
    with pytest.raises(ValueError, match="one prompt per image"):
        reward(torch.rand(2, 3, 8, 8), ["only one"])
    with pytest.raises(ValueError, match="one prompt per image.*got a str"):
        reward(torch.rand(1, 3, 8, 8), "a cat")
    with pytest.raises(ValueError, match=r"float tensor \(B,3,H,W\)"):
        reward(torch.rand(2, 8, 8), ["a", "b"])
    text = rewards.reward_help()
    assert all(n in text for n in rewards.REWARD_NAMES) and "http_backoff" in text


def test_options_from_flags():
    """--reward-option KEY=VALUE strings and the dedicated flags -> build_reward options, checked up front."""
    got = rewards.options_from_flags(["precision=fp32", " chunk_size=8", "ranker_criteria=a=b", "hps_checkpoint=old"],
                                     hps_checkpoint="new.pt", clip_path=None)
    assert got == {"precision": "fp32", "chunk_size": "8", "ranker_criteria": "a=b", "hps_checkpoint": "new.pt"}
    assert rewards.options_from_flags(None, aesthetic_checkpoint=None) == {}
    assert build_reward("jpeg-compressibility", **got).name == "jpeg-compressibility"
    for pairs, message in ((["precision"], "wants KEY=VALUE, got 'precision'"), (["=fp32"], "wants KEY=VALUE"),
                           (["chunk_size=two"], "chunk_size='two' is not a valid int"),
                           (["hps_ckpt=x.pt"], r"unknown reward option\(s\) \['hps_ckpt'\]")):
        with pytest.raises(ValueError, match=message):
            rewards.options_from_flags(pairs)


def test_nonfinite_scores_are_dropped_not_fatal(hps_files):
    scores = torch.tensor([0.3, float("nan"), 0.2, float("inf"), -float("inf")])
    mask, message = drop_nonfinite(scores)
    assert mask.tolist() == [True, False, True, False, False] and torch.equal(finite_mask(scores), mask)
    assert "3 of 5 images" in message and "[1, 3, 4]" in message
    mask, message = drop_nonfinite(torch.tensor([1.0, 2.0]))
    assert mask.all() and message is None
    # a NaN image through a real scorer: only that image is dropped, the others keep their exact scores
    reward = build_reward("hps=1,jpeg-compressibility=0.01", hps_checkpoint=hps_files.ckpt, hps_arch=hps_files.cfg,
                          quantize=False)
    images = make_images(4, 64, 64, seed=51)
    clean, _ = reward(images, PROMPTS[:4])
    images[2, :, :8, :8] = float("nan")
    total, info = reward(images, PROMPTS[:4])
    assert info["dropped"] == [2] and torch.equal(total[[0, 1, 3]], clean[[0, 1, 3]])
    assert any("hps: non-finite score for images [2]" in w for w in info["warnings"])
