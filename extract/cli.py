"""n2n-extract: run one frozen expert once over one dataset and write its latent store(s)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
import transformers
from rich.console import Console
from rich.table import Table

from n2n.extract.datasets import DatasetError, known_datasets
from n2n.extract.experts import ExpertError, known_experts
from n2n.extract.run import ExtractConfig, ExtractError, extract
from n2n.parallel import Ranks, relaunch
from n2n.shards.cli import PATH_OR_URL
from n2n.shards.store import FORMATS, StoreError

console = Console(stderr=True)


def parse_option(text: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE as an int, a float, true/false, or else the string itself."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"{text!r}: write it as KEY=VALUE, e.g. seed=1", param_hint="--data-option")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--expert", required=True,
              help=f"Expert spec name[:model][@layer]; families: {', '.join(known_experts())}. "
                   "E.g. minilm, bert:bert-base-uncased@cls, timm:resnet50@stage3, ae:experts/ae-shapes.")
@click.option("--data", required=True, help=f"Dataset: {', '.join(known_datasets())}.")
@click.option("--data-root", type=click.Path(path_type=Path), default=None,
              help="Where the dataset lives (coco, folder, wds); shapes and biggan need none.")
@click.option("--split", default="train", help="train | val (the dataset's own split).")
@click.option("--data-option", "data_options", multiple=True, metavar="KEY=VALUE",
              help="A dataset option, repeatable: e.g. seed=1, size=128 (shapes), classes=1,207,980 (biggan).")
@click.option("--out", type=PATH_OR_URL, default="shards",
              help="Root of the stores: writes OUT/<data>/<expert>[@layer]/.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="zarr", help="Store format.")
@click.option("--batch-size", default=64, help="Items per forward pass (fixed for the life of a store).")
@click.option("--num-workers", default=min(4, os.cpu_count() or 1), help="Loader processes (decode, preprocess).")
@click.option("--device", default="auto", help="auto | cpu | cuda | cuda:N")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", help="Stored latent dtype.")
@click.option("--limit", type=int, default=None, help="Only the first N items.")
@click.option("--layers", default=None, help="Comma-separated layers, one store each (one forward pass for all).")
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="Local weights (file or folder) instead of the hub: the way to run offline.")
@click.option("--on-error", type=click.Choice(["skip", "fail"]), default="skip",
              help="A corrupt image or empty caption: skip it (recorded in errors.jsonl) or stop.")
@click.option("--overwrite", is_flag=True, help="Redo the stores even if they are complete.")
@click.option("--commit-every", default=30.0, help="Seconds between commits: the most work a crash can cost.")
@click.option("--nproc", default=1, type=click.IntRange(min=1),
              help="Processes on this node (one per GPU): relaunches this command under torchrun; each takes a "
                   "contiguous share of the items and rank 0 commits one store. Many nodes: see the README.")
def main(expert: str, data: str, data_root: Path | None, split: str, data_options: tuple[str, ...], out: Path,
         fmt: str, batch_size: int,
         num_workers: int, device: str, dtype: str, limit: int | None, layers: str | None, weights: Path | None,
         on_error: str, overwrite: bool, commit_every: float, nproc: int) -> None:
    """Run one frozen expert over one dataset, once, and write its latents to a store.

    Rerunning the same command after a crash continues where the committed part ends and gives the
    store an uninterrupted run would have; on a complete store it does nothing and says so.

    Example: n2n-extract --expert minilm --data shapes --limit 2000

    Several GPUs: n2n-extract --nproc 8 ... (or torchrun --nproc-per-node 8 -m n2n.extract ...). The
    store equals a one-process run's; after a crash the same command finishes only what is missing.
    """
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        sys.exit(relaunch(nproc, "n2n.extract", sys.argv[1:]))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenisers run in forked loader workers
    transformers.logging.disable_progress_bar()  # one progress bar, ours
    cfg = ExtractConfig(expert=expert, data=data, data_root=data_root, split=split, out=out, format=fmt,
                        batch_size=batch_size, num_workers=num_workers, device=device, dtype=dtype, limit=limit,
                        layers=layers.split(",") if layers else None, weights=weights, on_error=on_error,
                        overwrite=overwrite, commit_every=commit_every,
                        dataset_options=dict(parse_option(o) for o in data_options))
    try:
        summary = extract(cfg, console)
    except (ExtractError, ExpertError, DatasetError, StoreError) as e:
        console.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    if summary["already_complete"] or not Ranks.from_env().main:
        return
    table = Table(title="n2n-extract", show_header=False)
    table.add_row("stores", "\n".join(summary["stores"]))
    table.add_row("rows", str(summary["rows"]))
    table.add_row("skipped items", f"{summary['skipped']} (see errors.jsonl)" if summary["skipped"] else "0")
    table.add_row("time", f"{summary['seconds']:.1f} s")
    table.add_row("items/s", f"{summary['items_per_s']:.1f}")
    Console().print(table)
