"""Metrics of a translation that need no knowledge of the dataset: they read latents only.

``n2n.evaluate`` knows ground truth only where a dataset brings a scorer (shapes). Any other view
still has held-out (source, target) pairs, so these measure what latents alone can show:
- a floor: the held-out NLL of the best linear-Gaussian law p(target | source) (``cinn.gaussian``). A
  flow that does not beat it has learned nothing a least-squares fit does not give for free;
- accuracy of a point prediction: retrieval of the true target among the distinct held-out targets,
  and mean cosine similarity to it;
- how samples match the targets as a distribution: the Frechet distance of the two Gaussian fits,
  and improved precision/recall (Kynkaanniemi et al. 2019), which tell missing modes from off-support samples.
Everything is plain torch (no scipy); distances and matrix roots are taken in float64, and the big
pairwise comparisons go in chunks of rows, so 100k x 20k never sits in memory at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from n2n.cinn.gaussian import LinearGaussian  # noqa: F401  (the floor; here too, where n2n-eval reads it)
from n2n.train.data import subsample  # noqa: F401  (here too: the metrics score a seeded subset)

CHUNK_ELEMENTS = 1 << 24  # entries of one chunk's pairwise matrix (128 MiB in float64)


def _chunk_rows(columns: int, chunk: int | None) -> int:
    """Rows per chunk so that a [rows, columns] matrix keeps to CHUNK_ELEMENTS (or ``chunk`` if given)."""
    return chunk if chunk is not None else max(1, CHUNK_ELEMENTS // max(1, columns))


# ---------------------------------------------------------------- point predictions


def ranks(predictions: Tensor, truth_rows: Tensor | np.ndarray, candidates: Tensor,
          chunk: int | None = None) -> Tensor:
    """Rank [N] (1 = best) of each prediction's true candidate by cosine similarity among ``candidates``.

    Ties count against the prediction: the rank is the number of candidates at least as similar as
    the true one (itself included), so a degenerate prediction (a zero vector: every similarity 0)
    ranks last, not first. A non-finite prediction ranks last too. The true similarity is read from
    the same matrix as the others, so rounding cannot make a candidate tie with itself differently.
    """
    truth = torch.as_tensor(truth_rows, dtype=torch.long, device=predictions.device)
    if predictions.ndim != 2 or candidates.ndim != 2 or predictions.shape[1] != candidates.shape[1]:
        raise ValueError(f"predictions [N, d] and candidates [M, d] must share d, got {tuple(predictions.shape)}, "
                         f"{tuple(candidates.shape)}")
    if truth.shape != (len(predictions),):
        raise ValueError(f"truth_rows must be [N] = [{len(predictions)}], got {tuple(truth.shape)}")
    if len(truth) and (int(truth.min()) < 0 or int(truth.max()) >= len(candidates)):
        raise ValueError(f"truth_rows must index the {len(candidates)} candidates")
    bank = torch.nn.functional.normalize(candidates.to(predictions.dtype), dim=1)
    rows = _chunk_rows(len(bank), chunk)
    out = []
    for i in range(0, len(predictions), rows):
        sims = torch.nn.functional.normalize(predictions[i : i + rows], dim=1) @ bank.T
        sims = sims.nan_to_num(nan=-2.0)  # below every cosine: a NaN row ties everywhere and ranks last
        true = sims.gather(1, truth[i : i + rows, None])
        out.append((sims >= true).sum(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def retrieval(predictions: Tensor, truth_rows: Tensor | np.ndarray, candidates: Tensor,
              chunk: int | None = None) -> dict:
    """Retrieval of each pair's true target among the M distinct held-out targets by its prediction.

    ``predictions`` [N, d] one per pair, ``candidates`` [M, d], ``truth_rows`` [N] the index into
    candidates of each pair's target. Chance is top1 = 1/M and median rank ~ M/2; see ``ranks``
    for ties. Returns {"top1", "top5", "median_rank", "candidates": M}.
    """
    r = ranks(predictions, truth_rows, candidates, chunk).cpu().numpy()
    if len(r) == 0:
        raise ValueError("retrieval needs at least one prediction")
    return {"top1": float((r <= 1).mean()), "top5": float((r <= 5).mean()), "median_rank": float(np.median(r)),
            "candidates": len(candidates)}


def retrieval_among(predictions: Tensor, truth_rows: Tensor | np.ndarray, candidates: Tensor, pool: int = 1024,
                    seed: int = 0) -> dict:
    """Retrieval as vec2vec reports it: each prediction's true target among ``pool`` candidates, itself and
    ``pool - 1`` others of one seeded draw (all candidates where there are fewer).

    A fixed pool makes the number comparable across views of any size, where the rank among all held-out
    targets (``retrieval``) grows with the view. Ties count against the prediction, as in ``ranks``.
    Returns {"top1", "mean_rank", "pool"}."""
    truth = torch.as_tensor(truth_rows, dtype=torch.long)
    size = min(pool, len(candidates))
    members = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))[:size]
    unit = torch.nn.functional.normalize(predictions.double(), dim=1)
    bank = torch.nn.functional.normalize(candidates.double(), dim=1)
    sims = (unit @ bank[members].T).nan_to_num(nan=-2.0)  # [N, pool]
    true = (unit * bank[truth]).sum(1).nan_to_num(nan=-2.0)
    others = members[None] != truth[:, None]  # the pool less each row's truth ...
    others[~(~others).any(1), -1] = False  # ... or less its last member, where the truth was not in it
    r = 1 + ((sims >= true[:, None]) & others).sum(1).double()
    return {"top1": float((r <= 1).double().mean()), "mean_rank": float(r.mean()), "pool": size}


def mean_cosine(predictions: Tensor, truth: Tensor) -> float:
    """Mean row-wise cosine similarity of predictions [N, d] to their targets [N, d] (1 = same directions)."""
    if predictions.shape != truth.shape or len(truth) == 0:
        raise ValueError(f"mean_cosine needs two [N, d] of the same shape, got {tuple(predictions.shape)}, "
                         f"{tuple(truth.shape)}")
    rows = _chunk_rows(truth.shape[1], None)  # in float64 a block at a time: a 65,536-dim pair of sets is 2 GiB
    return float(sum(torch.nn.functional.cosine_similarity(predictions[i : i + rows].double(),
                                                           truth[i : i + rows].double(), dim=1).sum()
                     for i in range(0, len(truth), rows)) / len(truth))


# ---------------------------------------------------------------- distributions


def _sqrt_psd(matrix: Tensor) -> Tensor:
    """Symmetric square root of a symmetric PSD matrix; rounding's tiny negative eigenvalues become 0."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def gaussian_frechet(mu_a: Tensor, cov_a: Tensor, mu_b: Tensor, cov_b: Tensor) -> float:
    """Frechet (2-Wasserstein squared) distance of N(mu_a, cov_a) and N(mu_b, cov_b), in float64:
    |mu_a - mu_b|^2 + Tr(cov_a + cov_b - 2 (cov_a^1/2 cov_b cov_a^1/2)^1/2). Rounding below 0 reads 0."""
    mu_a, cov_a, mu_b, cov_b = (t.double() for t in (mu_a, cov_a, mu_b, cov_b))
    root_a = _sqrt_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    cross = torch.linalg.eigvalsh(0.5 * (middle + middle.T)).clamp_min(0).sqrt().sum()
    distance = (mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross
    return max(0.0, float(distance))


def _moments(samples: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance (float64) of samples [N, d], N >= 2."""
    samples = samples.double()
    if samples.ndim != 2 or len(samples) < 2:
        raise ValueError(f"need samples [N >= 2, d], got {tuple(samples.shape)}")
    mean = samples.mean(0)
    centred = samples - mean
    return mean, centred.T @ centred / (len(samples) - 1)


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Frechet distance of the Gaussian fits of two sample sets [Na, d], [Nb, d] (FID's formula, on latents).

    It is biased upwards by finite samples (two samples of one law score ~d^2 / N, not 0), so compare
    values computed from equally many rows. Where d is at least the rows of either set (a 65,536-dim VAE latent
    scored on 2,000 rows) it is computed from the rows, never forming a d x d matrix (``_frechet_of_rows``):
    the same number, in O(Na Nb d).
    """
    if a.shape[1] >= min(len(a), len(b)):
        return _frechet_of_rows(a, b)
    return gaussian_frechet(*_moments(a), *_moments(b))


def _frechet_of_rows(a: Tensor, b: Tensor) -> float:
    """``frechet_distance`` through the rows: with A, B the centred rows, Cov_a = A^T A / (Na - 1) and
    Cov_b = B^T B / (Nb - 1), the traces are sums of squares and Tr((Cov_a^1/2 Cov_b Cov_a^1/2)^1/2) is the
    sum of the singular values of A B^T / sqrt((Na - 1)(Nb - 1)): Cov_a Cov_b and that matrix's Gram share
    their nonzero eigenvalues."""
    for samples in (a, b):
        if samples.ndim != 2 or len(samples) < 2:
            raise ValueError(f"need samples [N >= 2, d], got {tuple(samples.shape)}")
    a, b = a.double(), b.double()
    mean_a, mean_b = a.mean(0), b.mean(0)
    ca, cb = a - mean_a, b - mean_b
    na, nb = len(a) - 1, len(b) - 1
    cross = torch.linalg.svdvals(ca @ cb.T).sum() / math.sqrt(na * nb)
    distance = (mean_a - mean_b).pow(2).sum() + ca.pow(2).sum() / na + cb.pow(2).sum() / nb - 2 * cross
    return max(0.0, float(distance))


def _kth_neighbour_radii(points: Tensor, k: int, chunk: int | None) -> Tensor:
    """Distance of each point to its k-th nearest other point (the point itself is the 0th)."""
    if len(points) <= k:
        raise ValueError(f"k = {k} needs more than {k} points, got {len(points)}")
    rows = _chunk_rows(len(points), chunk)
    return torch.cat([torch.cdist(points[i : i + rows], points).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(points), rows)])


def _coverage(manifold: Tensor, radii: Tensor, queries: Tensor, chunk: int | None) -> float:
    """Fraction of ``queries`` inside at least one ball (centre ``manifold[i]``, radius ``radii[i]``)."""
    rows = _chunk_rows(len(manifold), chunk)
    inside = sum(int((torch.cdist(queries[i : i + rows], manifold) <= radii).any(1).sum())
                 for i in range(0, len(queries), rows))
    return inside / len(queries)


def precision_recall(real: Tensor, fake: Tensor, k: int = 3, chunk: int | None = None) -> dict:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of samples ``fake`` against ``real``.

    Each set's manifold is the union of balls around its points reaching their k-th nearest other
    point. Precision: the fraction of fake inside the real manifold (are samples realistic?);
    recall: the fraction of real inside the fake manifold (is every mode covered?). Euclidean, in
    float64 and centred on the real mean, because cdist's matrix-product form loses small distances
    between far-from-origin points in float32. Returns {"precision", "recall", "k"}.
    """
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1] or len(fake) == 0:
        raise ValueError(f"precision_recall needs real [N, d] and fake [M, d], got {tuple(real.shape)}, "
                         f"{tuple(fake.shape)}")
    centre = real.double().mean(0)
    real, fake = real.double() - centre, fake.double() - centre
    precision = _coverage(real, _kth_neighbour_radii(real, k, chunk), fake, chunk)
    recall = _coverage(fake, _kth_neighbour_radii(fake, k, chunk), real, chunk)
    return {"precision": precision, "recall": recall, "k": k}


def distribution(real: Tensor, fake: Tensor, project: Callable[[Tensor], Tensor] | None = None) -> dict:
    """The Fréchet distance and k-NN precision/recall of ``fake`` against ``real`` [N, d], on the coordinates
    ``project`` gives both where given (a wide target's principal subspace: at 65,536 dims and 2,000 rows the
    full-width distances cost half a minute a set)."""
    if project is not None:
        real, fake = project(real), project(fake)
    return {"frechet": frechet_distance(fake, real), **precision_recall(real, fake)}
