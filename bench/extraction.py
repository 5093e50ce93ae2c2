"""Extraction overhead: the wall time of n2n-extract (expert loading, dataset decoding and
preprocessing in a loader worker, writing the store) over the time of the expert's forward passes
alone on the same batches, already preprocessed and in memory. 1.0 would be a free pipeline.

Experts: the real MiniLM on shapes captions, and with random weights at their published sizes
(timing needs no trained ones, see bench.models): a timm resnet18, CLIP ViT-B/32's text and image
towers, and Stable Diffusion's VAE at 64 px, on shapes captions and images. CLIP and the VAE are
slow on a CPU, so they run over ``--large-items``. ``--tiny`` builds them from test-size configs
instead: a smoke run of the code path whose ratios mean nothing.
Run: python -m bench.extraction [--items 1000 --large-items 256 --num-workers 1]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import torch

from bench.common import Row, report
from bench.models import TINY_CLIP, TINY_SDVAE, save_clip, save_sdvae
from n2n.extract.datasets import open_dataset
from n2n.extract.experts import load_expert
from n2n.extract.run import ExtractConfig, batches, run_extraction

TARGET = 1.25


def forward_only(spec: str, weights: Path | None, items: int, batch_size: int, options: dict | None = None) -> float:
    """Seconds of expert.encode over the extraction's batches, preprocessed beforehand."""
    expert = load_expert(spec, weights, options=options)
    dataset = open_dataset("shapes", None, "train").with_modalities([expert.modality])
    prepared = [expert.collate([row for i in index for row in expert.rows(dataset[i])])
                for index in batches(0, items, batch_size)]
    layers = [expert.layers[0]]
    with torch.inference_mode():
        expert.encode(prepared[0], layers)  # warm-up, as the extraction's first batch is
        start = time.perf_counter()
        for batch in prepared:
            expert.encode(batch, layers)
        return time.perf_counter() - start


@click.command()
@click.option("--items", default=1000, show_default=True, help="shapes items for minilm and resnet18.")
@click.option("--large-items", default=256, show_default=True, help="shapes items for CLIP and the SD VAE.")
@click.option("--tiny", is_flag=True, help="CLIP and the SD VAE at test size: a smoke run, not a measurement.")
@click.option("--num-workers", default=1, show_default=True)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--experts", default="minilm,timm,clip-text,clip-image,sdvae", show_default=True,
              help="Which rows to measure (comma-separated).")
def main(items: int, large_items: int, tiny: bool, num_workers: int, batch_size: int, experts: str) -> None:
    import timm
    from safetensors.torch import save_file

    rows, raw = [], {}
    with tempfile.TemporaryDirectory(prefix="n2n-bench-") as tmp:
        tmp = Path(tmp)
        resnet = tmp / "resnet18.safetensors"
        save_file(timm.create_model("resnet18", pretrained=False).state_dict(), str(resnet))
        clip = save_clip(tmp / "clip-vit-b-32", **(TINY_CLIP if tiny else {}))
        sdvae = save_sdvae(tmp / "sd-vae", **(TINY_SDVAE if tiny else {}))
        # (row name, spec, weights, items, expert options)
        cases = {"minilm": ("minilm", None, items, {}), "timm": ("timm:resnet18", resnet, items, {}),
                 "clip-text": (f"clip:{clip}@text", None, large_items, {}),
                 "clip-image": (f"clip:{clip}@image", None, large_items, {}),
                 "sdvae": (f"sdvae:{sdvae}", None, large_items, {"size": 64})}
        for name in experts.split(","):
            spec, weights, n, options = cases[name]
            cfg = ExtractConfig(expert=spec, data="shapes", out=tmp / "shards", limit=n, num_workers=num_workers,
                                batch_size=batch_size, weights=weights, device="cpu", expert_options=options)
            forward_only(spec, weights, min(n, 2 * batch_size), batch_size, options)  # files into the page cache
            start = time.perf_counter()
            run_extraction(cfg)
            wall = time.perf_counter() - start
            forward = forward_only(spec, weights, n, batch_size, options)
            raw[name] = {"spec": spec.replace(tmp.as_posix(), "<random>"), "items": n, "extract_wall_s": wall,
                         "forward_s": forward}
            overhead = wall / forward
            shown = spec.replace(f"{tmp.as_posix()}/", "") + "".join(f" {k}={v}" for k, v in options.items())
            rows.append(Row(f"n2n-extract {shown} on {n} shapes items (--num-workers {num_workers}): "
                            "wall time over forward passes alone", f"{wall:.1f} s", f"{forward:.1f} s", overhead,
                            f"<= {TARGET}x", overhead <= TARGET))
    report("extraction", {"items": items, "large_items": large_items, "tiny": tiny, "num_workers": num_workers,
                          "batch_size": batch_size}, rows, raw)


if __name__ == "__main__":
    main()
