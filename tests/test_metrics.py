"""The dataset-agnostic metrics of n2n.evaluate.metrics against laws whose answer is known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from n2n.cinn.loss import LOG_2PI
from n2n.evaluate.metrics import (
    LinearGaussian,
    frechet_distance,
    gaussian_frechet,
    mean_cosine,
    precision_recall,
    ranks,
    retrieval,
    subsample,
)

DX, DY = 5, 4


def random_cov(d: int, generator: torch.Generator) -> torch.Tensor:
    """A full, well-conditioned covariance."""
    q = torch.randn(d, d, generator=generator, dtype=torch.float64)
    return q @ q.T / d + 0.2 * torch.eye(d, dtype=torch.float64)


@pytest.fixture(scope="module")
def linear_law():
    """y = A x + c + e, e ~ N(0, S) with a full S: train and held-out pairs and the true parameters."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(DY, DX, generator=g, dtype=torch.float64)
    c = torch.randn(DY, generator=g, dtype=torch.float64)
    s = random_cov(DY, g)
    chol = torch.linalg.cholesky(s)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, DX, generator=g, dtype=torch.float64)
        return x, x @ a.T + c + torch.randn(n, DY, generator=g, dtype=torch.float64) @ chol.T

    return a, c, s, draw(20000), draw(20000)


def gaussian_bpd(s: torch.Tensor) -> float:
    """Expected NLL in bits/dim of N(m, s) under itself: (d log 2 pi e + log det s) / (2 d ln 2)."""
    d = len(s)
    return (d * (LOG_2PI + 1) + float(torch.logdet(s))) / (2 * d * math.log(2))


# ---------------------------------------------------------------- LinearGaussian


def test_linear_gaussian_recovers_the_law(linear_law):
    a, c, s, (x, y), _ = linear_law
    model = LinearGaussian.fit(x.float(), y.float())
    assert torch.allclose(model.weight, a, atol=0.03)
    assert torch.allclose(model.bias, c, atol=0.03)
    assert torch.allclose(model.cov, s, atol=0.05)
    assert model.mean(x[:3].float()).dtype == torch.float32


def test_linear_gaussian_heldout_nll_matches_the_analytic_one(linear_law):
    _, _, s, (x, y), (hx, hy) = linear_law
    model = LinearGaussian.fit(x, y)
    bpd = model.nll_bits_per_dim(hx, hy, chunk=7000)  # chunks that do not divide N
    assert abs(bpd - gaussian_bpd(s)) < 0.02
    assert bpd == pytest.approx(float(model.nll(hx, hy).mean()) / (DY * math.log(2)), rel=1e-12)


def test_linear_gaussian_samples_are_row_major_with_the_fitted_moments(linear_law):
    _, _, _, (x, y), _ = linear_law
    model = LinearGaussian.fit(x, y)
    rows = torch.stack([x[0], x[1] + 5.0])  # far-apart means, so the row order shows
    n = 20000
    samples = model.sample(rows, n, torch.Generator().manual_seed(1)).view(2, n, DY)
    means = model.mean(rows)
    for i in range(2):
        assert torch.allclose(samples[i].mean(0), means[i], atol=0.05)
        assert torch.allclose(torch.cov(samples[i].T), model.cov, atol=0.05)
    again = model.sample(rows, n, torch.Generator().manual_seed(1)).view(2, n, DY)
    assert torch.equal(samples, again)


def test_linear_gaussian_is_beaten_by_the_true_bimodal_law():
    """y = +-A x + e: the linear fit sees mean 0 and a wide Gaussian; the mixture knows the two modes."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(DY, DX, generator=g, dtype=torch.float64)
    sigma = 0.1

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, DX, generator=g, dtype=torch.float64)
        sign = torch.randint(2, (n, 1), generator=g, dtype=torch.float64) * 2 - 1
        return x, sign * (x @ a.T) + sigma * torch.randn(n, DY, generator=g, dtype=torch.float64)

    (x, y), (hx, hy) = draw(20000), draw(5000)
    model = LinearGaussian.fit(x, y)
    mode = hx @ a.T
    log_component = torch.stack([-(hy - m).pow(2).sum(1) / (2 * sigma**2) for m in (mode, -mode)])
    mixture_nll = -(torch.logsumexp(log_component, 0) + math.log(0.5)) + DY * (0.5 * LOG_2PI + math.log(sigma))
    mixture_bpd = float(mixture_nll.mean()) / (DY * math.log(2))
    # the modes barely overlap, so the mixture costs one component's NLL plus the one bit of the sign
    assert abs(mixture_bpd - (gaussian_bpd(sigma**2 * torch.eye(DY)) + 1 / DY)) < 0.02
    assert model.nll_bits_per_dim(hx, hy) > mixture_bpd + 2.0


def test_linear_gaussian_survives_rank_deficient_data():
    """Duplicated x columns and an exactly predictable y coordinate: finite answers, not a failure."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 2, generator=g, dtype=torch.float64)
    x = torch.cat([x, x[:, :1]], 1)
    y = torch.stack([x[:, 0] + 1, x[:, 1] + 0.1 * torch.randn(200, generator=g, dtype=torch.float64)], 1)
    model = LinearGaussian.fit(x, y)
    assert torch.allclose(model.mean(x)[:, 0], y[:, 0], atol=1e-4)
    assert math.isfinite(model.nll_bits_per_dim(x, y))
    few = LinearGaussian.fit(x[:3], y[:3])  # fewer rows than parameters
    assert math.isfinite(few.nll_bits_per_dim(x, y))


# ---------------------------------------------------------------- retrieval and cosine


def test_retrieval_of_perfect_predictions():
    g = torch.Generator().manual_seed(4)
    candidates = torch.randn(50, 16, generator=g)
    truth = torch.randint(50, (300,), generator=g)
    scores = retrieval(2.5 * candidates[truth], truth.numpy(), candidates)  # cosine ignores the scale
    assert scores == {"top1": 1.0, "top5": 1.0, "median_rank": 1.0, "candidates": 50}


def test_retrieval_of_unrelated_predictions_is_at_chance():
    g = torch.Generator().manual_seed(5)
    m = 100
    candidates = torch.randn(m, 16, generator=g)
    truth = torch.randint(m, (5000,), generator=g)
    predictions = torch.randn(5000, 16, generator=g)
    scores = retrieval(predictions, truth, candidates, chunk=1234)
    assert abs(scores["top1"] - 1 / m) < 0.01
    assert abs(scores["top5"] - 5 / m) < 0.02
    assert abs(scores["median_rank"] - (m + 1) / 2) < 5
    assert torch.equal(ranks(predictions, truth, candidates, chunk=1234), ranks(predictions, truth, candidates))


def test_ranks_by_hand_and_ties_count_against():
    candidates = torch.eye(3)
    p = torch.tensor([1.0, 0.5, 0.2])
    assert ranks(torch.stack([p, p, p]), [0, 1, 2], candidates).tolist() == [1, 2, 3]
    tie = torch.tensor([[1.0, 1.0, 0.0]] * 3)  # as close to candidate 0 as to 1
    assert ranks(tie, [0, 1, 2], candidates).tolist() == [2, 2, 3]
    degenerate = torch.zeros(2, 3)  # every similarity 0: last, not first
    assert ranks(degenerate, [0, 2], candidates).tolist() == [3, 3]
    assert ranks(torch.full((1, 3), float("nan")), [1], candidates).tolist() == [3]
    scores = retrieval(torch.stack([p, p, p]), np.array([0, 1, 2]), candidates)
    assert scores == {"top1": pytest.approx(1 / 3), "top5": 1.0, "median_rank": 2.0, "candidates": 3}


def test_retrieval_rejects_bad_truth_rows():
    with pytest.raises(ValueError, match="index"):
        retrieval(torch.ones(2, 3), [0, 3], torch.eye(3))
    with pytest.raises(ValueError, match="truth_rows"):
        retrieval(torch.ones(2, 3), [0], torch.eye(3))


def test_mean_cosine():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    b = torch.tensor([[3.0, 0.0], [0.0, -1.0], [1.0, 0.0]])
    assert mean_cosine(a, b) == pytest.approx((1 - 1 + 1 / math.sqrt(2)) / 3)
    assert mean_cosine(a, a) == pytest.approx(1.0)


# ---------------------------------------------------------------- Frechet distance


def test_frechet_of_one_law_is_near_zero():
    g = torch.Generator().manual_seed(6)
    cov = random_cov(DY, g)
    chol, mu = torch.linalg.cholesky(cov), torch.randn(DY, generator=g, dtype=torch.float64)
    a, b = (mu + torch.randn(20000, DY, generator=g, dtype=torch.float64) @ chol.T for _ in range(2))
    assert frechet_distance(a, b) < 0.005 * float(torch.trace(cov))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_of_diagonal_gaussians_is_the_closed_form():
    g = torch.Generator().manual_seed(7)
    mu_a, mu_b = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    va, vb = torch.rand(6, generator=g, dtype=torch.float64) * 3, torch.rand(6, generator=g, dtype=torch.float64) * 3
    exact = float((mu_a - mu_b).pow(2).sum() + (va.sqrt() - vb.sqrt()).pow(2).sum())
    assert gaussian_frechet(mu_a, torch.diag(va), mu_b, torch.diag(vb)) == pytest.approx(exact, rel=1e-10)
    n = 40000
    a = mu_a + va.sqrt() * torch.randn(n, 6, generator=g, dtype=torch.float64)
    b = mu_b + vb.sqrt() * torch.randn(n, 6, generator=g, dtype=torch.float64)
    assert frechet_distance(a, b) == pytest.approx(exact, rel=0.03)


def test_frechet_of_non_commuting_covariances():
    """Tr((A^1/2 B A^1/2)^1/2) = sum sqrt(eig(A B)): a second route that a wrong root order would miss."""
    g = torch.Generator().manual_seed(8)
    ca, cb = random_cov(5, g), random_cov(5, g)
    assert not torch.allclose(ca @ cb, cb @ ca)
    cross = torch.linalg.eigvals(ca @ cb).real.sqrt().sum()
    expected = float(torch.trace(ca) + torch.trace(cb) - 2 * cross)
    zero = torch.zeros(5, dtype=torch.float64)
    assert gaussian_frechet(zero, ca, zero, cb) == pytest.approx(expected, rel=1e-9)
    assert gaussian_frechet(zero, ca, zero, cb) == pytest.approx(gaussian_frechet(zero, cb, zero, ca), rel=1e-9)


def test_frechet_trace_part_is_shift_invariant():
    g = torch.Generator().manual_seed(9)
    a = torch.randn(3000, DY, generator=g, dtype=torch.float64) * 2
    b = torch.randn(3000, DY, generator=g, dtype=torch.float64) @ random_cov(DY, g)
    shift = torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    base = frechet_distance(a, b)
    assert frechet_distance(a + shift, b + shift) == pytest.approx(base, rel=1e-9)
    mean_term = lambda p, q: float((p.mean(0) - q.mean(0)).pow(2).sum())  # noqa: E731
    trace_part = base - mean_term(a, b)
    assert frechet_distance(a + shift, b) - mean_term(a + shift, b) == pytest.approx(trace_part, rel=1e-9)
    assert trace_part > 0.1  # the covariances differ: the part that stays is not trivially 0


# ---------------------------------------------------------------- precision and recall


def test_precision_recall_of_identical_sets():
    real = torch.randn(500, 8, generator=torch.Generator().manual_seed(10)) + 100.0  # far from the origin
    assert precision_recall(real, real.clone(), chunk=150) == {"precision": 1.0, "recall": 1.0, "k": 3}


def test_precision_recall_of_a_collapsed_sampler():
    real = torch.randn(500, 8, generator=torch.Generator().manual_seed(11))
    fake = real[7].expand(300, 8).clone()
    scores = precision_recall(real, fake, k=5)
    assert scores["precision"] == 1.0
    assert scores["recall"] <= 2 / len(real)


def test_precision_recall_of_a_distant_sampler():
    g = torch.Generator().manual_seed(12)
    real, fake = torch.randn(400, 8, generator=g), torch.randn(300, 8, generator=g) + 50.0
    assert precision_recall(real, fake) == {"precision": 0.0, "recall": 0.0, "k": 3}


def test_precision_recall_of_one_mode_of_two():
    """Real has two clusters, fake only one: precision stays high, recall falls to about a half."""
    g = torch.Generator().manual_seed(13)
    centres = torch.tensor([[0.0] * 4, [20.0] * 4])
    real = centres[torch.arange(1000) % 2] + torch.randn(1000, 4, generator=g)
    fake = torch.randn(500, 4, generator=g)
    scores = precision_recall(real, fake)
    assert scores["precision"] > 0.9
    assert 0.35 < scores["recall"] < 0.55


def test_precision_recall_needs_more_than_k_points():
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(torch.randn(3, 2), torch.randn(10, 2))


# ---------------------------------------------------------------- subsample


def test_subsample():
    rows = subsample(1000, 100, seed=3)
    assert rows.dtype == np.int64 and len(rows) == 100
    assert np.all(np.diff(rows) > 0) and rows[0] >= 0 and rows[-1] < 1000
    assert np.array_equal(rows, subsample(1000, 100, seed=3))
    assert not np.array_equal(rows, subsample(1000, 100, seed=4))
    assert np.array_equal(subsample(50, 100, seed=3), np.arange(50))
    assert np.array_equal(subsample(100, 100, seed=3), np.arange(100))
    assert len(subsample(0, 10, seed=0)) == 0


def test_retrieval_among_a_pool_by_hand_and_at_chance():
    from n2n.evaluate.metrics import retrieval_among

    candidates = torch.eye(6)
    exact = retrieval_among(candidates, torch.arange(6), candidates, pool=4)
    assert exact == {"top1": 1.0, "mean_rank": 1.0, "pool": 4}
    # nearer the previous candidate than the truth: the truth ranks second
    shifted = retrieval_among(0.5 * candidates + candidates.roll(1, 0), torch.arange(6), candidates, pool=6)
    assert shifted["top1"] == 0.0 and shifted["mean_rank"] == 2.0
    generator = torch.Generator().manual_seed(0)
    noise = retrieval_among(torch.randn(2000, 32, generator=generator), torch.randint(0, 3000, (2000,)),
                            torch.randn(3000, 32, generator=generator), pool=1024)
    assert noise["pool"] == 1024 and abs(noise["mean_rank"] - 512.5) < 25 and noise["top1"] < 0.01


def test_procrustes_recovers_a_rotation_and_pads_the_narrower_side():
    from n2n.evaluate.baseline import fit_procrustes

    generator = torch.Generator().manual_seed(0)
    rotation = torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=torch.float64))[0]
    source = torch.randn(500, 6, generator=generator, dtype=torch.float64)
    assert torch.allclose(fit_procrustes(source, source @ rotation)(source), source @ rotation, atol=1e-10)
    wide = fit_procrustes(source[:, :4], (source @ rotation)[:, :5])(source[:, :4])
    assert wide.shape == (500, 5)


def test_best_of_n_picks_the_draw_closest_to_the_reference():
    from n2n.evaluate.api import best_of

    draws = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    assert torch.equal(best_of(draws, torch.tensor([[0.1, 1.0]])), torch.tensor([[0.0, 1.0]]))
