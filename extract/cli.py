"""n2n-extract: run one frozen expert once over one dataset and write its latent store(s)."""

from __future__ import annotations

import os
import sys

import click
from rich.console import Console
from rich.table import Table

from n2n import plugins
from n2n.cli import CONTEXT, console, reports_errors
from n2n.extract.run import ExtractConfig, run_extraction
from n2n.options import check_value, click_options, config_option, from_params
from n2n.parallel import Ranks, relaunch


@click.command(context_settings=CONTEXT)
@config_option
@click_options(ExtractConfig, more_help={
    "expert": f"Installed families: {plugins.listing('expert')}.",
    "data": f"Installed: {plugins.listing('dataset')}.",
    "format": f"Installed: {plugins.listing('format')}."})
@click.option("--nproc", default=1, type=int,
              help="Processes on this node (one per GPU): relaunches this command under torchrun; each takes a "
                   "contiguous share of the items and rank 0 commits one store. Many nodes: see the docs.")
@reports_errors
def main(nproc: int, **options: object) -> None:
    """Run one frozen expert over one dataset, once, and write its latents to a store.

    Rerunning the same command after a crash continues where the committed part ends and gives the
    store an uninterrupted run would have; on a complete store it does nothing and says so.

    Example: n2n-extract --expert minilm --data shapes --limit 2000

    Several GPUs: n2n-extract --nproc 8 ... (or torchrun --nproc-per-node 8 -m n2n.extract ...). The
    store equals a one-process run's; after a crash the same command finishes only what is missing.
    """
    cfg = from_params(ExtractConfig, options)
    check_value("nproc", nproc, integer=True, min=1)
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        sys.exit(relaunch(nproc, "n2n.extract", sys.argv[1:]))
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
