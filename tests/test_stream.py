"""Views streamed from their stores: random row reads, the window plan, statistics, exact resume."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from n2n.shards import StoreError, create_store, open_store
from n2n.shards.view import create_view
from n2n.train.checkpoint import CHECKPOINT, load_checkpoint, prefixed
from n2n.train.data import load_pairs
from n2n.train.stream import stream_pairs

PER_ITEM = 3


def write_view(root: Path, items: int = 3000, fmt: str = "zarr", source_dim: int = 384) -> Path:
    """Captions (PER_ITEM per item, float16, 384 dims: 4096-row zarr chunks) onto items, paired by key."""
    rng = np.random.default_rng(0)
    keys = np.array([f"item{i:05d}" for i in range(items)])
    with create_store(root / "text", dim=source_dim, dtype="float16", format=fmt) as writer:
        writer.append(np.repeat(keys, PER_ITEM), np.tile(np.arange(PER_ITEM), items),
                      rng.standard_normal((items * PER_ITEM, source_dim)) + 1.0)
    with create_store(root / "image", dim=4, dtype="float32", format=fmt) as writer:
        writer.append(keys, np.zeros(items, np.int64), rng.standard_normal((items, 4)) * 2.0)
    return create_view(root / "view", root / "text", root / "image")


@pytest.fixture(scope="module")
def view(tmp_path_factory) -> Path:
    return write_view(tmp_path_factory.mktemp("stream"))


@pytest.mark.parametrize("fmt", ["zarr", "wds", "h5"])
def test_take_reads_any_rows(tmp_path, fmt):
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((40_000, 8)).astype(np.float32)
    with create_store(tmp_path / "s", dim=8, dtype="float32", format=fmt) as writer:
        writer.append([str(i) for i in range(40_000)], np.zeros(40_000, np.int64), latents)
    store = open_store(tmp_path / "s")
    for rows in (rng.integers(0, 40_000, 700), np.array([39_999, 0, 0, 16_384, 16_383]), np.arange(0)):
        assert np.array_equal(store.take(rows), latents[rows])
    assert len(store.bounds()) == (4 if fmt == "wds" else 2)  # three tars; one chunk of 40k x 8 float32
    with pytest.raises(StoreError, match="40000 rows"):
        store.take(np.array([40_000]))


def test_an_epoch_draws_every_pair_once_in_shuffled_windows(view):
    data = stream_pairs(view, 0.05, None, device=torch.device("cpu"), batch_size=64, seed=0, eval_rows=100,
                        window_pairs=4096)
    stream = data.stream
    try:
        epochs = [stream.plan(0), stream.plan(1)]
        assert len(open_store(view.parent / "text").bounds()) - 1 == 3  # 9000 rows in chunks of 4096
        for plan in epochs:
            pairs = np.concatenate(plan)
            assert np.array_equal(np.sort(pairs), np.arange(len(stream)))  # each pair in one window
        orders = {tuple(int(w[0]) for w in stream.plan(epoch)) for epoch in range(8)}
        assert len(orders) > 1  # the files are drawn in a new order each epoch (3 files: 6 orders)
        # The batches of one epoch: each pair at most once; all but each window's tail of < a batch.
        resident = load_pairs(view, 0.05)
        drawn = []
        for _ in range(sum(len(w) // 64 for w in epochs[0])):
            x, c = data.batch(64, torch.Generator())
            drawn.append(torch.cat([x, c], 1))
        drawn = torch.cat(drawn)
        every = torch.cat([resident.target[:], resident.source[:]], 1)
        match = torch.cdist(drawn, every).argmin(1)
        assert torch.allclose(drawn, every[match], atol=1e-4)
        assert len(set(match.tolist())) == len(drawn)  # none twice
        assert len(drawn) > len(every) - 64 * len(epochs[0])
    finally:
        data.close()


def test_stream_statistics_and_heldout_rows_equal_the_resident_ones(view):
    resident = load_pairs(view, 0.05)
    streamed = stream_pairs(view, 0.05, None, device=torch.device("cpu"), batch_size=64, seed=0, eval_rows=10**6)
    try:
        for a, b in ((resident.source_norm, streamed.source_norm), (resident.target_norm, streamed.target_norm)):
            assert torch.allclose(a.mean, b.mean, atol=1e-5) and torch.allclose(a.std, b.std, atol=1e-5)
        assert torch.allclose(resident.held_target[:], streamed.held_target[:], atol=1e-6)
        assert torch.allclose(resident.held_source[:], streamed.held_source[:], atol=1e-5)
        assert streamed.train_pairs == resident.train_pairs and streamed.dims == resident.dims == (384, 4)
    finally:
        streamed.close()


def test_resident_and_streamed_pairs_serve_the_trainer_alike(view):
    """Both are ``Pairs``: the same held-out NLL of one flow, batches of one shape, and close()."""
    from n2n.cinn import ConditionalFlow, FlowConfig
    from n2n.train.heldout import heldout_bpd

    resident = load_pairs(view, 0.05).to(torch.device("cpu"))
    streamed = stream_pairs(view, 0.05, (resident.source_norm, resident.target_norm), device=torch.device("cpu"),
                            batch_size=64, seed=0, eval_rows=200)
    torch.manual_seed(0)
    flow = ConditionalFlow(4, 384, FlowConfig(n_flows=2, hidden_dim=16))
    try:
        for data in (resident, streamed):
            x, c = data.batch(64, torch.Generator().manual_seed(0), noise=0.1)
            assert x.shape == (64, 4) and c.shape == (64, 384)
        flow(x, c)  # ActNorm init
        assert heldout_bpd(flow, resident, 200) == pytest.approx(heldout_bpd(flow, streamed, 200), abs=1e-5)
    finally:
        resident.close()
        streamed.close()
    assert not streamed.stream.thread.is_alive()


SMALL = ["--n-flows", "2", "--hidden-dim", "16", "--batch-size", "256", "--no-compile", "--eval-every", "20"]


def test_a_streamed_run_resumes_exactly(view, tmp_path, n2n_train):
    """Resume mid-epoch, mid-window: the stream skips the batches drawn before, so the weights equal
    those of an uninterrupted streamed run (8000+ pairs in windows of 3 files: several windows)."""
    full, part = tmp_path / "full", tmp_path / "part"
    assert n2n_train("--shards", view, "--out", full, "--steps", 60, "--stream", *SMALL).exit_code == 0
    assert n2n_train("--shards", view, "--out", part, "--steps", 20, "--stream", *SMALL).exit_code == 0
    result = n2n_train("--shards", view, "--out", part, "--steps", 60, "--stream", "--resume", *SMALL)
    assert result.exit_code == 0, result.output
    a, b = (prefixed(load_checkpoint(run / CHECKPOINT)[0], "model") for run in (full, part))
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    train = [line["train_bpd"] for line in lines if "train_bpd" in line]  # (step 0: the start's held-out NLL only)
    assert train[-1] < train[0]  # it learns from the streamed batches


def test_nan_in_a_streamed_store_is_refused_naming_the_row(tmp_path, n2n_train):
    keys = np.array([f"k{i}" for i in range(300)])
    latents = np.random.default_rng(0).standard_normal((300, 4)).astype(np.float32)
    latents[123, 2] = np.nan
    with create_store(tmp_path / "a", dim=4, dtype="float32") as writer:
        writer.append(keys, np.zeros(300, np.int64), latents)
    with create_store(tmp_path / "b", dim=4, dtype="float32") as writer:
        writer.append(keys, np.zeros(300, np.int64), np.ones((300, 4), np.float32))
    view = create_view(tmp_path / "v", tmp_path / "a", tmp_path / "b")
    result = n2n_train("--shards", view, "--out", tmp_path / "r", "--steps", 5, "--stream", *SMALL[:-2])
    assert result.exit_code == 2 and "row 123" in result.output and "NaN" in result.output
    assert not (tmp_path / "r" / CHECKPOINT).exists()


def test_a_window_smaller_than_a_batch_is_passed_over(view):
    """Windows are whole files: with batches of 1024, an epoch whose last file (808 rows) ends alone
    gives a window of no batch, and the stream goes on to the next epoch instead of drawing an empty one."""
    kwargs = {"device": torch.device("cpu"), "batch_size": 1024, "seed": 0, "eval_rows": 10, "window_pairs": 1024}
    probe = stream_pairs(view, 0.05, None, **kwargs)
    probe.close()
    plans = [probe.stream.plan(epoch) for epoch in range(20)]
    epoch = next(e for e, plan in enumerate(plans) if len(plan[-1]) < 1024)  # the small file last
    before = sum(len(w) // 1024 for plan in plans[:epoch] for w in plan)
    data = stream_pairs(view, 0.05, (probe.source_norm, probe.target_norm), **kwargs, start_batch=before)
    try:
        for _ in range(2 * sum(len(w) // 1024 for w in plans[epoch])):  # through that epoch and the next
            x, c = data.batch(1024, torch.Generator())
            assert x.shape == (1024, 4) and c.shape == (1024, 384)
    finally:
        data.close()


def test_a_view_that_would_not_fit_is_streamed(view, tmp_path, monkeypatch, n2n_train):
    import n2n.train.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "fits_in_memory", lambda view, device: False)
    result = n2n_train("--shards", view, "--out", tmp_path / "r", "--steps", 5, *SMALL[:-2])
    assert result.exit_code == 0, result.output
    assert "would not fit" in " ".join(result.output.split()) and "streaming them" in " ".join(result.output.split())
