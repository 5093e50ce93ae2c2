"""Stores at fsspec URLs: memory:// in one process, and S3 through a local moto server, kill -9 included."""

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from n2n.extract.cli import main as extract_main
from n2n.shards import StoreError, as_path, create_store, open_store, remove_tree, resume_store, verify_store
from n2n.shards.cli import main as shards_main
from n2n.train.cli import main as train_main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
EXTRACT = ["--expert", "minilm", "--data", "shapes", "--batch-size", "8", "--num-workers", "0", "--dtype", "float32"]


def invoke(command, *args):
    result = CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def memory_root():
    root = as_path("memory://n2n-tests")
    remove_tree(root)
    yield root
    remove_tree(root)


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_a_store_in_memory_resumes_like_a_local_one(memory_root, fmt):
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((20_000, 16)).astype(np.float32)
    keys = np.array([f"k{i}" for i in range(20_000)])
    writer = create_store(memory_root / fmt, dim=16, dtype="float32", format=fmt)
    writer.append(keys[:17_000], np.zeros(17_000, np.int64), latents[:17_000])
    writer.flush()  # and the process "dies": the writer is dropped unclosed
    with pytest.raises(StoreError, match="incomplete"):
        open_store(memory_root / fmt)
    with resume_store(str(memory_root / fmt)) as again:
        again.append(keys[17_000:], np.zeros(3_000, np.int64), latents[17_000:])
    store = open_store(f"memory://n2n-tests/{fmt}")
    assert np.array_equal(store.latents(), latents) and np.array_equal(store.keys, keys)
    assert verify_store(store.path) == [] and store.identity()["path"] == f"memory://n2n-tests/{fmt}"


def test_hdf5_at_a_url_is_refused(memory_root):
    with pytest.raises(StoreError, match="HDF5 stores are local files"):
        create_store(memory_root / "h", dim=4, format="h5")


def test_extract_pair_verify_and_train_in_memory(memory_root, tmp_path, same_store):
    """The whole path with every store and view at memory:// (only the run folder is local)."""
    from n2n.extract.experts.ae import ConvAutoencoder, save_autoencoder

    ae = save_autoencoder(ConvAutoencoder(image_size=64, channels=(8, 16), latent_dim=16), tmp_path / "ae-x")
    root = "memory://n2n-tests/shards"
    invoke(extract_main, *EXTRACT, "--limit", 40, "--out", root)
    invoke(extract_main, "--expert", f"ae:{ae}", "--data", "shapes", "--limit", 40, "--num-workers", 0, "--out", root)
    invoke(extract_main, *EXTRACT, "--limit", 40, "--out", tmp_path / "local")
    same_store(f"{root}/shapes/minilm", tmp_path / "local/shapes/minilm")
    said = invoke(shards_main, "pair", f"{root}/shapes/minilm", f"{root}/shapes/ae-x", "--name", "t2i", "--root", root)
    assert "200 pairs" in said.output
    assert json.loads(as_path(f"{root}/t2i/view.json").read_text())["source"] == f"{root}/shapes/minilm"
    assert invoke(shards_main, "verify", f"{root}/t2i").output.strip() == "ok"
    for stream in ("--stream", "--no-stream"):
        invoke(train_main, "--shards", f"{root}/t2i", "--out", tmp_path / f"run{stream}", "--steps", 10,
               "--n-flows", 2, "--hidden-dim", 16, "--batch-size", 16, "--no-compile", "--eval-every", 10, stream)
        assert (tmp_path / f"run{stream}" / "checkpoint.safetensors").exists()


# ---------------------------------------------------------------- S3, through a local moto server


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on a free local port, a bucket, and the environment that points boto at it."""
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL_S3": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir("n2n-tests")
    yield {**os.environ, **env}
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    server.stop()


def test_extraction_to_s3_killed_mid_way_resumes_to_the_clean_store(s3_env, tmp_path, same_store):
    args = [*EXTRACT, "--limit", 160, "--commit-every", 0]
    invoke(extract_main, *args, "--out", tmp_path / "clean")
    out = "s3://n2n-tests/crashed"
    log = tmp_path / "extract.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "n2n.extract", *map(str, args), "--out", out], env=s3_env,
                                stdout=sink, stderr=subprocess.STDOUT)
    meta = as_path(f"{out}/shapes/minilm/meta.json")
    deadline = time.time() + 120
    count = 0
    while time.time() < deadline and proc.poll() is None:
        with contextlib.suppress(FileNotFoundError):
            count = json.loads(meta.fs.cat_file(meta.path))["count"]  # not cached: a fresh GET
        if count >= 200:
            break
        time.sleep(0.1)
    assert proc.poll() is None, f"the extraction ended before the kill:\n{log.read_text()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = json.loads(meta.fs.cat_file(meta.path))
    assert not committed["complete"] and committed["count"] >= 200, "the kill came too late"
    result = CliRunner().invoke(extract_main, [*map(str, args), "--out", out], catch_exceptions=False)
    assert result.exit_code == 0 and "resuming at item" in result.output, result.output
    same_store(tmp_path / "clean/shapes/minilm", f"{out}/shapes/minilm")
    assert verify_store(f"{out}/shapes/minilm") == []


def test_two_processes_extract_to_s3_as_one_does(s3_env, tmp_path, across_threads):
    """Parts at S3 URLs, their commit there, and the parts deleted: the store a one-process run writes."""
    args = [*EXTRACT, "--limit", 50]
    invoke(extract_main, *args, "--out", tmp_path / "one")
    done = subprocess.run([sys.executable, "-m", "n2n.extract", *map(str, args), "--out", "s3://n2n-tests/two",
                           "--nproc", "2"], env=s3_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    across_threads(tmp_path / "one/shapes/minilm", "s3://n2n-tests/two/shapes/minilm")
    folder = as_path("s3://n2n-tests/two/shapes")
    listed = folder.fs.ls(folder.path, refresh=True, detail=False)  # refresh: no cached listing
    assert [name.rsplit("/", 1)[-1] for name in listed] == ["minilm"]  # the parts are gone
