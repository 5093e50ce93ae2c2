"""The fidelity–diversity curve: the run's translator sampled at several temperatures (and guidances), each
point scored for how faithful and how varied its samples are, with the deterministic baselines as points.

A generative translator has a knob a regression lacks, as BigGAN's truncation and an LLM's temperature are:
z ~ N(0, T^2 I), so T = 0 gives one answer per source and T = 1 the learned distribution. Where the run was
trained with dropped conditions, classifier-free guidance is a second knob. Per point, on the held-out pairs
of the main table (``max_rows``, one sample per pair):

- fidelity: the cosine of the sample to the pair's true target, and retrieval top-1 among up to 1024 held-out
  targets (vec2vec's); the dataset's judge where its scorer has one (``curve_point``: shapes reads
  decoded images, or the caption nearest a text prediction);
- diversity: k-NN recall of the samples against the true targets (Kynkäänniemi et al. 2019), the Fréchet
  distance beside it, and the dataset's entropy of attributes the source leaves open where it knows them.

The MLP and the linear map give one point each: they have no temperature.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from n2n.evaluate.metrics import frechet_distance, mean_cosine, precision_recall, retrieval_among, subsample
from n2n.scoring import HeldOut, Predictor
from n2n.translate.report import POOL

Sampler = Callable[[float, float], Predictor]  # (temperature, guidance) -> the run's translator sampled so
FIDELITY = ("cosine", "top1", "judge")  # a point's fidelity scores: higher is more faithful
BASELINES = ("mlp", "linear")


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


def point_scores(held: HeldOut, predict: Predictor, rows: torch.Tensor, scorer: object | None) -> dict:
    """One point's scores (module docstring) from one sample per held-out pair in ``rows``."""
    cfg = held.options
    distinct, first, truth = np.unique(held.target_row, return_index=True, return_inverse=True)
    candidates, target = held.target[torch.from_numpy(first)].float(), held.target[rows].float()
    one = predict(held.source[rows], 1).float()
    scores = {"cosine": mean_cosine(one, target),
              "top1": retrieval_among(one, truth[rows.numpy()], candidates, POOL, cfg.seed)["top1"],
              "frechet": frechet_distance(one, target), **precision_recall(target, one)}
    read = getattr(scorer, "curve_point", None)
    return scores | (read(held, predict) if read is not None else {})


def fidelity_diversity(held: HeldOut, sampler: Sampler, temperatures: tuple[float, ...],
                       guidances: tuple[float, ...], scorer: object | None = None,
                       progress: Callable[[str], None] | None = None) -> dict:
    """The curve: ``{"points": [{"temperature", "guidance", scores...}], "baselines": {"mlp": scores, "linear":
    scores}, "best": {fidelity score: {"value", "temperature", "guidance"}}}``. Guidance 1 is always sampled;
    ``guidances`` add their lines (pass () where the run has no unconditional velocity). Every point draws
    from the same seed, so two curves of one run differ only by the knob."""
    rows = torch.from_numpy(subsample(len(held.key), held.options.max_rows, held.options.seed))
    points = []
    for guidance in dict.fromkeys((1.0, *guidances)):
        for temperature in temperatures:
            if progress is not None:
                progress(f"curve: temperature {temperature:g}, guidance {guidance:g}")
            scores = point_scores(held, sampler(temperature, guidance), rows, scorer)
            points.append({"temperature": temperature, "guidance": guidance, **scores})
    baselines = {name: point_scores(held, held.predictors[name], rows, scorer)
                 for name in BASELINES if name in held.predictors}
    best = {}
    for metric in FIDELITY:
        scored = [p for p in points if p.get(metric) is not None]
        if scored:
            top = max(scored, key=lambda p: p[metric])
            best[metric] = {"value": top[metric], "temperature": top["temperature"], "guidance": top["guidance"]}
    return {"points": points, "baselines": baselines, "best": best, "pairs": len(rows)}
