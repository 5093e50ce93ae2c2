"""Faithful when asked, diverse when asked: the MLP-Gaussian law a translator can start from, the continuous
translator's temperature from a regression's answer (T = 0) to its distribution (T = 1), and n2n-eval's
fidelity–diversity curve."""

from __future__ import annotations

import json

import pytest
import torch

import n2n
from n2n.cinn import ContinuousFlow, FlowConfig, build_flow, flow_from_dict
from n2n.cinn.gaussian import LinearGaussian
from n2n.cinn.mlp_gaussian import MLPGaussian
from n2n.evaluate.cli import main as n2n_eval
from n2n.shards.synthetic import write_synthetic
from n2n.train.checkpoint import CHECKPOINT, load_checkpoint, run_view
from n2n.train.data import load_pairs
from n2n.train.heldout import fit_law, floor_bpd, heldout_bpd
from n2n.translate.report import score_rows


def nonlinear(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets a linear map cannot read off the source: |c| and c^2 plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n, 6, generator=g)
    x = torch.cat([c[:, :3].abs(), c[:, 3:5].pow(2)], dim=1) + 0.1 * torch.randn(n, 5, generator=g)
    return c, x


def test_the_mlp_gaussian_law_reads_what_the_linear_one_cannot():
    c, x = nonlinear(4000, 0)
    test_c, test_x = nonlinear(1000, 1)
    law = MLPGaussian.fit(c, x, steps=600, hidden=64)
    linear = LinearGaussian.fit(c, x)
    assert law.nll_bits_per_dim(test_c, test_x) < linear.nll_bits_per_dim(test_c, test_x) - 0.5
    assert (law.mean(test_c) - test_x).pow(2).mean() < 0.5 * (linear.mean(test_c) - test_x).pow(2).mean()
    # Sigma from residuals the MLP never saw: near the noise's variance (0.01), not below it
    assert 0.008 < float(torch.diagonal(law.cov).mean()) < 0.05
    draws = law.sample(test_c[:3], 2000, torch.Generator().manual_seed(0)).reshape(3, 2000, 5)
    assert torch.allclose(draws.mean(1), law.mean(test_c[:3]), atol=0.02)
    assert "MLP-Gaussian law" in law.describe() and "width 64" in law.describe()


@pytest.mark.parametrize("kind", ["coupling", "continuous"])
def test_a_fresh_translator_with_an_mlp_base_is_its_law(kind, tmp_path):
    """Both kinds start exactly on the MLP-Gaussian law: the same held-out NLL, T = 0 gives its mean, and the
    state (the MLP in the first stage) survives a checkpoint's round trip."""
    view = write_synthetic(tmp_path, "bimodal", n=3000, src_dim=6, dst_dim=4)
    data = load_pairs(view)
    law = MLPGaussian.fit(data.source[:], data.target[:], steps=200, hidden=32)
    config = FlowConfig(translator=kind, n_flows=2, hidden_dim=16, velocity_width=32, base="mlp", base_width=32)
    flow = build_flow(4, 6, config)
    flow.start_from(law)
    flow.eval()
    assert abs(heldout_bpd(flow, data, 4096) - floor_bpd(law, data, 4096)) < 0.01
    c = data.held_source[:8]
    assert torch.allclose(flow.sample(c, 0.0), law.mean(c), atol=1e-4)
    rebuilt = flow_from_dict(flow.to_dict())
    rebuilt.load_state_dict(flow.state_dict())
    assert torch.equal(rebuilt.eval().sample(c, 0.0), flow.sample(c, 0.0))
    with pytest.raises(ValueError, match="base"):  # a linear stage cannot take an MLP's law
        build_flow(4, 6, FlowConfig(translator=kind, n_flows=2, hidden_dim=16, velocity_width=32)).start_from(law)


def test_the_continuous_temperature_runs_from_the_velocitys_mean_to_its_samples():
    torch.manual_seed(0)
    flow = ContinuousFlow(5, 3, velocity_width=32, velocity_blocks=1)
    with torch.no_grad():
        for p in flow.velocity.parameters():
            p.add_(0.1 * torch.randn(p.shape))
    flow.eval()
    c = torch.randn(16, 3)
    x0 = flow.source(torch.zeros(16, 5), c)
    times = torch.zeros(16)
    # T = 0: deterministic, the start plus the velocity there (on straight paths, E[x | c])
    expected = x0 + flow.velocity(x0, times, flow.embedder(c)) * flow.scale
    assert torch.allclose(flow.sample(c, 0.0), expected, atol=1e-6)
    assert torch.equal(flow.sample(c, 0.0, torch.Generator().manual_seed(1)), flow.sample(c, 0.0))
    # T = 1: the full ODE, as before; between: a sample that varies, less than at 1
    z = torch.randn(16, 5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(flow.sample(c, 1.0, torch.Generator().manual_seed(2)), flow.reverse(z, c))

    @torch.no_grad()
    def spread(t: float) -> float:
        draws = flow.sample(c.repeat_interleave(64, 0), t, torch.Generator().manual_seed(3)).reshape(16, 64, 5)
        return float(draws.std(1).mean())

    assert 0 < spread(0.5) < spread(1.0)


@pytest.fixture(scope="module")
def bimodal_runs(tmp_path_factory):
    """A continuous run with an MLP base and dropped conditions, and a coupling run, on the bimodal law."""
    root = tmp_path_factory.mktemp("curve")
    view = write_synthetic(root / "shards", "bimodal", n=4000, src_dim=8, dst_dim=4, seed=1)
    common = {"compile": False, "progress": False, "lr": 1e-3}
    continuous = n2n.train(view, root / "continuous", steps=150, translator="continuous", velocity_width=64,
                           velocity_blocks=2, base="mlp", base_width=64, cond_dropout=0.1, **common)
    coupling = n2n.train(view, root / "coupling", steps=100, n_flows=4, hidden_dim=64, **common)
    return {"continuous": continuous, "coupling": coupling}


def test_a_run_with_an_mlp_base_starts_on_it(bimodal_runs):
    """Step 0 of the run is the MLP-Gaussian law fitted as n2n-train fits it (the same pairs and seed)."""
    meta = load_checkpoint(bimodal_runs["continuous"] / CHECKPOINT)[1]
    assert meta["model"]["base"] == "mlp" and meta["model"]["base_width"] == 64
    first = json.loads((bimodal_runs["continuous"] / "metrics.jsonl").read_text().splitlines()[0])
    data = load_pairs(run_view(meta, bimodal_runs["continuous"]), meta["train"]["holdout"])
    law = fit_law(data, "mlp", 64)
    expected = floor_bpd(law, data, meta["train"]["eval_rows"])
    assert first["step"] == 0 and first["heldout_bpd"] == pytest.approx(expected, abs=0.01)


def test_n2n_eval_draws_the_fidelity_diversity_curve(bimodal_runs, tmp_path, invoke, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "eval.json"
    result = invoke(n2n_eval, "--run", bimodal_runs["continuous"], "--out", out, "--baseline-steps", 200,
                    "--max-rows", 300, "--curve-temperatures", "0,0.5,1", "--curve-guidance", "2")
    assert result.exit_code == 0, result.output
    curve = json.loads(out.read_text())["curve"]
    knobs = [(p["temperature"], p["guidance"]) for p in curve["points"]]
    assert knobs == [(0.0, 1.0), (0.5, 1.0), (1.0, 1.0), (0.0, 2.0), (0.5, 2.0), (1.0, 2.0)]
    points = {knob: point for knob, point in zip(knobs, curve["points"], strict=True)}
    assert set(curve["baselines"]) == {"mlp", "linear"}
    assert curve["pairs"] == json.loads(out.read_text())["translation"]["pairs"]  # the main table's pairs
    for point in [*curve["points"], *curve["baselines"].values()]:
        assert -1 <= point["cosine"] <= 1 and 0 <= point["top1"] <= 1 and 0 <= point["recall"] <= 1
    # The knob does what it says on a bimodal law: T = 0 is a regression's answer (faithful, on no mode), T = 1
    # the two modes (diverse)
    low, high = points[(0.0, 1.0)], points[(1.0, 1.0)]
    assert low["cosine"] > high["cosine"] and high["recall"] > low["recall"] + 0.3
    best = curve["best"]["cosine"]
    assert best["value"] == max(p["cosine"] for p in curve["points"])
    assert "cosine to the truth, best on the curve" in result.output
    report = json.loads(out.read_text())
    row = next(r for r in score_rows(report).rows if r[0].startswith("cosine to the truth, best on the curve"))
    assert f"T {best['temperature']:g}" in row[1] and row[3]  # the translator's best beside the MLP's point


def test_the_curve_has_no_guidance_line_where_the_run_cannot_guide(bimodal_runs):
    report = n2n.evaluate(bimodal_runs["coupling"], baseline_steps=20, max_rows=100, curve_temperatures="0,1",
                          curve_guidance="2,3", progress=False, log=False)
    assert [(p["temperature"], p["guidance"]) for p in report["curve"]["points"]] == [(0.0, 1.0), (1.0, 1.0)]
    none = n2n.evaluate(bimodal_runs["coupling"], baseline_steps=20, max_rows=100, curve_temperatures="",
                        progress=False, log=False)
    assert "curve" not in none


@pytest.mark.parametrize(("name", "value"), [("curve_temperatures", "0,x"), ("curve_temperatures", "-1"),
                                             ("curve_guidance", "nan"), ("curve_guidance", "-2")])
def test_bad_curve_options_are_refused_before_anything_loads(name, value, tmp_path):
    with pytest.raises(n2n.N2NError, match=rf"^{name} \(--{name.replace('_', '-')}\) = .*: must be"):
        n2n.evaluate(tmp_path / "no-run", **{name: value})
