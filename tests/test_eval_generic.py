"""n2n-eval on any view: the linear-Gaussian floor, retrieval, Fréchet distance and precision/recall of
the cINN beside a linear map and an MLP, and eval.png, checked on synthetic views with a known law."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

import n2n
from n2n.evaluate.cli import main as n2n_eval
from n2n.shards.synthetic import write_synthetic

FLOW = {"n_flows": 4, "hidden_dim": 64, "compile": False, "progress": False}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A short run on a linear-Gaussian law and a longer one on the bimodal law (where a flow must win)."""
    root = tmp_path_factory.mktemp("generic")
    gaussian = write_synthetic(root / "shards", "gaussian", n=6000, src_dim=8, dst_dim=4, seed=0)
    bimodal = write_synthetic(root / "shards", "bimodal", n=6000, src_dim=8, dst_dim=4, seed=1)
    return {"gaussian": (n2n.train(gaussian, root / "runs" / "gaussian", steps=100, **FLOW), gaussian),
            "bimodal": (n2n.train(bimodal, root / "runs" / "bimodal", steps=300, lr=2e-3, **FLOW), bimodal)}


def test_the_floor_is_the_truth_on_a_linear_law(runs):
    run, view = runs["gaussian"]
    truth = json.loads((view / "truth.json").read_text())["nll_nats_per_dim"] / math.log(2)
    report = n2n.evaluate(run, baseline_steps=50, max_rows=200, progress=False)
    assert report["linear_gaussian_bpd"] == pytest.approx(truth, abs=0.05)
    scores = report["translation"]
    # 200 of the ~290 held-out pairs are scored; every distinct held-out target is a candidate
    assert scores["pairs"] == 200 and scores["candidates"] > 250 and set(scores) >= {"translator", "linear", "mlp"}
    for name in ("translator", "linear", "mlp"):
        row = scores[name]
        assert 0 <= row["retrieval"]["top1"] <= row["retrieval"]["top5"] <= 1
        assert 1 <= row["retrieval_mean"]["median_rank"] <= scores["candidates"]
        assert row["frechet"] >= 0 and 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
    # On a linear law the least-squares map is the conditional mean: nothing retrieves better than it.
    assert scores["linear"]["retrieval"]["median_rank"] <= scores["mlp"]["retrieval"]["median_rank"]
    # A deterministic map has one prediction per pair: one sample and the mean of n are the same.
    assert scores["linear"]["retrieval"] == scores["linear"]["retrieval_mean"]


def test_the_cinn_clears_the_floor_on_the_bimodal_law(runs):
    run, view = runs["bimodal"]
    report = n2n.evaluate(run, baseline_steps=300, max_rows=500, progress=False)
    assert report["heldout_bpd"] < report["linear_gaussian_bpd"] - 0.5
    scores = report["translation"]
    # Samples land on the two modes; the regressors' means fall between them, off the data.
    assert scores["translator"]["precision"] > scores["linear"]["precision"] + 0.3
    assert scores["translator"]["frechet"] < scores["mlp"]["frechet"]


def test_n2n_eval_writes_the_table_and_eval_png(runs, tmp_path, invoke, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the table unwrapped, so a row's label reads whole
    run, _ = runs["gaussian"]
    out = tmp_path / "eval.json"
    result = invoke(n2n_eval, "--run", run, "--out", out, "--baseline-steps", 20, "--max-rows", 200)
    assert result.exit_code == 0, result.output
    for label in ("linear LS", "held-out NLL", "median rank, mean of 16 samples", "Fréchet", "precision"):
        assert label in result.output
    report = json.loads(out.read_text())
    assert report["figure"] == str(tmp_path / "eval.png")
    for name in ("translator", "linear", "procrustes"):  # the Gaussian law: each beats a shuffled pairing
        scores = report["translation"][name]
        assert scores["cosine"] > scores["cosine_unrelated"] + 0.2, (name, scores)
    with Image.open(tmp_path / "eval.png") as picture:
        assert picture.format == "PNG" and picture.size[0] > 500
    assert not list(tmp_path.glob(".*tmp*")), "no temp file left behind"


def test_n2n_eval_scores_a_continuous_translator_with_the_fields_metrics(runs, tmp_path, invoke, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the table unwrapped, so a row's label reads whole
    """The continuous translator in the same table: its NLL through the ODE below the floor on the bimodal
    law, and the rows the field reports (vec2vec's pool, DALLE2-pytorch's unrelated cosine and best of n,
    the Procrustes baseline)."""
    _, view = runs["bimodal"]
    run = n2n.train(view, tmp_path / "continuous", steps=200, translator="continuous", velocity_width=64,
                    velocity_blocks=2, lr=1e-3, compile=False, progress=False)
    out = tmp_path / "eval.json"
    result = invoke(n2n_eval, "--run", run, "--out", out, "--baseline-steps", 20, "--max-rows", 200)
    assert result.exit_code == 0, result.output
    for label in ("Procrustes", "among 1024", "best of 16", "unrelated target"):
        assert label in result.output
    report = json.loads(out.read_text())
    assert report["heldout_bpd"] < report["linear_gaussian_bpd"] - 0.1
    scores = report["translation"]
    assert scores["procrustes"]["retrieval_pool"]["pool"] == min(1024, scores["candidates"])
    assert "cosine_best" in scores["translator"] and "cosine_best" not in scores["mlp"]
