"""The benchmarks' own arithmetic and plumbing at toy sizes (no timing is asserted: ratios are the measure)."""

import itertools
import json
import math

import pytest
import torch
from click.testing import CliRunner

from bench import (
    ae_decode,
    cinn_step,
    extraction,
    freia_peer,
    fused_coupling,
    never_worse,
    reference,
    reproducible,
    store_reads,
    target_dims,
    time_to_quality,
    translator_sampling,
)
from n2n.cinn import ConditionalFlow, FlowConfig


def test_step_flops_counts_every_layer_forward_and_backward():
    flow = ConditionalFlow(6, 5, FlowConfig(n_flows=2, hidden_dim=8, embedding_dim=4, hidden_depth=1,
                                            coupling="affine", embedder="mlp"))
    first = flow.embedder[0]
    assert (first.in_features, first.out_features) == (5, 4)
    embedder = 5 * 4 + 3 * 4 * 4  # Linear(5, 4), then three Linear(4, 4)
    coupling_net = 7 * 8 + 8 * 8 + 8 * 3  # [half (3); embedding (4)] -> 8 -> 8 -> half (3)
    macs = embedder + 2 * 4 * coupling_net  # 2 flows x (s, t) x 2 halves
    # 2 FLOPs per multiply-add, forward once, backward twice, except no input gradient for the condition
    assert cinn_step.step_flops(flow, 3) == 3 * (6 * macs - 2 * 5 * 4)
    glow = ConditionalFlow(6, 5, FlowConfig(n_flows=2, hidden_dim=8, embedding_dim=4, hidden_depth=1))
    glow_net = 7 * 8 + 8 * 8 + 8 * 6  # [half; embedding] -> 8 -> 8 -> [log-scale; shift] of the other half
    assert cinn_step.step_flops(glow, 3) == 3 * (6 * (5 * 4 + 2 * 2 * glow_net) - 2 * 5 * 4)  # a Linear embedder


def run_bench(command, name: str, args: list[str], folder) -> dict:
    """Run a benchmark's command with its results written into ``folder``; the JSON it wrote."""
    result = CliRunner(env={"N2N_BENCH_RESULTS": str(folder)}).invoke(command, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads((folder / f"{name}.json").read_text())


def test_store_reads_runs_small_and_writes_its_json(tmp_path):
    saved = run_bench(store_reads.main, "store_reads", ["--rows", "2000", "--dim", "8", "--repeat", "1",
                                                        "--extract-items", "8"], tmp_path)
    assert saved["settings"]["rows"] == 2000 and saved["machine"]["torch"] == torch.__version__
    metrics = [row["metric"] for row in saved["rows"]]
    assert [m for m in metrics if m.startswith("load 2,000")] == [f"load 2,000 x 8 float16: {f} vs np.load"
                                                                  for f in ("zarr", "wds", "h5")]
    assert any("join" in m for m in metrics) and any(m.startswith("n2n-extract minilm") for m in metrics)
    assert all(row["ratio"] is None or row["ratio"] > 0 for row in saved["rows"])


def test_extraction_overhead_runs_small(tmp_path):
    saved = run_bench(extraction.main, "extraction", ["--items", "16", "--large-items", "8", "--tiny",
                                                      "--batch-size", "8", "--num-workers", "0"], tmp_path)
    assert set(saved["raw"]) == {"minilm", "timm", "clip-text", "clip-image", "sdvae"}
    assert all(v["extract_wall_s"] > 0 and v["forward_s"] > 0 for v in saved["raw"].values())


def test_the_glow_peer_is_matched_on_parameters_not_blocks():
    flow = ConditionalFlow(6, 5, FlowConfig(n_flows=4, hidden_dim=16, coupling="affine"))
    glow = freia_peer.matched_glow(flow)
    per_block = (freia_peer.parameters(freia_peer.matched_glow(ConditionalFlow(6, 5, FlowConfig(n_flows=2,
                 hidden_dim=16, coupling="affine")))) / 2)
    assert glow.config.coupling == "glow" and glow.config.n_flows > 4  # one net per half: more blocks
    assert abs(freia_peer.parameters(glow) - freia_peer.parameters(flow)) <= per_block


def test_freia_peer_is_matched_on_parameters_not_blocks():
    flow = ConditionalFlow(6, 5, FlowConfig(n_flows=2, hidden_dim=16))
    peer = freia_peer.matched_freia(flow)
    per_block = freia_peer.parameters(freia_peer.FreiaFlow(6, 5, 16, 2, blocks=1))
    assert abs(freia_peer.parameters(peer) - freia_peer.parameters(flow)) <= per_block / 2
    z, logdet = peer(torch.randn(4, 6), torch.randn(4, 5))
    assert z.shape == (4, 6) and logdet.shape == (4,)


def test_the_separate_net_baseline_computes_the_same_flow():
    torch.manual_seed(0)
    flow = ConditionalFlow(6, 5, FlowConfig(n_flows=2, hidden_dim=16, coupling="affine")).train()
    flow(torch.randn(32, 6), torch.randn(32, 5))  # ActNorm init
    twin = fused_coupling.separate_twin(flow)
    x, c = torch.randn(8, 6), torch.randn(8, 5)
    for a, b in zip(flow.eval()(x, c), twin.eval()(x, c), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert sum(p.numel() for p in twin.parameters()) == sum(p.numel() for p in flow.parameters())


def test_the_reference_benchmarks_n2n_way_trains_from_view_rows():
    result = reference.measure("minilm_ae", "n2n", batch_size=8, steps=2)
    assert len(result["step_s"]) == 2 and result["steps_per_s"] > 0 and result["peak_rss_mib"] > 0


def test_freia_peer_compares_learning_curves_and_time_to_quality(tmp_path):
    """Every contender trains on the same view and reports a curve; the rows compare each n2n variant's
    final NLL and its time to FrEIA's final NLL against FrEIA."""
    from n2n.shards.synthetic import write_synthetic
    from n2n.train.data import load_pairs

    data = load_pairs(write_synthetic(tmp_path, "gaussian", n=600, src_dim=5, dst_dim=4))
    spec = {"dim": 4, "cond_dim": 5, "n_flows": 2, "hidden_dim": 8}
    result = freia_peer.compare(data, spec, steps=6, batch_size=16, noise=0.0)
    assert set(result) == {"truth_bpd", "n2n", "n2n affine", "net2net", "FrEIA"}
    for name in ("n2n", "n2n affine", "net2net", "FrEIA"):
        curve = result[name]["curve"]
        assert len(curve) == freia_peer.CHECKS and [step for _, step, _ in curve][-1] == 6
        assert all(a[0] <= b[0] for a, b in itertools.pairwise(curve)) and math.isfinite(result[name]["bpd"])
    rows = freia_peer.nll_rows("tiny", result, steps=6)
    assert len(rows) == 6 and all(row.met in (True, False) for row in rows)
    assert freia_peer.time_to([(1.0, 1, 3.0), (2.0, 2, 2.0), (3.0, 3, 2.5)], 2.2) == 2.0
    assert freia_peer.time_to([(1.0, 1, 3.0)], 2.0) is None


def test_a_bench_refuses_a_device_it_does_not_know():
    result = CliRunner().invoke(cinn_step.main, ["--device", "tpu"])
    assert result.exit_code == 2 and "give cpu, cuda or cuda:N" in result.output


def test_extraction_records_its_device_and_builds_only_the_rows_asked_for(tmp_path, monkeypatch):
    def no_diffusers(*args, **kwargs):
        raise AssertionError("the SD VAE was built though its row was not asked for")

    monkeypatch.setattr(extraction, "save_sdvae", no_diffusers)
    saved = run_bench(extraction.main, "extraction", ["--device", "cpu", "--tiny", "--items", "8", "--large-items", "8",
                                                      "--batch-size", "8", "--num-workers", "0", "--experts",
                                                      "timm,clip-text"], tmp_path)
    assert saved["settings"]["device"] == "cpu" and set(saved["raw"]) == {"timm", "clip-text"}
    assert all(v["extract_wall_s"] > 0 and v["forward_s"] > 0 for v in saved["raw"].values())


def test_reference_records_its_device(tmp_path):
    saved = run_bench(reference.main, "reference", ["--device", "cpu", "--pair", "minilm_ae", "--batch-size", "8",
                                                    "--n2n-steps", "1", "--ref-steps", "1"], tmp_path)
    assert saved["settings"]["device"] == "cpu" and set(saved["raw"]) == {"minilm_ae/n2n", "minilm_ae/reference"}
    assert all(row["ratio"] > 0 for row in saved["rows"])


def test_cinn_step_in_bfloat16_records_device_and_dtype(tmp_path):
    saved = run_bench(cinn_step.main, "cinn_step-cpu-bfloat16", ["--device", "cpu", "--dtype", "bfloat16", "--batch",
                                                                 "8", "--repeat", "1", "--gemm-size", "256",
                                                                 "--n-flows", "2"], tmp_path)
    assert saved["settings"]["device"] == "cpu" and saved["settings"]["dtype"] == "bfloat16"
    assert saved["settings"]["n_flows"] == 2
    assert "bfloat16 autocast" in saved["rows"][0]["metric"] and saved["rows"][0]["ratio"] > 0


@pytest.mark.slow
def test_reproducible_runs_small_and_strict_mode_keeps_the_bits(tmp_path):
    saved = run_bench(reproducible.main, "reproducible", ["--items", "4", "--repeat", "1", "--bits-items", "4",
                                                          "--experts", "minilm"], tmp_path)
    assert set(saved["raw"]) == {"minilm"} and all(s > 0 for s in saved["raw"]["minilm"]["seconds"]["1 threads strict"])
    same = saved["raw"]["minilm"]["same_bits_1_vs_all_threads"]
    assert same["strict"] or not torch.backends.mkl.is_available()  # the contract where torch multiplies on MKL


def test_ae_decode_runs_small(tmp_path):
    saved = run_bench(ae_decode.main, "ae_decode", ["--repeat", "1", "--decode-batch", "4", "--train-batch", "2"],
                      tmp_path)
    assert [row["ratio"] > 0 for row in saved["rows"]] == [True, True]


def test_translator_sampling_runs_small(tmp_path):
    saved = run_bench(translator_sampling.main, "translator_sampling", ["--repeat", "1", "--batch", "8"], tmp_path)
    assert len(saved["rows"]) == 2 and all(row["ratio"] > 0 for row in saved["rows"])
    assert saved["settings"]["parameters"]["continuous"] > 0


def test_time_to_quality_races_both_kinds_from_one_config(tmp_path):
    from n2n.shards.synthetic import write_synthetic

    view = write_synthetic(tmp_path / "shards", "gaussian", n=600, src_dim=5, dst_dim=4)
    config = tmp_path / "tiny.yaml"
    config.write_text("holdout: 0.1\nn_flows: 2\nhidden_dim: 8\nembedding_dim: 8\nvelocity_width: 16\n"
                      "velocity_blocks: 1\nbatch_size: 32\n")
    saved = run_bench(time_to_quality.main, "time_to_quality", ["--view", view, "--config", config, "--budget",
                                                                "0.001", "--rows", "30", "--coupling-chunk", "3",
                                                                "--continuous-chunk", "5"], tmp_path)
    assert [point["steps"] for point in saved["raw"]["coupling"]] == [3]
    assert [point["steps"] for point in saved["raw"]["continuous"]] == [5]
    assert saved["settings"]["rows"] == 30 and len(saved["rows"]) == 3
    assert all(row["met"] in (True, False) for row in saved["rows"])
    assert time_to_quality.reached([{"seconds": 1.0, "median_rank": 9}, {"seconds": 2.0, "median_rank": 4}], 5) == 2.0
    assert time_to_quality.reached([{"seconds": 1.0, "median_rank": 9}], 5) is None
    refused = CliRunner().invoke(time_to_quality.main, ["--view", tmp_path])
    assert refused.exit_code == 2 and "run make demo first" in refused.output


def test_never_worse_runs_small_and_checks_its_targets(tmp_path):
    saved = run_bench(never_worse.main, "never_worse", ["--steps", "4", "--eval-every", "2", "--items", "200",
                                                        "--shards", tmp_path / "no-demo"], tmp_path)
    assert [row["metric"].split(":")[0] for row in saved["rows"]] == [
        "degenerate, coupling", "degenerate, continuous", "thumbnail, coupling", "thumbnail, continuous"]
    for name, run in saved["raw"].items():
        assert [step for step, _ in run["heldout"]] == [0, 2, 4], name  # step 0: the start, the first best
        assert run["best"]["heldout_bpd"] <= run["floor"] + 0.01, name
    assert all(row["met"] in (True, False) for row in saved["rows"])


def test_target_dims_measures_each_width_and_kind(tmp_path, monkeypatch):
    """At toy widths, each measured in a process of its own: a row per kind and width, with its step ratio to
    the first width, one per width for n2n-eval's law, and (here at every width) the step as glibc maps it."""
    monkeypatch.setattr(target_dims, "MMAP_CEILING", 0)
    saved = run_bench(target_dims.main, "target_dims", ["--dims", "8,24", "--rows", "300", "--repeat", "1"],
                      tmp_path)
    assert saved["settings"]["dims"] == [8, 24] and len(saved["rows"]) == 8
    assert saved["raw"]["24"]["mapped"]["step_s"] > 0
    assert [row["ratio"] for row in saved["rows"] if "coupling step at 8 dims vs" in row["metric"]] == [1.0]
    law = saved["raw"]["24"]["law"]
    assert law["lowrank_fit_s"] > 0 and law["full_bpd"] > 0 and law["frechet_s"] > 0
    assert saved["raw"]["8"]["continuous"]["peak_mib"] > 0
