"""n2n-extract: run one frozen expert once over one dataset and write its latent store(s)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from n2n import plugins
from n2n.cli import CONTEXT, PATH_OR_URL, console, parse_option, reports_errors
from n2n.extract.run import ExtractConfig, run_extraction
from n2n.options import check_value
from n2n.parallel import Ranks, relaunch


def help_for(field: str) -> str:
    return ExtractConfig.__dataclass_fields__[field].metadata["n2n"]["help"]


@click.command(context_settings=CONTEXT)
@click.option("--expert", required=True,
              help=f"Expert spec name[:model][@layer]; installed families: {plugins.listing('expert')}. "
                   "E.g. minilm, bert:bert-base-uncased@cls, timm:resnet50@stage3, ae:experts/ae-shapes.")
@click.option("--data", required=True, help=f"Dataset; installed: {plugins.listing('dataset')}.")
@click.option("--data-root", type=click.Path(path_type=Path), default=None,
              help="Where the dataset lives (coco, folder, wds); shapes and biggan need none.")
@click.option("--split", default="train", help="train | val (the dataset's own split).")
@click.option("--data-option", "data_options", multiple=True, metavar="KEY=VALUE",
              help="A dataset option, repeatable: e.g. seed=1, size=128 (shapes), classes=1,207,980 (biggan).")
@click.option("--expert-option", "expert_options", multiple=True, metavar="KEY=VALUE",
              help="An option of the expert family, repeatable: e.g. size=64 (sdvae: the image size it encodes).")
@click.option("--out", type=PATH_OR_URL, default="shards",
              help="Root of the stores: writes OUT/<data>/<expert>[@layer]/.")
@click.option("--format", "fmt", default="zarr", help=f"Store format; installed: {plugins.listing('format')}.")
@click.option("--batch-size", default=64, help=help_for("batch_size"))
@click.option("--num-workers", default=min(4, os.cpu_count() or 1), help=help_for("num_workers"))
@click.option("--device", default="auto", help="auto | cpu | cuda | cuda:N")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", help=help_for("dtype"))
@click.option("--limit", type=int, default=None, help=help_for("limit"))
@click.option("--layers", default=None, help="Comma-separated layers, one store each (one forward pass for all).")
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="Local weights (file or folder) instead of the hub: the way to run offline.")
@click.option("--on-error", type=click.Choice(["skip", "fail"]), default="skip", help=help_for("on_error"))
@click.option("--overwrite", is_flag=True, help="Redo the stores even if they are complete.")
@click.option("--commit-every", default=30.0, help=help_for("commit_every"))
@click.option("--nproc", default=1, type=int,
              help="Processes on this node (one per GPU): relaunches this command under torchrun; each takes a "
                   "contiguous share of the items and rank 0 commits one store. Many nodes: see the README.")
@reports_errors
def main(expert: str, data: str, data_root: Path | None, split: str, data_options: tuple[str, ...],
         expert_options: tuple[str, ...], out: Path,
         fmt: str, batch_size: int, num_workers: int, device: str, dtype: str, limit: int | None, layers: str | None,
         weights: Path | None, on_error: str, overwrite: bool, commit_every: float, nproc: int) -> None:
    """Run one frozen expert over one dataset, once, and write its latents to a store.

    Rerunning the same command after a crash continues where the committed part ends and gives the
    store an uninterrupted run would have; on a complete store it does nothing and says so.

    Example: n2n-extract --expert minilm --data shapes --limit 2000

    Several GPUs: n2n-extract --nproc 8 ... (or torchrun --nproc-per-node 8 -m n2n.extract ...). The
    store equals a one-process run's; after a crash the same command finishes only what is missing.
    """
    cfg = ExtractConfig(expert=expert, data=data, data_root=data_root, split=split, out=out, format=fmt,
                        batch_size=batch_size, num_workers=num_workers, device=device, dtype=dtype, limit=limit,
                        layers=layers.split(",") if layers else None, weights=weights, on_error=on_error,
                        overwrite=overwrite, commit_every=commit_every,
                        data_options=dict(parse_option(o, "--data-option") for o in data_options),
                        expert_options=dict(parse_option(o, "--expert-option") for o in expert_options))
    check_value("nproc", nproc, integer=True, min=1)
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        sys.exit(relaunch(nproc, "n2n.extract", sys.argv[1:]))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenisers run in forked loader workers
    import transformers  # here: it takes a second to import, and --help or a bad option need none of it

    transformers.logging.disable_progress_bar()  # one progress bar, ours
    summary = run_extraction(cfg, console())
    if summary["already_complete"] or not Ranks.from_env().main:
        return
    table = Table(title="n2n-extract", show_header=False)
    table.add_row("stores", "\n".join(summary["stores"]))
    table.add_row("rows", str(summary["rows"]))
    table.add_row("skipped items", f"{summary['skipped']} (see errors.jsonl)" if summary["skipped"] else "0")
    table.add_row("time", f"{summary['seconds']:.1f} s")
    table.add_row("items/s", f"{summary['items_per_s']:.1f}")
    Console().print(table)
