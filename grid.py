"""
The pictures a run shows, drawn with PIL: captioned image grids (rows of images with a label above each row, a
caption under each image and optional column-group headers: sample.py's comparisons, train.py's evaluation grids)
and the reward curve of a run (train batch mean +- std, evaluation sets, per component and per category).
"""
from __future__ import annotations

import math
import re

import torch
from PIL import Image, ImageDraw, ImageFont


def score_label(score: float) -> str:
    """How every grid writes a reward under an image: three decimals (shapes 0.833, HPS 0.273, JPEG -3.624)."""
    return f"{score:.3f}"


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels; the last kept line ends in '…' if text was cut."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            trial = f"{line} {word}".strip()
            if line and draw.textlength(trial, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        while lines[-1] and draw.textlength(lines[-1] + "…", font=font) > width:
            lines[-1] = lines[-1][:-1]
        lines[-1] += "…"
    return lines


def _to_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def make_grid(images, ncols: int, captions: list[str] | None = None, row_labels: list[str] | None = None,
              col_labels: list[str] | None = None, min_cell: int = 160, font_size: int = 13,
              max_caption_lines: int = 3) -> Image.Image:
    """Images (N,3,H,W) in [0,1] or a list of PIL images, row-major, into a grid of `ncols` columns.

    captions: one per image, written under it; row_labels: one per row, written above it (e.g. the prompt);
    col_labels: one per column, written on top, equal neighbours merged into one centred group label with a gap
    between groups (e.g. ["base"]*4 + ["fine-tuned"]*4). Small images are upscaled (nearest) to >= min_cell px."""
    pil = [_to_pil(im) for im in images]
    if not pil:
        raise ValueError("make_grid: no images to put in the grid")
    nrows = math.ceil(len(pil) / ncols)
    for name, labels, want in (("captions", captions, len(pil)), ("row_labels", row_labels, nrows),
                               ("col_labels", col_labels, ncols)):
        if labels is not None and len(labels) != want:
            what = "images" if name == "captions" else name[:3] + "s"
            raise ValueError(f"make_grid: {len(labels)} {name} for {want} {what}")
    w, h = pil[0].size
    scale = max(1, math.ceil(min_cell / w))
    cw, ch = w * scale, h * scale
    font = ImageFont.load_default(size=font_size)
    line_h, pad = font_size + 4, 6
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # column x positions, with a wider gap where the column label changes
    groups = [0] * ncols
    for c in range(1, ncols):
        groups[c] = groups[c - 1] + (col_labels is not None and col_labels[c] != col_labels[c - 1])
    xs = [pad + c * (cw + pad) + groups[c] * 3 * pad for c in range(ncols)]
    width = xs[-1] + cw + pad
    cap_lines = [_wrap(scratch, c, font, cw, max_caption_lines) for c in captions] if captions else None
    row_lines = [_wrap(scratch, r, font, width - 2 * pad, 2) for r in row_labels] if row_labels else None
    header_h = line_h + pad if col_labels else 0
    label_h = (max(map(len, row_lines)) * line_h if row_lines else 0)
    caption_h = (max(map(len, cap_lines)) * line_h if cap_lines else 0)
    row_h = label_h + ch + caption_h + 2 * pad
    grid = Image.new("RGB", (width, header_h + nrows * row_h + pad), "white")
    draw = ImageDraw.Draw(grid)
    if col_labels:
        start = 0
        for c in range(1, ncols + 1):
            if c == ncols or col_labels[c] != col_labels[start]:
                mid = (xs[start] + xs[c - 1] + cw) / 2
                draw.text((mid, pad), col_labels[start], fill="black", font=font, anchor="ma")
                start = c
    for i, im in enumerate(pil):
        r, c = divmod(i, ncols)
        y = header_h + r * row_h + pad
        if row_lines and c == 0:
            for k, line in enumerate(row_lines[r]):
                draw.text((pad, y + k * line_h), line, fill="black", font=font)
        grid.paste(im.resize((cw, ch), Image.NEAREST) if scale > 1 else im, (xs[c], y + label_h))
        if cap_lines:
            for k, line in enumerate(cap_lines[i]):
                draw.text((xs[c], y + label_h + ch + 2 + k * line_h), line, fill=(60, 60, 60), font=font)
    return grid


# ----------------------------------------------------------------------------------------------------------------
# the reward curve of a run

def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    raw = (hi - lo) / n or abs(hi) or 1.0
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first, last = math.floor(lo / step), math.ceil(hi / step)
    if first == last:   # a flat curve: one step either side
        first, last = first - 1, last + 1
    return [k * step for k in range(first, last + 1)]


def _panel(d: ImageDraw.ImageDraw, box: tuple, series: list, title: str, font) -> None:
    """One plot in box (x0, y0, x1, y1): series of (label, rgb, [(epoch, value)], [(epoch, lo, hi)] or None)."""
    L, T, R, B = box[0] + 60, box[1] + 24, box[2] - 10, box[3] - 36
    pts = [(e, v) for _, _, line, band in series for e, v in line + [(e, x) for e, lo, hi in band or [] for x in (lo, hi)]
           if math.isfinite(v)]
    d.text((L, box[1] + 6), title, fill="black", font=font)
    if not pts:
        return
    ticks = nice_ticks(min(v for _, v in pts), max(v for _, v in pts))
    x0, x1 = min(e for e, _ in pts), max(max(e for e, _ in pts), min(e for e, _ in pts) + 1)
    y0, y1 = ticks[0], ticks[-1]

    def px(e, v):
        return L + (e - x0) / (x1 - x0) * (R - L), T + (y1 - v) / (y1 - y0) * (B - T)

    digits = max(0, -math.floor(math.log10(ticks[1] - ticks[0]))) if len(ticks) > 1 else 2
    for v in ticks:
        y = px(x0, v)[1]
        d.line([(L, y), (R, y)], fill=(225, 225, 225))
        d.text((box[0] + 4, y - 6), f"{v:.{digits}f}", fill="black", font=font)
    for e in nice_ticks(x0, x1, 8):
        if x0 <= e <= x1 and e == int(e):
            x = px(e, y0)[0]
            d.line([(x, B), (x, B + 4)], fill="black")
            d.text((x - 4, B + 8), str(int(e)), fill="black", font=font)
    d.text(((L + R) // 2 - 15, B + 20), "epoch", fill="black", font=font)
    legend_x = L + 8
    for label, rgb, line, band in series:
        line = [(e, v) for e, v in line if math.isfinite(v)]
        band = [(e, lo, hi) for e, lo, hi in band or [] if math.isfinite(lo) and math.isfinite(hi)]
        if len(band) > 1:
            pale = tuple(int(c + (255 - c) * 0.75) for c in rgb)
            d.polygon([px(e, hi) for e, _, hi in band] + [px(e, lo) for e, lo, _ in reversed(band)], fill=pale)
        if len(line) > 1:
            d.line([px(e, v) for e, v in line], fill=rgb, width=2)
        for e, v in line:
            x, y = px(e, v)
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=rgb)
        if line:
            d.rectangle([legend_x, T + 6, legend_x + 10, T + 14], fill=rgb)
            d.text((legend_x + 14, T + 4), label, fill="black", font=font)
            legend_x += 20 + int(d.textlength(label, font=font))
    d.rectangle([L, T, R, B], outline="black")


CATEGORY_COLOURS = [(30, 90, 200), (230, 120, 20), (40, 150, 60), (200, 40, 40), (130, 80, 180), (120, 120, 120)]


def draw_reward_curve(history: list[dict], title: str) -> Image.Image:
    """The run's reward curves, drawn with PIL: training reward mean +- std, the evaluation sets' means and, when
    the reward reports categories (the shapes reward), one panel per evaluation set with a line per category."""
    def line(key):
        return [(r["epoch"], r[key]) for r in history if r.get(key) is not None]

    train = [(r["epoch"], r["reward_mean"] - r["reward_std"], r["reward_mean"] + r["reward_std"])
             for r in history if r.get("reward_mean") is not None and r.get("reward_std") is not None]
    main = [("train batch (mean +- std)", CATEGORY_COLOURS[0], line("reward_mean"), train),
            ("eval prompts, fixed seeds", CATEGORY_COLOURS[1], line("eval_reward_mean"), None),
            ("held-out prompts, fixed seeds", CATEGORY_COLOURS[2], line("heldout_reward_mean"), None)]
    components = sorted({k[len("reward_"):-len("_mean")] for r in history for k in r
                         if k.startswith("reward_") and k.endswith("_mean") and k != "reward_mean"})
    main += [(f"component {c}", CATEGORY_COLOURS[3 + i % 3], line(f"reward_{c}_mean"), None)
             for i, c in enumerate(components)]
    panels = [(title, main)] if any(line for _, _, line, _ in main) else []   # empty in joint training
    tasks = sorted({k.split("_")[0] for r in history for k in r if re.fullmatch(r"task\d+_reward_mean", k)})
    for i, task in enumerate(tasks):   # joint training: a panel per task, its train batch and evaluation
        band = [(r["epoch"], r[f"{task}_reward_mean"] - r[f"{task}_reward_std"],
                 r[f"{task}_reward_mean"] + r[f"{task}_reward_std"]) for r in history
                if r.get(f"{task}_reward_mean") is not None and r.get(f"{task}_reward_std") is not None]
        panels.append((f"{task} reward - {title}", [("train batch (mean +- std)", CATEGORY_COLOURS[0],
                                           line(f"{task}_reward_mean"), band),
                                          ("eval prompts, fixed seeds", CATEGORY_COLOURS[1],
                                           line(f"{task}_eval_reward_mean"), None)]))
    for prefix, name in (("eval_reward", "eval prompts"), ("heldout_reward", "held-out prompts")):
        cats = [c for c in ("single", "count", "two", "relation") if line(f"{prefix}_{c}")]
        if cats:
            panels.append((f"{name} by category", [(c, CATEGORY_COLOURS[i], line(f"{prefix}_{c}"), None)
                                                   for i, c in enumerate(cats)]))
    panels = panels or [(title, main)]   # nothing logged yet: the empty axes
    W, H = 900, 420
    img = Image.new("RGB", (W, H * len(panels)), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for i, (t, series) in enumerate(panels):
        _panel(d, (0, i * H, W, (i + 1) * H), series, t, font)
    return img
