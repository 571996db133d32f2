"""
The shapes world: a procedural text-to-image world with an exact compositional reward, small enough to pretrain
a latent diffusion model and to run DDPO on a laptop CPU.

Images are 32x32 px: coloured circles, squares and triangles on a light background. Captions come from a small
grammar with four categories, the skills GenEval measures on real models (Ghosh et al. 2023):

    single     "a red circle"
    count      "three blue squares"                      (counts 2-4)
    two        "a red circle and a yellow triangle"
    relation   "a green triangle left of a blue circle"  (left of / right of / above / below)

Scene i is a pure function of (caption, i): `render(caption, seed)` draws it with a NumPy generator seeded by
the index, so a dataset is reproducible bit for bit on any machine.

The reward is the compositional score of Zhang et al. 2024 / GenEval, exact here because the world is known by
construction: the image is segmented by hue (scipy.ndimage.label for connected components), each component is
classified by geometry (fill ratio of its bounding box: square ~1, circle ~pi/4, triangle ~1/2), and the caption's
atoms are checked:

    r(x, y) = mean over atoms a(y) of s_a(x) in [0, 1]
    atoms:   object   per object of the caption: 1 if one of its components is there; 1/2 for the right colour
                      or the right shape only (an attribute-binding error); else 0
             count    count prompts: 1 if k = n components of the asked kind, else (1 - min(1, |k - n| / n)) / 2
             relation relation prompts: 1 if the centroids' offset points the asked way along the dominant axis
             clean    the fraction of all components that the caption asks for (no extra objects)

HELD_OUT lists colour x shape and count x shape combinations that appear in no training caption (and so in no
pretraining image): the held-out prompts measure compositional generalisation.
"""
from __future__ import annotations

import argparse
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

SIZE = 32                      # image side in pixels
SUPERSAMPLE = 4                # shapes are drawn at 4x and box-filtered down: anti-aliased edges
BACKGROUND = (238, 238, 232)
COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "yellow": (235, 190, 20), "blue": (40, 80, 220)}
# hue windows in degrees for segmentation; the palette sits in the middle of each, gaps between them are "other"
HUES = {"red": (-25, 25), "yellow": (32, 70), "green": (90, 170), "blue": (195, 260)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = {1: "a", 2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
CATEGORIES = ("single", "count", "two", "relation")
HELD_OUT = {"colour_shape": {("green", "square"), ("yellow", "circle")},
            "count_shape": {(3, "circle"), (2, "triangle")}}
OBJECT_SIZE = {1: (8, 12), 2: (8, 12), 3: (7, 10), 4: (7, 10)}   # box side in px by object count, inclusive
GAP = 2                        # min px between bounding boxes
MIN_AREA = 10                  # components smaller than this are noise, not objects
SATURATION = 0.35              # pixels less saturated than this are background


# -----------------------------------------------------------------------------------------------------------
# captions


@dataclass(frozen=True)
class Spec:
    """What a caption asks for: objects as (count, colour, shape), and a relation between the first two."""
    category: str
    objects: tuple[tuple[int, str, str], ...]
    relation: str | None = None


def _noun(n: int, colour: str, shape: str) -> str:
    return f"{NUMBERS[n]} {colour} {shape}" + ("s" if n > 1 else "")


def caption(spec: Spec) -> str:
    nouns = [_noun(*o) for o in spec.objects]
    if spec.category == "two":
        return f"{nouns[0]} and {nouns[1]}"
    if spec.category == "relation":
        return f"{nouns[0]} {spec.relation} {nouns[1]}"
    return nouns[0]


_NOUN = r"(a|two|three|four) (" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")s?"
_WORDS = {w: n for n, w in NUMBERS.items()}


def parse(text: str) -> Spec:
    """The inverse of caption(); ValueError for text outside the grammar."""
    t = " ".join(text.lower().strip().rstrip(".").split())
    m = re.fullmatch(f"{_NOUN}(?: (and|{'|'.join(RELATIONS)}) {_NOUN})?", t)
    if m is None:
        raise ValueError(f"shapes.py: {text!r} is not a shapes-world caption (e.g. 'a red circle', 'three blue "
                         "squares', 'a red circle left of a blue square')")
    g = m.groups()
    first = (_WORDS[g[0]], g[1], g[2])
    if g[3] is None:
        return Spec("single" if first[0] == 1 else "count", (first,))
    second = (_WORDS[g[4]], g[5], g[6])
    if first[0] != 1 or second[0] != 1:
        raise ValueError(f"shapes.py: {text!r}: two-object captions take one of each ('a ... and a ...')")
    return Spec("two" if g[3] == "and" else "relation", (first, second), None if g[3] == "and" else g[3])


def all_specs() -> list[Spec]:
    """Every caption of the grammar (708), in a fixed order."""
    kinds = list(itertools.product(COLOURS, SHAPES))
    specs = [Spec("single", ((1, c, s),)) for c, s in kinds]
    specs += [Spec("count", ((n, c, s),)) for n in (2, 3, 4) for c, s in kinds]
    pairs = [(a, b) for a, b in itertools.permutations(kinds, 2)]
    specs += [Spec("two", ((1, *a), (1, *b))) for a, b in pairs]
    specs += [Spec("relation", ((1, *a), (1, *b)), r) for r in RELATIONS for a, b in pairs]
    return specs


def held_out(spec: Spec) -> bool:
    return any((c, s) in HELD_OUT["colour_shape"] or (n, s) in HELD_OUT["count_shape"] for n, c, s in spec.objects)


def split(name: str) -> list[str]:
    """Captions of a split: 'train' (pretraining and RL), 'heldout' (evaluation only), or 'all'."""
    if name not in ("train", "heldout", "all"):
        raise ValueError(f"shapes.py: unknown split {name!r}; use train, heldout or all")
    return [caption(s) for s in all_specs() if name == "all" or held_out(s) == (name == "heldout")]


# -----------------------------------------------------------------------------------------------------------
# drawing


def _mask(shape: str, x0: int, y0: int, side: int) -> np.ndarray:
    """(SIZE*SS, SIZE*SS) bool: the shape inside the box [x0, x0+side) x [y0, y0+side), in supersampled pixels."""
    n, ss = SIZE * SUPERSAMPLE, SUPERSAMPLE
    y, x = np.mgrid[0:n, 0:n] + 0.5
    bx0, by0, s = x0 * ss, y0 * ss, side * ss
    u, v = (x - bx0) / s, (y - by0) / s           # box coordinates in [0, 1]
    inside = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    if shape == "circle":
        return ((u - 0.5) ** 2 + (v - 0.5) ** 2) <= 0.25
    if shape == "square":
        return inside
    return inside & (np.abs(u - 0.5) <= 0.5 * v)   # upright triangle: apex at the top, base at the bottom


def _boxes_ok(boxes: list[tuple[int, int, int]]) -> bool:
    for (xa, ya, sa), (xb, yb, sb) in itertools.combinations(boxes, 2):
        if xa < xb + sb + GAP and xb < xa + sa + GAP and ya < yb + sb + GAP and yb < ya + sa + GAP:
            return False
    return True


def _relation_holds(relation: str, a: tuple[float, float], b: tuple[float, float], margin: float) -> bool:
    """a RELATION b, for centroids (x, y) with y down: the offset points the asked way by more than `margin`
    pixels, and further than along the other axis."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along > margin and along > abs(across)


def layout(spec: Spec, rng: np.random.Generator) -> list[tuple[str, str, int, int, int]]:
    """Objects as (colour, shape, x0, y0, side) with non-touching boxes; a relation holds with room to spare."""
    wanted = [(c, s) for n, c, s in spec.objects for _ in range(n)]
    for _ in range(1000):
        boxes = []
        lo, hi = OBJECT_SIZE[len(wanted)]
        for _ in wanted:
            side = int(rng.integers(lo, hi + 1))
            boxes.append((int(rng.integers(1, SIZE - side)), int(rng.integers(1, SIZE - side)), side))
        if not _boxes_ok(boxes):
            continue
        if spec.relation:
            centres = [(x + s / 2, y + s / 2) for x, y, s in boxes]
            # drawn so that a decoded (slightly blurred) image still passes the reward's 1 px test clearly
            if not (_relation_holds(spec.relation, *centres, 6) and _clear(spec.relation, *centres)):
                continue
        return [(c, s, *box) for (c, s), box in zip(wanted, boxes)]
    raise RuntimeError(f"shapes.py: no layout found for {caption(spec)!r}")   # never happens at these sizes


def _clear(relation: str, a, b) -> bool:
    """The relation's axis dominates by a factor of 2, so it is unambiguous to a person too."""
    dx, dy = abs(b[0] - a[0]), abs(b[1] - a[1])
    return dx >= 2 * dy if relation in ("left of", "right of") else dy >= 2 * dx


def render(text: str, seed: int) -> np.ndarray:
    """(SIZE, SIZE, 3) uint8: the scene for a caption, deterministic in (text, seed)."""
    spec = parse(text)
    rng = np.random.default_rng(seed)
    n = SIZE * SUPERSAMPLE
    canvas = np.empty((n, n, 3), np.float32)
    canvas[:] = BACKGROUND
    for colour, shape, x0, y0, side in layout(spec, rng):
        canvas[_mask(shape, x0, y0, side)] = COLOURS[colour]
    small = canvas.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.round(small).astype(np.uint8)


def dataset_item(index: int, split_name: str = "train", seed: int = 0) -> tuple[np.ndarray, str]:
    """Item `index` of a split: its caption is chosen by category first (the four are equally likely, so the
    12 single-object captions are not drowned by the 500 relation ones), then uniformly within the category."""
    rng = np.random.default_rng([seed, index])
    by_category = _by_category(split_name)
    cats = [c for c in CATEGORIES if by_category[c]]
    pool = by_category[cats[int(rng.integers(len(cats)))]]
    text = pool[int(rng.integers(len(pool)))]
    return render(text, int(rng.integers(2 ** 31))), text


_CACHE: dict = {}


def _by_category(split_name: str) -> dict[str, list[str]]:
    if split_name not in _CACHE:
        _CACHE[split_name] = {c: [t for t in split(split_name) if parse(t).category == c] for c in CATEGORIES}
    return _CACHE[split_name]


# -----------------------------------------------------------------------------------------------------------
# analysis and the reward


@dataclass(frozen=True)
class Blob:
    colour: str
    shape: str          # circle / square / triangle, or "other"
    x: float            # centroid, px (x right, y down)
    y: float
    area: int


def _hue_saturation(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hue in degrees [-60, 300) and HSV saturation of (H, W, 3) uint8."""
    rgb = img.astype(np.float32) / 255
    mx, mn = rgb.max(-1), rgb.min(-1)
    c = mx - mn
    sat = np.where(mx > 0, c / np.maximum(mx, 1e-6), 0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    cs = np.maximum(c, 1e-6)
    hue = np.where(mx == r, (g - b) / cs, np.where(mx == g, 2 + (b - r) / cs, 4 + (r - g) / cs)) * 60
    return np.where(hue >= 300, hue - 360, hue), sat


def features(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Geometry of one component: bounding-box fill ratio, share of its pixels in the lower half, fill of the
    bounding box's four 2x2 corner blocks, and width / height."""
    ys, xs = np.nonzero(mask)
    y0, x0 = ys.min(), xs.min()
    h, w = ys.max() - y0 + 1, xs.max() - x0 + 1
    box = mask[y0:y0 + h, x0:x0 + w]
    corners = np.mean([box[:2, :2].mean(), box[:2, -2:].mean(), box[-2:, :2].mean(), box[-2:, -2:].mean()])
    return len(xs) / (h * w), float(np.mean(ys > y0 + (h - 1) / 2)), float(corners), w / h


def classify(mask: np.ndarray) -> str:
    """A component's shape from its geometry. Drawn shapes measure: square fill 1, corners 1; circle fill
    0.75-0.85 (pi/4 plus edge pixels), corners 0; triangle (apex up) fill ~0.5-0.6, 62-72% of its pixels in the
    lower half. The thresholds sit between those, so slightly blurred decodes still classify."""
    fill, lower, corners, aspect = features(mask)
    if not 0.6 <= aspect <= 1.6:
        return "other"
    if lower >= 0.58 and 0.35 <= fill < 0.75:
        return "triangle"
    if corners >= 0.5 and fill >= 0.8:
        return "square"
    if corners < 0.5 and 0.62 <= fill < 0.95 and lower < 0.58:
        return "circle"
    return "other"


def analyse(img: np.ndarray) -> list[Blob]:
    """(H, W, 3) uint8 -> the coloured objects in it (components of MIN_AREA pixels or more)."""
    hue, sat = _hue_saturation(img)
    blobs = []
    for colour, (lo, hi) in HUES.items():
        labels, n = ndimage.label((sat >= SATURATION) & (hue >= lo) & (hue < hi))
        for k in range(1, n + 1):
            mask = labels == k
            area = int(mask.sum())
            if area >= MIN_AREA:
                ys, xs = np.nonzero(mask)
                blobs.append(Blob(colour, classify(mask), float(xs.mean()), float(ys.mean()), area))
    return blobs


def score(img: np.ndarray, text: str) -> dict[str, float]:
    """The atoms of `text` checked on one image: {'reward', 'object', 'count', 'relation', 'clean'} (NaN for an
    atom the caption does not have); reward is their mean."""
    spec = parse(text)
    blobs = analyse(img)
    atoms = {"object": [], "count": [], "relation": [], "clean": []}
    matches = []
    for n, c, s in spec.objects:
        mine = sorted((b for b in blobs if b.colour == c and b.shape == s), key=lambda b: -b.area)
        matches.append(mine)
        partial = any(b.colour == c or b.shape == s for b in blobs)
        atoms["object"].append(1.0 if mine else 0.5 if partial else 0.0)
        if spec.category == "count":
            k = len(mine)   # exact counts score 1; near misses get some credit, so RL has a slope to climb
            atoms["count"].append(1.0 if k == n else (1 - min(1.0, abs(k - n) / n)) / 2)
    if spec.relation:
        ok = all(matches) and _relation_holds(spec.relation, (matches[0][0].x, matches[0][0].y),
                                               (matches[1][0].x, matches[1][0].y), 1)
        atoms["relation"].append(float(ok))
    asked = {(c, s) for _, c, s in spec.objects}
    atoms["clean"].append(sum((b.colour, b.shape) in asked for b in blobs) / len(blobs) if blobs else 0.0)
    out = {k: float(np.mean(v)) if v else float("nan") for k, v in atoms.items()}
    out["reward"] = float(np.mean([x for v in atoms.values() for x in v]))
    return out


def score_batch(images: np.ndarray, prompts: list[str]) -> dict[str, np.ndarray]:
    """(B, H, W, 3) uint8 + B captions -> arrays: reward, the atoms (object, count_atom, relation_atom, clean)
    and the reward per category (single, count, two, relation), NaN where it does not apply."""
    rows = [score(img, p) for img, p in zip(images, prompts)]
    out = {("count_atom" if k == "count" else "relation_atom" if k == "relation" else k): np.array([r[k] for r in rows])
           for k in rows[0]}   # the atoms count/relation are renamed: "count"/"relation" are also categories
    cats = [parse(p).category for p in prompts]
    for c in CATEGORIES:
        out[c] = np.where([k == c for k in cats], out["reward"], np.nan)
    return out


# -----------------------------------------------------------------------------------------------------------
# prompt files


PROMPT_DIR = Path(__file__).resolve().parent / "prompts"


def _per_category(split_name: str, k: int = 16) -> list[str]:
    """Up to k evenly spaced captions of each category of a split, so every category weighs the same in a mean."""
    chosen = []
    for c in CATEGORIES:
        pool = _by_category(split_name)[c]
        n = min(k, len(pool))
        chosen += [pool[i * len(pool) // n] for i in range(n)]
    return chosen


# The RL demo's prompts: two of each hard skill (counting, two objects) and one per relation, all from the training
# split, the first two the ones the README's before/after grid shows. Few prompts on purpose: DDPO on a CPU gets
# ~130 images an epoch, and a prompt needs tens of them before its per-prompt advantages say anything.
HARD = ["three red squares", "a blue circle left of a yellow triangle", "four blue circles",
        "a red circle and a yellow triangle", "a blue square and a red square", "a red triangle right of a yellow square",
        "a yellow square above a red circle", "a blue circle below a green triangle"]


def prompt_sets() -> dict[str, list[str]]:
    """The built-in prompt sets (train.py/sample.py --prompts NAME; written to prompts/NAME.txt):
    shapes          up to 16 training captions per category (58): the broad evaluation set
    shapes-hard     8 hard training captions (HARD): what `train.py --model shapes` trains on
    shapes-train    every training caption (483): the pretraining distribution
    shapes-heldout  up to 16 held-out captions per category (47): combinations never seen in training"""
    return {"shapes": _per_category("train"), "shapes-hard": list(HARD), "shapes-train": split("train"),
            "shapes-heldout": _per_category("heldout")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="The shapes world: (re)write the built-in prompt files.")
    p.add_argument("--write-prompts", action="store_true", help=f"write prompt_sets() to {PROMPT_DIR}/NAME.txt")
    args = p.parse_args(argv)
    if not args.write_prompts:
        p.print_help()
        return
    PROMPT_DIR.mkdir(exist_ok=True)
    for name, lines in prompt_sets().items():
        path = PROMPT_DIR / f"{name}.txt"
        path.write_text("\n".join(lines) + "\n")
        print(f"{path}: {len(lines)} prompts")


if __name__ == "__main__":
    main()
