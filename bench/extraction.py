"""Extraction overhead: the wall time of n2n-extract (expert loading, dataset decoding and
preprocessing in a loader worker, writing the store) over the time of the expert's forward passes
alone on the same batches, already preprocessed and in memory. 1.0 would be a free pipeline.

Experts: the real MiniLM on shapes captions, and a timm resnet18 (random weights: timing needs no
trained ones) on shapes images. Run: python -m bench.extraction [--items 1000 --num-workers 1]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import torch

from bench.common import Row, report
from n2n.extract.datasets import open_dataset
from n2n.extract.experts import load_expert
from n2n.extract.run import ExtractConfig, batches, run_extraction

TARGET = 1.25


def forward_only(spec: str, weights: Path | None, items: int, batch_size: int) -> float:
    """Seconds of expert.encode over the extraction's batches, preprocessed beforehand."""
    expert = load_expert(spec, weights)
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
@click.option("--items", default=1000, show_default=True, help="shapes items per expert.")
@click.option("--num-workers", default=1, show_default=True)
@click.option("--batch-size", default=64, show_default=True)
def main(items: int, num_workers: int, batch_size: int) -> None:
    import timm
    from safetensors.torch import save_file

    rows, raw = [], {}
    with tempfile.TemporaryDirectory(prefix="n2n-bench-") as tmp:
        resnet = Path(tmp) / "resnet18.safetensors"
        save_file(timm.create_model("resnet18", pretrained=False).state_dict(), str(resnet))
        for spec, weights in (("minilm", None), ("timm:resnet18", resnet)):
            cfg = ExtractConfig(expert=spec, data="shapes", out=Path(tmp) / "shards", limit=items,
                                num_workers=num_workers, batch_size=batch_size, weights=weights, device="cpu")
            forward_only(spec, weights, min(items, 2 * batch_size), batch_size)  # load files into the page cache
            start = time.perf_counter()
            run_extraction(cfg)
            wall = time.perf_counter() - start
            forward = forward_only(spec, weights, items, batch_size)
            raw[spec] = {"extract_wall_s": wall, "forward_s": forward}
            overhead = wall / forward
            rows.append(Row(f"n2n-extract {spec} on {items} shapes items (--num-workers {num_workers}): "
                            "wall time over forward passes alone", f"{wall:.1f} s", f"{forward:.1f} s", overhead,
                            f"<= {TARGET}x", overhead <= TARGET))
    report("extraction", {"items": items, "num_workers": num_workers, "batch_size": batch_size}, rows, raw)


if __name__ == "__main__":
    main()
