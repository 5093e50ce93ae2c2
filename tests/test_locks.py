"""One writer per store and per run: a second is refused at once, in one line naming the first, alive; a
lock whose holder was killed (kill -9) is the next writer's at once, whatever children the holder forked,
so kill-and-rerun still resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import DIM

from n2n.extract.cli import main as n2n_extract
from n2n.shards import create_store, open_store, resume_store, verify_store
from n2n.shards.lock import BusyError, hold, lock_path
from n2n.train.cli import main as n2n_train

ARGS = ["--expert", "minilm", "--data", "shapes", "--batch-size", "8", "--num-workers", "0", "--dtype", "float32"]
HOLDER = ("import sys, time; from n2n.shards.lock import hold; hold(sys.argv[1]); print('held', flush=True); "
          "time.sleep(120)")


def holder(path: Path) -> subprocess.Popen:
    """Another process holding the lock of ``path`` until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


# A holder that forks a child after taking the lock (as a DataLoader's workers are forked), which outlives it.
FORKING_HOLDER = ("import os, sys, time; from n2n.shards.lock import hold; hold(sys.argv[1]); child = os.fork()\n"
                  "if child == 0: time.sleep(120); os._exit(0)\n"
                  "print(child, flush=True); time.sleep(120)")


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_child_forked_by_the_holder_keeps_no_lock(tmp_path):
    """kill -9 of the holder frees the lock at once, though the child it forked after taking it lives on."""
    path = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "-c", FORKING_HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    try:
        with pytest.raises(BusyError, match=f"pid {proc.pid}"):
            hold(path)
        kill(proc)
        assert alive(child)  # still there, with the lock file's descriptor it inherited
        with hold(path):  # at once: no wait for the child
            pass
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_holder_is_named_only_while_it_lives(tmp_path):
    """A record naming a process that has ended (a new holder has the lock but has not yet written its own
    record) is not passed off as the holder: the refusal says the recorded process has ended."""
    path = tmp_path / "s"
    first = holder(path)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(ended.stdout)
    record = json.loads(lock_path(path).read_text()) | {"pid": dead}
    lock_path(path).write_text(json.dumps(record))  # this process holds no lock on it: closing drops nothing
    try:
        with pytest.raises(BusyError) as refused:
            hold(path)
        message = str(refused.value)
        assert f"pid {dead}, has ended" in message and f"pid {dead}, since" not in message, message
        assert lock_path(path).exists()
    finally:
        kill(first)


def test_a_second_extraction_into_a_store_is_refused_naming_the_first(tmp_path, invoke):
    store = tmp_path / "shapes" / "minilm"
    first = holder(store)
    try:
        result = invoke(n2n_extract, *ARGS, "--limit", 8, "--out", tmp_path)
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
        assert f"pid {first.pid}" in result.output and "being written by another process" in result.output
        assert not store.exists()  # nothing written
    finally:
        kill(first)
    assert invoke(n2n_extract, *ARGS, "--limit", 8, "--out", tmp_path).exit_code == 0  # the dead holder's lock is free
    assert open_store(store).complete


def test_two_real_extractions_race_no_more(tmp_path):
    """The first writes, paused mid-way (SIGSTOP, so it surely still holds the store); the second, the same
    command, stops at once naming it; the first, let go on, ends with a whole store."""
    cmd = [sys.executable, "-m", "n2n.extract", *ARGS, "--limit", "160", "--commit-every", "0", "--out", str(tmp_path)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    meta = tmp_path / "shapes" / "minilm" / "meta.json"
    deadline = time.time() + 120
    while first.poll() is None and time.time() < deadline:
        if meta.exists() and json.loads(meta.read_text())["count"] >= 40:
            break
        time.sleep(0.02)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        assert not json.loads(meta.read_text())["complete"], "the first ended before it could be paused"
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    first_output, _ = first.communicate(timeout=300)
    assert first.returncode == 0, first_output
    assert second.returncode == 2 and f"pid {first.pid}" in second.stderr, second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    store = open_store(meta.parent)
    assert store.complete and len(store) == 800 and verify_store(meta.parent) == []


@pytest.fixture(scope="module")
def view(tmp_path_factory) -> Path:
    from n2n.shards.synthetic import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("shards"), "gaussian", n=600, src_dim=5, dst_dim=4)


def test_a_second_run_in_one_folder_is_refused_and_a_killed_ones_lock_is_free(view, tmp_path, invoke):
    run = tmp_path / "runs" / "x"
    args = ["--shards", view, "--out", run, "--steps", 10, "--n-flows", 2, "--hidden-dim", 8, "--device", "cpu",
            "--no-compile"]
    first = holder(run)
    try:
        result = invoke(n2n_train, *args)
        assert result.exit_code == 2 and f"pid {first.pid}" in result.output and "being trained" in result.output
        assert not (run / "checkpoint.safetensors").exists()
    finally:
        kill(first)
    assert invoke(n2n_train, *args).exit_code == 0


def test_a_writer_given_up_in_this_process_is_taken_over(tmp_path, rows):
    """A writer left unclosed after an error (a notebook cell that failed) does not lock its own process out."""
    path = tmp_path / "s"
    abandoned = create_store(path, dim=DIM)
    abandoned.append(*rows(5))
    abandoned.flush()
    with resume_store(path) as writer:
        writer.append(*rows(3, seed=1))
    assert len(open_store(path)) == 8
    abandoned.release()  # late: it no longer holds anything, and releases nothing of the next writer's
    with hold(path):
        pass


def test_a_lock_held_elsewhere_is_named(tmp_path):
    path = tmp_path / "s"
    first = holder(path)
    try:
        with pytest.raises(BusyError, match=rf"{path} is being written by another process \(host .*pid {first.pid}"):
            create_store(path, dim=DIM)
        assert not path.exists()
    finally:
        kill(first)
    with create_store(path, dim=DIM) as writer:
        writer.append(["a"], [0], np.zeros((1, DIM), np.float32))
