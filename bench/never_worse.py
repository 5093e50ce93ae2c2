"""Never worse than the start: both translator kinds, under n2n-train's default options, on views where
the start at the linear-Gaussian law used to be thrown off or skipped.

Every run starts at its view's linear-Gaussian law and reports that law's held-out NLL as its floor. On
each view below, each kind trains with every option at its default but the budget (``--steps``,
``--eval-every``), and the benchmark reports the floor, the train NLL at step 0 (the law's, on the train
pairs), the highest train NLL logged (the coupling kind's; the continuous kind logs flow matching's
loss), and the best held-out NLL, which ``best.safetensors`` keeps. The targets: the best held-out NLL
is at most the floor, and no logged train NLL is more than 1 bit/dim above step 0's.

The views (built in a temporary folder, but the demo's):
- ``degenerate``: ``n2n-shards synth --law degenerate`` (4,000 pairs, 32 -> 48 dims: a quarter of the
  target constant, a quarter determined by the source, a quarter nearly, a quarter ordinary);
- ``thumbnail``: a plug-in-style view of shapes, an 8 x 8 RGB thumbnail of each image (192 dims, most of
  a dark background) given a 96-dim hash of the words naming its colour, shape, size and position;
- ``small``: 1,357 shapes images with one caption each, MiniLM -> the demo's autoencoder (the rows of the
  demo's stores: ``make demo`` first, else it is skipped);
- ``--demo``: the demo's two views themselves (37,905 train pairs each).

Run: python -m bench.never_worse [--steps 1500] [--eval-every 250] [--demo] [--shards shards]
"""

from __future__ import annotations

import json
import math
import tempfile
import zlib
from pathlib import Path

import click
import numpy as np
import torch
from PIL import Image

import n2n
from bench.common import Row, report
from n2n.extract.datasets import open_dataset
from n2n.shards import create_store, open_store
from n2n.shards.synthetic import write_synthetic
from n2n.shards.view import create_view
from n2n.train.checkpoint import CHECKPOINT, read_meta
from n2n.train.data import load_pairs
from n2n.train.heldout import fit_floor

KINDS = ("coupling", "continuous")
ITEMS = 4000  # pairs of the degenerate and thumbnail views
SMALL_ITEMS = 1357  # images of the small view, one caption each


def hashed_words(text: str, dim: int = 96) -> np.ndarray:
    """A signed bag of words hashed into ``dim`` buckets (CRC32: the same on every machine)."""
    v = np.zeros(dim, np.float32)
    for word in text.split():
        h = zlib.crc32(word.encode())
        v[h % dim] += 1.0 if (h >> 16) & 1 else -1.0
    return v


def write_view(folder: Path, name: str, keys: list[str], source: np.ndarray, target: np.ndarray,
               subs: np.ndarray | None = None) -> Path:
    """Two float16 stores of a plug-in's kind and the view joining them (target rows one per key)."""
    sides = {"source": (source, subs if subs is not None else np.zeros(len(keys), np.int64)),
             "target": (target, np.zeros(len(keys), np.int64))}
    for side, (latents, sub) in sides.items():
        meta = {"dataset": {"name": name, "count": len(keys)}, "split": "train", "expert": {"spec": f"plugin:{side}"}}
        with create_store(folder / side, dim=latents.shape[1], dtype="float16", meta=meta) as writer:
            writer.append(keys, sub, latents)
    return create_view(folder, folder / "source", folder / "target")


def thumbnail_view(root: Path, items: int) -> Path:
    shapes = open_dataset("shapes")
    keys, words, thumbs = [], [], []
    for i in range(items):
        a = shapes.attributes(i)
        keys.append(shapes.key(i))
        words.append(hashed_words(f"{a['color']} {a['shape']} {a['size']} {a['position']}"))
        image = shapes[i]["image"].convert("RGB").resize((8, 8), Image.BOX)
        thumbs.append(np.asarray(image, np.float32).reshape(-1) / 255)
    return write_view(root / "thumbnail", "shapes-thumbnail", keys, np.stack(words), np.stack(thumbs))


def small_view(root: Path, shards: Path) -> Path | None:
    """The first SMALL_ITEMS images of the demo's stores (under ``shards``), each with its first caption."""
    text, image = shards / "shapes" / "minilm", shards / "shapes" / "ae-shapes"
    if not ((text / "meta.json").is_file() and (image / "meta.json").is_file()):
        return None
    text_store, image_store = open_store(text), open_store(image)
    first = np.flatnonzero(np.asarray(text_store.sub) == 0)
    keys = list(np.asarray(image_store.keys)[:SMALL_ITEMS])
    row_of = {k: i for i, k in enumerate(np.asarray(text_store.keys)[first])}
    captions = text_store.latents()[first[[row_of[k] for k in keys]]]
    return write_view(root / "small", "shapes-small", keys, captions, image_store.latents()[:SMALL_ITEMS])


def step0_train_bpd(view: Path) -> float:
    """The train NLL at step 0: the law the run starts from (fitted as n2n-train fits it), on the train pairs."""
    data = load_pairs(view)
    law = fit_floor(data)
    x, c = data.target[: 16_384], data.source[: 16_384]
    nats = float(law.nll(c, x).mean()) + data.target_norm.log_abs_det
    return nats / (x.shape[1] * math.log(2))


def run(view: Path, out: Path, kind: str, steps: int, eval_every: int) -> dict:
    """Train ``kind`` on ``view`` with the default options but the budget; what the targets read."""
    n2n.train(view, out, translator=kind, steps=steps, eval_every=eval_every, log_every=min(50, eval_every),
              logger="none", compile=False, progress=False)
    meta = read_meta(out / CHECKPOINT)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [line["train_bpd"] for line in lines if "train_bpd" in line]
    return {"floor": meta["linear_gaussian_bpd"], "best": meta["best"], "last": meta["heldout_bpd"],
            "max_train": max(train) if train else None, "model": meta["model"],
            "heldout": [(line["step"], line["heldout_bpd"]) for line in lines if "heldout_bpd" in line]}


@click.command()
@click.option("--steps", default=1500, show_default=True, help="Training steps of every run.")
@click.option("--eval-every", default=250, show_default=True, help="Steps between held-out evaluations.")
@click.option("--items", default=ITEMS, show_default=True, help="Pairs of the degenerate and thumbnail views.")
@click.option("--shards", type=click.Path(path_type=Path), default=Path("shards"), show_default=True,
              help="Where make demo wrote its stores and views (the small view is cut from them).")
@click.option("--demo", is_flag=True, help="Also the demo's two views (make demo first).")
def main(steps: int, eval_every: int, items: int, shards: Path, demo: bool) -> None:
    rows, raw = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        views = {"degenerate": write_synthetic(root, "degenerate", n=items, src_dim=32, dst_dim=48),
                 "thumbnail": thumbnail_view(root, items), "small": small_view(root, shards)}
        if demo:
            views |= {"demo minilm_ae": shards / "minilm_ae", "demo ae_minilm": shards / "ae_minilm"}
        for name, view in views.items():
            if view is None:
                click.echo(f"{name}: skipped (make demo writes the stores it is cut from)")
                continue
            start = step0_train_bpd(view)
            for kind in KINDS:
                result = run(view, root / "runs" / f"{name}-{kind}".replace(" ", "-"), kind, steps, eval_every)
                result["step0_train"] = start
                raw[f"{name} {kind}"] = result
                best, floor, worst = result["best"], result["floor"], result["max_train"]
                stable = worst is None or worst <= start + 1
                rows.append(Row(f"{name}, {kind}: best held-out NLL (step {best['step']}) vs the floor; highest "
                                f"train NLL {'-' if worst is None else f'{worst:.2f}'} vs step 0's {start:.2f}",
                                f"{best['heldout_bpd']:.3f}", f"{floor:.3f}", None, "<= floor, train <= step 0 + 1",
                                best["heldout_bpd"] <= floor and stable))
    report("never_worse", {"steps": steps, "eval_every": eval_every, "items": items, "demo": demo}, rows, raw)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
