"""The compositional reward (Zhang et al. Table 4): r = mean over the prompt's objects of the detector's best box
confidence, with OWLv2 in transformers' own classes (a tiny random-weight detector saved in the real layout)."""
import pytest
import torch

import rewards_detect
from rewards import build_reward


@pytest.fixture(scope="module")
def tiny_detector(tmp_path_factory):
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor
    from weights import clip_tokenizer
    torch.manual_seed(0)
    config = Owlv2Config(text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, max_position_embeddings=16),
                         vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=64, patch_size=16), projection_dim=32)
    folder = tmp_path_factory.mktemp("owlv2")
    model = Owlv2ForObjectDetection(config)
    with torch.no_grad():   # random shift/scale heads saturate every sigmoid; these give logits 2 * cosine
        for head in (model.class_head.logit_shift, model.class_head.logit_scale):
            head.weight.zero_()
        model.class_head.logit_shift.bias.zero_()
        model.class_head.logit_scale.bias.fill_(1.0)
    model.save_pretrained(folder)
    tok = clip_tokenizer()
    image_processor = Owlv2ImageProcessor(size={"height": 64, "width": 64})
    Owlv2Processor(image_processor=image_processor, tokenizer=tok).save_pretrained(folder)
    return folder


def test_prompt_objects_and_generator():
    assert rewards_detect.prompt_objects("a cat next to an umbrella") == ["cat", "umbrella"]
    assert rewards_detect.prompt_objects("A hot dog on side of a teddy bear.") == ["hot dog", "teddy bear"]
    assert rewards_detect.prompt_objects("an apple") == ["apple"]
    train, unseen = rewards_detect.make_prompts(300, False), rewards_detect.make_prompts(100, True)
    assert len(set(train)) == 300 and train == rewards_detect.make_prompts(300, False)   # deterministic
    held = set(rewards_detect.UNSEEN)
    assert not any(o in held for p in train for o in rewards_detect.prompt_objects(p))
    assert all(any(o in held for o in rewards_detect.prompt_objects(p)) for p in unseen)
    assert {c for p in train for c in rewards_detect.CONNECTORS if f" {c} " in p} == set(rewards_detect.CONNECTORS)
    for name in ("compositional-train", "compositional-unseen"):   # the shipped files are what the code writes
        assert (rewards_detect.PROMPT_DIR / f"{name}.txt").read_text().splitlines() == \
            rewards_detect.make_prompts(1000, name.endswith("unseen"))


def test_reward_is_the_mean_of_each_objects_best_box(tiny_detector):
    from transformers import Owlv2ForObjectDetection, Owlv2Processor
    reward = build_reward("compositional", detector_path=str(tiny_detector), quantize=False)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 48, 48, generator=g)
    prompts = ["a cat next to a dog", "a cat next to a dog", "an apple beside a book"]
    scores, _ = reward(images, prompts)
    # independently: one detector call per (image, object), a single text query each
    model = Owlv2ForObjectDetection.from_pretrained(tiny_detector).eval()
    proc = Owlv2Processor.from_pretrained(tiny_detector)
    from reward_base import to_uint8
    want = []
    for image, prompt in zip(to_uint8(images), prompts):
        conf = []
        for obj in rewards_detect.prompt_objects(prompt):
            inputs = proc(text=[[f"a photo of a {obj}"]], images=[image], return_tensors="pt", padding="max_length",
                          max_length=16, truncation=True)
            with torch.no_grad():
                conf.append(model(**inputs).logits[0, :, 0].max().sigmoid().item())
        want.append(sum(conf) / len(conf))
    print("compositional reward:", [round(s, 5) for s in scores.tolist()], "independent:", [round(w, 5) for w in want])
    assert scores.tolist() == pytest.approx(want, abs=1e-5)
    assert 0 < min(want) and max(want) < 1


def test_missing_detector_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        build_reward("compositional", detector_path=str(tmp_path / "nope"))
    assert "\n" not in str(e.value) and "detector_path" in str(e.value)
