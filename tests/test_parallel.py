"""Distributed extraction on CPU (gloo, 2 processes): parts, their commit, and a rank killed mid-way."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import ACROSS_THREADS

from n2n.shards import StoreError, create_store, open_store, verify_store
from n2n.shards.cli import main as shards_main
from n2n.shards.parts import commit_parts, part_meta, part_path, part_ranges, parts_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ARGS = ["--expert", "minilm", "--data", "shapes", "--batch-size", "8", "--num-workers", "0", "--dtype", "float32"]


def launch(*args, threads: int | None = None, **env: str) -> subprocess.Popen:
    """n2n-extract in a fresh process, as a user runs it (--nproc relaunches it under torchrun), with
    ``threads`` torch threads per process if given, and MKL in the mode the command itself picks unless
    ``env`` names one (MKL_CBWR)."""
    env = {**{k: v for k, v in os.environ.items() if k != "MKL_CBWR"}, **env,
           **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    cmd = [sys.executable, "-m", "n2n.extract", *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def finished(proc: subprocess.Popen) -> str:
    """The output of `proc`, which must end well."""
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    return output


def same_files(a: Path, b: Path) -> None:
    """Two stores hold the same meta and side files."""
    assert open_store(a).meta == open_store(b).meta
    for name in ("attributes.jsonl", "errors.jsonl"):
        assert (a / name).exists() == (b / name).exists()
        if (a / name).exists():
            assert (a / name).read_text() == (b / name).read_text()


@pytest.fixture
def same_store(same_store):
    """Here ``same_store(a, b, tolerance=0.0)`` is stricter than conftest's, which it overrides and calls:
    the same rows, and the same meta and side files."""
    same_rows = same_store

    def same(a: Path, b: Path, tolerance: float = 0.0) -> None:
        same_rows(a, b, tolerance)
        same_files(a, b)

    return same


@pytest.mark.parametrize(("items", "batch", "world"), [(50, 8, 2), (10, 8, 4), (64, 8, 3), (1, 4, 2), (0, 4, 2)])
def test_part_ranges_tile_the_items_in_whole_batches(items, batch, world):
    ranges = part_ranges(items, batch, world)
    assert len(ranges) == world and ranges[0][0] == 0 and ranges[-1][1] == items
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    assert all(lo % batch == 0 and lo <= hi for lo, hi in ranges)
    sizes = [-(-(hi - lo) // batch) for lo, hi in ranges]  # whole batches per rank differ by at most one
    assert max(sizes) - min(sizes) <= 1


def write_parts(store: Path, rows_per_item: int = 3, ranges=((0, 4), (4, 8), (8, 10))) -> tuple[np.ndarray, ...]:
    """Complete parts of `store` holding items 0..9, and the rows a single store would hold."""
    rng = np.random.default_rng(0)
    keys, subs, latents = [], [], []
    for lo, hi in ranges:
        k = np.repeat([f"item{i:03d}" for i in range(lo, hi)], rows_per_item)
        s = np.tile(np.arange(rows_per_item), hi - lo)
        x = rng.standard_normal((len(k), 6)).astype(np.float32)
        meta = part_meta({"expert": {"spec": "toy"}, "dataset": {"name": "toy"}, "split": "train"}, lo, hi, 10)
        with create_store(part_path(store, lo, hi), dim=6, dtype="float32", meta=meta) as writer:
            writer.append(k, s, x)
        (part_path(store, lo, hi) / "errors.jsonl").write_text(json.dumps({"key": f"bad{lo}", "reason": "x"}) + "\n")
        keys.append(k), subs.append(s), latents.append(x)
    return np.concatenate(keys), np.concatenate(subs), np.concatenate(latents)


def test_commit_joins_the_parts_in_item_order(tmp_path):
    store = tmp_path / "toy"
    keys, subs, latents = write_parts(store)
    commit_parts(store)
    committed = open_store(store)
    assert np.array_equal(committed.keys, keys) and np.array_equal(committed.sub, subs)
    assert np.array_equal(committed.latents(), latents) and verify_store(store) == []
    assert "part" not in committed.meta and committed.meta["dataset"] == {"name": "toy"}
    assert [json.loads(line)["key"] for line in (store / "errors.jsonl").read_text().splitlines()] == [
        "bad0", "bad4", "bad8"]
    assert not parts_dir(store).exists()
    commit_parts(store)  # again: a no-op on a complete store
    assert np.array_equal(open_store(store).latents(), latents)


def test_a_commit_cut_off_is_redone_from_the_parts(tmp_path):
    store = tmp_path / "toy"
    _, _, latents = write_parts(store)
    writer = create_store(store, dim=6, dtype="float32")  # a half commit: rows committed, never closed
    writer.append(["junk"], [0], np.zeros((1, 6), np.float32))
    writer.flush()
    assert not open_store(store, require_complete=False).complete
    result = CliRunner().invoke(shards_main, ["commit", str(store)])
    assert result.exit_code == 0, result.output
    assert "30 rows" in result.output and np.array_equal(open_store(store).latents(), latents)


@pytest.mark.parametrize(
    ("ranges", "message"),
    [(((0, 4), (8, 10)), "without gaps"), (((0, 4), (2, 10)), "without gaps"), (((0, 8),), "without gaps")],
)
def test_commit_refuses_parts_that_do_not_tile_the_items(tmp_path, ranges, message):
    store = tmp_path / "toy"
    write_parts(store, ranges=ranges)
    with pytest.raises(StoreError, match=message):
        commit_parts(store)
    assert not store.exists() and parts_dir(store).exists()  # nothing written, nothing lost


def test_commit_refuses_an_unfinished_part(tmp_path):
    store = tmp_path / "toy"
    write_parts(store)
    meta_file = part_path(store, 4, 8) / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "complete": False}))
    with pytest.raises(StoreError, match="items-0000000004-0000000008.*rerun the same extraction"):
        commit_parts(store)
    assert not store.exists()


@pytest.mark.parametrize(("one", "each"), [(2, 1), pytest.param(1, 2, marks=pytest.mark.slow)],
                         ids=["one-at-2-threads-ranks-at-1", "one-at-1-thread-ranks-at-2"])
def test_two_processes_write_the_store_one_process_writes(tmp_path, n2n_extract, across_threads, one, each):
    """The thread counts differ between the runs (forced, so every machine runs both ways): the latents
    still match, bit for bit on MKL (the commands' reproducible mode; the last batch, of 10 captions, is
    a size whose bits MKL's default mode changes with the thread count on an Intel Xeon)."""
    finished(launch(*ARGS, "--limit", 50, "--out", tmp_path / "one", threads=one))
    finished(launch(*ARGS, "--limit", 50, "--out", tmp_path / "two", "--nproc", 2, threads=each))
    across_threads(tmp_path / "one/shapes/minilm", tmp_path / "two/shapes/minilm")
    same_files(tmp_path / "one/shapes/minilm", tmp_path / "two/shapes/minilm")
    assert not parts_dir(tmp_path / "two/shapes/minilm").exists()
    # A one-process rerun finds the store complete; parts of another process count are refused.
    assert "already complete" in n2n_extract(*ARGS, "--limit", 50, "--out", tmp_path / "two").output


def test_with_mkl_in_its_default_mode_process_counts_agree_to_the_stated_tolerance(tmp_path, same_store):
    """MKL_CBWR set by the user (empty: MKL's default) is kept; the latents then agree to within the
    tolerance the docs state for torch builds without the reproducible mode."""
    finished(launch(*ARGS, "--limit", 50, "--out", tmp_path / "one", threads=2, MKL_CBWR=""))
    finished(launch(*ARGS, "--limit", 50, "--out", tmp_path / "two", "--nproc", 2, threads=1, MKL_CBWR=""))
    same_store(tmp_path / "one/shapes/minilm", tmp_path / "two/shapes/minilm", ACROSS_THREADS)


def test_ranks_share_the_cores_unless_told(monkeypatch):
    """--nproc N gives each process cores // N torch threads (torchrun alone would give one), unless
    OMP_NUM_THREADS is set; the command itself is torchrun's to run (stopped here)."""
    import torch.distributed.run as torchrun

    import n2n.parallel as parallel

    seen = []
    monkeypatch.setattr(torchrun, "run", lambda args: seen.append(os.environ["OMP_NUM_THREADS"]))
    monkeypatch.setattr(parallel, "usable_cores", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert parallel.relaunch(4, "n2n.extract", ["--nproc", "4"]) == 0
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert parallel.relaunch(4, "n2n.extract", ["--nproc", "4"]) == 0
    monkeypatch.setattr(parallel, "usable_cores", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert parallel.relaunch(4, "n2n.extract", ["--nproc", "4"]) == 0
    assert seen == ["4", "3", "1"]


def test_parts_of_another_process_count_are_refused(tmp_path, n2n_extract):
    store = tmp_path / "shapes" / "minilm"
    part_path(store, 0, 24).mkdir(parents=True)
    result = n2n_extract(*ARGS, "--limit", 50, "--out", tmp_path)
    assert result.exit_code == 2
    assert "items [(0, 24)]" in result.output and "process count" in result.output
    assert not (store / "meta.json").exists()


def rank_pid(rank: int, marker: str) -> int | None:
    """The pid of the torchrun worker with RANK=rank whose command line holds `marker` (Linux /proc)."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if proc.name.isdigit() and marker in cmdline and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


@pytest.mark.slow
def test_a_rank_killed_mid_way_is_finished_by_the_same_command(tmp_path, n2n_extract, across_threads):
    """kill -9 one rank while it writes its part: torchrun stops the job; the same command, run
    again, resumes each part where its commit ended and commits a store equal to a clean run."""
    common = [*ARGS, "--limit", 240, "--commit-every", 0]
    assert n2n_extract(*common, "--out", tmp_path / "clean").exit_code == 0
    out = tmp_path / "crashed"
    proc = launch(*common, "--out", out, "--nproc", 2)
    part = part_path(out / "shapes/minilm", 120, 240) / "meta.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if part.exists() and json.loads(part.read_text())["count"] >= 100:
            break
        time.sleep(0.05)
    pid = rank_pid(1, str(out))
    assert pid is not None, "rank 1 not found"
    os.kill(pid, signal.SIGKILL)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, output
    committed = json.loads(part.read_text())
    assert not committed["complete"] and committed["count"] >= 100, "the kill came too late"
    assert not (out / "shapes/minilm/meta.json").exists()  # no store posing as complete

    again = launch(*common, "--out", out, "--nproc", 2)
    output, _ = again.communicate(timeout=300)
    assert again.returncode == 0, output
    assert "resuming at item" in output
    across_threads(tmp_path / "clean/shapes/minilm", out / "shapes/minilm")  # one process vs two
    same_files(tmp_path / "clean/shapes/minilm", out / "shapes/minilm")
    assert verify_store(out / "shapes/minilm") == []


# ---------------------------------------------------------------- distributed training (DDP)

TRAIN = ["--n-flows", "2", "--hidden-dim", "16", "--batch-size", "64", "--no-compile", "--eval-every", "10",
         "--device", "cpu"]


@pytest.fixture(scope="module")
def gaussian_view(tmp_path_factory) -> Path:
    from n2n.shards.synthetic import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("shards"), "gaussian", n=3000, src_dim=6, dst_dim=4)


def n2n_train(*args, nproc: int = 1) -> subprocess.CompletedProcess:
    """n2n-train in a fresh process; --nproc 2 relaunches it under torchrun (gloo on CPU)."""
    cmd = [sys.executable, "-m", "n2n.train", *map(str, args), "--nproc", str(nproc)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def curve(run: Path) -> np.ndarray:
    lines = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return np.array([line["train_bpd"] for line in lines if "train_bpd" in line])  # step 0: held-out only


def weights(run: Path) -> dict:
    from n2n.train.checkpoint import CHECKPOINT, load_checkpoint, prefixed

    return prefixed(load_checkpoint(run / CHECKPOINT)[0], "model")


@pytest.mark.parametrize("stream", [[], ["--stream"]], ids=["resident", "streamed"])
def test_two_processes_train_the_one_process_run_and_resume_with_one(gaussian_view, tmp_path, stream):
    """DDP with 2 gloo processes on halves of each global batch follows the one-process run with the
    same --batch-size (to float rounding: gradients are summed in another order); a run begun with two
    processes resumes with one and ends where the one-process run ends."""
    one, two = tmp_path / "one", tmp_path / "two"
    done = n2n_train("--shards", gaussian_view, "--out", one, "--steps", 60, *TRAIN, *stream)
    assert done.returncode == 0, done.stderr
    done = n2n_train("--shards", gaussian_view, "--out", two, "--steps", 40, *TRAIN, *stream, nproc=2)
    assert done.returncode == 0, done.stderr
    assert "2 processes of 32" in " ".join(done.stderr.split())
    assert len(list(two.glob("events.out.tfevents*"))) == 1  # rank 0 alone logs
    done = n2n_train("--shards", gaussian_view, "--out", two, "--steps", 60, *TRAIN, *stream, "--resume")
    assert done.returncode == 0, done.stderr
    a, b = curve(one), curve(two)
    assert len(a) == len(b) == 6  # every 10 steps (log and checkpoint)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-4)
    wa, wb = weights(one), weights(two)
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-4) for k in wa)


def test_two_processes_train_the_continuous_translators_one_process_run(gaussian_view, tmp_path):
    """The continuous translator's random inputs (noise, times, dropped conditions) are drawn for the
    global batch and sliced per rank, as the pairs are: two processes follow the one-process run."""
    args = ["--translator", "continuous", "--velocity-width", "32", "--velocity-blocks", "1", "--cond-dropout", "0.2",
            "--steps", 30, *TRAIN]
    one, two = tmp_path / "one", tmp_path / "two"
    assert (done := n2n_train("--shards", gaussian_view, "--out", one, *args)).returncode == 0, done.stderr
    assert (done := n2n_train("--shards", gaussian_view, "--out", two, *args, nproc=2)).returncode == 0, done.stderr
    losses = [np.array([line["train_loss"] for line in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                        if "train_loss" in line])
              for run in (one, two)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=0, atol=1e-4)
    wa, wb = weights(one), weights(two)
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-4) for k in wa)


def test_the_global_batch_must_split_over_the_processes(gaussian_view, tmp_path):
    done = n2n_train("--shards", gaussian_view, "--out", tmp_path / "r", "--steps", 5, *TRAIN,
                     "--batch-size", "63", nproc=2)  # the last --batch-size counts
    assert done.returncode != 0
    said = " ".join(done.stderr.split())
    assert "--batch-size 63" in said and "multiple of the process count" in said
    assert not (tmp_path / "r" / "checkpoint.safetensors").exists()


def test_a_commit_cut_off_is_finished_by_a_rerun_with_any_process_count(tmp_path, monkeypatch, n2n_extract, same_store):
    """Both ranks' parts complete, rank 0 killed while committing (an incomplete store beside the parts):
    the command run again, here by one process, commits the parts instead of extracting anything."""
    import torch
    from rich.console import Console

    import n2n.extract.run as run
    from n2n.parallel import Ranks

    assert n2n_extract(*ARGS, "--limit", 50, "--out", tmp_path / "clean").exit_code == 0
    cfg = run.ExtractConfig(expert="minilm", data="shapes", limit=50, batch_size=8, num_workers=0, dtype="float32",
                            out=tmp_path / "cut", device="cpu")
    job, quiet, cpu = run.plan(cfg), Console(quiet=True), torch.device("cpu")
    with monkeypatch.context() as m:
        m.setattr(Ranks, "barrier", lambda self: None)  # the two ranks run one after the other here
        run.extract_parts(job, Ranks(1, 2, 0), cpu, quiet)

        def cut_off(store):  # the commit's own first step, then a kill
            writer = create_store(store, dim=384, dtype="float32", meta=job.metas[job.layers[0]])
            writer.append(["x"], [0], np.zeros((1, 384), np.float32))
            writer.flush()
            raise RuntimeError("killed while committing")

        m.setattr(run, "commit_parts", cut_off)
        with pytest.raises(RuntimeError, match="killed while committing"):
            run.extract_parts(job, Ranks(0, 2, 0), cpu, quiet)
    store = tmp_path / "cut/shapes/minilm"
    assert not open_store(store, require_complete=False).complete and parts_dir(store).exists()
    result = n2n_extract(*ARGS, "--limit", 50, "--out", tmp_path / "cut")
    assert result.exit_code == 0, result.output
    assert "committed the finished parts" in " ".join(result.output.split())
    same_store(tmp_path / "clean/shapes/minilm", store)
    assert not parts_dir(store).exists()
