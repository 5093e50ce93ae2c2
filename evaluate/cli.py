"""n2n-eval: score a trained run on its held-out keys (a thin wrapper of ``n2n.evaluate``)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from n2n.cli import CONTEXT, console, reports_errors
from n2n.evaluate.api import EvalConfig, dataset_table, evaluate
from n2n.evaluate.texts import caption_table
from n2n.options import click_options, config_option
from n2n.shards import write_json_atomic
from n2n.translate.report import score_rows, title


def print_report(report: dict) -> None:
    """The report as a table on stdout (``translate.report.score_rows``: the dataset's rows included, which a
    report written before it recorded them gets from its run's dataset)."""
    scores = score_rows(report, None if "dataset_table" in report else dataset_table(report))
    table = Table(title=title(report), caption=scores.caption or None)
    table.add_column(scores.headers[0])
    for header in scores.headers[1:]:
        table.add_column(header, justify="right")
    for row in scores.rows:
        table.add_row(*row)
    Console().print(table)
    if report.get("captions"):
        Console().print(caption_table(report["captions"]))


@click.command(context_settings=CONTEXT)
@config_option
@click.option("--run", required=True, type=click.Path(path_type=Path),
              help="Run folder of n2n-train, or a saved translator (its folder or Hugging Face Hub id).")
@click.option("--shards", type=click.Path(path_type=Path), default=None,
              help="The view to score on: needed for a saved translator (a view of its two experts). "
                   "[default: the run's own]")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="[default: RUN/eval.json; ./eval.json for a Hub id]")
@click_options(EvalConfig)
@reports_errors
def main(run: Path, out: Path | None, **options: object) -> None:
    """Score a trained run on its held-out keys against a linear map and an MLP fitted on the same split:
    held-out NLL (beside the linear-Gaussian floor), retrieval of the true target, cosine, Fréchet
    distance and precision/recall, and what the run's dataset measures beyond them (shapes: attribute
    accuracy and diversity of decoded samples). Writes eval.json and eval.png (the table, and decoded
    samples of a few held-out pairs where the target expert decodes)."""
    out = out or (run if run.is_dir() else run.parent if run.is_file() else Path(".")) / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = evaluate(run, figure=out.with_suffix(".png"), **options)
    write_json_atomic(out, report)
    print_report(report)
    console().print(f"wrote {out} and {report['figure']}")
