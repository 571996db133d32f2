"""
Captioned image grids: rows of images with a label above each row, a caption under each image and optional
column-group headers, drawn with PIL (sample.py's comparisons, train.py's per-epoch sample grids).
"""
from __future__ import annotations

import math

import torch
from PIL import Image, ImageDraw, ImageFont


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
