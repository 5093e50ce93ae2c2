"""n2n-train: fit a cINN on a view of two latent stores (a thin wrapper of ``n2n.train``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from click.core import ParameterSource
from rich.console import Console
from rich.table import Table

from n2n.cinn import FlowConfig
from n2n.cli import CONTEXT, PATH_OR_URL, console, reports_errors
from n2n.options import check_value, click_options, config_option
from n2n.parallel import relaunch
from n2n.train import api
from n2n.train.trainer import TrainConfig


@click.command(context_settings=CONTEXT)
@config_option
@click.option("--shards", "view", type=PATH_OR_URL, default=None,
              help="View folder (holds view.json) naming the source and target stores, e.g. shards/minilm_ae.  "
                   "[on --resume: the run's own]")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Run folder for checkpoint.safetensors and metrics.jsonl.  [default: runs/<view name>]")
@click_options(TrainConfig)
@click_options(FlowConfig)
@click.option("--device", default="auto", help="auto | cpu | cuda | cuda:N")
@click.option("--compile/--no-compile", default=None,
              help="torch.compile the loss; falls back to eager if compiling fails.  [default: on CUDA only: "
                   "on a CPU compiling took ~75 s for +16% steps/s, a loss for runs under ~50k steps]")
@click.option("--stream/--no-stream", default=None,
              help="Read training pairs from the stores window by window (shuffled across files, read ahead in "
                   "the background) instead of loading the view on the device.  [default: only where it would "
                   "not fit]")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint, exactly.")
@click.option("--init-from", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Start a new run from a net2net checkpoint's flow (.ckpt, or its state dict); --config its "
                   "net2net YAML builds the same flow.")
@click.option("--source-dim", type=int, default=None,
              help="Refuse a view whose source latents are not this size (a net2net config sets it).")
@click.option("--target-dim", type=int, default=None,
              help="Refuse a view whose target latents are not this size (a net2net config sets it).")
@click.option("--dry-run", is_flag=True, help="Build the model, print its size and the pair count, train nothing.")
@click.option("--nproc", default=1, type=int,
              help="Data-parallel processes on this node (one per GPU): relaunches this command under torchrun. "
                   "--batch-size stays the global batch; many nodes: see the README.")
@click.pass_context
@reports_errors
def main(ctx: click.Context, view: Path | None, out: Path | None, device: str, compile: bool | None,
         stream: bool | None, resume: bool, init_from: Path | None, source_dim: int | None, target_dim: int | None,
         dry_run: bool, nproc: int, **options: object) -> None:
    """Train a conditional INN p(target latent | source latent) from a view's stores alone.

    Both sides are standardised (statistics kept in the checkpoint); keys hashing into --holdout are
    held out and reported as NLL in bits/dim of the target latent. Ctrl-C keeps the last checkpoint;
    --resume continues it and ends with the weights an uninterrupted run would have.

    Example: n2n-train --shards shards/synth-gaussian --steps 2000 --n-flows 8 --hidden-dim 128

    Several GPUs: n2n-train --nproc 8 ... (or torchrun --nproc-per-node 8 -m n2n.train ...): DDP, each
    process a slice of every global batch, so the run is the one-process run's; --resume works with
    any process count.
    """
    # Only the options on the command line: the others take the run's defaults, or on --resume its own.
    given = {name: value for name, value in options.items()
             if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT}
    api.settings(**given)  # every option checked before any process starts
    check_value("nproc", nproc, integer=True, min=1)
    if dry_run:
        print_dry_run(api.dry_run(view, **given), view)
        return
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        sys.exit(relaunch(nproc, "n2n.train", sys.argv[1:]))
    api.train(view, out, resume=resume, device=device, compile=compile, stream=stream, init_from=init_from,
              source_dim=source_dim, target_dim=target_dim, console=console(), **given)


def print_dry_run(size: dict, view: Path) -> None:
    table = Table(title=f"n2n-train --dry-run {view}", show_header=False)
    for key, value in size.items():
        if key == "parts":  # one row per part, largest first
            for part, count in value.items():
                table.add_row(f"  parameters: {part}", f"{count:,}")
            continue
        number = isinstance(value, int) and not isinstance(value, bool)
        table.add_row(key, f"{value:.3g}" if key == "lr" else f"{value:,}" if number else str(value))
    table.add_row("weights + Adam state (fp32)", f"{size['parameters'] * 4 * 4 / 2**20:,.0f} MiB")
    Console().print(table)
