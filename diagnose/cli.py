"""n2n-diagnose: what each layer of an expert keeps, seen through a decoder (a thin wrapper of ``n2n.diagnose``)."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from n2n.cli import CONTEXT, console, reports_errors
from n2n.diagnose.api import DiagnoseConfig, diagnose
from n2n.options import click_options, config_option


def report_table(report: dict) -> Table:
    """One row per layer: its size, held-out NLL beside the floor, and per attribute kept % / free."""
    layers = report["layers"]
    attrs = list(report.get("chance") or {})
    table = Table(title=f"what each layer keeps ({report['inputs']} held-out inputs x {report['samples']} samples)",
                  caption="each attribute: kept / free. kept: samples read as the input's value; free: entropy of "
                          "an input's samples over a perfect sampler's (1: as varied as the data). NLL and the "
                          "linear-Gaussian floor in bits/dim of the decoder's latent.")
    for header in ("layer", "dim", "NLL", "floor", *attrs):
        table.add_column(header, justify="left" if header == "layer" else "right")
    for layer, entry in layers.items():
        cells = [f"{s['kept']:.1%} / {s['free']:.2f}" for s in (entry.get("attributes") or {}).values()]
        nll, floor = entry["heldout_bpd"], entry["linear_gaussian_bpd"]
        table.add_row(layer, str(entry["dim"]), "-" if nll is None else f"{nll:.3f}",
                      "-" if floor is None else f"{floor:.3f}", *cells)
    if attrs:
        table.add_row("chance", "", "", "", *(f"{report['chance'][a]:.1%} / 1.00" for a in attrs))
    return table


@click.command(context_settings=CONTEXT)
@config_option
@click_options(DiagnoseConfig)
@reports_errors
def main(**options: object) -> None:
    """Translate each layer of an expert into a decoder's images and measure what each one keeps.

    Extracts every layer in one pass of the expert and the decoder once (complete stores are reused),
    trains one translator per layer into the decoder's latent (finished runs are kept), then samples
    held-out inputs. Writes OUT/diagnosis.png (inputs as rows, samples of each layer) and
    OUT/diagnosis.json, and prints each layer's held-out NLL beside its linear-Gaussian floor and, where
    the dataset's scorer reads attributes (shapes), how often samples keep each one.

    Example: n2n-diagnose --expert classifier:experts/classifier-shapes --layers block1,block2,pool,logits
    --decoder ae:experts/ae-shapes --data shapes --limit 8000
    """
    report = diagnose(**options)
    Console().print(report_table(report))
    console().print(f"wrote {report['out']}/diagnosis.json and {report['figure']}")
