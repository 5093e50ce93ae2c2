"""n2n-extract end to end: real MiniLM weights on shapes, exact resume after kill -9, layers, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from extract.cli import main
from shards.store import open_store

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def n2n_extract(*args) -> "click.testing.Result":  # noqa: F821
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def same_store(a: Path, b: Path) -> None:
    sa, sb = open_store(a), open_store(b)
    assert np.array_equal(sa.keys, sb.keys) and np.array_equal(sa.sub, sb.sub)
    assert np.array_equal(sa.latents(), sb.latents())  # bitwise: CPU MiniLM is deterministic


def test_minilm_on_shapes(tmp_path):
    result = n2n_extract("--expert", "minilm", "--data", "shapes", "--limit", 24, "--batch-size", 8,
                         "--num-workers", 1, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    store = open_store(tmp_path / "shapes" / "minilm")
    assert store.dim == 384 and store.complete
    items = np.unique(store.keys)
    assert len(items) == 24 and len(store) % 24 == 0 and len(store) > 24  # several captions per item
    assert set(store.sub.tolist()) == set(range(len(store) // 24))
    norms = np.linalg.norm(store.latents().astype(np.float32), axis=1)
    assert np.allclose(norms, 1, atol=1e-2)  # MiniLM's sentence embeddings are L2-normalised
    meta = store.meta
    assert meta["expert"]["spec"].startswith("minilm") and meta["expert"]["digest"]
    assert meta["dataset"]["name"] == "shapes" and meta["split"] == "train"
    attributes = [json.loads(line) for line in (store.path / "attributes.jsonl").read_text().splitlines()]
    assert [a["key"] for a in attributes] == sorted(items.tolist(), key=store.keys.tolist().index)
    assert {"color", "shape", "size", "position"} <= attributes[0].keys()

    again = n2n_extract("--expert", "minilm", "--data", "shapes", "--limit", 24, "--out", tmp_path)
    assert again.exit_code == 0 and "already complete" in again.output


def test_resume_after_kill_9_equals_an_uninterrupted_run(tmp_path):
    args = ["--expert", "minilm", "--data", "shapes", "--limit", 240, "--batch-size", 8, "--num-workers", 0,
            "--dtype", "float32", "--commit-every", 0]
    assert n2n_extract(*args, "--out", tmp_path / "clean").exit_code == 0
    out = tmp_path / "crashed"
    cmd = [sys.executable, "-c", "from extract.cli import main; main()", *map(str, args), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = out / "shapes" / "minilm" / "meta.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if meta.exists() and json.loads(meta.read_text())["count"] >= 300:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = json.loads(meta.read_text())
    assert not committed["complete"] and 0 < committed["count"], "kill came too late or too early"
    result = n2n_extract(*args, "--out", out)
    assert result.exit_code == 0, result.output
    assert "resuming at item" in result.output
    same_store(tmp_path / "clean" / "shapes" / "minilm", out / "shapes" / "minilm")


def test_several_layers_from_one_pass(tmp_path):
    result = n2n_extract("--expert", "minilm", "--data", "shapes", "--limit", 8, "--layers", "mean,cls",
                         "--num-workers", 0, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    mean, cls = open_store(tmp_path / "shapes" / "minilm@mean"), open_store(tmp_path / "shapes" / "minilm@cls")
    assert np.array_equal(mean.keys, cls.keys)
    assert not np.allclose(mean.latents(), cls.latents())


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--expert", "nosuch", "--data", "shapes"], "minilm"),
        (["--expert", "minilm", "--data", "nosuch"], "shapes"),
        (["--expert", "minilm@nosuch", "--data", "shapes"], "mean"),
        (["--expert", "minilm", "--data", "shapes", "--layers", "nosuch"], "mean"),
        (["--expert", "minilm", "--data", "coco", "--data-root", "/nonexistent/coco"], "/nonexistent/coco"),
    ],
)
def test_bad_input_is_one_clear_line(args, says, tmp_path):
    result = n2n_extract(*args, "--limit", 4, "--num-workers", 0, "--out", tmp_path)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error:") and says in result.output
    assert not any(tmp_path.rglob("meta.json"))


def test_a_store_of_another_origin_is_not_resumed(tmp_path):
    base = ["--expert", "minilm", "--data", "shapes", "--num-workers", 0, "--out", tmp_path]
    assert n2n_extract(*base, "--limit", 4).exit_code == 0
    assert n2n_extract(*base, "--limit", 4, "--split", "val").exit_code == 0  # its own folder
    assert open_store(tmp_path / "shapes-val" / "minilm").meta["split"] == "val"
    refused = n2n_extract(*base, "--limit", 8)
    assert refused.exit_code == 2 and "--overwrite" in refused.output
    assert n2n_extract(*base, "--limit", 8, "--overwrite").exit_code == 0
    assert len(np.unique(open_store(tmp_path / "shapes" / "minilm").keys)) == 8
