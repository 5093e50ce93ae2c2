"""What a dataset's scorer is handed and gives back: the contract between n2n-eval and a dataset.

A dataset that knows its ground truth scores translations of it (``ItemDataset.translation_scorer``:
shapes lets a judge read decoded samples). n2n-eval hands the scorer the run's held-out pairs and
the translators to compare (``HeldOut``); the scorer returns entries for eval.json and the rows that
print them (``TranslationScorer``, ``ScoreTable``). These types live at the package's root, below both
stages, so a dataset (stage 1) imports nothing from the evaluation.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from rich.console import Console

if TYPE_CHECKING:
    from n2n.extract.experts import Expert
    from n2n.shards import Store

Predictor = Callable[[torch.Tensor, int], torch.Tensor]
Editor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(target latents [N, dim] in stored units, their standardised sources [N, dim], new standardised sources
[N, dim]) -> the targets under the new sources, their residuals kept (``Translator.edit`` on latents)."""
"""(standardised source rows [B, dim], n) -> n target latents per row [B * n, dim], row-major, in the
target store's units (what the target expert decodes)."""


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
    predictors: dict[str, Predictor]  # "translator" (the run's), "linear" and "mlp"
    target_expert: Callable[[], Expert]  # the target store's expert (to decode), loaded on first call
    target_store: Store  # the target store (its keys, subs and dataset, e.g. to read captions)
    source_truth: dict[str, dict] | None  # the attributes each store's dataset recorded (attributes.jsonl), by key
    target_truth: dict[str, dict] | None
    options: Any  # n2n-eval's options (evaluate.api.EvalConfig): samples, max_rows, seed, judge, ...
    console: Console | None  # for progress; None when progress is off
    # Editing through the residual, where the run's translator and source expert allow it (None elsewhere):
    encode_source: Callable[[list[dict]], torch.Tensor] | None = None  # dataset-like items (each with the field
    # the source expert reads: "text": [caption], "attributes": {...}) -> standardised source latents [N, dim]
    edit: Editor | None = None
    # The attributes every source names where the source expert is a dataset's labels (label@shape: "shape");
    # None where each source says its own (a caption: source_truth's flags). Loads the source expert.
    source_names: Callable[[], tuple[str, ...] | None] | None = None
    # Targets wider than 4096 dims: target latents [N, dim] -> coordinates [N, k] on the subspace that the
    # distribution scores (Fréchet distance, precision/recall) are measured on (n2n-eval's report says which).
    project: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class ScoreTable:
    """How a scorer's entries print: (metric, the run's translator, MLP baseline) rows and a caption under the
    table. n2n-eval records it in eval.json (``dataset_table``), so a report reads whole without its dataset."""

    rows: list[tuple[str, str, str]] = field(default_factory=list)
    caption: str = ""


class TranslationScorer(Protocol):
    """What ``ItemDataset.translation_scorer`` returns: scores for eval.json and the rows that print them."""

    def score(self, held_out: HeldOut) -> dict:
        """Entries added to the report (JSON values); {} when nothing fits this run."""

    def table(self, report: dict) -> ScoreTable:
        """The rows of the printed table for the entries ``score`` added to ``report`` (none if absent)."""

    # Optional, for n2n-eval's fidelity–diversity curve (``getattr(scorer, "curve_point", None)``): the dataset's
    # scores of one point, the run's translator at one temperature (or a baseline) as ``predict``:
    # {"judge": fidelity in [0, 1] or None, "open_entropy": diversity in [0, 1] or None}.
    # def curve_point(self, held_out: HeldOut, predict: Predictor) -> dict: ...

    # Optional, for n2n-diagnose (``getattr(scorer, "read_decoded", None)``): what a person would read off the
    # images ``target`` decodes from ``latents`` [N, dim], {attribute: [value per latent]}, each value one of
    # the dataset's ``attribute_values``. ``judge`` is n2n-diagnose's --judge (None: the scorer's default).
    # def read_decoded(self, target: Expert, latents: torch.Tensor, judge: Path | None,
    #                  console: Console | None) -> dict[str, list[str]]: ...


def normalized_entropy(values: list[str], n_values: int) -> float:
    """Entropy of the values' frequencies over that of ``n_values`` equally frequent values."""
    counts = np.array(list(Counter(values).values()), dtype=np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum() / math.log(n_values))


def uniform_entropy(n_values: int, n_samples: int, trials: int = 4000, seed: int = 0) -> float:
    """What a perfect sampler scores: the mean normalised entropy of ``n_samples`` uniform draws.

    Below 1 because a few samples rarely cover every value (16 draws over 9 positions: 0.87), so a
    diversity score is read against this, not against 1.
    """
    draws = np.random.default_rng(seed).integers(n_values, size=(trials, n_samples))
    p = (draws[..., None] == np.arange(n_values)).mean(1)
    logs = np.log(np.where(p > 0, p, 1.0))
    return float(-(p * logs).sum(1).mean() / math.log(n_values))


OLD_NAMES = {"cinn": "translator"}  # eval.json's names before a continuous translator could be scored


class Predictors(dict):
    """``HeldOut.predictors``: a dict by name, in which the former name of the run's translator (``cinn``)
    still finds it, with a DeprecationWarning, so that a scorer written against it keeps working."""

    def __missing__(self, key: str) -> Predictor:
        if key not in OLD_NAMES:
            raise KeyError(key)
        warnings.warn(f"HeldOut.predictors[{key!r}] is deprecated: the run's translator is "
                      f"predictors[{OLD_NAMES[key]!r}]", DeprecationWarning, stacklevel=2)
        return self[OLD_NAMES[key]]


def upgrade_report(report: dict) -> dict:
    """An eval.json of any n2n version with today's names: the run's translator's entries were ``cinn`` (a
    name that is wrong for the continuous kind) and are ``translator``, in ``translation`` and at the top."""
    def renamed(entry: dict) -> dict:
        return {OLD_NAMES.get(key, key): value for key, value in entry.items()}

    report = renamed(report)
    if isinstance(report.get("translation"), dict):
        report["translation"] = renamed(report["translation"])
    return report
