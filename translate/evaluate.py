"""``n2n.evaluate`` / n2n-eval: how good is a trained translator, measured on its view's held-out keys.

Every run gets its held-out NLL in bits/dim. What else is worth measuring depends on the data, so
the dataset of the run's stores decides (``ItemDataset.translation_scorer``): shapes, whose ground
truth is known, lets a judge read the attributes of decoded samples and retrieves captions for
images; a dataset without a scorer (the default) leaves the NLL as the measure. A scorer is handed
the held-out pairs and two predictors to compare, the cINN and the deterministic MLP baseline
trained on the same view (the paper's cINN-vs-MLP comparison), so this module knows no dataset.
Everything is computed from the stores: no source expert is run.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import click
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from n2n.cli import CONTEXT, console, reports_errors
from n2n.errors import N2NError
from n2n.extract.datasets import DatasetError, dataset_class
from n2n.extract.experts import Expert
from n2n.options import check_fields, click_options, setting
from n2n.shards import as_path, write_json_atomic
from n2n.train.checkpoint import CHECKPOINT, TrainedFlow, load_run, read_meta, run_view
from n2n.train.data import PairedLatents, load_pairs
from n2n.train.trainer import heldout_bpd
from n2n.translate.baseline import train_mlp
from n2n.translate.pipeline import expert_of

Predictor = Callable[[torch.Tensor, int], torch.Tensor]
"""(standardised source rows [B, dim], n) -> n target latents per row [B * n, dim], row-major, in the
target store's units (what the target expert decodes)."""


@dataclass(frozen=True)
class EvalConfig:
    """The options of one evaluation, checked when made, before anything is loaded or written."""

    samples: int = setting(16, "Samples per source row where a dataset scores diversity (a perfect sampler "
                           "scores below 1 with few samples; the table prints what it would score).", min=1, max=4096)
    temperature: float = setting(1.0, "Sampling temperature of the cINN: z ~ N(0, T^2 I).", min=0)
    max_rows: int = setting(1000, "Held-out rows (captions or images) a dataset scores.", min=1)
    seed: int = setting(0, "Seeds the cINN's samples and the MLP baseline.", min=0)
    baseline_steps: int = setting(2000, "Training steps of the MLP baseline.", min=1)
    judge: Path | None = setting(None, "A model the dataset scores with, where it has one (shapes: the attribute "
                                       "judge, trained there first if missing) [default: the dataset's own, "
                                       "experts/judge-shapes for shapes].")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class HeldOut:
    """What a dataset's scorer gets: the run's held-out pairs, the predictors to compare, the options.

    Row i of every array is one held-out (source, target) pair; an item's pairs are adjacent (an
    image with five captions: five pairs sharing ``target_row`` or ``source_row``).
    """

    key: np.ndarray  # [N] the item key of each pair
    source_sub: np.ndarray  # [N] which of its item's rows the source latent is (a caption's number; 0 for images)
    target_sub: np.ndarray  # [N] the same for the target latent
    target_row: np.ndarray  # [N] the target store's row: equal for pairs that share one target latent
    source: torch.Tensor  # [N, source dim] standardised source latents: what the predictors take
    target: torch.Tensor  # [N, target dim] the target latents, in the store's units
    predictors: dict[str, Predictor]  # "cinn" and "mlp"
    target_expert: Callable[[], Expert]  # the target store's expert (to decode), loaded on first call
    source_truth: dict[str, dict] | None  # the attributes each store's dataset recorded (attributes.jsonl), by key
    target_truth: dict[str, dict] | None
    options: EvalConfig
    console: Console | None  # for progress; None when progress is off


@dataclass
class ScoreTable:
    """How a scorer's entries print: (metric, cINN, MLP baseline) rows and a caption under the table."""

    rows: list[tuple[str, str, str]] = field(default_factory=list)
    caption: str = ""


class TranslationScorer(Protocol):
    """What ``ItemDataset.translation_scorer`` returns: scores for eval.json and the rows that print them."""

    def score(self, held_out: HeldOut) -> dict:
        """Entries added to the report (JSON values); {} when nothing fits this run."""

    def table(self, report: dict) -> ScoreTable:
        """The rows of the printed table for the entries ``score`` added to ``report`` (none if absent)."""


# ---------------------------------------------------------------- the dataset's part


def read_attributes(store_path: Path) -> dict[str, dict] | None:
    """Ground truth per key, written beside a store by n2n-extract for datasets that have it."""
    path = as_path(store_path) / "attributes.jsonl"
    if not path.exists():
        return None
    return {row["key"]: row for row in map(json.loads, path.read_text().splitlines())}


def scorer_of(meta: dict) -> TranslationScorer | None:
    """The scorer of the dataset both of a run's stores were extracted from (checkpoint header ``meta``);
    None where the stores name none, or different ones, or the dataset is not installed or has no scorer."""
    names = {(meta[side].get("dataset") or {}).get("name") for side in ("source", "target")}
    if len(names) != 1 or None in names:
        return None
    try:
        cls, _ = dataset_class(names.pop())
    except DatasetError:
        return None
    return cls.translation_scorer()


def held_out(translator: TrainedFlow, data: PairedLatents, cfg: EvalConfig, quiet: bool) -> HeldOut:
    """The held-out pairs of ``data`` with the cINN and a freshly trained MLP baseline as predictors."""
    generator = torch.Generator().manual_seed(cfg.seed)
    mlp = functools.cache(lambda: train_mlp(data, steps=cfg.baseline_steps, seed=cfg.seed))  # trained if used

    @torch.no_grad()
    def cinn(c: torch.Tensor, n: int) -> torch.Tensor:
        z = translator.flow.sample(c.repeat_interleave(n, dim=0), cfg.temperature, generator)
        return translator.target_norm.inverse(z)

    @torch.no_grad()
    def regress(c: torch.Tensor, n: int) -> torch.Tensor:
        return data.target_norm.inverse(mlp()(c)).repeat_interleave(n, 0)

    view, (source_rows, target_rows) = data.view, data.held_rows
    target = functools.cache(lambda: expert_of(translator.meta["target"], "target", None, console(),
                                               store=view.target.path))
    return HeldOut(key=data.held_key, source_sub=view.source.sub[source_rows], target_sub=view.target.sub[target_rows],
                   target_row=target_rows, source=data.held_source[:],
                   target=data.held_target.latents[torch.from_numpy(target_rows)],
                   predictors={"cinn": cinn, "mlp": regress}, target_expert=target,
                   source_truth=read_attributes(view.source.path), target_truth=read_attributes(view.target.path),
                   options=cfg, console=None if quiet else console())


# ---------------------------------------------------------------- the API


def evaluate(run: str | os.PathLike, *, samples: int = EvalConfig.samples, temperature: float = EvalConfig.temperature,
             max_rows: int = EvalConfig.max_rows, seed: int = EvalConfig.seed,
             baseline_steps: int = EvalConfig.baseline_steps, judge: str | os.PathLike | None = None,
             progress: bool = True) -> dict:
    """Every metric of the run in folder ``run``, as the dict n2n-eval writes to eval.json.

    ``{"run", "view", "step", "heldout_bpd"}`` always, plus the entries of the scorer of the run's
    dataset (see the module docstring). Every number is checked first: an ``N2NError`` names the
    argument and its range before anything is loaded. ``progress=False`` keeps the console quiet.
    """
    cfg = EvalConfig(samples=samples, temperature=temperature, max_rows=max_rows, seed=seed,
                     baseline_steps=baseline_steps, judge=None if judge is None else Path(judge))
    translator = load_run(run)
    meta = translator.meta
    view = run_view(meta, run)
    data = load_pairs(view, meta["train"]["holdout"], (translator.source_norm, translator.target_norm))
    report: dict = {"run": str(run), "view": str(view), "step": meta["step"],
                    "heldout_bpd": heldout_bpd(translator.flow, data, rows=len(data.held_target))}
    scorer = scorer_of(meta)
    if scorer is not None:
        report |= scorer.score(held_out(translator, data, cfg, quiet=not progress))
    return report


def print_report(report: dict) -> None:
    """The report as a table on stdout; the rows beyond the NLL are those of the run's dataset's scorer."""
    table = Table(title=f"n2n-eval {report['run']} (step {report['step']})")
    table.add_column("metric")
    table.add_column("cINN", justify="right")
    table.add_column("MLP baseline", justify="right")
    table.add_row("held-out NLL (bits/dim)", f"{report['heldout_bpd']:.4f}", "")
    scores = dataset_table(report)
    for row in scores.rows:
        table.add_row(*row)
    table.caption = scores.caption or None
    Console().print(table)


def dataset_table(report: dict) -> ScoreTable:
    """The dataset's rows of a report, found through the run it names (its checkpoint's header, not its
    tensors); a note instead where that run can no longer be read."""
    run = Path(report["run"])
    try:
        scorer = scorer_of(read_meta(run / CHECKPOINT if run.is_dir() else run))
    except N2NError as err:
        return ScoreTable(caption=f"only the NLL is shown: the dataset's scores are printed through the run ({err})")
    return scorer.table(report) if scorer is not None else ScoreTable()


# ---------------------------------------------------------------- command line


@click.command(context_settings=CONTEXT)
@click.option("--run", required=True, type=click.Path(path_type=Path), help="Run folder of n2n-train.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="[default: RUN/eval.json]")
@click_options(EvalConfig)
@reports_errors
def main(run: Path, out: Path | None, **options: object) -> None:
    """Score a trained run on its held-out keys and write eval.json: the held-out NLL, and what the run's
    dataset measures beyond it (shapes: attribute accuracy and diversity of decoded samples, caption
    retrieval), each beside the MLP baseline."""
    report = evaluate(run, **options)
    out = out or run / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, report)
    print_report(report)
    console().print(f"wrote {out}")
