"""Targets of any width: the low-rank-plus-diagonal law (O(d·k)) and its first stage, and n2n-eval's
distribution scores without d x d matrices."""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path

import numpy as np
import pytest
import torch

from n2n.cinn import FlowConfig, build_flow
from n2n.cinn.gaussian import LinearGaussian
from n2n.cinn.lowrank_gaussian import FULL_WIDTH, LowRankGaussian
from n2n.evaluate.baseline import fit_procrustes
from n2n.evaluate.metrics import _frechet_of_rows, _moments, frechet_distance, gaussian_frechet
from n2n.shards.view import create_view, open_view
from n2n.train.data import load_pairs
from n2n.train.heap import MMAP_CEILING, glibc, heap_for
from n2n.train.heldout import fit_floor, floor_bpd, heldout_bpd
from tests.test_train import write_store


def factor_view(n: int, ds: int, d: int, factors: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x = W c + F f + noise: a linear mean and residuals of a few shared factors, as a VAE latent's are."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, ds, generator=torch.Generator().manual_seed(99)) / math.sqrt(ds)
    f = torch.randn(d, factors, generator=torch.Generator().manual_seed(98))
    c = torch.randn(n, ds, generator=g)
    x = c @ w.T + 0.5 * torch.randn(n, factors, generator=g) @ f.T + 0.3 * torch.randn(n, d, generator=g)
    return c, x


def test_the_low_rank_law_is_exact_in_what_it_computes():
    """Whitening inverts, and the NLL is the dense Gaussian's with Sigma = B (I + V E V^T) B built out."""
    c, x = factor_view(3000, 8, 64, 4, 0)
    law = LowRankGaussian.fit(c, x, rank=6)
    assert law.rank == 6 and torch.allclose(law.basis.T @ law.basis, torch.eye(6, dtype=torch.float64), atol=1e-10)
    u = torch.randn(5, 64, dtype=torch.float64)
    assert torch.allclose(law.whiten(law.colour(u)), u, atol=1e-10)
    b = torch.diag(law.scale)
    sigma = b @ (torch.eye(64, dtype=torch.float64) + law.basis @ torch.diag(law.excess) @ law.basis.T) @ b
    dense = torch.distributions.MultivariateNormal(law.mean(c[:20].double()), covariance_matrix=sigma)
    assert torch.allclose(law.nll(c[:20], x[:20]), -dense.log_prob(x[:20].double()), rtol=1e-9)
    assert torch.allclose(law.variance, torch.diagonal(sigma))
    assert "rank 6" in law.describe()


def test_a_few_directions_hold_what_the_full_law_holds():
    """On residuals of 4 shared factors, rank 8 is as likely held out as the full covariance (fewer numbers to
    estimate), and a diagonal covariance (rank 0) far above both."""
    c, x = factor_view(6000, 8, 256, 4, 0)
    tc, tx = factor_view(2000, 8, 256, 4, 1)
    full = LinearGaussian.fit(c, x).nll_bits_per_dim(tc, tx)
    low = LowRankGaussian.fit(c, x, rank=8).nll_bits_per_dim(tc, tx)
    diagonal = LowRankGaussian.fit(c, x, rank=0).nll_bits_per_dim(tc, tx)
    assert low < full + 0.005 and diagonal > low + 0.3, (full, low, diagonal)


@pytest.mark.parametrize("kind", ["coupling", "continuous"])
def test_a_fresh_translator_starts_on_the_low_rank_law(kind, tmp_path):
    """Above FULL_WIDTH dims the law and the first stage are low-rank by default: a translator starts on the law
    within 0.01 bits/dim, its first stage holds no d x d parameter, and the map inverts."""
    dim, ds, n = FULL_WIDTH + 4, 16, 600
    c, x = factor_view(n, ds, dim, 4, 0)
    keys = [f"k{i:05d}" for i in range(n)]
    view = create_view(tmp_path / "view", write_store(tmp_path / "src", keys, c.numpy()),
                       write_store(tmp_path / "dst", keys, x.numpy()))
    data = load_pairs(view, 0.2)
    law = fit_floor(data)
    assert isinstance(law, LowRankGaussian)
    flow = build_flow(dim, ds, FlowConfig(translator=kind, n_flows=2, hidden_dim=16, velocity_width=32))
    flow.start_from(law)
    flow.eval()
    assert max(p.numel() for p in flow.linear_stage.parameters()) == dim * ds  # M; nothing d x d
    assert abs(heldout_bpd(flow, data, 4096) - floor_bpd(law, data, 4096)) < 0.01
    target, source = data.held_target[:8], data.held_source[:8]
    z, _ = flow(target, source)
    assert torch.allclose(flow.reverse(z, source), target, atol=1e-3)


def test_the_frechet_distance_of_rows_is_the_matrix_one():
    g = torch.Generator().manual_seed(0)
    for na, nb, d in ((300, 250, 40), (30, 25, 400)):
        a = torch.randn(na, d, generator=g)
        b = torch.randn(nb, d, generator=g) @ torch.randn(d, d, generator=g) / math.sqrt(d) + 0.2
        assert _frechet_of_rows(a, b) == pytest.approx(gaussian_frechet(*_moments(a), *_moments(b)), rel=1e-6)
    assert frechet_distance(a, b) == pytest.approx(_frechet_of_rows(a, b))  # 400 dims > 30 rows: through the rows


@pytest.mark.parametrize(("ds", "dt"), [(8, 20), (20, 8)])
def test_procrustes_without_the_padded_square_is_the_padded_rotation(ds, dt):
    g = torch.Generator().manual_seed(0)
    source = torch.randn(500, ds, generator=g, dtype=torch.float64)
    target = torch.randn(500, dt, generator=g, dtype=torch.float64) + 0.5 * torch.nn.functional.pad(
        source, (0, max(0, dt - ds)))[:, :dt]
    width = max(ds, dt)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
    u, _, vh = torch.linalg.svd(pad(source).T @ pad(target))
    padded = (pad(source[:10]) @ (u @ vh))[:, :dt]
    assert torch.allclose(fit_procrustes(source, target)(source[:10]), padded, atol=1e-9)


def test_an_mlp_base_on_a_low_rank_target_is_refused_before_anything_is_written(tmp_path):
    import n2n

    dim, n = FULL_WIDTH + 4, 50
    c, x = factor_view(n, 4, dim, 2, 0)
    keys = [f"k{i:05d}" for i in range(n)]
    view = create_view(tmp_path / "view", write_store(tmp_path / "src", keys, c.numpy()),
                       write_store(tmp_path / "dst", keys, x.numpy()))
    with pytest.raises(n2n.N2NError, match=r"--base mlp has a full covariance.*--law full"):
        n2n.train(view, tmp_path / "run", steps=1, base="mlp", compile=False, progress=False)
    assert not (tmp_path / "run").exists()


def wide_view(tmp_path, dim: int = FULL_WIDTH + 4, ds: int = 16, n: int = 40):
    c, x = factor_view(n, ds, dim, 2, 0)
    keys = [f"k{i:05d}" for i in range(n)]
    return create_view(tmp_path / "view", write_store(tmp_path / "src", keys, c.numpy()),
                       write_store(tmp_path / "dst", keys, x.numpy()))


def test_the_dry_run_counts_each_part_and_the_first_stage_is_linear_in_d(tmp_path, invoke):
    from n2n.train.api import dry_run
    from n2n.train.cli import main as n2n_train

    view, dim = wide_view(tmp_path), FULL_WIDTH + 4
    low = dry_run(view, n_flows=2, hidden_dim=16)
    full = dry_run(view, n_flows=2, hidden_dim=16, law="full")
    assert set(low["parts"]) == {"flow blocks", "embedder", "first stage"}
    assert sum(low["parts"].values()) == low["parameters"]
    assert low["parts"]["first stage"] == dim * 16 + 2 * dim + 64  # M, m, a; s: O(d k), nothing d x d
    assert full["parts"]["first stage"] == dim * 16 + dim + dim * dim + dim
    assert next(iter(full["parts"])) == "first stage"  # largest first
    continuous = dry_run(view, translator="continuous", velocity_width=32)
    assert "velocity net" in continuous["parts"]
    result = invoke(n2n_train, "--shards", view, "--dry-run", "--n-flows", 2, "--hidden-dim", 16)
    assert result.exit_code == 0, result.output
    assert "parameters: first stage" in result.output and "parameters: flow blocks" in result.output


def test_out_of_memory_names_the_largest_part_and_its_option(tmp_path, monkeypatch, invoke):
    import n2n.train.api as api
    from n2n.train.cli import main as n2n_train

    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes")

    monkeypatch.setattr(api, "fit", no_memory)
    result = invoke(n2n_train, "--shards", wide_view(tmp_path), "--out", tmp_path / "run", "--law", "full",
                    "--n-flows", 2, "--hidden-dim", 16, "--no-compile")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "largest part is the first stage" in lines[0] and "--law lowrank" in lines[0]


def test_synth_draws_a_wide_gaussian_law_without_a_square_matrix(tmp_path, monkeypatch):
    """Past DENSE_WIDTH the noise's rotation is Householder reflections: what it draws has the covariance the
    truth records (checked against the dense B its reflections make, on a small width), and the NLL it
    reports is the law's; rows are written a chunk at a time, the same rows as in one go."""
    from n2n.shards import synthetic

    monkeypatch.setattr(synthetic, "DENSE_WIDTH", 16)
    one = synthetic.write_synthetic(tmp_path / "one", "gaussian", n=3000, src_dim=3, dst_dim=40, seed=1)
    law, params = synthetic.read_law(one)
    assert law == "gaussian" and "B" not in params and params["U"].shape == (synthetic.REFLECTIONS, 40)
    q = synthetic.reflect(params["U"], np.eye(40)).T  # row i of reflect(I) is Q e_i: transposed, Q
    assert np.allclose(q @ q.T, np.eye(40))
    b = q * params["s"]
    c = np.random.default_rng(0).standard_normal((5, 3))
    x = synthetic.sample(law, params, c, np.random.default_rng(1))
    with_b = {"A": params["A"], "B": b, "m": params["m"]}
    assert np.allclose(synthetic.conditional_nll(law, params, x, c), synthetic.conditional_nll(law, with_b, x, c))
    truth = json.loads((one / "truth.json").read_text())["nll_nats_per_dim"]
    assert math.isclose(truth, synthetic.expected_nll(law, with_b, x, c) / 40)
    stored = open_view(one)
    source, target = stored.source.latents().astype(np.float64), stored.target.latents().astype(np.float64)
    residual = target - source @ params["A"].T - params["m"]
    assert np.abs(np.cov(residual.T) - b @ b.T).max() < 0.1  # 3,000 draws of variances <= 1
    monkeypatch.setattr(synthetic, "CHUNK_NUMBERS", 40 * 7)  # 7 rows a chunk
    chunked = synthetic.write_synthetic(tmp_path / "chunked", "gaussian", n=3000, src_dim=3, dst_dim=40, seed=1)
    assert np.array_equal(open_view(chunked).target.latents(), stored.target.latents())


def test_the_degenerate_law_past_the_dense_width_is_refused_before_writing(tmp_path):
    from n2n.errors import N2NError
    from n2n.shards.synthetic import DENSE_WIDTH, write_synthetic

    with pytest.raises(N2NError, match="--dst-dim.*--law gaussian"):
        write_synthetic(tmp_path, "degenerate", n=10, dst_dim=DENSE_WIDTH + 1)
    assert not any(tmp_path.iterdir())


def test_a_16384_dim_target_trains_at_the_defaults_and_is_evaluated(tmp_path, n2n_train, invoke, monkeypatch):
    """SD's VAE at 512 px is 16,384 dims: synth writes it, n2n-train starts on the low-rank law and trains a few
    steps at the default options without blowing up (the fan-in-scaled rates of wide layers), and n2n-eval
    scores it within memory, the MLP through the targets' principal subspace, stated in the report."""
    from n2n.evaluate.cli import main as n2n_eval
    from n2n.shards.cli import main as n2n_shards
    from n2n.train.checkpoint import read_meta

    dim = 16_384
    made = invoke(n2n_shards, "synth", "--root", tmp_path, "--n", 1000, "--src-dim", 64, "--dst-dim", dim)
    assert made.exit_code == 0, made.output
    view, run = tmp_path / "synth-gaussian", tmp_path / "run"
    result = n2n_train("--shards", view, "--out", run, "--steps", 4, "--holdout", 0.2, "--no-compile")
    assert result.exit_code == 0, result.output
    assert "low-rank linear-Gaussian law" in result.output
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    floor = read_meta(run / "checkpoint.safetensors")["linear_gaussian_bpd"]
    assert abs(metrics[0]["heldout_bpd"] - floor) < 0.01
    assert metrics[-1]["train_bpd"] < floor + 1 and metrics[-1]["heldout_bpd"] < floor + 0.1, metrics
    assert (run / "law.safetensors").is_file()  # the low-rank law, which n2n-eval reads back instead of fitting

    def no_fit(*args, **kwargs):
        raise AssertionError("n2n-eval fitted the law n2n-train saved")

    monkeypatch.setattr("n2n.evaluate.api.fit_floor", no_fit)
    scored = invoke(n2n_eval, "--run", run, "--baseline-steps", 50, "--samples", 4,
                    "--curve-temperatures", "0,1")
    assert scored.exit_code == 0, scored.output
    report = json.loads((run / "eval.json").read_text())
    assert report["subspace"].startswith("the top 256 principal directions") and "The MLP regresses" in scored.output
    assert report["linear_gaussian_bpd"] == pytest.approx(floor, abs=1e-9)
    scores = report["translation"]
    assert all(math.isfinite(scores[name]["frechet"]) for name in ("translator", "linear", "mlp", "procrustes"))
    assert scores["mlp"]["cosine"] > scores["procrustes"]["cosine"]


def test_a_saved_law_is_read_only_where_it_was_fitted_so(tmp_path):
    """read_law gives the law back bit for bit under its record, and nothing under any other."""
    from n2n.train.heldout import read_law, save_law

    c, x = factor_view(300, 4, 40, 2, 0)
    law = LowRankGaussian.fit(c, x, rank=3)
    record = {"seed": 0, "noise": 0.0, "train_pairs": 300}
    save_law(law, tmp_path / "law.safetensors", record)
    back = read_law(tmp_path / "law.safetensors", record)
    for name in ("weight", "bias", "scale", "basis", "excess"):
        assert torch.equal(getattr(back, name), getattr(law, name)), name
    assert back.describe() == law.describe()
    assert read_law(tmp_path / "law.safetensors", record | {"seed": 1}) is None
    assert read_law(tmp_path / "missing.safetensors", record) is None
    (tmp_path / "law.safetensors").write_bytes(b"not a law")
    assert read_law(tmp_path / "law.safetensors", record) is None


def test_only_layers_wider_than_fan_in_learn_at_a_scaled_rate():
    """make_optimizer: a flow whose layers all read FAN_IN inputs or fewer has one group at lr (as before); a
    wide target's coupling nets, reading more, learn at lr x FAN_IN / their inputs, and nothing else does."""
    from n2n.train.trainer import FAN_IN, fan_ins, make_optimizer

    narrow = build_flow(64, 8, FlowConfig(n_flows=2, hidden_dim=16))
    assert [group["lr"] for group in make_optimizer(narrow, 1e-3).param_groups] == [1e-3]
    dim, embedding = 2 * FAN_IN + 200, 32
    wide = build_flow(dim, 8, FlowConfig(n_flows=1, hidden_dim=8, embedding_dim=embedding, law="lowrank"))
    groups = make_optimizer(wide, 1e-3).param_groups
    inputs = fan_ins(wide)
    for group in groups:
        for p in group["params"]:
            assert group["lr"] == pytest.approx(1e-3 * min(1.0, FAN_IN / inputs.get(id(p), 1)))
    first_layer = wide.blocks[0].coupling.net1[0].weight
    assert inputs[id(first_layer)] == dim // 2 + embedding
    assert any(any(p is first_layer for p in g["params"]) and g["lr"] < 1e-3 for g in groups)
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in wide.parameters() if p.requires_grad)


def page_faults_of(count: int) -> int:
    """Minor page faults of allocating, filling and freeing ``count`` 64 MiB tensors one after another."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(count):
        torch.ones(2**24)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def resident_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


@pytest.mark.skipif(glibc() is None, reason="the heap policy is glibc's")
def test_a_wide_steps_activations_come_back_from_the_heap():
    """Inside heap_for, 64 MiB tensors freed and allocated again reuse the heap's pages (glibc maps each afresh:
    16,384 faults of 4 KiB apiece); on leaving, the heap's free pages go back to the system. A narrow step or
    another device is left to glibc."""
    with heap_for(torch.device("cpu"), MMAP_CEILING - 1) as narrow, heap_for(torch.device("meta"), 2**40) as other:
        assert not narrow and not other
    with heap_for(torch.device("cpu"), MMAP_CEILING) as applied:
        page_faults_of(5)  # the heap grows to what the pattern needs
        inside = page_faults_of(5)
        kept = resident_mib()
    assert applied and inside < 1_000
    assert resident_mib() < kept - 48  # the freed 64 MiB went back (malloc_trim)
