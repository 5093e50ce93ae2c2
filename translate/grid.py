"""An image grid a person can read: one row of samples per input, the input's text under its row."""

from __future__ import annotations

import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

PAD = 4
LINE = 12


def to_pil(image: torch.Tensor, scale: int) -> Image.Image:
    """[3, H, W] in [0, 1] -> RGB image, enlarged by an integer factor (nearest: no invented detail)."""
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    pil = Image.fromarray(array)
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST) if scale > 1 else pil


def image_grid(images: torch.Tensor, labels: list[str], scale: int = 2) -> Image.Image:
    """images [rows, n, 3, H, W] in [0, 1]; labels: one caption per row, drawn under it."""
    rows, n, _, h, w = images.shape
    cell_w, cell_h = w * scale, h * scale
    width = n * cell_w + (n + 1) * PAD
    font = ImageFont.load_default()
    wrapped = [textwrap.wrap(label, max(20, width // 7)) or [""] for label in labels]
    heights = [cell_h + PAD + LINE * len(lines) + PAD for lines in wrapped]
    grid = Image.new("RGB", (width, sum(heights) + PAD), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    y = PAD
    for r in range(rows):
        for c in range(n):
            grid.paste(to_pil(images[r, c], scale), (PAD + c * (cell_w + PAD), y))
        for i, line in enumerate(wrapped[r]):
            draw.text((PAD, y + cell_h + 2 + i * LINE), line, fill=(0, 0, 0), font=font)
        y += heights[r]
    return grid
