"""The continuous translator (flow matching) and both kinds' start at the linear-Gaussian law."""

import json

import numpy as np
import pytest
import torch
from torch.func import jacrev, vmap

from n2n import N2NError
from n2n.cinn import ContinuousFlow, FlowConfig, build_flow, flow_from_dict, nll
from n2n.cinn.continuous import integrate, velocity_and_divergence
from n2n.shards.synthetic import write_synthetic
from n2n.shards.view import create_view
from n2n.train.checkpoint import CHECKPOINT, CheckpointError, load_checkpoint, load_run
from n2n.train.data import load_pairs
from n2n.train.heldout import fit_floor, floor_bpd, heldout_bpd
from n2n.translate.pipeline import SamplingConfig
from tests.conftest import SMALL
from tests.test_train import write_store

CONTINUOUS = ["--translator", "continuous", "--velocity-width", "32", "--velocity-blocks", "1", "--batch-size", "64",
              "--no-compile"]


@pytest.fixture(scope="module")
def gaussian_view(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("shards"), "gaussian", n=3000, src_dim=6, dst_dim=4)


@pytest.fixture(scope="module")
def dark_view(tmp_path_factory):
    """Targets like mostly-black thumbnails: 40 of 48 dims are zero but for a rare faint pixel, the rest
    a linear function of the source plus noise."""
    root, rng, n = tmp_path_factory.mktemp("dark"), np.random.default_rng(0), 2000
    source = rng.standard_normal((n, 12))
    target = np.zeros((n, 48))
    target[:, :8] = source @ rng.standard_normal((12, 8)) + 0.1 * rng.standard_normal((n, 8))
    rare = rng.random((n, 40)) < 0.01
    target[:, 8:][rare] = 0.02
    keys = [f"k{i:05d}" for i in range(n)]
    return create_view(root / "view", write_store(root / "src", keys, source), write_store(root / "dst", keys, target))


def moved(flow: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``flow`` with every weight nudged: a test of the identity map would prove nothing."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return flow.eval()


@pytest.mark.parametrize("kind", ["coupling", "continuous"])
@pytest.mark.parametrize("view", ["gaussian_view", "dark_view"])
def test_a_fresh_translator_is_the_linear_gaussian_law(kind, view, request):
    data = load_pairs(request.getfixturevalue(view))
    law = fit_floor(data)
    torch.manual_seed(0)
    flow = build_flow(data.dims[1], data.dims[0], FlowConfig(translator=kind, n_flows=2, hidden_dim=16,
                                                             velocity_width=32))
    flow.start_from(law)
    assert abs(heldout_bpd(flow, data, 4096) - floor_bpd(law, data, 4096)) < 0.01


@pytest.mark.parametrize("args", [SMALL, CONTINUOUS], ids=["coupling", "continuous"])
def test_a_run_starts_at_the_floor_and_training_moves_off_it(gaussian_view, tmp_path, n2n_train, args):
    """Step 0 is the floor: a run of one step at a learning rate too small to move it reports the floor's
    held-out NLL; without the start (--no-start-from-floor) an untrained flow is far above it."""
    for name, extra in (("floor", []), ("plain", ["--no-start-from-floor"])):
        result = n2n_train("--shards", gaussian_view, "--out", tmp_path / name, "--steps", 1, "--lr", 1e-12,
                           *args, *extra)
        assert result.exit_code == 0, result.output
    floor = load_checkpoint(tmp_path / "floor" / CHECKPOINT)[1]
    plain = load_checkpoint(tmp_path / "plain" / CHECKPOINT)[1]
    assert abs(floor["heldout_bpd"] - floor["linear_gaussian_bpd"]) < 0.01
    assert plain["heldout_bpd"] > plain["linear_gaussian_bpd"] + 0.2


def test_continuous_translator_learns_the_gaussian_law(tmp_path, n2n_train):
    """Within 0.05 bits/dim of the analytic NLL, its likelihood read through the ODE (exact divergence)."""
    view = write_synthetic(tmp_path / "shards", "gaussian", n=6000, src_dim=8, dst_dim=4)
    result = n2n_train("--shards", view, "--out", tmp_path / "run", "--steps", 300, "--eval-every", 300,
                       "--lr", 1e-3, *CONTINUOUS)
    assert result.exit_code == 0, result.output
    truth_bpd = json.loads((view / "truth.json").read_text())["nll_nats_per_dim"] / np.log(2)
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "train_loss" in last and "train_bpd" not in last  # flow matching's loss is not an NLL
    assert abs(last["heldout_bpd"] - truth_bpd) < 0.05, (last, truth_bpd)
    translator = load_run(tmp_path / "run", checkpoint="last")  # (the best may be the start: the law is the truth)
    assert isinstance(translator.flow, ContinuousFlow)
    assert translator.flow.velocity.output.weight.abs().sum() > 0  # it trained: the field is not the identity
    assert "train loss (flow matching)" in result.output


def test_the_ode_map_inverts_and_its_error_falls_with_steps():
    torch.manual_seed(0)
    flow = moved(ContinuousFlow(6, 3, velocity_width=32, velocity_blocks=2, cond_dropout=0.1))
    x, c = torch.randn(64, 6, dtype=torch.float64), torch.randn(64, 3, dtype=torch.float64)
    flow = flow.double()
    errors = {}
    for steps in (5, 40):
        with torch.no_grad():
            z, _ = flow(x, c, steps=steps)
            errors[steps] = float((flow.reverse(z, c, steps=steps) - x).abs().max())
    assert errors[40] < errors[5] / 10 and errors[40] < 1e-3, errors
    assert float((z - flow.linear_stage(x, c)[0]).abs().max()) > 0.01  # the field moved the points (z is not the law's)


def test_nll_is_the_change_of_variables_of_the_map():
    """The ODE's log-determinant against a numerical Jacobian of the whole map x -> z (float64)."""
    torch.manual_seed(0)
    flow = moved(ContinuousFlow(3, 2, velocity_width=16, velocity_blocks=1)).double()
    x, c = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    with torch.no_grad():
        _, logdet = flow(x, c, steps=200)

    def z_of(xi: torch.Tensor, ci: torch.Tensor) -> torch.Tensor:  # the same map, differentiable, one row
        v = flow.field(ci[None])
        x0 = integrate(lambda t, s: (v(s[0], t),), (xi[None],), 1.0, 0.0, 200, "heun")[0]
        return flow.linear_stage(x0, ci[None])[0][0]

    jacobian = torch.stack([torch.autograd.functional.jacobian(z_of, (xi, ci))[0] for xi, ci in zip(x, c, strict=True)])
    assert torch.allclose(logdet, torch.linalg.slogdet(jacobian)[1], atol=1e-4), (logdet, jacobian)


def test_divergence_is_exact_in_small_dims_and_unbiased_above():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 32), torch.nn.Tanh(), torch.nn.Linear(32, 5)).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    trace = torch.diagonal(vmap(jacrev(net))(x), dim1=1, dim2=2).sum(1)
    assert torch.allclose(velocity_and_divergence(net, x, None)[1], trace)
    probes = torch.randint(0, 2, (4000, *x.shape), generator=torch.Generator().manual_seed(1)).double() * 2 - 1
    estimates = torch.stack([velocity_and_divergence(net, x, p)[1] for p in probes])
    assert torch.allclose(estimates.mean(0), trace, atol=4 * float(estimates.std(0).max()) / 4000 ** 0.5)


@pytest.mark.parametrize("solver", ["euler", "midpoint", "heun"])
def test_solvers_integrate_to_their_order(solver):
    """dy/dt = y from 1: e at t = 1. Euler's error halves with twice the steps, the others' quarters."""
    errors = [abs(float(integrate(lambda t, s: (s[0],), (torch.ones(1, dtype=torch.float64),), 0.0, 1.0, n,
                                  solver)[0]) - np.e) for n in (20, 40)]
    assert errors[0] / errors[1] == pytest.approx(2 if solver == "euler" else 4, rel=0.1)


def test_guidance_needs_a_translator_trained_with_condition_dropout():
    torch.manual_seed(0)
    c = torch.randn(8, 3)
    plain = moved(ContinuousFlow(4, 3, velocity_width=16, velocity_blocks=1))
    with pytest.raises(ValueError, match="--cond-dropout"):
        plain.sample(c, guidance=2.0)
    assert "guidance" not in plain.sampling and "guidance" in ContinuousFlow.SAMPLING
    guided = moved(ContinuousFlow(4, 3, velocity_width=16, velocity_blocks=1, cond_dropout=0.2))
    draw = lambda g: guided.sample(c, generator=torch.Generator().manual_seed(0), guidance=g)  # noqa: E731
    with torch.no_grad():
        assert torch.equal(draw(1.0), guided.sample(c, generator=torch.Generator().manual_seed(0)))
        assert not torch.allclose(draw(3.0), draw(1.0))


def test_a_continuous_run_resumes_bit_for_bit_and_samples_from_its_folder(gaussian_view, tmp_path, n2n_train):
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["--shards", gaussian_view, "--eval-every", 20, "--cond-dropout", 0.1, *CONTINUOUS]
    assert n2n_train(*args, "--out", full, "--steps", 40).exit_code == 0
    assert n2n_train(*args, "--out", part, "--steps", 20).exit_code == 0
    assert n2n_train(*args, "--out", part, "--steps", 40, "--resume").exit_code == 0
    a, b = load_checkpoint(full / CHECKPOINT)[0], load_checkpoint(part / CHECKPOINT)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    translator = load_run(part)
    source = torch.randn(5, 6)
    once = translator.sample(source, generator=torch.Generator().manual_seed(3), steps=8, guidance=1.5)
    again = translator.sample(source, generator=torch.Generator().manual_seed(3), steps=8, guidance=1.5)
    assert torch.equal(once, again) and once.shape == (5, 4)
    rebuilt = flow_from_dict(load_checkpoint(part / CHECKPOINT)[1]["model"])
    assert isinstance(rebuilt, ContinuousFlow) and rebuilt.config == translator.flow.config


def test_sampling_options_of_a_continuous_translator_are_refused_for_a_coupling_run(gaussian_view, tmp_path,
                                                                                  n2n_train):
    assert n2n_train("--shards", gaussian_view, "--out", tmp_path / "r", "--steps", 2, *SMALL).exit_code == 0
    translator = load_run(tmp_path / "r")
    with pytest.raises(CheckpointError, match="--guidance: this run's coupling translator samples with nothing"):
        translator.sample(torch.randn(2, 6), guidance=2.0)
    with pytest.raises(CheckpointError, match="--steps and --guidance: .* leave them out"):
        translator.sample(torch.randn(2, 6), steps=4, guidance=2.0)
    with pytest.raises(N2NError, match=r"steps \(--steps\) = 0"):
        SamplingConfig(steps=0)
    # a continuous run trained without --cond-dropout has no guidance either: one line saying why, no traceback
    assert n2n_train("--shards", gaussian_view, "--out", tmp_path / "c", "--steps", 2, *CONTINUOUS).exit_code == 0
    with pytest.raises(CheckpointError, match="--guidance: .* samples with --steps, --solver .*--cond-dropout"):
        load_run(tmp_path / "c").sample(torch.randn(2, 6), guidance=2.0)


def test_the_coupling_nll_of_a_started_flow_is_the_laws_row_by_row(gaussian_view):
    """Not only the mean: the started flow is the law for every pair (the affine stage is exact)."""
    data = load_pairs(gaussian_view)
    law = fit_floor(data)
    flow = build_flow(4, 6, FlowConfig(n_flows=2, hidden_dim=16))
    flow.start_from(law)
    x, c = data.held_target[:200], data.held_source[:200]
    with torch.no_grad():
        assert torch.allclose(nll(*flow(x, c)).double(), law.nll(c, x), atol=1e-4)


def test_few_pairs_still_start_at_a_law_whose_samples_do_not_collapse(tmp_path, n2n_train):
    """64 train pairs of a 20-d source: least squares would fit them almost exactly, and a law made of its
    in-sample residuals would sample nearly one point per source. The ridge (GCV) and the leave-one-out
    residuals give a law whose spread is the data's."""
    view = write_synthetic(tmp_path / "shards", "gaussian", n=80, src_dim=20, dst_dim=4)
    result = n2n_train("--shards", view, "--out", tmp_path / "run", "--steps", 1, "--holdout", 0.2, *SMALL)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "starting at the linear-Gaussian law, N(W c + b, Sigma) over 4 dims: ridge" in said
    draws = load_run(tmp_path / "run").sample(torch.zeros(64, 20), generator=torch.Generator().manual_seed(0))
    assert draws.std(0).min() > 0.1


def test_a_continuous_runs_loss_plot_shows_its_loss_and_held_out_nll(tmp_path):
    from n2n.train.plots import plot_loss

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "train_loss": 2.0 / s, **({"heldout_bpd": 1.0 - s / 1000}
                                                                              if s % 50 == 0 else {})}) + "\n"
                               for s in range(10, 210, 10)))
    plot_loss(metrics, tmp_path / "loss.png", {"linear-Gaussian floor": 1.0})
    held_only = tmp_path / "held.jsonl"  # the same records less the training loss
    held_only.write_text("".join(line.replace('"train_loss"', '"other"') + "\n"
                                 for line in metrics.read_text().splitlines()))
    plot_loss(held_only, tmp_path / "held.png", {"linear-Gaussian floor": 1.0})
    from PIL import Image

    with Image.open(tmp_path / "loss.png") as drawn, Image.open(tmp_path / "held.png") as without:
        assert drawn.size == (700, 420)
        assert np.asarray(drawn).tobytes() != np.asarray(without).tobytes()  # the loss curve and its axis are drawn
