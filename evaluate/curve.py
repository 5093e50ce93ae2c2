"""The fidelity–diversity curve: the run's translator sampled at several temperatures (and guidances), each
point scored for how faithful and how varied its samples are, with the deterministic baselines as points.

A generative translator has a knob a regression lacks, as BigGAN's truncation and an LLM's temperature are:
z ~ N(0, T^2 I), so T = 0 gives one answer per source and T = 1 the learned distribution. Where the run was
trained with dropped conditions, classifier-free guidance is a second knob. Per point, on the held-out pairs
of the main table (``max_rows``, one sample per pair; fewer for a wide target, CURVE_NUMBERS in all):

- fidelity: the cosine of the sample to the pair's true target, and retrieval top-1 among up to 1024 held-out
  targets (vec2vec's); the dataset's judge where its scorer has one (``curve_point``: shapes reads
  decoded images, or the caption nearest a text prediction);
- diversity: k-NN recall of the samples against the true targets (Kynkäänniemi et al. 2019), the Fréchet
  distance beside it, and the dataset's entropy of attributes the source leaves open where it knows them.

The MLP and the linear map give one point each: they have no temperature.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from n2n.evaluate.metrics import distribution, mean_cosine, retrieval_among, subsample
from n2n.scoring import HeldOut, Predictor
from n2n.translate.report import POOL

Sampler = Callable[[float, float], Predictor]  # (temperature, guidance) -> the run's translator sampled so
FIDELITY = ("cosine", "top1", "judge")  # a point's fidelity scores: higher is more faithful
BASELINES = ("mlp", "linear")
CURVE_NUMBERS = 2**27  # the most sampled numbers of a whole curve: 65,536-dim targets get 341 pairs over 6 points


def parse_values(text: str, option: str, least: float) -> tuple[float, ...]:
    """Comma-separated numbers, each at least ``least``; a ValueError naming ``option`` (and its command-line
    flag) otherwise."""
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = (float("nan"),)
    if any(not np.isfinite(v) or v < least for v in values):
        raise ValueError(f"{option} (--{option.replace('_', '-')}) = {text!r}: must be comma-separated numbers "
                         f">= {least:g}, e.g. 0,0.25,0.5,0.75,1")
    return values


@dataclass(frozen=True)
class Scored:
    """What every point is scored against: the held-out pairs' ``rows``, their true targets, each one's row among
    the ``candidates`` (the distinct held-out targets) as ``truth``."""

    rows: torch.Tensor
    target: torch.Tensor
    candidates: torch.Tensor
    truth: np.ndarray

    @classmethod
    def of(cls, held: HeldOut, points: int = 1) -> Scored:
        """At most ``max_rows`` pairs, and at most CURVE_NUMBERS numbers of samples over ``points`` points."""
        most = min(held.options.max_rows, max(2, CURVE_NUMBERS // (points * held.target.shape[1])))
        rows = torch.from_numpy(subsample(len(held.key), most, held.options.seed))
        _, first, truth = np.unique(held.target_row, return_index=True, return_inverse=True)
        return cls(rows, held.target[rows].float(), held.target[torch.from_numpy(first)].float(), truth[rows.numpy()])


def point_scores(held: HeldOut, predict: Predictor, scored: Scored, scorer: object | None) -> dict:
    """One point's scores (module docstring) from one sample per held-out pair of ``scored``."""
    one = predict(held.source[scored.rows], 1).float()
    scores = {"cosine": mean_cosine(one, scored.target),
              "top1": retrieval_among(one, scored.truth, scored.candidates, POOL, held.options.seed)["top1"],
              **distribution(scored.target, one, held.project)}
    read = getattr(scorer, "curve_point", None)
    return scores | (read(held, predict) if read is not None else {})


def fidelity_diversity(held: HeldOut, sampler: Sampler, temperatures: tuple[float, ...],
                       guidances: tuple[float, ...], scorer: object | None = None,
                       progress: Callable[[str], None] | None = None) -> dict:
    """The curve: ``{"points": [{"temperature", "guidance", scores...}], "baselines": {"mlp": scores, "linear":
    scores}, "best": {fidelity score: {"value", "temperature", "guidance"}}}``. Guidance 1 is always sampled;
    ``guidances`` add their lines (pass () where the run has no unconditional velocity). Every point draws
    from the same seed, so two curves of one run differ only by the knob."""
    scored = Scored.of(held, len(temperatures) * len(dict.fromkeys((1.0, *guidances))))
    points = []
    for guidance in dict.fromkeys((1.0, *guidances)):
        for temperature in temperatures:
            if progress is not None:
                progress(f"curve: temperature {temperature:g}, guidance {guidance:g}")
            scores = point_scores(held, sampler(temperature, guidance), scored, scorer)
            points.append({"temperature": temperature, "guidance": guidance, **scores})
    baselines = {name: point_scores(held, held.predictors[name], scored, scorer)
                 for name in BASELINES if name in held.predictors}
    best = {}
    for metric in FIDELITY:
        having = [p for p in points if p.get(metric) is not None]
        if having:
            top = max(having, key=lambda p: p[metric])
            best[metric] = {"value": top[metric], "temperature": top["temperature"], "guidance": top["guidance"]}
    return {"points": points, "baselines": baselines, "best": best, "pairs": len(scored.rows)}
