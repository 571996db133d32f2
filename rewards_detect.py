"""
The compositionality reward of Zhang et al. 2024 (their Table 4 task): an open-vocabulary detector looks for each
object the prompt names, and the reward is the mean over the prompt's objects o of the detector's best confidence

    r(x0, c) = 1/|o(c)| * sum_{o in o(c)} d(o, x0),    d(o, x0) = max over boxes of sigmoid(logit(box, "a photo of a o"))

They use UniDet; we use OWLv2 (Minderer et al. 2023), which transformers ships (Owlv2ForObjectDetection; weights
google/owlv2-base-patch16-ensemble or a local folder), and whose post-processed box scores are exactly these
sigmoids. The prompts are theirs in form: two objects joined by "and", "next to", "near", "on side of" or
"beside", over a public class list (COCO's 80), with a fixed set of classes held out (unseen in training):

    python rewards_detect.py --write-prompts      # prompts/compositional-train.txt, prompts/compositional-unseen.txt
"""
from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

import torch

from reward_base import Reward, prompt_groups, to_uint8

CONNECTORS = ("and", "next to", "near", "on side of", "beside")   # Zhang et al.'s five
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
# held out of the training prompts (about 15%, as their 82 of 532): every 7th class
UNSEEN = COCO_CLASSES[3::7]
PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
_SPLIT = re.compile(r"\s+(?:" + "|".join(re.escape(c) for c in sorted(CONNECTORS, key=len, reverse=True)) + r")\s+")
_ARTICLE = re.compile(r"^(?:a|an|the|two|some)\s+")


def article(noun: str) -> str:
    if noun in ("skis", "scissors"):   # plural class names take no article
        return noun
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def prompt_objects(prompt: str) -> list[str]:
    """The objects a prompt names: "a cat next to an umbrella" -> ["cat", "umbrella"] (any connector, articles
    dropped; a prompt without a connector is one object)."""
    parts = _SPLIT.split(prompt.strip().rstrip(".").lower())
    return [_ARTICLE.sub("", p).strip() for p in parts if p.strip()]


def make_prompts(n: int, unseen: bool, seed: int = 0) -> list[str]:
    """n distinct prompts "a A CONNECTOR a B": both objects seen classes (training) or at least one unseen."""
    rng = random.Random(f"compositional-{seed}-{unseen}")
    seen = [c for c in COCO_CLASSES if c not in UNSEEN]
    out: dict[str, None] = {}
    while len(out) < n:
        a, b = rng.sample(COCO_CLASSES if unseen else seen, 2)
        if unseen and a not in UNSEEN and b not in UNSEEN:
            continue
        out[f"{article(a)} {rng.choice(CONNECTORS)} {article(b)}"] = None
    return list(out)


class Compositional(Reward):
    """Zhang et al.'s detection reward with an OWLv2 detector (model + processor loaded by rewards.py)."""
    name = "compositional"

    def __init__(self, model, processor, device="cpu", template: str = "a photo of a {}", chunk_size: int = 16):
        super().__init__()
        self.model = model.to(device).eval()
        self.processor, self.device = processor, torch.device(device)
        self.template, self.chunk_size = template, chunk_size
        self.text_length = model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def confidences(self, images: torch.Tensor, queries: list[str]) -> torch.Tensor:
        """(B, Q): for every image, each query's best box confidence, sigmoid(max over boxes of the logit)."""
        pils = list(to_uint8(images))
        texts = [self.template.format(q) for q in queries]
        out = []
        for i in range(0, len(pils), self.chunk_size):
            chunk = pils[i:i + self.chunk_size]
            # queries padded to the text tower's length (16 for OWLv2), as it was trained; whatever the tokenizer says
            inputs = self.processor(text=[texts] * len(chunk), images=chunk, return_tensors="pt", padding="max_length",
                                    max_length=self.text_length, truncation=True)
            logits = self.model(**{k: v.to(self.device) for k, v in inputs.items()}).logits   # (b, boxes, Q)
            out.append(logits.float().amax(dim=1).sigmoid().cpu())
        return torch.cat(out)

    def score(self, images, prompts):
        scores = torch.empty(len(prompts))
        detections = {}
        for prompt, idx in prompt_groups(prompts).items():   # one detector text batch per distinct prompt
            objects = prompt_objects(prompt)
            conf = self.confidences(images[idx], objects)        # (n, |o|)
            scores[idx] = conf.mean(dim=1)
            detections[prompt] = dict(zip(objects, conf.mean(dim=0).tolist()))
        return scores, {"detections": detections}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="rewards_detect.py", description="Write Zhang et al.-style compositional "
                                "prompt files over COCO's 80 classes.")
    p.add_argument("--write-prompts", action="store_true", help="write prompts/compositional-{train,unseen}.txt")
    p.add_argument("--n", type=int, default=1000, help="prompts per file")
    args = p.parse_args(argv)
    if args.write_prompts:
        for name, unseen in (("compositional-train", False), ("compositional-unseen", True)):
            path = PROMPT_DIR / f"{name}.txt"
            path.write_text("\n".join(make_prompts(args.n, unseen)) + "\n")
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
