"""Extraction overhead: the wall time of n2n-extract (expert loading, dataset decoding and
preprocessing in a loader worker, writing the store) over the time of the expert's forward passes
alone on the same batches, already preprocessed and on the device. 1.0 would be a free pipeline.

Experts: the real MiniLM on shapes captions, and with random weights at their published sizes
(timing needs no trained ones, see bench.models): a timm resnet18, CLIP ViT-B/32's text and image
towers, and Stable Diffusion's VAE at 64 px, on shapes captions and images. CLIP and the VAE are
slow on a CPU, so they run over ``--large-items``. ``--tiny`` builds them from test-size configs
instead: a smoke run of the code path whose ratios mean nothing. Only the rows in ``--experts`` are
built (the SD VAE needs diffusers, MiniLM its weights' package).

``--device cuda``: both ways run there, under the float16 autocast n2n-extract puts around the
forward pass on a GPU (the baseline through the same ``encode_batches``), timed to the GPU's finish.
Run: python -m bench.extraction [--device cuda --items 1000 --large-items 256 --num-workers 1]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import torch

from bench.common import DEVICE_OPTION, Row, report, timed
from bench.models import TINY_CLIP, TINY_SDVAE, save_clip, save_sdvae, save_timm
from n2n.extract.datasets import open_dataset
from n2n.extract.experts import load_expert
from n2n.extract.run import ExtractConfig, batches, encode_batches, run_extraction

TARGET = 1.25
EXPERTS = ("minilm", "timm", "clip-text", "clip-image", "sdvae")
Case = tuple[str, Path | None, int, dict]  # a row's expert spec, weights, items and expert options


def forward_only(spec: str, weights: Path | None, items: int, batch_size: int, device: torch.device,
                 options: dict | None = None) -> float:
    """Seconds of the extraction's own forward loop (``encode_batches``: its autocast, the latents to
    the host) over its batches, preprocessed beforehand and already on ``device``."""
    expert = load_expert(spec, weights, options=options).to(device)
    dataset = open_dataset("shapes", None, "train").with_modalities([expert.modality])
    prepared = [{"inputs": {k: v.to(device) for k, v in
                            expert.collate([row for i in index for row in expert.rows(dataset[i])]).items()}}
                for index in batches(0, items, batch_size)]
    layers = [expert.layers[0]]
    list(encode_batches(expert, prepared[:1], layers, device))  # warm-up, as the extraction's first batch is
    return timed(lambda: list(encode_batches(expert, prepared, layers, device)), 1, sync=device.type == "cuda")[0]


def build_case(name: str, folder: Path, tiny: bool, items: int, large_items: int) -> Case:
    """One row's case, its random weights written into ``folder`` only
    now: a row that is not asked for needs none of its packages (diffusers for the SD VAE)."""
    if name == "minilm":
        return "minilm", None, items, {}
    if name == "timm":
        return "timm:resnet18", save_timm(folder, "resnet18"), items, {}
    if name == "sdvae":
        return (f"sdvae:{save_sdvae(folder / 'sd-vae', **(TINY_SDVAE if tiny else {}))}", None, large_items,
                {"size": 64})
    clip = folder / "clip-vit-b-32"  # one model for both towers
    if not clip.exists():
        save_clip(clip, **(TINY_CLIP if tiny else {}))
    return f"clip:{clip}@{name.removeprefix('clip-')}", None, large_items, {}


def parse_experts(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    """The comma-separated rows, each one this benchmark knows."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in EXPERTS]
    if unknown or not names:
        raise click.BadParameter(f"{value!r}: give some of {','.join(EXPERTS)}")
    return names


@click.command()
@DEVICE_OPTION
@click.option("--items", default=1000, show_default=True, help="shapes items for minilm and resnet18.")
@click.option("--large-items", default=256, show_default=True, help="shapes items for CLIP and the SD VAE.")
@click.option("--tiny", is_flag=True, help="CLIP and the SD VAE at test size: a smoke run, not a measurement.")
@click.option("--num-workers", default=1, show_default=True)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--experts", default=",".join(EXPERTS), show_default=True, callback=parse_experts,
              help="Which rows to measure (comma-separated).")
def main(device: torch.device, items: int, large_items: int, tiny: bool, num_workers: int, batch_size: int,
         experts: list[str]) -> None:
    rows, raw = [], {}
    with tempfile.TemporaryDirectory(prefix="n2n-bench-") as tmp:
        tmp = Path(tmp)
        for name in experts:
            spec, weights, n, options = build_case(name, tmp, tiny, items, large_items)
            cfg = ExtractConfig(expert=spec, data="shapes", out=tmp / "shards", limit=n, num_workers=num_workers,
                                batch_size=batch_size, weights=weights, device=str(device), expert_options=options)
            forward_only(spec, weights, min(n, 2 * batch_size), batch_size, device, options)  # into the page cache
            start = time.perf_counter()
            run_extraction(cfg)
            wall = time.perf_counter() - start
            forward = forward_only(spec, weights, n, batch_size, device, options)
            raw[name] = {"spec": spec.replace(tmp.as_posix(), "<random>"), "items": n, "extract_wall_s": wall,
                         "forward_s": forward}
            overhead = wall / forward
            shown = spec.replace(f"{tmp.as_posix()}/", "") + "".join(f" {k}={v}" for k, v in options.items())
            rows.append(Row(f"n2n-extract {shown} on {n} shapes items on {device.type} (--num-workers {num_workers}): "
                            "wall time over forward passes alone", f"{wall:.1f} s", f"{forward:.1f} s", overhead,
                            f"<= {TARGET}x", overhead <= TARGET))
    report("extraction" if device.type == "cpu" else f"extraction-{device.type}",
           {"device": str(device), "experts": experts, "items": items, "large_items": large_items, "tiny": tiny,
            "num_workers": num_workers, "batch_size": batch_size}, rows, raw)


if __name__ == "__main__":
    main()
