"""Streaming a view from its stores vs holding it on the device: training steps/s on the same view.

The view is the demo's shape at scale (MiniLM's 384 float16 dims, five captions per image, onto
a 32-dim autoencoder latent), 200k captions; the flow is the demo's cINN. Both ways run n2n-train's
own step on batches from train.data (on the device) and train.stream (read window by window from
the zarr stores in a background thread). Small windows make the stream read often: a window of
4096 pairs is one zarr chunk of captions, read every 16 steps at batch 256.
The ways run in alternating blocks of several windows, so that a read started by one block's
stream runs inside that block. Memory is measured apart, in a fresh process per way (peak RSS
after loading a 1M-caption view and 20 training steps). Run: python -m bench.stream
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch

from bench.common import Row, peak_rss_mib, report, trainer_step
from bench.compile import DEMO_FLOW
from n2n.cinn import ConditionalFlow
from n2n.shards import FORMATS, create_store
from n2n.shards.view import create_view
from n2n.train.data import load_pairs
from n2n.train.stream import stream_pairs

TARGET = 0.8


def write_view(root: Path, captions: int, per_item: int = 5, format: str = "zarr") -> Path:
    """Caption and image stores with random latents in ``format``, paired by key (shards.view)."""
    rng = np.random.default_rng(0)
    items = captions // per_item
    keys = np.char.add("item", np.arange(items).astype(str))
    with create_store(root / "text", dim=DEMO_FLOW["cond_dim"], dtype="float16", format=format) as writer:
        for start in range(0, items, 10_000):
            block = keys[start : start + 10_000]
            latents = rng.standard_normal((len(block) * per_item, DEMO_FLOW["cond_dim"]), np.float32)
            writer.append(np.repeat(block, per_item), np.tile(np.arange(per_item), len(block)), latents)
    with create_store(root / "image", dim=DEMO_FLOW["dim"], dtype="float16", format=format) as writer:
        writer.append(keys, np.zeros(items, np.int64), rng.standard_normal((items, DEMO_FLOW["dim"]), np.float32))
    return create_view(root / "view", root / "text", root / "image")


def steps_per_s(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def memory_of(way: str, view: Path, batch: int) -> dict:
    """Peak RSS of a fresh process that loads ``view`` one way and trains 20 steps (run as a child)."""
    data = load_pairs(view) if way == "resident" else stream_pairs(
        view, 0.05, None, device=torch.device("cpu"), batch_size=batch, seed=0, eval_rows=1024)
    flow = ConditionalFlow.from_dict(DEMO_FLOW)
    generator = torch.Generator().manual_seed(0)
    flow(*data.batch(batch, generator))
    train = trainer_step(flow)
    for _ in range(20):
        train(*data.batch(batch, generator))
    data.close()
    return {"peak_rss_mib": peak_rss_mib()}


def alternate(view: Path, resident, window: int, batch: int, blocks: int) -> dict[str, list[float]]:
    """Steps/s of the demo cINN fed from ``resident`` and from ``view`` streamed, in alternating blocks."""
    streamed = stream_pairs(view, 0.05, (resident.source_norm, resident.target_norm), device=torch.device("cpu"),
                            batch_size=batch, seed=0, eval_rows=1024, window_pairs=window)
    steps = {}
    for name, data in (("resident", resident), ("stream", streamed)):
        torch.manual_seed(0)
        flow = ConditionalFlow.from_dict(DEMO_FLOW)
        generator = torch.Generator().manual_seed(0)
        flow(*data.batch(batch, generator))  # ActNorm init
        train = trainer_step(flow)
        steps[name] = lambda train=train, data=data, g=generator: train(*data.batch(batch, g))
    block = 3 * max(1, window // batch)  # three windows' worth of steps per block
    for step in steps.values():  # warm-up
        steps_per_s(step, 4)
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(blocks):
        for name, step in steps.items():
            rates[name].append(steps_per_s(step, block))
    streamed.close()
    return rates


@click.command()
@click.option("--captions", default=200_000, show_default=True)
@click.option("--rss-captions", default=1_000_000, show_default=True, help="The view whose memory is measured.")
@click.option("--rss-of", type=click.Choice(["resident", "stream"]), default=None, hidden=True)
@click.option("--view", type=click.Path(path_type=Path), default=None, hidden=True)
@click.option("--batch", default=256, show_default=True)
@click.option("--window", "windows", multiple=True, type=int, default=(4096, 16384), show_default=True,
              help="Pairs per stream window (each a separate measurement).")
@click.option("--blocks", default=3, show_default=True, help="Alternating timed blocks per way.")
@click.option("--format", "formats", multiple=True, type=click.Choice(FORMATS), default=("zarr", "wds"),
              show_default=True, help="Store formats of the streamed view (each a separate measurement).")
def main(captions: int, rss_captions: int, rss_of: str | None, view: Path | None, batch: int,
         windows: tuple[int, ...], blocks: int, formats: tuple[str, ...]) -> None:
    if rss_of:  # the child of the memory measurement
        print(json.dumps(memory_of(rss_of, view, batch)))
        return
    rows, raw = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        big = write_view(Path(tmp) / "big", rss_captions)
        rss = {way: json.loads(subprocess.run(
            [sys.executable, "-m", "bench.stream", "--rss-of", way, "--view", str(big), "--batch", str(batch)],
            capture_output=True, text=True, check=True).stdout)["peak_rss_mib"] for way in ("resident", "stream")}
        raw["peak_rss_mib"] = rss
        rows.append(Row(f"peak memory (RSS) of a process loading a {rss_captions:,}-caption view and training 20 "
                        "steps: streamed vs on the device", f"{rss['stream']:.0f} MiB", f"{rss['resident']:.0f} MiB",
                        rss["resident"] / rss["stream"]))
        for format in formats:
            view = write_view(Path(tmp) / format, captions, format=format)
            resident = load_pairs(view)
            for window in windows:
                rates = alternate(view, resident, window, batch, blocks)
                mean = {name: float(np.mean(r)) for name, r in rates.items()}
                ratio = mean["stream"] / mean["resident"]
                raw[f"{format}_window_{window}"] = {"steps_per_s": rates}
                rows.append(Row(f"demo cINN, batch {batch}, {captions:,} captions: streamed from {format} (windows of "
                                f"{window:,} pairs or one file) vs on the device", f"{mean['stream']:.1f}/s",
                                f"{mean['resident']:.1f}/s", ratio, f">= {TARGET}x", ratio >= TARGET))
    settings = {"captions": captions, "rss_captions": rss_captions, "batch": batch, "windows": list(windows),
                "blocks": blocks, "formats": list(formats), "flow": DEMO_FLOW}
    report("stream", settings, rows, raw)


if __name__ == "__main__":
    main()
