"""n2n-train end to end on views with a known law, exact resume, and refusal of bad input."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL

import n2n
from n2n.shards import as_path, create_store
from n2n.shards.synthetic import modes, read_law, write_synthetic
from n2n.shards.view import create_view, open_view
from n2n.train.api import dry_run
from n2n.train.checkpoint import (
    BEST,
    CHECKPOINT,
    CheckpointError,
    load_checkpoint,
    load_run,
    prefixed,
    read_meta,
    run_view,
    save_checkpoint,
    view_record,
)
from n2n.train.data import Standardizer, heldout_mask, load_pairs
from n2n.train.sizing import COUPLING_SIZES


def write_store(path: Path, keys, latents, sub=None, complete=True, **meta):
    writer = create_store(path, dim=latents.shape[1], dtype="float32", meta=meta or None)
    writer.append(list(keys), np.zeros(len(keys), np.int64) if sub is None else sub, latents.astype(np.float32))
    writer.close() if complete else writer.flush()
    return path


@pytest.fixture(scope="module")
def small_view(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("shards"), "gaussian", n=3000, src_dim=6, dst_dim=4)


def test_gaussian_law_reaches_analytic_nll(tmp_path, n2n_train):
    """The trainer's acceptance test: within 0.05 nats/dim of the true conditional NLL, on CPU."""
    view = write_synthetic(tmp_path / "shards", "gaussian")
    start = time.perf_counter()
    result = n2n_train("--shards", view, "--out", tmp_path / "run", "--steps", 2000, "--n-flows", 4,
                       "--hidden-dim", 64, "--no-compile")
    assert result.exit_code == 0, result.output
    seconds = time.perf_counter() - start
    truth = json.loads((view / "truth.json").read_text())["nll_nats_per_dim"]
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    gap = last["heldout_bpd"] * np.log(2) - truth
    print(f"held-out gap {gap:+.4f} nats/dim in {seconds:.0f} s")
    assert -0.02 < gap < 0.05, gap  # far below the truth would mean a bug in the NLL, not a good model
    assert "gap" in result.output


def test_bimodal_law_samples_both_modes(tmp_path, n2n_train):
    view = write_synthetic(tmp_path / "shards", "bimodal")
    result = n2n_train("--shards", view, "--out", tmp_path / "run", "--steps", 2000, "--n-flows", 4,
                       "--hidden-dim", 64, "--no-compile")
    assert result.exit_code == 0, result.output
    _, params = read_law(view)
    translator = load_run(tmp_path / "run")
    c = np.random.default_rng(1).standard_normal((100, 16))
    draws = np.stack([
        translator.sample(torch.tensor(c, dtype=torch.float32), generator=torch.Generator().manual_seed(i)).numpy()
        for i in range(40)
    ])  # [40 draws, 100 conditions, 8]
    mode = modes(params, c)
    to_pos, to_neg = np.linalg.norm(draws - mode, axis=2), np.linalg.norm(draws + mode, axis=2)
    positive = (to_pos < to_neg).mean(0)
    assert 0.4 < positive.mean() < 0.6
    assert (positive > 0).mean() > 0.95 and (positive < 1).mean() > 0.95  # both modes for nearly every c
    # Samples sit on a mode (noise sigma * sqrt(dim) = 0.85), not between them (|mode| is about 3.2).
    assert np.median(np.minimum(to_pos, to_neg)) < 1.2


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(small_view, tmp_path, n2n_train):
    full, part = tmp_path / "full", tmp_path / "part"
    assert n2n_train("--shards", small_view, "--out", full, "--steps", 60, "--eval-every", 20, *SMALL).exit_code == 0
    assert n2n_train("--shards", small_view, "--out", part, "--steps", 20, "--eval-every", 20, *SMALL).exit_code == 0
    result = n2n_train("--shards", small_view, "--out", part, "--steps", 60, "--eval-every", 20, "--resume", *SMALL)
    assert result.exit_code == 0, result.output
    a, meta_a = load_checkpoint(full / CHECKPOINT)
    b, meta_b = load_checkpoint(part / CHECKPOINT)
    assert meta_a["step"] == meta_b["step"] == 60
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert (full / "metrics.jsonl").read_text().count("\n") == (part / "metrics.jsonl").read_text().count("\n")
    # Resuming a finished run (a rerun of make demo) changes nothing and says so.
    before = (part / CHECKPOINT).read_bytes()
    again = n2n_train("--shards", small_view, "--out", part, "--steps", 60, "--eval-every", 20, "--resume", *SMALL)
    assert again.exit_code == 0 and "already at step 60" in again.output
    assert (part / CHECKPOINT).read_bytes() == before


def test_resume_after_kill_9(small_view, tmp_path, n2n_train):
    """A real crash: kill -9 the trainer after its first checkpoint, resume, compare with a clean run."""
    args = ["--shards", small_view, "--steps", 400, "--eval-every", 40, *SMALL]
    assert n2n_train(*args, "--out", tmp_path / "clean").exit_code == 0
    run = tmp_path / "crashed"
    cmd = [sys.executable, "-c", "from n2n.train.cli import main; main()", *map(str, args), "--out", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (run / CHECKPOINT).exists() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(run / CHECKPOINT)[1]["step"]  # the last checkpoint is whole and loads
    assert killed_at < 400, "the run finished before it could be killed; make it longer"
    assert n2n_train(*args, "--out", run, "--resume").exit_code == 0
    clean = prefixed(load_checkpoint(tmp_path / "clean" / CHECKPOINT)[0], "model")
    resumed = prefixed(load_checkpoint(run / CHECKPOINT)[0], "model")
    assert clean.keys() == resumed.keys()
    assert all(torch.equal(clean[k], resumed[k]) for k in clean)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 400  # no step logged twice after the crash


def test_standardisation_statistics_and_split_are_saved(small_view, tmp_path, n2n_train):
    assert n2n_train("--shards", small_view, "--out", tmp_path / "r", "--steps", 5, "--eval-every", 5,
                     *SMALL).exit_code == 0
    tensors, meta = load_checkpoint(tmp_path / "r" / CHECKPOINT)
    assert tensors["norm.source.mean"].shape == (6,) and tensors["norm.target.std"].shape == (4,)
    assert meta["source"]["dim"] == 6 and meta["target"]["dim"] == 4 and meta["heldout_bpd"] is not None
    translator = load_run(tmp_path / "r")
    out = translator.sample(torch.zeros(3, 6))
    assert out.shape == (3, 4) and torch.isfinite(out).all()


def test_a_constant_target_dimension_trains_with_target_noise(tmp_path, n2n_train):
    # MiniLM has dimensions that are constant over a templated caption set. Regression: ActNorm was
    # initialised on a clean batch (std 0 there -> scale 1e6) and then trained on noisy targets.
    rng = np.random.default_rng(0)
    keys = [f"k{i}" for i in range(2000)]
    source = rng.normal(size=(2000, 3))
    target = np.c_[source[:, :2] + 0.1 * rng.normal(size=(2000, 2)), np.full(2000, 0.5)]
    view = create_view(tmp_path / "v", write_store(tmp_path / "s", keys, source),
                       write_store(tmp_path / "t", keys, target))
    assert n2n_train("--shards", view, "--out", tmp_path / "r", "--steps", 200, "--eval-every", 200,
                     "--target-noise", 0.1, *SMALL).exit_code == 0
    translator = load_run(tmp_path / "r")
    assert translator.target_norm.std[2] == 1  # centred only: a constant has no spread to divide by
    heldout = translator.meta["heldout_bpd"]
    assert np.isfinite(heldout) and abs(heldout) < 20, heldout  # it was ~1e11 bits/dim before the fix
    sample = translator.sample(torch.as_tensor(source[:50], dtype=torch.float32))
    assert torch.allclose(sample[:, 2], torch.full((50,), 0.5), atol=0.5)


def test_training_rows_are_the_joined_rows_standardised_by_train_statistics(tmp_path):
    """Captions onto images (the join repeats each image row): rows gathered and standardised on
    demand must equal a float64 numpy join of the same rows, and the statistics must weigh each
    image by its number of train captions."""
    rng = np.random.default_rng(0)
    images = [f"img{i}" for i in range(300)]
    image_latents = rng.normal(3.0, 2.0, (300, 5))
    caption_keys = np.repeat(images, 3)
    caption_latents = rng.normal(-1.0, 0.5, (900, 7))
    text = write_store(tmp_path / "text", caption_keys, caption_latents, sub=np.tile(np.arange(3), 300))
    pixels = write_store(tmp_path / "pixels", images, image_latents)
    data = load_pairs(create_view(tmp_path / "view", text, pixels), holdout=0.2)
    held = heldout_mask(caption_keys, 0.2)
    expected = image_latents[np.repeat(np.arange(300), 3)]
    mean, std = expected[~held].mean(0), expected[~held].std(0)
    assert np.allclose(data.target_norm.mean, mean, atol=1e-5) and np.allclose(data.target_norm.std, std, atol=1e-5)
    assert len(data.target) == (~held).sum() and len(data.held_target) == held.sum()
    assert np.allclose(data.target[:].numpy(), (expected[~held] - mean) / std, atol=1e-4)
    assert np.allclose(data.held_source[:].numpy(), (caption_latents[held] - caption_latents[~held].mean(0))
                       / caption_latents[~held].std(0), atol=1e-4)
    picked = torch.tensor([5, 0, 5])  # a batch gathers any rows, repeats included
    assert torch.equal(data.target[picked], data.target[:][picked])


def test_statistics_merged_over_blocks_equal_the_whole_array():
    x = torch.from_numpy(np.random.default_rng(1).normal(1e3, 1e-2, (10_000, 3)).astype(np.float32))
    whole, merged = Standardizer.fit([x]), Standardizer.fit(x.split(777))
    assert torch.allclose(whole.mean, merged.mean) and torch.allclose(whole.std, merged.std, rtol=1e-3)
    assert np.allclose(merged.std.numpy(), x.double().numpy().std(0), rtol=1e-3)


def test_heldout_split_depends_on_key_only():
    keys = np.array([f"img{i}" for i in range(5000)])
    mask = heldout_mask(keys, 0.1)
    assert 0.07 < mask.mean() < 0.13
    shuffled = np.random.default_rng(0).permutation(len(keys))
    assert np.array_equal(heldout_mask(keys[shuffled], 0.1), mask[shuffled])
    captions = np.repeat(keys, 5)  # every caption of an image lands on the image's side
    assert np.array_equal(heldout_mask(captions, 0.1), np.repeat(mask, 5))


def test_dry_run_prints_the_net2net_size_and_sizes_a_small_view_to_its_pairs(tmp_path, n2n_train):
    rng = np.random.default_rng(0)
    keys = [f"k{i}" for i in range(4)]
    src = write_store(tmp_path / "bert", keys, rng.standard_normal((4, 768)))
    dst = write_store(tmp_path / "biggan", keys, rng.standard_normal((4, 268)))
    create_view(tmp_path / "bert_biggan", src, dst)
    net2net = {"embedding_dim": 268, "coupling": "affine", "embedder": "mlp", "start_from_floor": False,
               "n_flows": 24, "hidden_dim": 1024}  # its cINN, at the size its recipe names
    result = n2n_train("--shards", tmp_path / "bert_biggan", "--dry-run", "--embedding-dim", 268, "--n-flows", 24,
                       "--hidden-dim", 1024, "--coupling", "affine", "--embedder", "mlp", "--no-start-from-floor")
    assert result.exit_code == 0, result.output
    assert "254,762,152" in result.output  # the count test_cinn derives from the layer shapes
    assert not (tmp_path / "runs").exists()
    size = dry_run(tmp_path / "bert_biggan", batch_size=64, **net2net)  # what the command prints
    assert size["parameters"] == 254_762_152 and size["pairs"] == 4 and size["lr"] == pytest.approx(64 * 4.5e-6)
    recipe = dry_run(tmp_path / "bert_biggan", config="configs/recipes/bert_biggan.yaml")
    assert (recipe["n_flows"], recipe["hidden_dim"]) == (24, 1024)  # the paper's recipe is the named preset
    # Left open, the size is the smallest of the ladder for 4 pairs; given one, the other is sized around it.
    small = dry_run(tmp_path / "bert_biggan", holdout=0.0)
    assert (small["n_flows"], small["hidden_dim"]) == COUPLING_SIZES[0] and small["train_pairs"] == 4
    assert dry_run(tmp_path / "bert_biggan", holdout=0.0, n_flows=3)["n_flows"] == 3


def test_open_sizes_grow_with_the_train_pairs_and_stay_within_the_budget():
    from n2n.cinn import FlowConfig
    from n2n.train.sizing import PARAMS_PER_VALUE, parameters, sized

    shapes = []
    for pairs in (1_283, 37_905, 100_000, 2_000_000):
        config, said = sized(FlowConfig(), 32, 384, pairs)
        assert config.n_flows and config.hidden_dim and "sized to the view" in said
        count = parameters(32, 384, config)
        assert count <= PARAMS_PER_VALUE * pairs * 32 or (config.n_flows, config.hidden_dim) == COUPLING_SIZES[0]
        shapes.append((config.n_flows, config.hidden_dim))
    assert shapes == sorted(shapes, key=lambda s: COUPLING_SIZES.index(s)) and len(set(shapes)) == 4
    assert shapes[1] == (8, 256)  # the demo's text -> image view: 2.6M, beside the 4.2M its config pins
    assert sized(FlowConfig(n_flows=8, hidden_dim=64), 32, 384, 10)[1] is None  # nothing open, nothing said
    continuous, said = sized(FlowConfig(translator="continuous"), 32, 384, 1_283)
    assert continuous.velocity_width < 512 and "--velocity-width" in said


def test_dry_run_sizes_a_4096_dim_target_without_allocating_it(tmp_path):
    """An SD-VAE's 256 px latent (4096 dims) from CLIP's 512: the default embedding is clamped to 512, and the
    448M-parameter flow is counted on the meta device (building it for real would take 1.8 GB)."""
    rng = np.random.default_rng(0)
    keys = [f"k{i}" for i in range(4)]
    src = write_store(tmp_path / "clip", keys, rng.standard_normal((4, 512)))
    dst = write_store(tmp_path / "sdvae", keys, rng.standard_normal((4, 4096)))
    create_view(tmp_path / "clip_sdvae", src, dst)
    size = dry_run(tmp_path / "clip_sdvae", n_flows=24, hidden_dim=1024)  # the size its recipe names
    floor_stage = 4096 * 512 + 4096 + 4096 * 4096 + 4096  # M, m, the whitening's lower part and diagonal
    assert size["embedding_dim"] == 512 and size["parameters"] == 428_622_336 + floor_stage


def test_out_of_memory_is_one_line_naming_what_shrinks_the_run(small_view, tmp_path, monkeypatch, n2n_train):
    import n2n.train.api as api

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 8589934592 bytes.\nmore detail")

    monkeypatch.setattr(api, "fit", no_memory)
    result = n2n_train("--shards", small_view, "--out", tmp_path / "r", *SMALL)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "out of memory on cpu" in lines[0] and "--dry-run" in lines[0]
    assert "its largest part is the flow blocks" in lines[0] and "--hidden-dim or --n-flows" in lines[0]
    assert "--batch-size" in lines[0]


def test_loss_blowing_up_stops_and_keeps_the_last_good_checkpoint(small_view, tmp_path, monkeypatch, n2n_train):
    run = tmp_path / "r"
    args = ["--shards", small_view, "--out", run, "--eval-every", 10, *SMALL]
    assert n2n_train(*args, "--steps", 10).exit_code == 0
    good = (run / CHECKPOINT).read_bytes()
    # The run goes on and its loss turns NaN at once (as a too-high lr or a broken latent would make it).
    import n2n.cinn.flow as flow_module

    monkeypatch.setattr(flow_module, "nll", lambda z, logdet: (z.sum(1) + logdet) * float("nan"))
    result = n2n_train(*args, "--steps", 40, "--resume")
    assert result.exit_code == 1
    assert "loss became" in result.output and "lower --lr" in result.output
    assert (run / CHECKPOINT).read_bytes() == good  # the step-10 checkpoint, untouched
    kept = load_checkpoint(run / CHECKPOINT)[0]
    assert all(torch.isfinite(v).all() for v in prefixed(kept, "model").values() if v.is_floating_point())


@pytest.mark.parametrize(
    "problem", ["missing_store", "incomplete", "no_overlap", "nan", "no_view", "truncated_shard", "unknown_format"]
)
def test_bad_view_is_refused_with_one_line(problem, tmp_path, n2n_train):
    rng = np.random.default_rng(0)
    keys = [f"k{i}" for i in range(50)]
    src = write_store(tmp_path / "src", keys, rng.standard_normal((50, 3)))
    target_keys = [f"other{i}" for i in range(50)] if problem == "no_overlap" else keys
    latents = rng.standard_normal((50, 2))
    if problem == "nan":
        latents[7, 1] = np.nan
    dst = write_store(tmp_path / "dst", target_keys, latents)
    view = tmp_path / "view"
    if problem == "no_overlap":  # create_view refuses it already; write the file by hand as a stale view would be
        view.mkdir()
        (view / "view.json").write_text(json.dumps({"n2n_view": 1, "source": "../src", "target": "../dst"}))
    elif problem != "no_view":
        create_view(view, src, dst)
    meta = json.loads((dst / "meta.json").read_text())
    if problem in ("incomplete", "unknown_format"):
        change = {"complete": False} if problem == "incomplete" else {"format": "parquet"}
        (dst / "meta.json").write_text(json.dumps({**meta, **change}))
    if problem == "truncated_shard":
        files = [f for f in dst.rglob("*") if f.is_file() and f.name != "meta.json"]
        biggest = max(files, key=lambda f: f.stat().st_size)
        biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    if problem == "missing_store":
        os.rename(dst, tmp_path / "moved")
    result = n2n_train("--shards", view, "--out", tmp_path / "run", *SMALL)
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert message.startswith("error:") and len(message.splitlines()) <= 2, message  # rich may wrap a long line
    assert not (tmp_path / "run" / CHECKPOINT).exists()


def test_resume_refusals(small_view, tmp_path, n2n_train):
    run = tmp_path / "r"
    assert n2n_train("--shards", small_view, "--out", run, "--resume", *SMALL).exit_code == 2  # nothing to resume
    assert n2n_train("--shards", small_view, "--out", run, "--steps", 5, "--eval-every", 5, *SMALL).exit_code == 0
    again = n2n_train("--shards", small_view, "--out", run, "--steps", 5, *SMALL)
    assert again.exit_code == 2 and "--resume" in again.output
    clash = n2n_train("--shards", small_view, "--out", run, "--steps", 10, "--resume", *SMALL[:-3], "--batch-size", 32)
    assert clash.exit_code == 2 and "--batch-size 32" in clash.output
    other = write_synthetic(tmp_path / "other", "gaussian", n=500, src_dim=5, dst_dim=4)
    wrong = n2n_train("--shards", other, "--out", run, "--steps", 10, "--resume", *SMALL)
    assert wrong.exit_code == 2 and "dims" in wrong.output
    # How long it runs and how often it reports may change; the trajectory's settings may not.
    api = {"n_flows": 2, "hidden_dim": 16, "batch_size": 64, "compile": False, "progress": False}
    n2n.train(None, run, resume=True, steps=10, eval_every=5, log_every=5, eval_rows=100, **api)
    assert read_meta(run / CHECKPOINT)["step"] == 10
    with pytest.raises(n2n.N2NError, match=re.escape("drop --lr 0.1 (checkpoint: None), --seed 3 (checkpoint: 0)")):
        n2n.train(None, run, resume=True, steps=20, seed=3, lr=0.1, **api)
    with pytest.raises(n2n.N2NError, match="give one .--shards., or a run folder to --resume"):
        n2n.train(None, resume=True)


@pytest.mark.slow
def test_compiled_loss_matches_eager_and_trains(small_view, tmp_path, n2n_train):
    """The default path on CUDA: torch.compile of the loss (here on CPU's inductor)."""
    from n2n.cinn import ConditionalFlow, FlowConfig
    from n2n.train.trainer import Objective, make_loss

    torch.manual_seed(0)
    flow = ConditionalFlow(4, 6, FlowConfig(n_flows=2, hidden_dim=16))
    x, c = torch.randn(64, 4), torch.randn(64, 6)
    flow(x, c)  # ActNorm init, eagerly
    eager = make_loss(Objective(flow), compile=False, console=None)(x, c)
    compiled = make_loss(Objective(flow), compile=True, console=None)(x, c)
    assert torch.allclose(eager, compiled, atol=1e-5)
    result = n2n_train("--shards", small_view, "--out", tmp_path / "r", "--steps", 30, "--eval-every", 30,
                       *SMALL[:-1], "--compile")
    assert result.exit_code == 0, result.output
    assert "warning: torch.compile failed" not in result.output


def test_the_api_trains_quietly_into_the_folder_it_returns(small_view, tmp_path, capsys):
    run = n2n.train(open_view(small_view), tmp_path / "r", steps=5, eval_every=5, n_flows=2, hidden_dim=16,
                    batch_size=64, compile=False, progress=False)
    assert run == tmp_path / "r" and (run / CHECKPOINT).is_file()
    assert capsys.readouterr().err == ""  # progress=False: no progress, no summary
    meta = read_meta(run / CHECKPOINT)
    assert meta["model"]["n_flows"] == 2 and meta["train"]["steps"] == 5 and meta["train"]["batch_size"] == 64


@pytest.mark.parametrize("heap", [True, False])
def test_the_training_loop_asks_for_the_heap_by_its_largest_activation(small_view, tmp_path, monkeypatch, heap):
    """n2n-train's steps run inside train.heap.heap_for, sized batch x target dims x 4 bytes; --no-heap leaves
    glibc alone."""
    from n2n.train import trainer

    asked = []
    monkeypatch.setattr(trainer, "heap_for", lambda device, largest: asked.append((device.type, largest))
                        or contextlib.nullcontext(False))
    n2n.train(open_view(small_view), tmp_path / "r", steps=2, eval_every=2, n_flows=1, hidden_dim=8,
              batch_size=32, heap=heap, compile=False, progress=False)
    assert asked == ([("cpu", 32 * open_view(small_view).target.dim * 4)] if heap else [])


@pytest.mark.parametrize(("option", "value"), [
    ("steps", 0), ("batch_size", 0), ("lr", 0.0), ("lr", -1), ("seed", -1), ("holdout", 1), ("holdout", -0.1),
    ("target_noise", -0.1), ("eval_every", 0), ("log_every", 0), ("eval_rows", 0), ("steps", 2.5),
    ("n_flows", 0), ("hidden_dim", 0), ("embedding_dim", 0), ("embedder_norm", "group"),
])
def test_the_api_refuses_an_option_out_of_range_before_any_work(option, value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default run folder, runs/<view name>, must not appear either
    with pytest.raises(n2n.N2NError, match=re.escape(f"{option} (--{option.replace('_', '-')}) = {value!r}: must")):
        n2n.train(tmp_path / "no-view", **{option: value})
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_option_lists_the_accepted_ones(small_view, tmp_path):
    with pytest.raises(n2n.N2NError, match="unknown option 'n_flow'; the options are: .*hidden_dim.*n_flows"):
        n2n.train(small_view, tmp_path / "r", n_flow=2)
    assert not (tmp_path / "r").exists()


SMALL_API = {"n_flows": 2, "hidden_dim": 16, "batch_size": 64, "eval_every": 10, "compile": False, "progress": False}


def test_a_project_folder_moved_after_training_resumes_evaluates_and_samples(tmp_path, n2n_train):
    """The run names its view relative to itself (view.json its stores likewise), so shards/ and
    runs/ moved together keep working: resume without naming the view, evaluate, sample."""
    project = tmp_path / "project"
    write_synthetic(project / "shards", "gaussian", n=1000, src_dim=6, dst_dim=4)
    n2n.train(project / "shards/synth-gaussian", project / "runs/r", steps=10, **SMALL_API)
    assert read_meta(project / "runs/r" / CHECKPOINT)["view"] == "../../shards/synth-gaussian"
    moved = Path(shutil.move(project, tmp_path / "elsewhere"))
    assert not project.exists()
    view = open_view(moved / "shards/synth-gaussian")
    assert view.source.path == moved / "shards/synth-gaussian/src" and len(view.join()) == 1000

    run = moved / "runs/r"
    result = n2n_train("--out", run, "--steps", 20, "--eval-every", 10, "--resume", "--no-compile")
    assert result.exit_code == 0, result.output
    meta = read_meta(run / CHECKPOINT)
    assert meta["step"] == 20 and meta["view"] == "../../shards/synth-gaussian"
    scores = n2n.evaluate(run)
    assert scores["heldout_bpd"] == pytest.approx(meta["heldout_bpd"], abs=1e-4)
    samples = load_run(run).sample(torch.zeros(3, 6), generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, 4) and torch.isfinite(samples).all()


def test_a_run_moved_without_its_view_names_both_paths_until_given_the_view(small_view, tmp_path):
    n2n.train(small_view, tmp_path / "a/runs/r", steps=10, **SMALL_API)
    run = Path(shutil.move(tmp_path / "a/runs", tmp_path / "b/c/runs")) / "r"
    recorded = read_meta(run / CHECKPOINT)["view"]
    named = re.escape(f"recorded as {recorded}, and there is no view at {os.path.normpath(run / recorded)}")
    for call in (lambda: n2n.evaluate(run), lambda: n2n.train(None, run, resume=True, steps=20, **SMALL_API)):
        with pytest.raises(CheckpointError, match=named):
            call()
    n2n.train(small_view, run, resume=True, steps=20, **SMALL_API)  # given, it goes on and records the new place
    assert read_meta(run / CHECKPOINT)["view"] == os.path.relpath(small_view, run)
    assert n2n.evaluate(run, checkpoint="last")["step"] == 20
    assert n2n.evaluate(run)["step"] == read_meta(run / CHECKPOINT)["best"]["step"]  # best, found on the new view


def test_a_view_at_a_url_is_recorded_and_resolved_as_given(tmp_path):
    url = "memory://n2n-tests/shards/t2i"
    assert view_record(as_path(url), tmp_path / "run") == url
    assert str(run_view({"view": url}, tmp_path / "run")) == url


def test_a_run_written_before_flow_config_loads_resumes_and_evaluates(small_view, tmp_path):
    """Headers as n2n wrote them before: the flow without ``coupling`` and ``embedder``, the training settings with a
    copy of the model's, the view as an absolute path. Such a run samples, evaluates, and resumes to
    the weights of an uninterrupted run."""
    full, old = tmp_path / "full", tmp_path / "old"
    n2n.train(small_view, full, steps=20, coupling="affine", embedder="mlp", **SMALL_API)
    n2n.train(small_view, old, steps=10, coupling="affine", embedder="mlp", **SMALL_API)
    tensors, meta = load_checkpoint(old / CHECKPOINT)
    model = {k: v for k, v in meta["model"].items() if k not in ("coupling", "embedder")}
    flow_settings = {"n_flows": 2, "hidden_dim": 16, "hidden_depth": 2, "embedding_dim": None, "embedder_depth": 2,
                     "embedder_norm": "layer"}
    header = {**meta, "model": model, "view": str(Path(small_view).resolve()),
              "train": {**meta["train"], "log_every": 10, "model": flow_settings}}
    save_checkpoint(old / CHECKPOINT, tensors, header)

    assert load_run(old).sample(torch.zeros(2, 6)).shape == (2, 4)
    assert n2n.evaluate(old)["heldout_bpd"] == pytest.approx(meta["heldout_bpd"], abs=1e-4)
    n2n.train(None, old, resume=True, steps=20, **SMALL_API)
    a, b = (prefixed(load_checkpoint(run / CHECKPOINT)[0], "model") for run in (full, old))
    assert all(torch.equal(a[k], b[k]) for k in a)
    meta = read_meta(old / CHECKPOINT)
    assert meta["view"] == os.path.relpath(small_view, old) and meta["model"]["coupling"] == "affine"
    assert meta["model"]["embedder"] == "mlp"


# ---------------------------------------------------------------- the linear-Gaussian floor and the loss plot


def test_a_run_plots_its_loss_and_records_the_linear_gaussian_floor(small_view, tmp_path, monkeypatch, n2n_train):
    from PIL import Image

    import n2n.train.trainer as trainer_module
    from n2n.train.heldout import linear_gaussian_bpd

    run, drawn_at = tmp_path / "r", []  # the last metrics line each plot saw

    def spy(metrics, out, lines):
        drawn_at.append(json.loads(metrics.read_text().splitlines()[-1])["step"])
        return plot_loss(metrics, out, lines)

    plot_loss = trainer_module.plot_loss
    monkeypatch.setattr(trainer_module, "plot_loss", spy)
    result = n2n_train("--shards", small_view, "--out", run, "--steps", 40, "--eval-every", 20, *SMALL)
    assert result.exit_code == 0, result.output
    meta = read_meta(run / CHECKPOINT)
    floor = meta["linear_gaussian_bpd"]
    assert floor == pytest.approx(linear_gaussian_bpd(load_pairs(small_view, 0.05), meta["train"]["eval_rows"]))
    assert f"linear-Gaussian floor: {floor:.4f} bits/dim" in result.output
    assert drawn_at[-1] == 40  # the last checkpoint's plot is drawn, after its metrics line
    with Image.open(run / "loss.png") as image:
        assert image.format == "PNG" and image.size == (700, 420)
        assert len(np.unique(np.asarray(image.convert("L")))) > 10  # curves and text, not a blank canvas
    assert (run / "loss.png").stat().st_size > 10_000
    files = sorted(p.name for p in run.iterdir() if not p.name.startswith("events.out.tfevents"))  # TensorBoard's
    assert files == [BEST, CHECKPOINT, "config.yaml", "loss.png", "metrics.jsonl"]  # no temp


def test_importing_the_trainer_does_not_import_matplotlib():
    code = "import sys, n2n.train.trainer; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_linear_gaussian_floor_is_the_nll_of_a_linear_law_and_above_a_bimodal_one(tmp_path):
    """On the linear-Gaussian synthetic law the floor is the law itself: its NLL is the analytic one
    (and the true law's on the same held-out rows); on the bimodal law a linear mean sits between the
    modes, so the floor stays far above the analytic NLL a flow can reach."""
    from n2n.shards.synthetic import conditional_nll
    from n2n.train.heldout import linear_gaussian_bpd

    floors = {}
    for law in ("gaussian", "bimodal"):
        data = load_pairs(write_synthetic(tmp_path / law, law, n=20_000), holdout=0.2)
        floor = linear_gaussian_bpd(data, len(data.held_target))
        analytic = data.truth["nll_nats_per_dim"] / np.log(2)
        c = data.source_norm.inverse(data.held_source[:]).double().numpy()
        x = data.target_norm.inverse(data.held_target[:]).double().numpy()
        _, params = read_law(data.view.path)
        same_rows = conditional_nll(law, params, x, c).mean() / (x.shape[1] * np.log(2))
        floors[law] = floor, analytic, same_rows
    print({law: tuple(round(v, 4) for v in values) for law, values in floors.items()})
    floor, analytic, same_rows = floors["gaussian"]
    assert abs(floor - analytic) < 0.02 and abs(floor - same_rows) < 0.01
    floor, analytic, same_rows = floors["bimodal"]
    assert floor > analytic + 0.5 and floor > same_rows + 0.5


def test_a_resumed_run_keeps_its_recorded_floor(small_view, tmp_path, monkeypatch, n2n_train):
    """Resuming reads the floor from the checkpoint (no refit); a header without one (a run trained
    before the floor), or another --eval-rows (other held-out rows), measures it again."""
    from n2n.cinn.gaussian import LinearGaussian
    from n2n.train.heldout import linear_gaussian_bpd

    run = tmp_path / "r"
    args = ["--shards", small_view, "--out", run, "--eval-every", 10, *SMALL]
    assert n2n_train(*args, "--steps", 10).exit_code == 0
    floor = read_meta(run / CHECKPOINT)["linear_gaussian_bpd"]
    fit, fits = LinearGaussian.fit, []

    def counted(cls, x, y, *rest):
        fits.append(len(x))
        return fit(x, y, *rest)

    monkeypatch.setattr(LinearGaussian, "fit", classmethod(counted))
    result = n2n_train(*args, "--steps", 20, "--resume")
    assert result.exit_code == 0, result.output
    assert fits == [] and read_meta(run / CHECKPOINT)["linear_gaussian_bpd"] == floor
    assert f"linear-Gaussian floor: {floor:.4f}" in result.output

    tensors, meta = load_checkpoint(run / CHECKPOINT)
    save_checkpoint(run / CHECKPOINT, tensors, {k: v for k, v in meta.items() if k != "linear_gaussian_bpd"})
    assert n2n_train(*args, "--steps", 30, "--resume").exit_code == 0
    assert len(fits) == 1 and read_meta(run / CHECKPOINT)["linear_gaussian_bpd"] == pytest.approx(floor)

    assert n2n_train(*args, "--steps", 40, "--resume", "--eval-rows", 50).exit_code == 0
    assert len(fits) == 2
    assert read_meta(run / CHECKPOINT)["linear_gaussian_bpd"] == pytest.approx(
        linear_gaussian_bpd(load_pairs(small_view, 0.05), 50))


@pytest.mark.parametrize("failure", ["plot_loss raises", "matplotlib does not import"])
def test_a_failing_loss_plot_is_one_warning_and_the_run_goes_on(failure, small_view, tmp_path, monkeypatch, n2n_train):
    import n2n.train.trainer as trainer_module

    calls = []
    if failure == "plot_loss raises":
        def broken(*args):
            calls.append(args)
            raise RuntimeError("no backend")

        monkeypatch.setattr(trainer_module, "plot_loss", broken)
    else:
        monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # importing it raises ImportError
    run = tmp_path / "r"
    result = n2n_train("--shards", small_view, "--out", run, "--steps", 40, "--eval-every", 10, *SMALL)
    assert result.exit_code == 0, result.output
    assert result.output.count("warning: could not draw") == 1  # once, though four checkpoints were written
    assert len(calls) == (1 if failure == "plot_loss raises" else 0)
    assert read_meta(run / CHECKPOINT)["step"] == 40 and not (run / "loss.png").exists()
    files = sorted(p.name for p in run.iterdir() if not p.name.startswith("events.out.tfevents"))  # TensorBoard's
    assert files == [BEST, CHECKPOINT, "config.yaml", "metrics.jsonl"]
