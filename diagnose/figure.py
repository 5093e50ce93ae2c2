"""diagnosis.png: held-out inputs as rows; the input, then a few decoded samples of each layer's translator.

What a layer keeps is what its samples share with the input; what it is free of varies across them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from n2n.extract.datasets import reopen_dataset
from n2n.shards import open_store
from n2n.translate.cli import write_atomic_image
from n2n.translate.grid import to_pil

PAD, GAP, HEADER = 3, 10, 30  # px between cells, between layers, above the cells for the layer names


def input_images(store_path: str | Path, keys: list[str], size: int) -> torch.Tensor:
    """The dataset items of ``keys`` (the store's dataset, found by key) as images [N, 3, size, size] in [0, 1]."""
    dataset = reopen_dataset(open_store(store_path).meta["dataset"]).with_modalities(["image"])
    index, wanted = {}, set(keys)
    for i in range(len(dataset)):
        if (key := dataset.key(i)) in wanted:
            index[key] = i
            if len(index) == len(wanted):
                break
    images = []
    for key in keys:
        image = dataset[index[key]]["image"].convert("RGB").resize((size, size), Image.BILINEAR)
        images.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1))
    return torch.stack(images)


def diagnosis_figure(report: dict, shown: dict[str, torch.Tensor], out: Path, scale: int = 2) -> Path:
    """Draw the grid (see the module) with each layer's name and, where scored, what it keeps, over its samples;
    written atomically to ``out``."""
    first = next(iter(shown.values()))
    rows, per_layer, _, h, w = first.shape
    inputs = input_images(report["decoder_store"], report["keys"][:rows], h)
    cell_w, cell_h = w * scale, h * scale
    width = PAD + cell_w + GAP + len(shown) * (per_layer * (cell_w + PAD) + GAP)
    grid = Image.new("RGB", (width, HEADER + rows * (cell_h + PAD) + PAD), (255, 255, 255))
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    draw.text((PAD, 2), "input", fill=(0, 0, 0), font=font)
    for r in range(rows):
        grid.paste(to_pil(inputs[r], scale), (PAD, HEADER + r * (cell_h + PAD)))
    x = PAD + cell_w + GAP
    for layer, images in shown.items():
        draw.text((x, 2), layer, fill=(0, 0, 0), font=font)
        kept = (report["layers"][layer].get("attributes") or {})
        if kept:
            line = " ".join(f"{attr[:3]} {100 * s['kept']:.0f}" for attr, s in kept.items())
            draw.text((x, 14), line, fill=(90, 90, 90), font=font)
        for r in range(rows):
            for c in range(per_layer):
                grid.paste(to_pil(images[r, c], scale), (x + c * (cell_w + PAD), HEADER + r * (cell_h + PAD)))
        x += per_layer * (cell_w + PAD) + GAP
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic_image(grid, out)
    return out
