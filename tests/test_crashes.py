"""kill -9 at random moments of a real extraction, then the same command again: nothing lost, nothing twice.

Each trial starts n2n-extract (MiniLM on shapes, its default loader workers, which are forked
processes, and a commit after every batch so that a kill can land between any two commits), kills it
with SIGKILL after a random delay, reruns the command at once (no pause: the workers the kill left
behind may still be alive) to the end and compares the store with one clean run: same keys, subs and
latents bit for bit, no duplicate (key, sub), and ``n2n-shards verify`` finds nothing. Kills land
before the store exists, while it is written, and after it is complete; all must end the same way.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from n2n.shards import verify_store

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ARGS = ["--expert", "minilm", "--data", "shapes", "--limit", "160", "--batch-size", "8", "--dtype", "float32",
        "--commit-every", "0", "--device", "cpu"]


def extraction(out) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "n2n.extract", *ARGS, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def watched_run(out) -> tuple[float, float]:
    """A clean extraction in a process, watched: (seconds until its store existed, seconds until it
    ended). Kills are drawn inside that window, so they land mid-write on a fast or a slow machine."""
    start, proc, created = time.perf_counter(), extraction(out), None
    while proc.poll() is None:
        if created is None and (out / "shapes" / "minilm" / "meta.json").exists():
            created = time.perf_counter() - start
        time.sleep(0.02)
    assert proc.returncode == 0
    ended = time.perf_counter() - start
    return created or ended, ended


def kill_at_random(out, delay: float) -> str:
    """Start the extraction in a process, SIGKILL it after ``delay`` s; what the kill interrupted."""
    proc = extraction(out)
    time.sleep(delay)
    finished = proc.poll() is not None
    if not finished:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    meta = out / "shapes" / "minilm" / "meta.json"
    if finished:
        return "after the end"
    if not meta.exists():
        return "before the store existed"
    return "after completion" if json.loads(meta.read_text())["complete"] else "mid-way"


@pytest.fixture
def run_trials(n2n_extract, same_store):
    """``run_trials(tmp_path, trials, seed)``: one clean extraction, then `trials` killed at random moments
    and rerun to the end, each compared with the clean one; where the kills landed."""

    def extract_in_process(out) -> None:
        result = n2n_extract(*ARGS, "--out", out)
        assert result.exit_code == 0, result.output

    def run(tmp_path, trials: int, seed: int) -> Counter:
        created, ended = watched_run(tmp_path / "clean")
        rng = random.Random(seed)
        moments: Counter = Counter()
        for trial in range(trials):
            out = tmp_path / f"trial{trial}"
            moments[kill_at_random(out, rng.uniform(0.9 * created, 1.05 * ended))] += 1
            extract_in_process(out)  # the same command, to the end
            same_store(tmp_path / "clean" / "shapes" / "minilm", out / "shapes" / "minilm")  # bit for bit
            assert verify_store(out / "shapes" / "minilm") == [], trial  # no NaN, no duplicate (key, sub), readable
        print(f"{trials} kill -9 trials: {dict(moments)}; rows lost or doubled: 0")
        return moments

    return run


def test_kill_9_at_random_moments_two_trials(tmp_path, run_trials):
    assert sum(run_trials(tmp_path, 2, seed=1).values()) == 2


@pytest.mark.slow
def test_kill_9_at_random_moments_ten_trials(tmp_path, run_trials):
    moments = run_trials(tmp_path, 10, seed=0)
    assert moments["mid-way"] >= 3, moments  # most kills must land while rows are being written
