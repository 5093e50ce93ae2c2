"""Never worse than the start: a law for every view (few pairs, constant and determined target dims), no
divergence from a near-degenerate start at the default learning rate, a best checkpoint that includes the
start, and a memorising run named as such."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import n2n
from n2n.cinn import FlowConfig, build_flow, nll
from n2n.cinn.gaussian import VARIANCE_FLOOR, LinearGaussian
from n2n.cinn.linear_stage import LinearGaussianStage
from n2n.shards import create_store
from n2n.shards.synthetic import write_synthetic
from n2n.shards.view import create_view
from n2n.train.checkpoint import BEST, CHECKPOINT, load_checkpoint, load_run, read_meta
from n2n.train.data import load_pairs
from n2n.train.heldout import fit_floor, heldout_bpd

FAST = {"compile": False, "progress": False, "logger": "none"}


def draw_linear(n: int, dx: int, dy: int, noise: float, generator: torch.Generator, a: torch.Tensor | None = None):
    a = torch.randn(dy, dx, generator=generator, dtype=torch.float64) / dx**0.5 if a is None else a
    x = torch.randn(n, dx, generator=generator, dtype=torch.float64)
    return a, x, x @ a.T + noise * torch.randn(n, dy, generator=generator, dtype=torch.float64)


def least_squares_bpd(x, y, hx, hy) -> float:
    """The held-out NLL of the unregularised law (least squares, the in-sample residuals' covariance)."""
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    coef = torch.linalg.lstsq(design, y).solution
    residual = y - design @ coef
    cov = residual.T @ residual / len(x) + 1e-10 * torch.eye(y.shape[1], dtype=x.dtype)
    held = hy - torch.cat([hx, torch.ones(len(hx), 1, dtype=x.dtype)], 1) @ coef
    dist = torch.distributions.MultivariateNormal(torch.zeros(y.shape[1], dtype=x.dtype), cov)
    return float(-dist.log_prob(held).mean()) / (y.shape[1] * math.log(2))


def test_the_law_exists_with_fewer_pairs_than_source_dims_and_beats_least_squares():
    """500 pairs of 384 -> 32 dims (noise 0.5: truth 1.047 bits/dim): least squares' law is 18 bits/dim off,
    the cross-validated one within 0.6."""
    g = torch.Generator().manual_seed(0)
    a, x, y = draw_linear(500, 384, 32, 0.5, g)
    _, hx, hy = draw_linear(5000, 384, 32, 0.5, g, a)
    truth = 0.5 * math.log2(2 * math.pi * math.e * 0.25)
    law = LinearGaussian.fit(x, y)
    assert law.nll_bits_per_dim(hx, hy) < truth + 0.6 < least_squares_bpd(x, y, hx, hy) - 10
    assert law.regularisation.ridge > 1e-3 and law.regularisation.floored == 0
    assert "ridge" in law.describe() and "cross-validated" in law.describe()
    many = LinearGaussian.fit(*draw_linear(50_000, 384, 32, 0.5, g, a)[1:])
    assert many.nll_bits_per_dim(hx, hy) == pytest.approx(truth, abs=0.02)  # least squares' own, where it is posed


def test_cross_validation_holds_out_whole_groups():
    """Five rows per target (five captions of one image): held out row by row, the other four captions vouch
    for an over-fitted map; held out by group, the penalty is the one that generalises to new images."""
    g = torch.Generator().manual_seed(1)
    images, per, dx, dy = 80, 5, 120, 8
    scene = torch.randn(images, dx, generator=g, dtype=torch.float64)
    a = torch.randn(dy, dx, generator=g, dtype=torch.float64) / dx**0.5

    def draw(count: int, offset: int = 0):
        s = scene[offset : offset + count] if offset + count <= images else torch.randn(count, dx, generator=g,
                                                                                           dtype=torch.float64)
        image = s @ a.T + 0.7 * torch.randn(count, dy, generator=g, dtype=torch.float64)  # what captions leave open
        x = s.repeat_interleave(per, 0) + 0.3 * torch.randn(count * per, dx, generator=g, dtype=torch.float64)
        return x, image.repeat_interleave(per, 0), torch.arange(count).repeat_interleave(per)

    x, y, groups = draw(images)
    hx, hy, _ = draw(400, offset=images)
    by_group, by_row = LinearGaussian.fit(x, y, groups), LinearGaussian.fit(x, y)
    assert by_group.regularisation.ridge >= 10 * by_row.regularisation.ridge
    assert by_group.nll_bits_per_dim(hx, hy) < by_row.nll_bits_per_dim(hx, hy) - 0.2


def test_constant_and_determined_target_dims_sit_at_the_variance_floor():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2000, 6, generator=g, dtype=torch.float64)
    y = torch.stack([torch.zeros(2000, dtype=torch.float64), x[:, 0] * 2 + 1,
                     x[:, 1] + torch.randn(2000, generator=g, dtype=torch.float64)], 1)
    law = LinearGaussian.fit(x, y)
    variance = torch.diagonal(law.cov)
    spread = y.var(0, unbiased=False)
    assert variance[0] == pytest.approx(VARIANCE_FLOOR * float(spread.mean()), rel=1e-6)  # constant: the mean one
    assert variance[1] == pytest.approx(VARIANCE_FLOOR * float(spread[1]), rel=1e-3)
    assert float(variance[2]) == pytest.approx(1.0, abs=0.1)
    assert law.regularisation.floored == 2 and torch.allclose(law.mean(x)[:, 1], y[:, 1], atol=1e-3)


def test_the_stage_loads_a_checkpoint_of_its_former_parametrisation_as_the_same_map():
    torch.manual_seed(3)
    stage = LinearGaussianStage(4, 3)
    weight, bias = torch.randn(4, 3), torch.randn(4)
    lower, log_diag = torch.randn(4, 4), 0.3 * torch.randn(4)
    stage.load_state_dict({"weight": weight, "bias": bias, "lower": lower, "log_diag": log_diag})
    x, c = torch.randn(16, 4), torch.randn(16, 3)
    a = torch.tril(lower, -1) + torch.diag(log_diag.exp())
    u, _ = stage(x, c)
    assert torch.allclose(u, (x - c @ weight.T - bias) @ a.T, atol=1e-5)
    assert torch.allclose(stage.reverse(u, c), x, atol=1e-5)


@pytest.mark.parametrize("kind", ["coupling", "continuous"])
def test_a_checkpoint_that_named_the_first_stage_floor_loads_into_linear_stage(kind):
    torch.manual_seed(4)
    flow = build_flow(5, 3, FlowConfig(translator=kind, n_flows=2, hidden_dim=8, velocity_width=8))
    flow.linear_stage.log_diag.data.normal_()
    old = {key.replace("linear_stage.", "floor.", 1): value for key, value in flow.state_dict().items()}
    assert any(key.startswith("floor.") for key in old) and not any(key.startswith("linear_stage.") for key in old)
    twin = build_flow(5, 3, FlowConfig(translator=kind, n_flows=2, hidden_dim=8, velocity_width=8))
    twin.load_state_dict(old)
    assert torch.equal(twin.linear_stage.log_diag, flow.linear_stage.log_diag)


@pytest.fixture(scope="module")
def degenerate(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("degenerate"), "degenerate", n=3000, src_dim=16, dst_dim=24)


@pytest.mark.parametrize("kind", ["coupling", "continuous"])
def test_a_near_degenerate_start_survives_the_default_learning_rate(degenerate, tmp_path, kind):
    """A quarter of the target constant, a quarter determined, a quarter nearly: every held-out NLL stays near
    the start or below it, the coupling's train NLL never climbs over step 0's by a bit, and the best is no
    worse than the floor. (Parametrised by W and b, the coupling's stage reached 3e9 bits/dim in 25 steps.)"""
    run = n2n.train(degenerate, tmp_path / "run", translator=kind, steps=300, eval_every=100, log_every=10, **FAST)
    meta = read_meta(run / CHECKPOINT)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    floor, start = meta["linear_gaussian_bpd"], lines[0]
    assert start["step"] == 0 and start["heldout_bpd"] == pytest.approx(floor, abs=0.01)
    assert all(line["heldout_bpd"] < floor + 1 for line in lines if "heldout_bpd" in line)
    data = load_pairs(degenerate)
    law = fit_floor(data)
    step0_train = (float(law.nll(data.source[:4096], data.target[:4096]).mean()) + data.target_norm.log_abs_det) \
        / (24 * math.log(2))
    assert all(line["train_bpd"] <= step0_train + 1 for line in lines if "train_bpd" in line)
    assert meta["best"]["heldout_bpd"] <= floor
    if kind == "coupling":  # it does better than the law, not only no worse
        assert meta["best"]["heldout_bpd"] < floor - 1


def test_the_best_checkpoint_is_the_best_evaluation_and_what_readers_load(degenerate, tmp_path):
    run = n2n.train(degenerate, tmp_path / "run", steps=60, eval_every=20, n_flows=2, hidden_dim=16, **FAST)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluated = {line["step"]: line["heldout_bpd"] for line in lines if "heldout_bpd" in line}
    assert sorted(evaluated) == [0, 20, 40, 60]
    best_step = min(evaluated, key=evaluated.get)
    assert read_meta(run / CHECKPOINT)["best"] == {"step": best_step, "heldout_bpd": evaluated[best_step]}
    tensors, meta = load_checkpoint(run / BEST)
    assert meta["step"] == best_step and not any(k.startswith(("optim.", "rng.")) for k in tensors)
    assert load_run(run).meta["step"] == best_step and load_run(run, checkpoint="last").meta["step"] == 60
    data = load_pairs(degenerate)
    assert heldout_bpd(load_run(run).flow, data, 16_384) == pytest.approx(evaluated[best_step], abs=1e-4)
    with pytest.raises(n2n.N2NError, match="--checkpoint 'first'"):
        load_run(run, checkpoint="first")
    # A resume goes on from the last, and keeps the best over both parts of the run.
    n2n.train(None, run, resume=True, steps=100, **FAST)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluated = {line["step"]: line["heldout_bpd"] for line in lines if "heldout_bpd" in line}
    assert sorted(evaluated) == [0, 20, 40, 60, 80, 100]
    assert read_meta(run / BEST)["step"] == min(evaluated, key=evaluated.get)


def test_a_run_started_at_n01_evaluates_no_step_0(degenerate, tmp_path):
    run = n2n.train(degenerate, tmp_path / "run", steps=20, eval_every=10, n_flows=2, hidden_dim=16,
                    start_from_floor=False, **FAST)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert 0 not in steps and read_meta(run / BEST)["step"] in (10, 20)


def test_a_run_that_memorises_its_pairs_says_so_once_and_keeps_the_start(tmp_path, n2n_train):
    """200 pairs whose targets the source does not explain: the law (the truth) is the best there is, and a
    coupling flow can only learn the train pairs by heart."""
    rng = np.random.default_rng(0)
    keys = [f"k{i:04d}" for i in range(240)]
    for side, dim in (("src", 12), ("dst", 4)):
        with create_store(tmp_path / side, dim=dim, dtype="float32") as writer:
            writer.append(keys, np.zeros(240, np.int64), rng.standard_normal((240, dim)).astype(np.float32))
    view = create_view(tmp_path / "view", tmp_path / "src", tmp_path / "dst")
    result = n2n_train("--shards", view, "--out", tmp_path / "run", "--steps", 600, "--eval-every", 100,
                       "--holdout", 0.2, "--n-flows", 8, "--hidden-dim", 128, "--no-compile", "--logger", "none")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert said.count("the translator is fitting its train pairs") == 1 and "--target-noise" in said
    assert read_meta(tmp_path / "run" / BEST)["step"] == 0


def test_a_fresh_translator_of_either_kind_is_the_regularised_law(degenerate):
    data = load_pairs(degenerate)
    law = fit_floor(data)
    for kind in ("coupling", "continuous"):
        flow = build_flow(24, 16, FlowConfig(translator=kind, n_flows=2, hidden_dim=16, velocity_width=16))
        flow.start_from(law)
        x, c = data.held_target[:200], data.held_source[:200]
        with torch.no_grad():
            assert torch.allclose(nll(*flow(x, c)).double(), law.nll(c, x), rtol=1e-4, atol=1e-2), kind
